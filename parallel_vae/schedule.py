"""Which unit of work runs when, and where.

A unit is (tile, step): a whole tile for image and generic video plans (step 0), one latent
frame of one spatial tile for causal video.

In-process, one lane walks the plan tile by tile, and a causal tile through all of its frames
before the next tile starts: only one causal cache is alive at a time (the memory profile of
ComfyUI's own tiled decode), and every segment receives its tiles in plan order.

Across workers, scheduling is pull-based: an idle worker takes the largest tile still waiting, so
a slower device simply takes fewer tiles. A causal tile is a sticky lane: all of its frames are
decoded by one worker, where its causal cache lives.

Streaming wants frames in order instead ("frame" order): every tile of a frame before any tile of
the next, so a frame is finished as early as possible and the reorder buffer stays small. For
causal video this keeps every tile's cache alive at once (in-process), or splits the tiles into one
group per worker, each decoded frame by frame by that worker (``lane_groups``).
"""
from __future__ import annotations

from collections import Counter, defaultdict, deque
from dataclasses import dataclass
from typing import Iterator, Optional

from .plan import Plan, Tile

ORDERS = ("tile", "frame")


def in_process_order(plan: Plan, order: str = "tile") -> Iterator[tuple[Tile, int]]:
    if order == "frame":
        for batch in range(plan.batch):
            for step in range(plan.steps):
                for tile in plan.tiles_of(batch):
                    yield tile, step
        return
    for tile in plan.tiles:
        for step in range(plan.steps):
            yield tile, step


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


def lane_groups(plan: Plan, lanes: int) -> list[Group]:
    """Split each batch item's tiles into at most ``lanes`` groups of about equal volume (largest
    tile to the lightest group), each group in plan order; batch items in order (a stream emits
    them in order), the heaviest group first within one."""
    groups: list[Group] = []
    for batch in range(plan.batch):
        tiles = plan.tiles_of(batch)
        buckets: list[list[Tile]] = [[] for _ in range(max(1, min(lanes, len(tiles))))]
        load = [0] * len(buckets)
        for tile in sorted(tiles, key=lambda t: (-t.volume, t.index)):
            i = min(range(len(buckets)), key=lambda b: (load[b], b))
            buckets[i].append(tile)
            load[i] += tile.volume
        mine = [Group(tuple(sorted(b, key=lambda t: t.index))) for b in buckets if b]
        groups += sorted(mine, key=lambda g: (-g.volume, g.index))
    return groups


def largest_first(plan: Plan) -> list[Tile]:
    """Tiles by decreasing latent volume, plan order among equals (the big ones must not come last)."""
    return sorted(plan.tiles, key=lambda t: (-t.volume, t.index))


class TileQueue:
    """Tiles waiting for a worker, with bounded retries and per-tile excluded lanes."""

    def __init__(self, tiles: list[Tile], max_attempts: int = 3):
        self.waiting: deque[Tile] = deque(tiles)
        self.max_attempts = max_attempts
        self.attempts: Counter[int] = Counter()
        self.excluded: defaultdict[int, set[str]] = defaultdict(set)

    def __len__(self) -> int:
        return len(self.waiting)

    def take(self, lane: str) -> Optional[Tile]:
        for i, tile in enumerate(self.waiting):
            if lane not in self.excluded[tile.index]:
                del self.waiting[i]
                return tile
        return None

    def requeue(self, tile: Tile, lane: Optional[str] = None, exclude: bool = False) -> bool:
        """Put a tile back at the front; False when it has used up its attempts."""
        self.attempts[tile.index] += 1
        if self.attempts[tile.index] >= self.max_attempts:
            return False
        if exclude and lane is not None:
            self.excluded[tile.index].add(lane)
        self.waiting.appendleft(tile)
        return True

    def unrunnable(self, lanes: list[str]) -> list[Tile]:
        """Waiting tiles that every one of ``lanes`` is excluded from."""
        return [t for t in self.waiting if lanes and all(l in self.excluded[t.index] for l in lanes)]
