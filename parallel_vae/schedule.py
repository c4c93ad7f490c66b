"""Which unit of work runs when, and where.

A unit is (tile, step): a whole tile for image and generic video plans (step 0), one latent
frame of one spatial tile for causal video. A group is the tiles one lane decodes together,
frame by frame across them (units.decode).

In-process, one lane walks the plan group by group: in "tile" order each tile alone, a causal tile
through all of its frames before the next tile starts (only one causal cache alive at a time: the
memory profile of ComfyUI's own tiled decode), and every segment receives its tiles in plan order.
Exact bands of one batch item are always one group (they exchange rows, or share the prefix).

Across workers, scheduling is pull-based: an idle worker takes the largest group still waiting,
so a slower device simply takes fewer tiles. A causal tile is decoded by one worker, where its
causal cache lives.

Streaming wants frames in order instead ("frame" order): every tile of a frame before any tile of
the next, so a frame is finished as early as possible and the reorder buffer stays small. For
causal video this keeps every tile's cache alive at once (in-process: one group per batch item),
or splits the tiles into one group per worker, each decoded frame by frame there
(``frame_groups``). A non-causal video's tiles go out in plan order (time-major), and no worker
starts a temporal window too far past the earliest one not yet delivered (``time_windows``): the
frames in flight, not the video's length, bound what the parent holds.
"""
from __future__ import annotations

from collections import Counter, defaultdict, deque
from dataclasses import dataclass
from typing import Optional

from .plan import CAUSAL, Plan, Tile


def in_process_groups(plan: Plan, order: str = "tile") -> list[tuple[int, ...]]:
    """The groups (tile indices) one lane decodes in turn, in plan order."""
    if plan.exact or (order == "frame" and plan.kind == CAUSAL):
        return [tuple(t.index for t in plan.tiles_of(b)) for b in range(plan.batch)]
    return [(t.index,) for t in plan.tiles]


@dataclass(frozen=True)
class Group:
    """Tiles one worker decodes together, frame by frame, keeping each tile's causal cache."""

    tiles: tuple[Tile, ...]

    @property
    def index(self) -> int:  # the queue's key: tiles belong to one group, so the first one names it
        return self.tiles[0].index

    @property
    def volume(self) -> int:
        return sum(t.volume for t in self.tiles)


def frame_groups(plan: Plan, workers: int) -> list[Group]:
    """Split each batch item's tiles into at most ``workers`` groups of about equal volume (largest
    tile to the lightest group), each group in plan order; batch items in order (a stream emits
    them in order), the heaviest group first within one."""
    groups: list[Group] = []
    for batch in range(plan.batch):
        tiles = plan.tiles_of(batch)
        buckets: list[list[Tile]] = [[] for _ in range(max(1, min(workers, len(tiles))))]
        load = [0] * len(buckets)
        for tile in sorted(tiles, key=lambda t: (-t.volume, t.index)):
            i = min(range(len(buckets)), key=lambda b: (load[b], b))
            buckets[i].append(tile)
            load[i] += tile.volume
        mine = [Group(tuple(sorted(b, key=lambda t: t.index))) for b in buckets if b]
        groups += sorted(mine, key=lambda g: (-g.volume, g.index))
    return groups


def in_plan_order(plan: Plan) -> list[Group]:
    """One group per tile in plan order: for a non-causal video, time-major (ComfyUI's grid), so
    its frames finish from the first on."""
    return [Group((t,)) for t in plan.tiles]


def time_windows(plan: Plan) -> dict[int, int]:
    """Each tile's temporal window, numbered in plan order across batch items (tiles that start at
    the same latent frame of the same item share one)."""
    starts = sorted({(t.batch, t.in_start[0]) for t in plan.tiles})
    rank = {key: i for i, key in enumerate(starts)}
    return {t.index: rank[(t.batch, t.in_start[0])] for t in plan.tiles}


def largest_first(plan: Plan) -> list[Group]:
    """One group per tile, by decreasing latent volume, plan order among equals (the big ones
    must not come last)."""
    return [Group((t,)) for t in sorted(plan.tiles, key=lambda t: (-t.volume, t.index))]


class TileQueue:
    """Groups waiting for a worker, with bounded retries and per-group excluded workers (named by
    their lane)."""

    def __init__(self, groups: list[Group], max_attempts: int = 3):
        self.waiting: deque[Group] = deque(groups)
        self.max_attempts = max_attempts
        self.attempts: Counter[int] = Counter()
        self.excluded: defaultdict[int, set[str]] = defaultdict(set)

    def take(self, worker: str, may_start=lambda group: True) -> Optional[Group]:
        """The first waiting group ``worker`` is not excluded from and ``may_start`` allows."""
        for i, group in enumerate(self.waiting):
            if worker not in self.excluded[group.index] and may_start(group):
                del self.waiting[i]
                return group
        return None

    def requeue(self, group: Group, worker: Optional[str] = None, exclude: bool = False) -> bool:
        """Put a group back at the front; False when it has used up its attempts."""
        self.attempts[group.index] += 1
        if self.attempts[group.index] >= self.max_attempts:
            return False
        if exclude and worker is not None:
            self.excluded[group.index].add(worker)
        self.waiting.appendleft(group)
        return True

    def unrunnable(self, workers: list[str]) -> list[Group]:
        """Waiting groups that every one of ``workers`` is excluded from."""
        return [g for g in self.waiting if workers and all(w in self.excluded[g.index] for w in workers)]
