#!/usr/bin/env python
"""Best robust accuracy found vs training epochs spent: random search with full budgets against
scoretune's TPE + ASHA + floor stopper, on digits, side by side in one run.

For each seed (``--seeds 0 1``; the seed of the search's sampler, the experiment seed stays 0 so
every trial sees the same data split) it runs the ``--methods`` over the same space (TRADES with
beta / lr / loss / clip searched, 3-step training PGD, val PGD with ``--pgd-steps`` steps), one after
the other:

* ``random`` (always first: the reference): Optuna's RandomSampler, no scheduler, no stopper: every
  trial trains ``--epochs``;
* ``tpe_asha_floor``: seeded multivariate TPE, ASHA on epochs (``--grace``, ``--reduction-factor`` 2)
  and SCORE's floor stopper (``--floor``: the automatic floor by default, patience 2) -- scoretune's
  default kind of search, cold;
* ``startup4`` / ``grace2``: the same with TPE's random start-up cut to 4 trials / ASHA's grace period 2;
* ``warm``: ``tpe_asha_floor`` warm-started (``warm_start: {from: ...}``) from the same seed's
  ``tpe_asha_floor`` search that ran just before it: the second search of a user who searches the same
  space again. Its source's epochs are not counted in its own number; the line that counts them too
  is printed next to it.

The per-epoch ``val_pgd_acc`` of every trial is read back from the search's MLflow child runs
(``SearchSummary.trials[i].run_id`` -> metric history; the driver logs one point per reported
epoch). Trials are ordered by completion (the time of their last logged epoch) and the curve
"best val_pgd_acc so far vs cumulative epochs" is built from them: a trial adds all its epochs and
its best epoch's value when it completes. The target of a seed is the best value random search
found with that seed minus ``--within`` (1 point); the script prints the epochs each search needed
to reach it (``-`` when it never did), one line per method, and as the summary line the mean over
seeds for ``--ours`` (default: the last method)::

    name ours reference ratio
    epochs_to_within_1pt <ours epochs> <random epochs> <ours/random>

Goal: ratio <= 0.25 with a mean best no worse than random's (printed, never asserted). A search that
never reaches the target counts with all the epochs it spent and the ratio is then a lower bound
(marked ``>=``). The finer curve that orders single epochs by their log time (fairer when trials run
concurrently) is printed too. With ``--json OUT`` every finished (seed, method) is also saved to
``OUT.partial``; ``--summarize OUT.partial [...]`` prints the summary of the seeds finished in one or
several such files (e.g. seeds run as separate processes).

Defaults fit 2 shared CPU cores in about 10-15 minutes (2 seeds, 8 trials each, 8 epochs, 2 trials
at a time); scale up with e.g. ``--seeds 0 1 2 3 --samples 24 --epochs 15 --attack-steps 7
--pgd-steps 20``. Extra ``--set key=value`` overrides go to both spaces (``base.batch_size=128``).

    python benchmarks/search_efficiency.py --json search_efficiency.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import machine_info  # noqa: E402  (also puts platform/ on sys.path)
from scoretune.commands.train import floor_arg  # noqa: E402
from scoretune.drivers.ray_session import ray_session  # noqa: E402
from scoretune.search import build_space, run_search  # noqa: E402
from scoretune.tracking import client as mlflow_client  # noqa: E402

METRIC = "val_pgd_acc"


def base_space(args: argparse.Namespace) -> dict[str, Any]:
    """The searched space shared by both methods (the quickstart space, shrunk)."""
    return {
        "name": "bench",
        "base": {
            "data": {"name": "digits", "val_size": 0.1},
            "model": {"name": "small_cnn"},
            "objective": {"method": "trades", "loss": "se", "beta": 6.0, "clip_mode": "smoothing", "clip": 0.0},
            "attack": {"eps": 0.2, "norm": "linf", "steps": args.attack_steps},
            "eval": {"pgd_steps": args.pgd_steps, "test": False},
            "optim": {"name": "sgd", "lr": 0.2, "momentum": 0.9, "weight_decay": 5.0e-4, "schedule": "cosine"},
            "epochs": args.epochs,
            "batch_size": 64,
            "device": "cpu",
            "seed": 0,
        },
        "params": {
            "beta": {"loguniform": [1.0, 10.0]},
            "lr": {"loguniform": [0.01, 0.5]},
            "loss": {"choice": ["se", "kl", "l1_sq", "js"]},
            "clip": {"uniform": [0.0, 0.3]},
        },
        "objective": {"metric": METRIC, "mode": "max"},
        "max_concurrent": args.concurrent,
        "resources": {"workers": 1, "cpus": 1, "gpus": 0},
        "top_k": 0,  # no models logged / AutoAttacked at the end: only the search itself is compared
    }


METHODS = {
    "random": "random search, full budgets (the reference)",
    "tpe_asha_floor": "TPE + ASHA + floor stopper (scoretune's default search, cold)",
    "startup4": "tpe_asha_floor with TPE's random start-up cut to 4 trials (cold)",
    "grace2": "tpe_asha_floor with ASHA grace period 2 (rungs 2, 4, 8; cold)",
    "warm": "tpe_asha_floor warm-started from the same seed's tpe_asha_floor search (its epochs not counted)",
}


def floor_stopper(floor: str) -> dict[str, Any]:
    """The floor stopper of the TPE searches: the automatic floor (``auto``, as the quickstart) or a fixed value."""
    if floor == "auto":
        return {"estimate": "auto", "patience": 2}
    return {"value": float(floor), "patience": 2}


def method_space(args: argparse.Namespace, method: str, seed: int, root: Path, names: dict[str, str] | None = None):
    """The validated :class:`SearchSpace` of ``method`` (a key of :data:`METHODS`) for ``seed``; ``names``:
    the search names run so far for this seed (``warm`` starts from ``tpe_asha_floor``'s)."""
    raw = base_space(args)
    raw["seed"] = seed
    raw["storage_path"] = str(root / "ray")
    if method == "random":
        raw.update(num_samples=args.samples, sampler={"type": "random"}, scheduler={"type": "none"})
        return build_space(raw, list(args.set or []), source=f"{method} space")
    raw.update(num_samples=args.samples_b or args.samples, sampler={"type": "tpe"},
               scheduler={"type": "asha", "grace_period": args.grace, "reduction_factor": args.reduction_factor},
               stoppers={"floor": floor_stopper(args.floor)})
    if method == "startup4":
        raw["sampler"]["n_startup_trials"] = 4
    elif method == "grace2":
        raw["scheduler"]["grace_period"] = 2
    elif method == "warm":
        if not names or "tpe_asha_floor" not in names:
            raise SystemExit("--methods: warm needs tpe_asha_floor before it (its warm-start source)")
        raw["warm_start"] = {"from": names["tpe_asha_floor"]}
    elif method != "tpe_asha_floor":
        raise SystemExit(f"--methods: unknown method {method!r}; choose from {', '.join(METHODS)}")
    return build_space(raw, list(args.set or []), source=f"{method} space")


def trial_histories(summary: Any) -> list[dict[str, Any]]:
    """Per trial: its ``METRIC`` by epoch and the log time of each epoch (ms), from MLflow."""
    cl = mlflow_client(summary.tracking_uri)
    out = []
    for t in summary.trials:
        if not t.run_id:
            continue
        hist = sorted(cl.get_metric_history(t.run_id, METRIC), key=lambda m: (m.step, m.timestamp))
        by_epoch: dict[int, Any] = {}
        for m in hist:  # one point per epoch (a resumed trial may log an epoch twice: keep the last)
            by_epoch[int(m.step)] = m
        if by_epoch:
            out.append({"trial_id": t.trial_id, "status": t.status, "point": t.point,
                        "epochs": [e for e in sorted(by_epoch)],
                        "values": [float(by_epoch[e].value) for e in sorted(by_epoch)],
                        "times": [int(by_epoch[e].timestamp) for e in sorted(by_epoch)]})
    return out


def completion_curve(trials: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """(cumulative epochs, best value so far) after each trial, trials in completion order."""
    curve, spent, best = [], 0, float("-inf")
    for t in sorted(trials, key=lambda t: max(t["times"])):
        spent += len(t["epochs"])
        best = max(best, max(t["values"]))
        curve.append((spent, best))
    return curve


def epoch_curve(trials: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """(cumulative epochs, best value so far) after each single epoch, epochs in log-time order."""
    events = sorted((tm, v) for t in trials for tm, v in zip(t["times"], t["values"]))
    curve, best = [], float("-inf")
    for i, (_, v) in enumerate(events, 1):
        best = max(best, v)
        curve.append((i, best))
    return curve


def epochs_to(curve: list[tuple[int, float]], target: float) -> int | None:
    """The first cumulative epoch count at which the curve reaches ``target`` (None: never)."""
    for spent, best in curve:
        if best >= target - 1e-12:
            return spent
    return None


def mean_epochs(values: list[int | None], totals: list[int]) -> tuple[float, bool]:
    """Mean over seeds; a seed that never reached the target counts with all it spent (lower bound)."""
    filled = [v if v is not None else tot for v, tot in zip(values, totals)]
    return statistics.fmean(filled), any(v is None for v in values)


def run_methods(args: argparse.Namespace, methods: tuple[str, ...], root: Path, uri: str) -> dict[str, dict[int, Any]]:
    """Every (seed, method) search, one after the other (Ray already up): per method and seed, the trials'
    histories, wall time, curves, epochs and best value."""
    quiet = lambda s: None  # noqa: E731
    runs: dict[str, dict[int, Any]] = {m: {} for m in methods}
    stamp = time.strftime("%H%M%S")
    for seed in args.seeds:
        names: dict[str, str] = {}
        for method in methods:
            space = method_space(args, method, seed, root, names)
            names[method] = f"{method}-s{seed}-{stamp}"
            t0 = time.perf_counter()
            summary = run_search(space, name=names[method], tracking_uri=uri, out=quiet)
            wall = time.perf_counter() - t0
            trials = trial_histories(summary)
            runs[method][seed] = {"trials": trials, "wall_s": wall, "completion": completion_curve(trials),
                                  "by_epoch": epoch_curve(trials),
                                  "total_epochs": sum(len(t["epochs"]) for t in trials),
                                  "best": max((max(t["values"]) for t in trials), default=float("nan")),
                                  "counts": summary.counts()}
            r = runs[method][seed]
            if args.json:  # partial results survive an interrupted run
                Path(args.json + ".partial").write_text(json.dumps(runs, default=str))
            print(f"seed {seed} {method:<15} trials {len(trials):>2}  epochs {r['total_epochs']:>3}  "
                  f"best {METRIC} {r['best']:.4f}  {wall:.0f} s  {r['counts']}", flush=True)
    return runs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="search seeds (default: 0 1)")
    ap.add_argument("--samples", type=int, default=8, help="trials per search (default 8)")
    ap.add_argument("--samples-b", type=int, default=None, help="trials of (b) if different from --samples")
    ap.add_argument("--epochs", type=int, default=8, help="full epoch budget of a trial (default 8)")
    ap.add_argument("--attack-steps", type=int, default=3, help="training PGD steps (default 3)")
    ap.add_argument("--pgd-steps", type=int, default=5, help="validation PGD steps (default 5)")
    ap.add_argument("--grace", type=int, default=1, help="ASHA grace period in epochs (default 1)")
    ap.add_argument("--reduction-factor", type=float, default=2.0,
                    help="ASHA reduction factor (default 2, the search spaces' default; 3 stops more trials)")
    ap.add_argument("--floor", type=floor_arg, default="auto",
                    help="floor (C^l1)^2/2 of the stopper: 'auto' (estimated by a cached proxy, as the quickstart; "
                         "default) or a number (the runs before 2026-12-02 used a fixed 0.2)")
    ap.add_argument("--within", type=float, default=0.01, help="target = best of (a) minus this (default 0.01)")
    ap.add_argument("--concurrent", type=int, default=2, help="trials at a time (default 2)")
    ap.add_argument("--set", action="append", metavar="KEY=VALUE", help="override for both spaces (repeatable)")
    ap.add_argument("--workdir", default=None, help="keep Ray results and MLflow store here (default: a temp dir)")
    ap.add_argument("--json", default=None, metavar="OUT", help="write all numbers and curves to OUT")
    ap.add_argument("--methods", nargs="+", default=["random", "tpe_asha_floor"], choices=list(METHODS),
                    help="searches to run per seed, in order (random first: it is the reference; warm needs "
                         "tpe_asha_floor before it). " + "; ".join(f"{k}: {v}" for k, v in METHODS.items()))
    ap.add_argument("--summarize", nargs="+", default=None, metavar="PARTIAL",
                    help="print the summary of the seeds finished in the OUT.partial files of interrupted (or "
                         "per-seed) runs; no search is run")
    ap.add_argument("--ours", default=None, help="the method of the headline line (default: the last of --methods)")
    args = ap.parse_args(argv)

    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="scoretune-bench-")
    root = Path(args.workdir or tmp.name).absolute()  # type: ignore[union-attr]
    root.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    info = machine_info()
    print(f"machine: {info}")
    methods = tuple(args.methods)
    if methods[0] != "random":
        raise SystemExit("--methods: start with random (the reference)")
    ours_m = args.ours or methods[-1]
    if args.summarize:
        runs = {m: {} for m in methods}
        for f in args.summarize:
            saved = json.loads(Path(f).read_text())
            for m in methods:
                runs[m].update({int(k): v for k, v in saved.get(m, {}).items()})
        done = [sd for sd in args.seeds if all(sd in runs[m] for m in methods)]
        print(f"summarizing seeds {done} of {args.seeds} from {args.summarize}")
        args.seeds = done
    else:
        with ray_session(None, out=print):
            runs = run_methods(args, methods, root, uri)

    rows: dict[str, Any] = {}
    for curve_name in ("completion", "by_epoch"):
        need: dict[str, list[int | None]] = {m: [] for m in methods}
        totals: dict[str, list[int]] = {m: [] for m in methods}
        for seed in args.seeds:
            target = runs["random"][seed]["best"] - args.within
            for m in methods:
                need[m].append(epochs_to(runs[m][seed][curve_name], target))
                totals[m].append(runs[m][seed]["total_epochs"])
            print(f"  [{curve_name}] seed {seed}: target {target:.4f}; epochs to reach it: "
                  + ", ".join(f"{m} {need[m][-1] if need[m][-1] is not None else '-'}/{totals[m][-1]}"
                              for m in methods))
        ref, _ = mean_epochs(need["random"], totals["random"])
        rows[curve_name] = {"reference": ref, "per_seed": need, "totals": totals, "methods": {}}
        for m in methods[1:]:
            ours, ours_lb = mean_epochs(need[m], totals[m])
            rows[curve_name]["methods"][m] = {"ours": ours, "ratio": ours / ref, "ratio_is_lower_bound": ours_lb}

    best = {m: [runs[m][s]["best"] for s in args.seeds] for m in methods}
    tot = {m: [runs[m][s]["total_epochs"] for s in args.seeds] for m in methods}
    print()
    print(f"per method (mean over seeds {args.seeds}; reference = random):")
    for m in methods[1:]:
        c, e = rows["completion"]["methods"][m], rows["by_epoch"]["methods"][m]
        print(f"  {m:<15} epochs_to_within_1pt {c['ours']:.1f} ({'>=' if c['ratio_is_lower_bound'] else ''}"
              f"{c['ratio']:.3f}x)  epoch order {e['ratio']:.3f}x  total_epochs {statistics.fmean(tot[m]):.1f}  "
              f"best {statistics.fmean(best[m]):.4f}   {METHODS[m]}")
    if "warm" in methods:
        src = statistics.fmean(tot["tpe_asha_floor"])
        w = rows["completion"]["methods"]["warm"]["ours"]
        print(f"  warm counting its source's epochs too: {w + src:.1f} ({(w + src) / rows['completion']['reference']:.3f}x)")
    print()
    print("name ours reference ratio")
    for curve_name, label in (("completion", "epochs_to_within_1pt"), ("by_epoch", "epochs_to_within_1pt_epoch_order")):
        r = rows[curve_name]["methods"][ours_m]
        mark = ">=" if r["ratio_is_lower_bound"] else ""
        print(f"{label} {r['ours']:.1f} {rows[curve_name]['reference']:.1f} {mark}{r['ratio']:.3f}")
    print(f"total_epochs {statistics.fmean(tot[ours_m]):.1f} {statistics.fmean(tot['random']):.1f} "
          f"{statistics.fmean(tot[ours_m]) / statistics.fmean(tot['random']):.3f}")
    print(f"best_{METRIC} {statistics.fmean(best[ours_m]):.4f} {statistics.fmean(best['random']):.4f} "
          f"{statistics.fmean(best[ours_m]) / statistics.fmean(best['random']):.3f}")
    print(f"(ours = {ours_m}: {METHODS[ours_m]}; reference = random search with full budgets; mean over seeds "
          f"{args.seeds}; goal: epochs ratio <= 0.25 with a mean best no worse than random's)")

    if args.json:
        Path(args.json).write_text(json.dumps({
            "settings": vars(args), "machine": info, "summary": rows,
            "runs": {m: {str(s): v for s, v in d.items()} for m, d in runs.items()},
        }, indent=1, default=str))
        print(f"wrote {args.json}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
