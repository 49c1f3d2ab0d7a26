"""A delaying work queue of keys (what client-go's `workqueue` is to a controller).

The operator keeps one entry per FineTuneJob, not one task: watch events and the loop's own requeues
`add` a job's key with a delay; a fixed set of workers `get` the key that is due first, reconcile it
and say `done`. A key is never handed to two workers at once: added while a worker has it, it comes
back once that worker is done. Adding a key that is already waiting keeps the earlier of the two
times, so a burst of events costs one reconcile.

Pure asyncio, no Kubernetes: tests/test_workqueue.py covers it.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

Key = TypeVar("Key", bound=Hashable)


class WorkQueue(Generic[Key]):
    """Keys due at a time; `get` waits for the earliest due one that no worker holds."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._due: dict[Key, float] = {}  # waiting key -> when it is due
        self._heap: list[tuple[float, int, Key]] = []  # (due, order, key); stale entries skipped
        self._order = itertools.count()
        self._active: set[Key] = set()  # handed to a worker, not yet done
        self._again: dict[Key, float] = {}  # added while active: due time once done
        self._changed = asyncio.Event()

    def add(self, key: Key, delay: float = 0.0) -> None:
        """Have `key` reconciled `delay` seconds from now (or sooner, if it is already due sooner)."""
        due = self._clock() + max(0.0, delay)
        if key in self._active:
            self._again[key] = min(due, self._again.get(key, due))
            return
        current = self._due.get(key)
        if current is not None and current <= due:
            return
        self._due[key] = due
        heapq.heappush(self._heap, (due, next(self._order), key))
        if self._heap[0][2] == key:  # the earliest changed: wake the waiting workers
            self._changed.set()

    def forget(self, key: Key) -> None:
        """Drop `key` if it is waiting (a worker holding it keeps it until `done`)."""
        self._due.pop(key, None)
        self._again.pop(key, None)

    async def get(self) -> Key:
        """The earliest due key, once it is due; the caller must call `done(key)` after."""
        while True:
            self._drop_stale()
            wait: float | None = None
            if self._heap:
                due, _, key = self._heap[0]
                wait = due - self._clock()
                if wait <= 0:
                    heapq.heappop(self._heap)
                    del self._due[key]
                    self._active.add(key)
                    return key
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=wait)
            except TimeoutError:
                pass

    def done(self, key: Key, requeue: float | None = None) -> None:
        """The worker is finished with `key`; reconcile it again after `requeue` seconds (None: only
        when added again), or sooner if it was added while the worker had it."""
        self._active.discard(key)
        again = self._again.pop(key, None)
        if again is not None:
            self.add(key, max(0.0, again - self._clock()))
        if requeue is not None:
            self.add(key, requeue)

    def __len__(self) -> int:
        """Keys waiting or being worked on."""
        return len(self._due) + len(self._active - self._due.keys())

    def __contains__(self, key: object) -> bool:
        return key in self._due or key in self._active

    def _drop_stale(self) -> None:
        """Pop heap entries whose key was forgotten or re-added for another time."""
        while self._heap:
            due, _, key = self._heap[0]
            if self._due.get(key) == due:
                return
            heapq.heappop(self._heap)
