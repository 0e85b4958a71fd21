"""Round-robin queue across users: one user's five jobs do not hold up five other users."""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class FairQueue(Generic[T]):
    """Items are queued per owner; ``pop`` serves owners in turn, each owner's items in order.

    The owner just served goes to the back of the rotation; a new owner joins at the back.
    """

    def __init__(self) -> None:
        self._by_owner: OrderedDict[str, deque[T]] = OrderedDict()

    def push(self, owner: str, item: T) -> None:
        self._by_owner.setdefault(owner, deque()).append(item)

    def pop(self) -> T | None:
        for owner, items in self._by_owner.items():
            item = items.popleft()
            del self._by_owner[owner]
            if items:
                self._by_owner[owner] = items  # re-insert at the back of the rotation
            return item
        return None

    def remove(self, owner: str, item: T) -> bool:
        items = self._by_owner.get(owner)
        if not items or item not in items:
            return False
        items.remove(item)
        if not items:
            del self._by_owner[owner]
        return True

    def ordered(self) -> Iterator[T]:
        """Items in the order ``pop`` would return them if nothing else arrived."""
        queues = [list(items) for items in self._by_owner.values()]
        depth = max((len(q) for q in queues), default=0)
        for i in range(depth):
            for q in queues:
                if i < len(q):
                    yield q[i]

    def count(self, owner: str) -> int:
        return len(self._by_owner.get(owner, ()))

    def __len__(self) -> int:
        return sum(len(items) for items in self._by_owner.values())
