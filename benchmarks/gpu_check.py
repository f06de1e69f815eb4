#!/usr/bin/env python
"""The first hour on a GPU, prepared: everything ``benchmarks/gpu_check.sh`` runs, into one JSON file.

Steps (each a subprocess with its own time limit, so one that hangs cannot take the others with it):

1. ``pytest -m cuda tests/test_cuda.py``: bf16 autocast, channels_last, ``use_gpu`` Ray Train with one
   worker, AutoAttack on CUDA (they skip without CUDA: the dry run checks they collect and skip cleanly);
2. ``benchmarks/step_throughput.py --device cuda`` on PreActResNet-18 and WRN-28-10 at batch 512 with
   ``--ablations --compile`` (TRADES-SE, 3 interleaved rounds, to fit the budget): images/s, the ratio to the fp32 reference, the fraction of the bf16 peak;
   goals: >= 2x the reference and >= 35% of the bf16 peak on WRN-28-10;
3. a 3-epoch training on CIFAR-shaped synthetic 32x32 data (written as CIFAR-10 python pickles)
   through ``scoretune train`` with ``device: cuda``, logged to an MLflow store under the output folder.

``--dry-run`` runs the same steps on the CPU with tiny sizes (small CNN, batch 8, one round, no
``--compile``, 20 images a batch file) so CI keeps the script from rotting; its numbers mean nothing.
Output: ``OUT/gpu_check.json`` (``OUT`` = ``--out``, else ``$OUT``, else ``./gpu_check_out``); exit
status 0 when every step ran and passed (goals missed are reported, not failures).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Time limits (s) add up to the 8-minute budget on one GPU; the dry run's are for a loaded CI machine.
REAL = {"device": "cuda", "models": "preact_resnet18,wrn-28-10", "batch": 512, "repeats": 3,
        "step_extra": ["--ablations", "--compile", "--objectives", "trades_se"], "train_model": "preact_resnet18",
        "per_batch": 1000, "train_batch": 256, "limits": {"tests": 120, "step": 270, "train": 90}}
DRY = {"device": "cpu", "models": "small_cnn", "batch": 8, "repeats": 1,
       "step_extra": ["--ablations", "--threads", "1", "--objectives", "trades_se"], "train_model": "small_cnn",
       "per_batch": 10, "train_batch": 16, "limits": {"tests": 300, "step": 300, "train": 300}}
GOAL_RATIO, GOAL_PEAK = 2.0, 0.35


def run_step(name: str, cmd: list[str], limit: float, out_dir: Path, env: dict[str, str]) -> dict:
    """Run ``cmd``; its output goes to ``OUT/<name>.log``. Returns rc, seconds and the log's tail."""
    log = out_dir / f"{name}.log"
    t0 = time.perf_counter()
    print(f"gpu_check: {name}: {shlex.join(cmd)}", flush=True)
    try:
        with open(log, "w") as f:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=limit).returncode
    except subprocess.TimeoutExpired:
        rc = 124
    seconds = time.perf_counter() - t0
    tail = log.read_text(errors="replace").splitlines()[-15:]
    print(f"gpu_check: {name}: rc {rc} in {seconds:.1f} s" + (f" (time limit {limit:.0f} s)" if rc == 124 else ""),
          flush=True)
    return {"cmd": cmd, "rc": rc, "seconds": round(seconds, 1), "log": str(log), "tail": tail}


def write_synthetic_cifar(d: Path, per_batch: int, seed: int = 0) -> Path:
    """CIFAR-10-shaped random data in the python-pickle layout (data_batch_1..5, test_batch)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=per_batch).tolist()
        with open(d / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels}, f)
    return d


def pytest_counts(xml: Path) -> dict:
    import xml.etree.ElementTree as ET

    try:
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        keys = ("tests", "failures", "errors", "skipped")
        return {k: int(suite.get(k, 0)) for k in keys}
    except (OSError, ET.ParseError, AttributeError):
        return {}


def step_summary(path: Path) -> list[dict]:
    """One line per measurement of step_throughput's JSON: images/s, ratio, peak fraction."""
    try:
        rows = json.loads(path.read_text())["results"]
    except (OSError, ValueError, KeyError):
        return []
    keys = ("name", "model", "variant", "ours_img_per_s", "ref_img_per_s", "ratio", "ours_tflop_per_s",
            "ours_peak_fraction", "compile_s", "fp32_loss_diff")
    return [{k: r.get(k) for k in keys} for r in rows]


def goals(rows: list[dict]) -> dict:
    wrn = [r for r in rows if r["model"] == "wrn-28-10" and r["variant"] in ("ours", "ours+compile")]
    if not wrn:
        return {"wrn_28_10": None}
    best = max(wrn, key=lambda r: r["ratio"])
    peak = best.get("ours_peak_fraction")
    return {"wrn_28_10": {"variant": best["variant"], "ratio": best["ratio"], "peak_fraction": peak,
                          "ratio_goal_met": best["ratio"] >= GOAL_RATIO,
                          "peak_goal_met": peak is not None and peak >= GOAL_PEAK}}


