#!/usr/bin/env python
"""The quickstart's wall time, end to end and split into setup / trials / AutoAttack / finalize.

Runs ``scoretune search SPACE`` (default ``search_spaces/quickstart.yaml``, a fresh Ray, a fresh
MLflow store and results folder in a temporary directory) under ``/usr/bin/time -v``, stamps every
output line with the time it arrived, and splits the run at the lines the search prints:

* setup: start until the first trial starts (Ray start-up, the dataset check, the parent run);
* trials: until the first ``logged model of trial`` line (the last trial ended);
* AutoAttack: from the models' ``AutoAttack ... of N models in parallel`` line to the last result line
  (or, for the sequential AutoAttack of older versions, the sum of each model's attack);
* finalize: the rest (model logging, plots, the parent run's summary, the results table).

    nice -n 10 python benchmarks/quickstart_time.py --json out.json [-- --set num_samples=4]

Prints the split, the peak RSS and CPU from ``time -v``, the load average, and the best trial's
validation PGD accuracy (the search quality to keep). Wall times depend on the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def split_phases(lines: list[tuple[float, str]], t_end: float) -> dict[str, float | None]:
    """Seconds of setup / trials / autoattack / finalize from ``(arrival time, line)`` pairs."""
    t0 = lines[0][0] if lines else t_end

    def first(pattern: str) -> float | None:
        return next((t for t, ln in lines if re.search(pattern, ln)), None)

    t_start = first(r"\]\s+start\s")
    t_models = first(r"^logged model of trial|^could not log the model")
    aa = 0.0
    stamp = r"^(\[[\d:]+\] )?"  # the search stamps its AutoAttack lines with the time of day
    t_par = first(stamp + r"AutoAttack \(.*models in parallel")
    if t_par is not None:
        aa_lines = [t for t, ln in lines if re.match(stamp + r"\s+trial \S+: (aa_acc=|failed)", ln)]
        aa = (max(aa_lines) - t_par) if aa_lines else 0.0
    else:  # sequential: each "logged model" line is followed by its "  AutoAttack" result line
        prev = None
        for t, ln in lines:
            if ln.startswith("logged model of trial"):
                prev = t
            elif ln.startswith("  AutoAttack (") and prev is not None:
                aa += t - prev
                prev = None
    setup = (t_start - t0) if t_start else None
    trials = (t_models - t_start) if (t_models and t_start) else None
    total = t_end - t0
    finalize = (t_end - t_models - aa) if t_models else None
    return {"total": total, "setup": setup, "trials": trials, "autoattack": aa, "finalize": finalize}


def parse_time_v(text: str) -> dict[str, str]:
    keys = {"Elapsed (wall clock) time": "wall", "User time (seconds)": "user_s", "System time (seconds)": "sys_s",
            "Maximum resident set size (kbytes)": "max_rss_kb", "Percent of CPU this job got": "cpu_percent"}
    out = {}
    for ln in text.splitlines():
        k, _, v = ln.strip().partition(": ")
        if k in keys:
            out[keys[k]] = v.strip()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--space", default=str(ROOT / "search_spaces" / "quickstart.yaml"))
    p.add_argument("--json", dest="json_out", default=None)
    p.add_argument("--log", default=None, help="keep the stamped output here")
    p.add_argument("extra", nargs="*", help="more arguments for scoretune search (after --)")
    args = p.parse_args(argv)
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="quickstart-time-") as work:
        time_file = Path(work) / "time.txt"
        cmd = ["/usr/bin/time", "-v", "-o", str(time_file), sys.executable, "-m", "scoretune.cli", "search", args.space,
               "--tracking-uri", f"sqlite:///{work}/mlflow.db", "--set", f"storage_path={work}/ray_results",
               *args.extra]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "platform"), str(ROOT),
                                                           os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        lines: list[tuple[float, str]] = []
        t_launch = time.time()
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for ln in proc.stdout:
            lines.append((time.time(), ln.rstrip("\n")))
            print(ln, end="", flush=True)
        rc = proc.wait()
        t_end = time.time()
        tv = parse_time_v(time_file.read_text()) if time_file.exists() else {}
    phases = split_phases([(t_launch, "")] + lines, t_end)
    best = None
    for _, ln in lines:
        m = re.search(r"\]\s+best\s+\S+\s+val_pgd_acc=([0-9.]+)", ln)
        if m:
            best = float(m.group(1))
    report = {"rc": rc, "phases_s": phases, "time_v": tv, "loadavg_start": load0, "loadavg_end": os.getloadavg(),
              "best_val_pgd_acc": best, "cmd": cmd}
    if args.log:
        Path(args.log).write_text("\n".join(f"{t - t_launch:8.2f} {ln}" for t, ln in lines) + "\n")
    print("quickstart_time: " + ", ".join(f"{k} {v:.1f} s" if v is not None else f"{k} ?" for k, v in phases.items())
          + f"; best val_pgd_acc {best}; max RSS {tv.get('max_rss_kb', '?')} kB; CPU {tv.get('cpu_percent', '?')}"
          + f"; load {load0[0]:.1f} -> {report['loadavg_end'][0]:.1f}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2))
    return rc


if __name__ == "__main__":
    sys.exit(main())
