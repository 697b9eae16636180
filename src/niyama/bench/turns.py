"""Round-robin turns for work in threads, such as live capacity searches whose points should interleave in
time, so that a machine whose speed drifts treats each search alike."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager


class Turns:
    """Threads named in ``names`` take turns in that order, each turn one ``with turn(name):`` block; a
    thread that has no more turns to take must ``leave``, or the others wait for it forever."""

    def __init__(self, names: Iterable[str]):
        self._order = list(names)
        self._next = 0
        self._cond = threading.Condition()

    @contextmanager
    def turn(self, name: str) -> Iterator[None]:
        with self._cond:
            if name not in self._order:
                raise ValueError(f"{name!r} takes no turns here (turns: {', '.join(self._order) or 'none left'})")
            self._cond.wait_for(lambda: self._order[self._next] == name)
        try:
            yield
        finally:
            with self._cond:
                self._next = (self._next + 1) % len(self._order)
                self._cond.notify_all()

    def leave(self, name: str) -> None:
        with self._cond:
            i = self._order.index(name)
            del self._order[i]
            if i < self._next:
                self._next -= 1
            self._next = self._next % len(self._order) if self._order else 0
            self._cond.notify_all()
