"""`Timeline`: an opt-in log of I/O and compute events, for traces you can look at.

Events are `(kind, name, start, end, args)` with times from `time.perf_counter()`; kinds used by the library:
`io` (an expert read from the checkpoint into a slot, or copied host -> device: args `layer`, `expert`, `bytes`,
`tier`, `speculative`), `compute` (one expert applied to its tokens: `layer`, `expert`, `tokens`), `stall` (the
forward waiting for a load: `layer`), `layer` (a whole MoE layer call: `layer`, `step`, `tokens`). Recording costs a
lock and an append per event and is off unless `enabled`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

__all__ = ["Timeline", "Event"]


@dataclass
class Event:
    kind: str
    name: str
    start: float
    end: float
    thread: str
    args: dict = field(default_factory=dict)


class Timeline:
    def __init__(self, enabled: bool = False):
        self.enabled = enabled
        self._events: list[Event] = []
        self._lock = threading.Lock()

    def record(self, kind: str, name: str, start: float, end: float, **args) -> None:
        if not self.enabled:
            return
        ev = Event(kind, name, start, end, threading.current_thread().name, args)
        with self._lock:
            self._events.append(ev)

    def events(self) -> list[Event]:
        with self._lock:
            return list(self._events)

    def clear(self) -> None:
        with self._lock:
            self._events.clear()
