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
