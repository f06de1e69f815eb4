"""Does SCORE's floor rule earn its place? Four ways to stop/select, side by side, in a regime where
robust overfitting really happens (small data, long training, piecewise LR decay).

Per objective and seed, one full training (no stopping) is recorded epoch by epoch (weights kept in
memory) and three rules are replayed on its rows -- exactly what they would have decided online:

* ``best-ckpt``  no stopping; the epoch of best validation PGD accuracy (the reference).
* ``plateau``    Rice et al. (2020): stop when val PGD accuracy has not improved for ``--plateau`` epochs.
* ``floor``      SCORE's floor rule: stop after ``--patience`` epochs with ``train_r_madry`` (robust CE at
                 the CE-PGD point on 10% of the training split) below the automatic floor (C^l1)^2/2.
* ``refined``    the floor rule with the floor refined from the best model so far (``early_stop.refine``:
                 min(floor, val_c_l1^2/2), val_c_l1 = C^l1 of the model of best val PGD accuracy so far).
* ``floor+clip`` a second training with ``objective.clip: auto`` (the label-smoothing clip whose bound is
                 the automatic floor) and the refined floor rule on, stopped when the rule fires.

Every method selects, among the epochs it trained, the one of best validation PGD accuracy; that model
is attacked with AutoAttack (``--aa fast``: APGD-CE + APGD-T, or ``standard``) on the test split.
Printed per method: epochs spent, stop epoch vs the peak epoch of val robust accuracy, and AA accuracy.

    # the measured regime (benchmarks/README.md; one objective per process, ~26 min each, two side by side):
    nice -n 10 python benchmarks/floor_stopping.py --data digits --n-train 300 --val-size 0.2 --channels 32 64 128 \
        --eps 0.1 --epochs 80 --batch-size 32 --weight-decay 0 --milestones 0.25 0.9 --patience 3 --plateau 10 \
        --objectives pgdat_se --seeds 0 1 2 --json p.json
    python benchmarks/floor_stopping.py --summarize p.json t.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT / "platform", ROOT):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import torch  # noqa: E402

from scoretune.config import ExperimentConfig  # noqa: E402
from scoretune.data import load_dataset, to_float  # noqa: E402
from scoretune.engine import Trainer  # noqa: E402
from scoretune.floor_estimate import clip_for_floor, estimate_floor  # noqa: E402
from scoretune.robustness import autoattack_accuracy  # noqa: E402
from scoretune.stopping import FloorRefiner, FloorRule, PlateauRule  # noqa: E402

OBJECTIVES = {
    "pgdat_se": {"method": "pgdat", "loss": "se"},
    "trades_se": {"method": "trades", "loss": "se", "beta": 4.0},
}


def base_config(args: argparse.Namespace, objective: str, seed: int) -> dict:
    data = {"name": args.data, "val_size": args.val_size}
    model = {"name": "small_cnn", "options": {"channels": list(args.channels)}}
    if args.data == "mnist5k":
        model["options"]["stem_stride"] = 2
    if args.n_train:
        data["options"] = {"n_train": args.n_train}
    return {
        "name": f"floorbench-{objective}-{seed}", "data": data, "model": model,
        "objective": dict(OBJECTIVES[objective]),
        "attack": {"eps": args.eps, "norm": "linf", "steps": args.steps},
        "eval": {"pgd_steps": args.eval_steps, "test": False},
        "optim": {"name": "sgd", "lr": args.lr, "momentum": 0.9, "weight_decay": args.weight_decay,
                  "schedule": "piecewise", "milestones": list(args.milestones), "gamma": 0.1},
        "early_stop": {"probe_fraction": 0.1, "refine": True},
        "epochs": args.epochs, "batch_size": args.batch_size, "device": "cpu", "seed": seed,
    }


def train_recorded(cfg: ExperimentConfig, stop_rule=None, tag: str = "") -> tuple[list[dict], list[dict]]:
    """Train, keeping every epoch's row and weights; stop when ``stop_rule`` says so."""
    trainer = Trainer(cfg)
    rows, states = [], []
    while trainer.epoch < cfg.epochs:
        row = trainer.train_one_epoch()
        print(f"  {tag} epoch {int(row['epoch']):>3} lr {row['lr']:.4f} train_r_madry {row['train_r_madry']:.3f} "
              f"train_attack_ce {row['train_attack_ce']:.3f} val_r_madry {row['val_r_madry']:.3f} "
              f"val_pgd {row['val_pgd_acc']:.3f}"
              + (f" val_c_l1 {row['val_c_l1']:.3f}" if "val_c_l1" in row else "")
              + f" ({row['epoch_time']:.1f} s)", flush=True)
        rows.append(row)
        states.append(copy.deepcopy(trainer.eval_model.state_dict()))
        if stop_rule is not None and stop_rule.should_stop(row):
            break
    return rows, states


def replay(rule, rows: list[dict]) -> int:
    """The epoch (1-based) at which ``rule`` stops on ``rows``; len(rows) if it never does."""
    for row in rows:
        if rule.should_stop(row):
            return int(row["epoch"])
    return len(rows)


