#!/usr/bin/env python
"""One ``scoretune train`` epoch alone and beside k busy processes, with today's thread settings and the new.

For each config (the digits config ``configs/digits_trades_se.yaml`` and the base experiment of
``search_spaces/mnist5k.yaml``) one epoch runs as ``python -m scoretune.cli train CONFIG --set epochs=1
--no-mlflow`` in a fresh process, alone (k = 0) and beside k = 1 and 2 competitors (a Python busy loop each, or
with ``--competitor torch`` a one-thread torch matmul loop), under two settings:

* ``today``: ``SCORETUNE_THREADS=off`` (libgomp's default spin-then-sleep wait, torch's default thread count);
* ``new``: scoretune's thread policy (:mod:`scoretune.threads`: threads = the CPUs it may use, libgomp's spinning
  wait) with the thread governor (:mod:`scoretune.thread_governor`: in the engine's loops, torch's threads = the
  CPUs the other processes leave free);
* ``--variant NAME=VAR=VALUE[,VAR=VALUE]`` (repeatable) adds a setting: the policy with those variables set
  (e.g. ``spin10k=GOMP_SPINCOUNT=10000``, ``t1=OMP_NUM_THREADS=1``), measured in the same rounds. A variable set
  so is the user's and switches the governor off: ``passive=OMP_WAIT_POLICY=PASSIVE`` is the policy before the
  governor (passive wait, threads = the CPUs it may use).

Rounds interleave everything (per round: k = 0, 1, 2; within each k both settings, their order alternating from
round to round). The time is the epoch's own ``sec`` (the engine's ``epoch_time``: training and evaluation, not
the process start-up). Prints the machine and its load before and after, then per setting and config
``contention k=<k> <seconds> <alone> <ratio> <setting> <config>`` (medians over rounds; ratio = seconds /
alone of the same setting), ``idle_cost <alone> <today alone> <ratio> <setting> <config>`` (the cost on an
idle machine) and last ``contention_ratio <worst ratio at k=2 of the new settings>``. Goal: <= 2.0 on 2 cores
(a fair share), never asserted. Run it with the machine otherwise quiet:

    python benchmarks/contention.py --json contention.json          # 3 rounds, ~7 minutes on 2 cores
    python benchmarks/contention.py --variant passive=OMP_WAIT_POLICY=PASSIVE  # ~11 minutes
    python benchmarks/contention.py --quick                         # 1 round, digits only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import machine_info  # noqa: E402  (also puts platform/ on sys.path)
from scoretune import threads  # noqa: E402

SETTINGS = {"today": {threads.MARK_VAR: "off"}, "new": {}}
COMPETITORS = {
    "python": "while True: pass",
    "torch": "import torch\ntorch.set_num_threads(1)\na = torch.randn(256, 256)\nwhile True: a @ a",
}


def configs(work: Path, names: list[str]) -> dict[str, Path]:
    """The experiment files: the digits config, and mnist5k.yaml's base written out as a config."""
    out = {}
    if "digits" in names:
        out["digits"] = ROOT / "configs" / "digits_trades_se.yaml"
    if "mnist5k" in names:
        base = yaml.safe_load((ROOT / "search_spaces" / "mnist5k.yaml").read_text())["base"]
        path = work / "mnist5k_base.yaml"
        path.write_text(yaml.safe_dump({**base, "name": "mnist5k-base"}))
        out["mnist5k"] = path
    return out


def base_env() -> dict[str, str]:
    """This environment without any OpenMP or policy setting, scoretune's code first on the path."""
    drop = {*threads.WAIT_VARS, threads.COUNT_VAR, threads.MARK_VAR, "MKL_NUM_THREADS"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "platform"), str(ROOT), env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep)
    return env


def epoch_seconds(text: str) -> float | None:
    """The ``sec`` column of epoch 1 in the table ``scoretune train`` prints."""
    lines = text.splitlines()
    for i, line in enumerate(lines[:-1]):
        head = line.split()
        if head[:1] == ["epoch"] and head[-1:] == ["sec"]:
            row = lines[i + 1].split()
            try:
                return float(row[-1]) if row[:1] == ["1"] else None
            except ValueError:
                return None
    return None


def run_epoch(config: Path, env: dict[str, str], work: Path, timeout: float) -> tuple[float | None, float]:
    """(epoch seconds or None, process wall seconds) of one ``scoretune train`` epoch."""
    cmd = [sys.executable, "-m", "scoretune.cli", "train", str(config), "--set", "epochs=1", "--no-mlflow",
           "--set", f"output_dir={work / 'runs'}"]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, time.perf_counter() - t0
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(proc.stdout[-2000:], proc.stderr[-2000:], sep="\n", file=sys.stderr)
        return None, wall
    return epoch_seconds(proc.stdout), wall


