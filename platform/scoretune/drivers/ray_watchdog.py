"""Ends a local Ray when the process that started it dies, even by SIGKILL.

Ray's own fate-sharing ends the GCS and the raylet with their parent, but their agents (dashboard and
runtime-env agents, idle workers) notice only after minutes, re-parented and still listening. This
watchdog is started by :func:`scoretune.drivers.ray_session.ray_session` in its own session, with a pipe
from the driver on its stdin: when the pipe closes without the word ``done`` (the driver died), it sends
SIGTERM, then SIGKILL, to every process whose command line names the Ray session.

    python -m scoretune.drivers.ray_watchdog SESSION_NAME
"""

from __future__ import annotations

import os
import signal
import sys
import time


def session_pids(session_name: str, exclude: int | None = None) -> list[int]:
    """Processes whose command line mentions ``session_name`` (Ray passes its session dir to each)."""
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == exclude:
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if session_name in cmd:
            pids.append(int(d))
    return pids


def end_session(session_name: str, grace_s: float = 3.0) -> int:
    """SIGTERM every process of the session, SIGKILL what is left after ``grace_s``; how many there were."""
    me = os.getpid()
    pids = session_pids(session_name, exclude=me)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + grace_s
        while sig == signal.SIGTERM and time.monotonic() < deadline and session_pids(session_name, exclude=me):
            time.sleep(0.1)
        pids = session_pids(session_name, exclude=me)
        if not pids:
            break
    return len(pids)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not args[0].startswith("session_"):
        print("usage: python -m scoretune.drivers.ray_watchdog session_<name>", file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C meant for the driver is not ours
    said = sys.stdin.read()
    if "done" not in said:
        end_session(args[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
