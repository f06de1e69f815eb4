#!/usr/bin/env python
"""Wall-time overhead of ``scoretune search`` (Ray Tune + Optuna + MLflow) over a plain training loop.

N identical ~30 s trainings (default 4 x 25 epochs; digits, small CNN, TRADES-SE, fixed hyper-parameters: the
space searches ``lr: {choice: [<one value>]}``, so every trial is the same experiment) are run

* ours: through :func:`scoretune.search.run_search` with ``max_concurrent: 1`` (one trial at a time,
  so it compares to a serial loop), random sampler, no scheduler, no stopper, MLflow on a fresh
  sqlite store, the search's end-of-run work (statuses, plots) included; by default ``top_k: 0`` and
  no AutoAttack, because logging the best models and AutoAttacking them is extra work the loop does
  not do (``--top-k 3 --autoattack fast`` measures it: it shows up in the ``finalize`` phase);
* reference: the same experiments in a plain in-process loop: ``Trainer(cfg)`` and
  ``train_one_epoch()`` per epoch, no Ray, no MLflow, no checkpoints.

Both use one torch thread per training (a search trial sets ``torch.set_num_threads(cpus)``, 1 here).
The summary lines (``name ours reference ratio``) are the wall times and the overhead fraction
``ours / reference - 1``, with Ray's start-up counted (``overhead_cold``: what ``scoretune search``
costs from a shell) and not counted (``overhead_warm``: Ray already running). Goal: <= 10% (printed,
never asserted). With ``--repeats R`` the two are alternated R times and the medians are reported.

    python benchmarks/overhead.py --json overhead.json
    python benchmarks/overhead.py --trials 8 --epochs 30 --repeats 3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import machine_info  # noqa: E402  (also puts platform/ on sys.path)


def space_raw(args: argparse.Namespace, storage: Path) -> dict[str, Any]:
    """A search space whose every trial is the same experiment (``lr`` is a choice of one value)."""
    return {
        "name": "overhead",
        "base": {
            "data": {"name": "digits", "val_size": 0.1},
            "model": {"name": "small_cnn"},
            "objective": {"method": "trades", "loss": "se", "beta": 6.0},
            "attack": {"eps": 0.2, "norm": "linf", "steps": args.attack_steps},
            "eval": {"pgd_steps": args.pgd_steps, "test": False},
            "optim": {"name": "sgd", "lr": args.lr, "momentum": 0.9, "weight_decay": 5.0e-4, "schedule": "cosine"},
            "epochs": args.epochs,
            "batch_size": 64,
            "device": "cpu",
            "seed": 0,
        },
        "params": {"lr": {"choice": [args.lr]}},
        "objective": {"metric": "val_pgd_acc", "mode": "max"},
        "num_samples": args.trials,
        "max_concurrent": 1,
        "resources": {"workers": 1, "cpus": 1, "gpus": 0},
        "sampler": {"type": "random"},
        "scheduler": {"type": "none"},
        "storage_path": str(storage),
        "top_k": args.top_k,
        **autoattack_setting(args.autoattack),
    }


def autoattack_setting(version: str) -> dict[str, Any]:
    """``{"autoattack": {"version": version}}`` where the search space has the end-of-search AutoAttack
    of the top-k models (newer scoretune), else nothing."""
    from scoretune.search.space import SearchSpace

    return {"autoattack": {"version": version}} if "autoattack" in SearchSpace.model_fields else {}


def plain_loop(space: Any, trials: int, threads: int) -> float:
    """Seconds to train the space's experiment ``trials`` times with ``Trainer`` in this process."""
    import torch

    from scoretune.engine import Trainer

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t0 = time.perf_counter()
        for i in range(trials):
            cfg = space.experiment_config({"lr": space.params["lr"].choice[0]}, name=f"plain-{i}")
            trainer = Trainer(cfg)
            while trainer.epoch < cfg.epochs:
                trainer.train_one_epoch()
        return time.perf_counter() - t0
    finally:
        torch.set_num_threads(old)


