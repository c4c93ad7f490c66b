"""Pull-based scheduling: largest tiles first, requeue at the front, bounded attempts, exclusions."""
from parallel_vae.plan import AxisScale, plan_image, settings_from_pixels
from parallel_vae.schedule import TileQueue, largest_first


def plan():
    settings = settings_from_pixels(96, 32, 64, 8, 8, None)
    return plan_image((1, 4, 21, 27), settings, AxisScale(8), 3)


def test_largest_first_is_by_volume_then_plan_order():
    p = plan()
    order = [g.tiles[0] for g in largest_first(p)]
    assert all(len(g.tiles) == 1 for g in largest_first(p))
    assert sorted(t.index for t in order) == [t.index for t in p.tiles]
    keys = [(-t.volume, t.index) for t in order]
    assert keys == sorted(keys)
    assert order[0].volume > order[-1].volume, "the plan has tiles of different sizes"


def test_queue_requeues_at_the_front_and_bounds_attempts():
    tiles = largest_first(plan())
    q = TileQueue(tiles, max_attempts=2)
    first = q.take("a")
    assert first is tiles[0]
    assert q.requeue(first) is True
    assert q.take("b") is first, "a requeued tile goes first"
    assert q.requeue(first) is False, "the second loss uses up its attempts"


def test_an_excluded_worker_skips_a_tile_and_unrunnable_reports_it():
    tiles = largest_first(plan())
    q = TileQueue(tiles)
    t = q.take("a")
    q.requeue(t, "a", exclude=True)
    assert q.take("a") is tiles[1], "worker a no longer gets the tile it ran out of memory on"
    assert q.unrunnable(["a"]) == [t] and q.unrunnable(["a", "b"]) == []
    assert q.take("b") is t


def test_time_windows_number_a_videos_temporal_tiles_in_plan_order_and_gate_the_queue():
    from parallel_vae import plan as P
    from parallel_vae.schedule import TileQueue, in_plan_order, time_windows

    plan = P.plan_video((2, 2, 9, 6, 6), P.TileSettings(4, 1, 4, 2),
                        (P.AxisScale(4, 3), P.AxisScale(2), P.AxisScale(2)), 3)
    windows = time_windows(plan)
    assert [windows[t.index] for t in plan.tiles] == sorted(windows.values())  # plan order is time order
    assert sorted(set(windows.values())) == list(range(8))  # 4 windows per item, items in order
    assert all(windows[t.index] == windows[u.index] for t in plan.tiles for u in plan.tiles
               if (t.batch, t.in_start[0]) == (u.batch, u.in_start[0]))
    queue = TileQueue(in_plan_order(plan))
    first = queue.take("cpu[0]", lambda g: windows[g.index] <= 0)
    assert first.index == 0
    taken = [queue.take("cpu[0]", lambda g: windows[g.index] <= 0) for _ in range(4)]
    assert [g.index for g in taken[:3]] == [1, 2, 3] and taken[3] is None  # window 1 must wait
