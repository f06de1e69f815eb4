"""Progress of a few long tasks run side by side (the end-of-search AutoAttack of the top-k models): a line as
each finishes (k/N, seconds since the start, the ones still running) and, while none finishes, a line every
``heartbeat_s`` seconds, so a phase of minutes never goes silent.

:func:`gather` waits on Ray object refs in completion order (``ray.wait``); the ``wait``/``get`` functions are
parameters, so the rule is tested without Ray.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass
class TaskProgress:
    """Prints ``<label> k/N finished: <name> (T s)...`` lines through ``out``."""

    label: str
    total: int
    out: Callable[[str], None]
    clock: Callable[[], float] = time.monotonic
    _start: float = field(default=0.0, init=False)
    _done: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self._start = self.clock()

    def _stamp(self) -> str:
        return f"[{time.strftime('%H:%M:%S')}]   {self.label}"

    def elapsed(self) -> float:
        return self.clock() - self._start

    def starting(self, name: str) -> None:
        """A task run in this process starts (nothing else prints until it ends)."""
        self.out(f"{self._stamp()} {self._done + 1}/{self.total}: {name} ... ({self.elapsed():.0f} s)")

    def finished(self, name: str, failed: bool, running: list[str]) -> None:
        self._done += 1
        left = f"; still running: {', '.join(running)}" if running else ""
        self.out(f"{self._stamp()} {self._done}/{self.total} {'failed' if failed else 'finished'}: {name} "
                 f"({self.elapsed():.0f} s){left}")

    def waiting(self, running: list[str]) -> None:
        self.out(f"{self._stamp()} {self._done}/{self.total} finished, still running: {', '.join(running)} "
                 f"({self.elapsed():.0f} s)")


def gather(refs: Mapping[str, Any], names: Mapping[str, str], progress: TaskProgress, *,
           wait: Callable[..., tuple[list[Any], list[Any]]] | None = None, get: Callable[[Any], Any] | None = None,
           heartbeat_s: float = 15.0) -> dict[str, Any]:
    """``{key: result, or the exception it raised}`` of ``refs`` (key -> Ray object ref), reporting each as it
    finishes and every ``heartbeat_s`` while none does. A Ray task error is unwrapped to its cause."""
    if wait is None or get is None:
        import ray

        wait, get = wait or ray.wait, get or ray.get
    pending = {ref: key for key, ref in refs.items()}
    outcomes: dict[str, Any] = {}
    while pending:
        done, _ = wait(list(pending), num_returns=1, timeout=heartbeat_s)
        if not done:
            progress.waiting([names[k] for k in pending.values()])
            continue
        key = pending.pop(done[0])
        try:
            outcomes[key] = get(done[0])
        except Exception as e:  # noqa: BLE001 - a RayTaskError: keep the cause
            outcomes[key] = getattr(e, "cause", None) or e
        progress.finished(names[key], isinstance(outcomes[key], BaseException), [names[k] for k in pending.values()])
    return outcomes