def search_once(space: Any, name: str, uri: str) -> tuple[float, dict[str, float]]:
    """Seconds of one ``run_search`` (Ray already up) and where they went: ``setup`` (until the first
    trial starts), ``trials`` (first start to last completion), ``finalize`` (after the last trial:
    MLflow statuses, top-k models, plots), from the times the search's progress lines arrive."""
    from scoretune.search import run_search

    marks: list[tuple[float, str]] = []
    t0 = time.perf_counter()
    summary = run_search(space, name=name, tracking_uri=uri, out=lambda s: marks.append((time.perf_counter(), s)))
    end = time.perf_counter()
    counts = summary.counts() if summary is not None else {}
    if counts.get("completed", 0) != space.total_samples:
        raise SystemExit(f"the search did not complete every trial ({counts}); see {summary and summary.ray_path}")
    starts = [t for t, s in marks if "] start " in s]
    ends = [t for t, s in marks if "] completed " in s]
    phases = {}
    if starts and ends:
        phases = {"setup": starts[0] - t0, "trials": ends[-1] - starts[0], "finalize": end - ends[-1]}
    return end - t0, phases


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=4, help="identical trainings (default 4)")
    ap.add_argument("--epochs", type=int, default=25,
                    help="epochs per training (default 25: a ~30 s training on one idle core)")
    ap.add_argument("--attack-steps", type=int, default=3, help="training PGD steps (default 3)")
    ap.add_argument("--pgd-steps", type=int, default=5, help="validation PGD steps (default 5)")
    ap.add_argument("--lr", type=float, default=0.2, help="the fixed learning rate (default 0.2)")
    ap.add_argument("--top-k", type=int, default=0,
                    help="trials whose models the search logs (and AutoAttacks) at the end (default 0: only the "
                         "trainings are compared; the spaces' default is 3)")
    ap.add_argument("--autoattack", default="none", choices=("none", "fast", "standard"),
                    help="end-of-search AutoAttack of the top-k models (default none)")
    ap.add_argument("--repeats", type=int, default=2, help="alternate reference/ours this many times (default 2)")
    ap.add_argument("--json", default=None, metavar="OUT", help="write the numbers to OUT")
    args = ap.parse_args(argv)

    from scoretune.drivers.ray_session import ray_session
    from scoretune.search import build_space

    with tempfile.TemporaryDirectory(prefix="scoretune-overhead-") as tmp, contextlib.ExitStack() as stack:
        root = Path(tmp)
        space = build_space(space_raw(args, root / "ray"), source="overhead space")
        uri = f"sqlite:///{root / 'mlflow.db'}"
        info = machine_info()
        print(f"machine: {info}")
        print(f"{args.trials} trainings x {args.epochs} epochs (digits, small_cnn, TRADES-SE, {args.attack_steps}-step "
              f"attack, val PGD-{args.pgd_steps}), {args.repeats} repeat(s)", flush=True)
        t0 = time.perf_counter()
        stack.enter_context(ray_session(None, out=print))
        ray_start = time.perf_counter() - t0
        ref: list[float] = []
        ours: list[float] = []
        phases: list[dict[str, float]] = []
        for r in range(args.repeats):
            ref.append(plain_loop(space, args.trials, threads=1))
            print(f"repeat {r}: plain loop {ref[-1]:.1f} s", flush=True)
            wall, ph = search_once(space, f"overhead-{r}", uri)
            ours.append(wall)
            phases.append(ph)
            print(f"repeat {r}: scoretune search {wall:.1f} s (Ray start-up {ray_start:.1f} s not included; "
                  + ", ".join(f"{k} {v:.1f} s" for k, v in ph.items()) + ")", flush=True)
    ref_m, ours_m = statistics.median(ref), statistics.median(ours)
    rows = {
        "wall_s_warm": (ours_m, ref_m),
        "wall_s_cold": (ours_m + ray_start, ref_m),
    }
    print()
    print("name ours reference ratio")
    for name, (o, f) in rows.items():
        print(f"{name} {o:.1f} {f:.1f} {o / f:.3f}")
    print("overhead fraction (ours/reference - 1): "
          + ", ".join(f"{name.rsplit('_', 1)[1]} {o / f - 1:+.3f}" for name, (o, f) in rows.items()))
    print("(ours = scoretune search, max_concurrent 1; reference = Trainer.train_one_epoch loop; "
          "overhead = ours/reference - 1; goal <= 0.10)")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "settings": vars(args), "machine": info, "ray_start_s": ray_start,
            "reference_s": ref, "ours_s": ours, "ours_phases_s": phases,
            "overhead_warm": ours_m / ref_m - 1, "overhead_cold": (ours_m + ray_start) / ref_m - 1,
        }, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