class Competitors:
    """k busy processes (started here, ended here by their pids)."""

    def __init__(self, k: int, kind: str, env: dict[str, str]):
        self.procs = [subprocess.Popen([sys.executable, "-c", COMPETITORS[kind]], env={**env, "OMP_NUM_THREADS": "1"},
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(k)]
        if self.procs:
            time.sleep(1.0 if kind == "python" else 4.0)  # running, torch imported

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def median(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--configs", default="digits,mnist5k", help="comma-separated: digits, mnist5k")
    p.add_argument("--ks", default="1,2", help="competitor counts besides alone (comma-separated)")
    p.add_argument("--competitor", choices=sorted(COMPETITORS), default="python")
    p.add_argument("--timeout", type=float, default=240.0, help="seconds per epoch process before giving up")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=VAR=VALUE[,VAR=VALUE]",
                   help="another setting to measure in the same rounds (repeatable)")
    p.add_argument("--quick", action="store_true", help="1 round, digits only")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.configs = 1, "digits"
    ks = [0, *(int(k) for k in args.ks.split(",") if k.strip())]
    settings = dict(SETTINGS)
    for v in args.variant:
        name, _, assignments = v.partition("=")
        settings[name] = dict(a.split("=", 1) for a in assignments.split(","))
    env0 = base_env()
    info = machine_info()
    load0 = os.getloadavg()
    print(f"machine: {info}")
    print(f"load average at start: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}; competitor: {args.competitor}",
          flush=True)
    t_start = time.perf_counter()
    times: dict[tuple[str, str, int], list[float | None]] = {}
    walls: dict[tuple[str, str, int], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="contention-") as tmp:
        work = Path(tmp)
        cfgs = configs(work, args.configs.split(","))
        for r in range(args.rounds):
            for k in ks:
                order = list(settings) if (r + k) % 2 == 0 else list(settings)[::-1]
                with Competitors(k, args.competitor, env0):
                    for setting in order:
                        for name, path in cfgs.items():
                            sec, wall = run_epoch(path, {**env0, **settings[setting]}, work, args.timeout)
                            times.setdefault((setting, name, k), []).append(sec)
                            walls.setdefault((setting, name, k), []).append(wall)
                            shown = f"{sec:.1f} s" if sec is not None else "failed/timed out"
                            print(f"round {r + 1} k={k} {setting:5s} {name:8s} epoch {shown} (process {wall:.1f} s)",
                                  flush=True)
    load1 = os.getloadavg()
    print(f"load average at end: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}; "
          f"{time.perf_counter() - t_start:.0f} s in all")
    print()
    print("contention k=<k> <seconds> <alone> <ratio> <setting> <config>   (medians of the epoch seconds)")
    results, worst = [], None
    for setting in settings:
        for name in cfgs:
            alone = median(times[(setting, name, 0)])
            for k in ks[1:]:
                sec = median(times[(setting, name, k)])
                ratio = sec / alone if (sec is not None and alone) else None
                results.append({"setting": setting, "config": name, "k": k, "seconds": sec, "alone": alone,
                                "ratio": ratio})
                print(f"contention k={k} {_f(sec)} {_f(alone)} {_f(ratio, 2)} {setting} {name}")
                if setting == "new" and k == 2 and ratio is not None:
                    worst = ratio if worst is None else max(worst, ratio)
    for setting in list(settings)[1:]:
        for name in cfgs:
            new, today = median(times[(setting, name, 0)]), median(times[("today", name, 0)])
            print(f"idle_cost {_f(new)} {_f(today)} {_f(new / today if new and today else None, 3)} {setting} {name}")
    print(f"contention_ratio {_f(worst, 2)}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "settings": vars(args), "machine": info, "loadavg_start": load0, "loadavg_end": load1,
            "results": results,
            "epoch_seconds": {f"{s}/{n}/k={k}": v for (s, n, k), v in times.items()},
            "process_seconds": {f"{s}/{n}/k={k}": v for (s, n, k), v in walls.items()},
            "contention_ratio": worst}, indent=2))
        print(f"wrote {args.json}")
    return 0


def _f(x: float | None, digits: int = 1) -> str:
    return "nan" if x is None else f"{x:.{digits}f}"


if __name__ == "__main__":
    sys.exit(main())
