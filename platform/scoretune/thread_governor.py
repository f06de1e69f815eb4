"""Torch's intra-op threads sized, while the engine runs, to the CPUs other processes leave free.

libgomp's idle threads spin before they sleep: the fastest wait on a free machine, and the slowest beside
busy processes, whose cores the spinning threads take. So the thread policy (:mod:`scoretune.threads`) keeps
the spinning wait, and the engine's loops call :meth:`ThreadGovernor.tick`, which every ``interval`` reads how
busy the other processes kept this process's CPUs (``/proc/stat`` less this process's own CPU time) and sets
``torch.set_num_threads`` to the CPUs they leave free: one thread (no OpenMP team, nothing spins) when the
machine is busy, up to the process's budget when it is free. Used as a context manager around a loop, the
governor puts the budget back when the loop ends. It does nothing where the user fixed the threads or the
wait (:func:`governable`), on a non-CPU device, with a budget of one thread, or without ``/proc/stat``.

Torch's CPU results depend on the thread count in the last bits (the float summation order), so a run the
governor resized is not bit-for-bit repeatable; fixing ``OMP_NUM_THREADS`` makes it so.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from . import threads

HEADROOM = 0.5
"""The share of a CPU the other processes must leave free for it to get a thread."""
INTERVAL = 0.5
"""Seconds between two samples of the CPU load."""


def threads_for(others_busy_cpus: float, cpus: int, max_threads: int) -> int:
    """Threads for a process that may run on ``cpus`` CPUs of which other processes keep
    ``others_busy_cpus`` busy: one per CPU that is at least :data:`HEADROOM` free, from 1 to ``max_threads``."""
    free = cpus - max(0.0, others_busy_cpus)
    return max(1, min(max_threads, math.ceil(free - HEADROOM)))


def governable(env: Mapping[str, str] | None = None) -> bool:
    """True when the thread policy is on and the user set no OpenMP thread count or wait setting."""
    env = os.environ if env is None else env
    return env.get(threads.MARK_VAR, "").strip().lower() != "off" and not threads.user_settings(env)


def read_cpu_jiffies(path: str | Path = "/proc/stat", cpus: set[int] | None = None) -> tuple[int, int] | None:
    """(busy, total) clock ticks since boot of the CPUs ``cpus`` (None: the aggregate ``cpu`` line) from
    ``/proc/stat``; busy counts user, nice, system, irq, softirq and steal, total adds idle and iowait.
    None when the file is missing or unreadable."""
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    busy = total = 0
    found = False
    for line in text.splitlines():
        name, *fields = line.split()
        if not name.startswith("cpu") or len(fields) < 5:
            continue
        if (name != "cpu") if cpus is None else not (name[3:].isdigit() and int(name[3:]) in cpus):
            continue
        user, nice, system, idle, iowait, *rest = (int(f) for f in fields[:8])
        b = user + nice + system + sum(rest)  # rest: irq, softirq, steal (guest is inside user)
        busy, total, found = busy + b, total + b + idle + iowait, True
    return (busy, total) if found else None


class OthersLoad:
    """Callable: the CPUs other processes kept busy since the previous call (None on the first call or
    when ``/proc/stat`` cannot be read): the busy time of this process's CPUs less its own CPU time, over
    the wall time."""

    def __init__(self, path: str | Path = "/proc/stat", cpus: set[int] | None = None, *,
                 clock: Callable[[], float] = time.monotonic, own_cpu: Callable[[], float] = time.process_time,
                 ticks_per_second: float | None = None):
        self.path, self.cpus, self.clock, self.own_cpu = path, cpus, clock, own_cpu
        self.hz = ticks_per_second or (os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100)
        self.last: tuple[float, float, int] | None = None

    def __call__(self) -> float | None:
        jiffies = read_cpu_jiffies(self.path, self.cpus)
        now, own = self.clock(), self.own_cpu()
        if jiffies is None:
            self.last = None
            return None
        last, self.last = self.last, (now, own, jiffies[0])
        if last is None or now <= last[0]:
            return None
        busy = (jiffies[0] - last[2]) / self.hz
        return max(0.0, (busy - (own - last[1])) / (now - last[0]))


class ThreadGovernor:
    """Sizes torch's threads to the free CPUs (:func:`threads_for`) every ``interval`` seconds of
    :meth:`tick`; between samples a tick is one clock read. ``with governor:`` around a loop applies
    the last decision on entry and puts ``max_threads`` back on exit. Inert (ticks do nothing) unless
    ``max_threads`` > 1, ``device`` is a CPU, :func:`governable` holds for ``env`` and the load can be read.
    ``others`` (tests): a callable like :class:`OthersLoad`."""

    def __init__(self, max_threads: int, device: torch.device | str = "cpu", *, interval: float = INTERVAL,
                 env: Mapping[str, str] | None = None, others: Callable[[], float | None] | None = None,
                 cpus: int | None = None, clock: Callable[[], float] = time.monotonic):
        self.max_threads, self.interval, self.clock = int(max_threads), interval, clock
        self.cpus = cpus or threads.affinity_cpus()
        self.threads = self.max_threads
        self.next = 0.0
        self.active = (self.max_threads > 1 and torch.device(device).type == "cpu" and governable(env))
        if self.active and others is None:
            others = OthersLoad(cpus=set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None)
            others()  # the first sample
            self.active = others.last is not None  # /proc/stat is readable
        self.others = others
        if self.active:
            self.next = self.clock() + self.interval

    def tick(self) -> None:
        """Resize torch's threads when ``interval`` has passed since the last sample and the count changes."""
        if not self.active:
            return
        now = self.clock()
        if now < self.next:
            return
        self.next = now + self.interval
        others = self.others()
        if others is not None:
            self.threads = threads_for(others, self.cpus, self.max_threads)
            self._set(self.threads)

    def _set(self, n: int) -> None:
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)

    def __enter__(self) -> None:
        if self.active:
            self._set(self.threads)
            self.tick()

    def __exit__(self, *exc: object) -> None:
        if self.active:
            self._set(self.max_threads)


INERT = ThreadGovernor(1)
"""A governor that does nothing (the engine's default)."""


class Governed(nn.Module):
    """``model`` with a :meth:`ThreadGovernor.tick` before every forward: for attacks that loop over a model
    outside the engine (AutoAttack). Never exported or saved."""

    def __init__(self, model: nn.Module, governor: ThreadGovernor):
        super().__init__()
        self.model, self.governor = model, governor

    def forward(self, *args, **kwargs):
        self.governor.tick()
        return self.model(*args, **kwargs)