def train_summary(tracking_uri: str, experiment: str) -> dict:
    try:
        from mlflow.tracking import MlflowClient

        cl = MlflowClient(tracking_uri=tracking_uri)
        exp = cl.get_experiment_by_name(experiment)
        run = cl.search_runs([exp.experiment_id], max_results=1)[0]
        m = run.data.metrics
        return {"run_id": run.info.run_id, "status": run.info.status, "epoch": m.get("epoch"),
                "train_loss": m.get("train_loss"), "val_pgd_acc": m.get("val_pgd_acc"),
                "epoch_time": m.get("epoch_time"), "device": run.data.params.get("device")}
    except Exception as e:  # the step's rc already says it failed; keep why the summary is missing
        return {"error": f"{type(e).__name__}: {e}"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="the same steps on CPU with tiny sizes (CI)")
    p.add_argument("--out", default=None, help="output folder (default: $OUT, else ./gpu_check_out)")
    p.add_argument("--skip", default="", help="comma-separated steps to leave out: tests, step, train")
    args = p.parse_args(argv)
    prof = DRY if args.dry_run else REAL
    out = Path(args.out or os.environ.get("OUT") or "gpu_check_out").absolute()
    out.mkdir(parents=True, exist_ok=True)
    skip = {s for s in args.skip.split(",") if s}
    py = sys.executable
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "platform"), str(ROOT),
                                                       os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    report: dict = {"dry_run": args.dry_run, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "loadavg_start": os.getloadavg(), "steps": {}}
    try:
        import torch

        report["torch"] = torch.__version__
        report["cuda_available"] = torch.cuda.is_available()
        report["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception as e:
        report["torch"] = f"unavailable: {e}"
    if not args.dry_run and not report.get("cuda_available"):
        print("gpu_check: no CUDA device visible to torch; run it on a GPU machine, or pass --dry-run", file=sys.stderr)
        return 2
    t_all = time.perf_counter()
    if "tests" not in skip:
        xml = out / "cuda_tests.xml"
        r = run_step("tests", [py, "-m", "pytest", "-q", "-m", "cuda", "tests/test_cuda.py", "-p", "no:cacheprovider",
                               "-n", "0",
                               f"--junitxml={xml}"], prof["limits"]["tests"], out, env)
        r["counts"] = pytest_counts(xml)
        r["ok"] = r["rc"] == 0 and r["counts"].get("tests", 0) > 0
        report["steps"]["tests"] = r
    if "step" not in skip:
        sj = out / "step_throughput.json"
        r = run_step("step", [py, "benchmarks/step_throughput.py", "--device", prof["device"], "--models", prof["models"],
                              "--batch-size", str(prof["batch"]), "--repeats", str(prof["repeats"]),
                              *prof["step_extra"], "--json", str(sj)], prof["limits"]["step"], out, env)
        r["results"] = step_summary(sj)
        r["goals"] = goals(r["results"])
        r["ok"] = r["rc"] == 0 and bool(r["results"])
        report["steps"]["step"] = r
    if "train" not in skip:
        data = write_synthetic_cifar(out / "data" / "cifar-10-batches-py", prof["per_batch"])
        cfg = out / "train_cifar_synthetic.yaml"
        cfg.write_text(json.dumps({  # JSON is YAML
            "name": "gpu-check-train", "data": {"name": "cifar10", "root": str(data.parent), "val_size": 0.1},
            "model": {"name": prof["train_model"]}, "objective": {"method": "trades", "loss": "se", "beta": 6.0},
            "attack": {"eps": 8 / 255, "norm": "linf", "steps": 10 if not args.dry_run else 2,
                       "step_size": 2 / 255},
            "eval": {"pgd_steps": 10 if not args.dry_run else 2, "test": False},
            "optim": {"lr": 0.1}, "epochs": 3, "batch_size": prof["train_batch"], "device": prof["device"],
            "seed": 0, "output_dir": str(out / "train_runs"),
        }, indent=2))
        uri = f"sqlite:///{out / 'mlflow.db'}"
        r = run_step("train", [py, "-m", "scoretune.cli", "train", str(cfg), "--tracking-uri", uri],
                     prof["limits"]["train"], out, env)
        r["summary"] = train_summary(uri, "gpu-check-train")
        r["ok"] = r["rc"] == 0 and r["summary"].get("epoch") == 3.0
        report["steps"]["train"] = r
    report["seconds"] = round(time.perf_counter() - t_all, 1)
    report["loadavg_end"] = os.getloadavg()
    report["ok"] = all(s.get("ok") for s in report["steps"].values())
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    for name, s in report["steps"].items():
        print(f"gpu_check: {name}: {'ok' if s.get('ok') else 'FAILED'} ({s['seconds']} s)")
    g = report["steps"].get("step", {}).get("goals", {}).get("wrn_28_10")
    if g:
        print(f"gpu_check: WRN-28-10 {g['variant']}: {g['ratio']:.2f}x the fp32 reference (goal {GOAL_RATIO}x), "
              + (f"{g['peak_fraction']:.1%} of the bf16 peak (goal {GOAL_PEAK:.0%})" if g["peak_fraction"] else
                 "bf16 peak unknown for this GPU"))
    print(f"gpu_check: {'ok' if report['ok'] else 'FAILED'} in {report['seconds']} s; report: {out / 'gpu_check.json'}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
