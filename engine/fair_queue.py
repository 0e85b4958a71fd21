"""Fair queue across users: one user's five jobs do not hold up five other users.

Users take turns; a turn costs the job's weight (its number of images: a job of ``--n 4`` is
four images of GPU time), so a user who just had a grid of four waits while others get four
single images. Each waiting owner has a count of what it was served; ``pop`` serves the owner
with the least, and among equals the one waiting longest for its turn. A newcomer starts level
with the least-served owner waiting: it neither inherits a debt (a user whose grids have run
for an hour does not make a newcomer wait an hour) nor gets credit for time it was not there.
With every weight 1 this is round-robin.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class FairQueue(Generic[T]):
    def __init__(self, weight: Callable[[T], int] = lambda item: 1) -> None:
        self._weight = weight
        self._by_owner: dict[str, deque[T]] = {}
        self._served: dict[str, int] = {}  # owner -> images served while it kept waiting
        self._turn: dict[str, int] = {}  # owner -> when it went to the back (ties' order)
        self._clock = itertools.count()

    def push(self, owner: str, item: T) -> None:
        items = self._by_owner.get(owner)
        if items is None:
            self._served[owner] = min(self._served.values(), default=0)
            self._turn[owner] = next(self._clock)
            items = self._by_owner[owner] = deque()
        items.append(item)

    def pop(self) -> T | None:
        """The next item in fair order (``ordered()``'s first)."""
        return self.pop_first(lambda item: True)

    def pop_first(self, can_start: Callable[[T], bool]) -> T | None:
        """The first item in ``ordered()`` that ``can_start`` accepts, served as ``pop`` serves
        (its owner pays its weight). An item skipped (no free worker can run it yet) keeps its
        owner's place: it goes first once it can."""
        for owner, index, item in self._in_order():
            if can_start(item):
                items = self._by_owner[owner]
                del items[index]
                self._served[owner] += self._weight(item)
                self._turn[owner] = next(self._clock)  # to the back among equals
                if not items:
                    self._drop(owner)
                return item
        return None

    def remove(self, owner: str, item: T) -> bool:
        items = self._by_owner.get(owner)
        if not items or item not in items:
            return False
        items.remove(item)
        if not items:
            self._drop(owner)
        return True

    def _drop(self, owner: str) -> None:
        del self._by_owner[owner], self._served[owner], self._turn[owner]

    def ordered(self) -> Iterator[T]:
        """Items in the order ``pop`` would return them if nothing else arrived."""
        return (item for _, _, item in self._in_order())

    def _in_order(self) -> Iterator[tuple[str, int, T]]:
        """``ordered()`` with each item's owner and its index among the owner's items."""
        heap = [(self._served[o], self._turn[o], o) for o in self._by_owner]
        heapq.heapify(heap)
        taken = dict.fromkeys(self._by_owner, 0)
        tick = itertools.count(next(self._clock))  # later than every turn now recorded
        while heap:
            served, _, owner = heapq.heappop(heap)
            items = self._by_owner[owner]
            item = items[taken[owner]]
            taken[owner] += 1
            yield owner, taken[owner] - 1, item
            if taken[owner] < len(items):
                heapq.heappush(heap, (served + self._weight(item), next(tick), owner))

    def count(self, owner: str) -> int:
        return len(self._by_owner.get(owner, ()))

    def __len__(self) -> int:
        return sum(len(items) for items in self._by_owner.values())