def best_epoch(rows: list[dict], upto: int) -> int:
    best = max(rows[:upto], key=lambda r: r["val_pgd_acc"])
    return int(best["epoch"])


def aa_accuracy(cfg: ExperimentConfig, state: dict, x: torch.Tensor, y: torch.Tensor, version: str) -> float:
    trainer_net = Trainer(cfg.model_copy(update={"epochs": 1})).eval_model
    trainer_net.load_state_dict(state)
    trainer_net = trainer_net.to(memory_format=torch.contiguous_format).eval()
    return float(autoattack_accuracy(trainer_net, x, y, cfg.attack.eps, cfg.attack.norm, version=version,
                                     batch_size=500, device="cpu").robust_acc)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="digits", choices=["digits", "mnist5k"])
    p.add_argument("--n-train", type=int, default=None, help="training examples kept (a fixed stratified subset)")
    p.add_argument("--val-size", type=float, default=0.1)
    p.add_argument("--objectives", nargs="+", default=["pgdat_se", "trades_se"], choices=sorted(OBJECTIVES))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--eps", type=float, default=0.2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--eval-steps", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--milestones", type=float, nargs="+", default=[0.5, 0.75],
                   help="piecewise LR decay (x0.1) at these fractions of --epochs")
    p.add_argument("--channels", type=int, nargs=3, default=[16, 32, 64], help="small_cnn channels")
    p.add_argument("--patience", type=int, default=2, help="floor rule patience")
    p.add_argument("--plateau", type=int, default=5, help="plateau rule patience (Rice et al. 2020)")
    p.add_argument("--proxy-epochs", type=int, default=10)
    p.add_argument("--floor-seed", type=int, default=0, help="the seed (split) of the floor's proxy")
    p.add_argument("--aa", default="fast", choices=["fast", "standard"])
    p.add_argument("--aa-n", type=int, default=None, help="test examples for AutoAttack (default: all)")
    p.add_argument("--cache", default=str(ROOT / "runs" / "floor_cache"))
    p.add_argument("--json", default=None, help="write every number to this JSON file")
    p.add_argument("--summarize", nargs="+", default=None, metavar="JSON",
                   help="only print the summary of earlier runs' --json files (e.g. one per seed, run in parallel)")
    args = p.parse_args()
    if args.summarize:
        runs = [r for f in args.summarize for r in json.loads(Path(f).read_text())["runs"]]
        summarize(runs, sorted({r["objective"] for r in runs}))
        return 0
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    try:
        import os
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3
    print(f"machine: {os.cpu_count()} cores, load {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}, torch "
          f"{torch.__version__}, 1 thread; data {args.data}, eps {args.eps}, {args.epochs} epochs piecewise "
          f"(x0.1 at {'/'.join(f'{100 * m:g}%' for m in args.milestones)}), n_train {args.n_train}, channels "
          f"{args.channels}, weight decay {args.weight_decay:g}, floor patience {args.patience}, plateau patience "
          f"{args.plateau}, seeds {args.seeds}; AutoAttack '{args.aa}' on the test split", flush=True)
    results: dict = {"args": vars(args), "load": load, "runs": []}
    for objective in args.objectives:
        # one floor for every seed (the search's way: estimated once, at the space's seed): the proxy is
        # trained on the split of --floor-seed, so runs of single seeds in parallel share one cached proxy
        cfg0 = ExperimentConfig.model_validate(base_config(args, objective, args.floor_seed))
        est = estimate_floor(cfg0, cache_dir=args.cache, proxy_epochs=args.proxy_epochs, out=print)
        print(f"[{objective}] {est.line()}", flush=True)
        clip = clip_for_floor(est.floor)
        for seed in args.seeds:
            cfg = ExperimentConfig.model_validate(base_config(args, objective, seed))
            ds = load_dataset(cfg.data.name, val_size=cfg.data.val_size, seed=seed, **cfg.data.options)
            x_test, y_test = to_float(ds.test.x), ds.test.y
            if args.aa_n:
                x_test, y_test = x_test[: args.aa_n], y_test[: args.aa_n]
            t0 = time.perf_counter()
            rows, states = train_recorded(cfg, tag=f"[{objective} seed {seed} full]")
            t_full = time.perf_counter() - t0
            n = len(rows)
            peak = best_epoch(rows, n)
            peak_acc = rows[peak - 1]["val_pgd_acc"]
            final_acc = rows[-1]["val_pgd_acc"]
            stops = {
                "best-ckpt": n,
                "plateau": replay(PlateauRule("val_pgd_acc", "max", args.plateau), rows),
                "floor": replay(FloorRule(est.floor, args.patience, "train_r_madry"), rows),
                "refined": replay(FloorRule(est.floor, args.patience, "train_r_madry", refine=True), rows),
            }
            fired = {m: m != "best-ckpt" and stops[m] < n for m in stops}
            # floor + clip: its own training, stopped online by the floor rule
            clip_cfg = ExperimentConfig.model_validate({**base_config(args, objective, seed), "objective": {
                **OBJECTIVES[objective], "clip_mode": "smoothing", "clip": clip}})
            rule = FloorRule(est.floor, args.patience, "train_r_madry", refine=True)
            t1 = time.perf_counter()
            crow, cstates = train_recorded(clip_cfg, rule, tag=f"[{objective} seed {seed} clip {clip:.3f}]")
            t_clip = time.perf_counter() - t1
            selected = {m: best_epoch(rows, s) for m, s in stops.items()}
            cache: dict[int, float] = {}
            aa = {}
            for m, e in selected.items():
                if e not in cache:
                    cache[e] = aa_accuracy(cfg, states[e - 1], x_test, y_test, args.aa)
                aa[m] = cache[e]
            stops["floor+clip"] = len(crow)
            fired["floor+clip"] = rule.stopped
            selected["floor+clip"] = best_epoch(crow, len(crow))
            aa["floor+clip"] = aa_accuracy(clip_cfg, cstates[selected["floor+clip"] - 1], x_test, y_test, args.aa)
            below = [int(r["epoch"]) for r in rows if r.get("train_r_madry", 1e9) < est.floor]
            refiner = FloorRefiner(est.floor)
            refined_floor = [refiner.observe(r) for r in rows]  # the floor in force at each epoch
            rec = {"objective": objective, "seed": seed, "epochs": n, "peak_epoch": peak, "peak_val_pgd": peak_acc,
                   "final_val_pgd": final_acc, "overfit_drop": peak_acc - final_acc, "stops": stops, "fired": fired,
                   "selected": selected, "aa": aa, "floor": est.floor, "c_l1": est.c_l1, "c_l1_se": est.c_l1_se,
                   "first_below_floor": below[0] if below else None, "clip": clip,
                   "refined_floor": refined_floor, "clip_refined_floor": rule.floor,
                   "seconds_full": t_full, "seconds_clip": t_clip,
                   "probe_share": sum(r.get("probe_time", 0) for r in rows) / sum(r["epoch_time"] for r in rows),
                   "c_l1_share": sum(r.get("c_l1_time", 0) for r in rows) / sum(r["epoch_time"] for r in rows),
                   "curve": [{k: r.get(k) for k in ("epoch", "train_r_madry", "train_attack_ce", "val_r_madry",
                                                  "val_pgd_acc", "val_c_l1")} for r in rows],
                   "clip_curve": [{k: r.get(k) for k in ("epoch", "train_r_madry", "val_pgd_acc")} for r in crow]}
            results["runs"].append(rec)
            print(f"[{objective} seed {seed}] val PGD peak {peak_acc:.3f} at epoch {peak}, final {final_acc:.3f} "
                  f"(drop {peak_acc - final_acc:+.3f}); first epoch below the floor: {rec['first_below_floor']}; "
                  f"{t_full:.0f}+{t_clip:.0f} s, probe {100 * rec['probe_share']:.0f}% and val_c_l1 "
                  f"{100 * rec['c_l1_share']:.0f}% of epoch time; refined floor at the end {refined_floor[-1]:.4g}",
                  flush=True)
            for m in stops:
                print(f"    {m:<11} epochs {stops[m]:>3}  {'stopped' if fired[m] else 'ran out':<8} "
                      f"selected epoch {selected[m]:>3}  AA({args.aa}) {100 * aa[m]:5.1f}%", flush=True)
    results["summary"] = summarize(results["runs"], args.objectives)
    print(f"total {time.perf_counter() - t_start:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=float))
    return 0


def summarize(runs: list[dict], objectives: list[str]) -> list[dict]:
    """Print (and return) the medians over seeds per objective and method."""
    print("\nsummary (median over seeds; epochs saved vs full training; AA difference vs best-ckpt, points)")
    print(f"{'objective':<10} {'method':<11} {'epochs':>6} {'saved':>6} {'fired':>5} {'AA %':>6} {'dAA':>6}")
    summary = []
    for objective in objectives:
        recs = [r for r in runs if r["objective"] == objective]
        for m in ("best-ckpt", "plateau", "floor", "refined", "floor+clip"):
            ep = statistics.median(r["stops"][m] for r in recs)
            saved = statistics.median(1 - r["stops"][m] / r["epochs"] for r in recs)
            aa = statistics.median(100 * r["aa"][m] for r in recs)
            daa = statistics.median(100 * (r["aa"][m] - r["aa"]["best-ckpt"]) for r in recs)
            nfired = sum(r["fired"][m] for r in recs)
            summary.append({"objective": objective, "method": m, "epochs": ep, "saved": saved, "aa": aa, "daa": daa,
                            "fired": nfired})
            print(f"{objective:<10} {m:<11} {ep:>6.0f} {100 * saved:>5.0f}% {nfired:>2}/{len(recs)} {aa:>6.1f} "
                  f"{daa:>+6.1f}")
        drops = [r["overfit_drop"] for r in recs]
        print(f"{objective:<10} robust overfitting: val PGD drop peak->final median {100 * statistics.median(drops):.1f} "
              f"points (per seed: {', '.join(f'{100 * d:.1f}' for d in drops)}); peak epochs "
              f"{[r['peak_epoch'] for r in recs]}, floor stops {[r['stops']['floor'] for r in recs]}")
    return summary


if __name__ == "__main__":
    raise SystemExit(main())
