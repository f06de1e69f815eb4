"""``scoretune evaluate MODEL``: AutoAttack / PGD / clean accuracy of a checkpoint or MLflow model.

Results are printed as a table and logged to MLflow: into the model's own run when MODEL came
from one (run id, ``runs:/``, a registered version or logged model), else into a new run of the
experiment ``scoretune-eval``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from ._argtypes import eps_value, positive_int

HELP = "evaluate a checkpoint or MLflow model under AutoAttack / PGD and log the numbers to MLflow"
DEFAULT_STATE_DIR = os.path.join("runs", "eval_state")
# Copies of scoretune.robustness.ATTACKS / tracking.model_refs.REF_HELP: importing those pulls in torch, and
# ``scoretune --help`` builds every subcommand's parser (a test keeps the copies equal).
ATTACKS = ("aa-standard", "aa-fast", "pgd-20", "pgd-50", "clean")
REF_HELP = ("a checkpoint file (.pt), a RobustBench export (.pt with its .json sidecar), an MLflow run id, "
            "runs:/<run_id>/model, models:/NAME@ALIAS, models:/NAME/VERSION or models:/m-<model_id>")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help=REF_HELP)
    p.add_argument("--data", default=None, metavar="NAME",
                   help="dataset to evaluate on (default: the one the model was trained on)")
    p.add_argument("--data-root", default=None, metavar="DIR",
                   help="directory with the dataset files (default: the training config's, $SCORETUNE_DATA or ./data)")
    p.add_argument("--split", choices=("test", "val"), default="test",
                   help="test split, or the validation split carved from the training data (default: test)")
    p.add_argument("--attack", choices=ATTACKS, default="aa-standard",
                   help="aa-standard (RobustBench's AutoAttack; the number to report), aa-fast (APGD-CE + "
                        "APGD-T), pgd-20, pgd-50 or clean (default: aa-standard)")
    p.add_argument("--n-ex", type=positive_int, default=None, metavar="N",
                   help="evaluate N examples of the split: a fixed class-stratified sample, the same for every "
                        "model given the same --subset-seed (default: all)")
    p.add_argument("--subset-seed", type=int, default=0, metavar="S",
                   help="seed of the --n-ex sample (default 0); independent of --seed")
    p.add_argument("--eps", type=eps_value, default=None, metavar="E",
                   help="perturbation radius, e.g. 8/255 (default: the model's training attack.eps)")
    p.add_argument("--norm", choices=("linf", "l2"), default=None,
                   help="threat model (default: the model's training attack.norm)")
    p.add_argument("--batch-size", type=positive_int, default=250, metavar="B", help="attack batch size (default 250)")
    p.add_argument("--seed", type=int, default=0, help="attack seed (default 0)")
    p.add_argument("--restarts", type=positive_int, default=1, help="random restarts for pgd-* (default 1)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps or auto (default)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db in the working dir)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log the results to MLflow")
    p.add_argument("--state-dir", default=None, metavar="D",
                   help=f"where AutoAttack keeps its resumable state (default: {DEFAULT_STATE_DIR})")
    p.add_argument("--export-robustbench", default=None, metavar="OUT.pt",
                   help="also write the model as a RobustBench state dict (OUT.pt + OUT.json sidecar) and "
                        "evaluate the re-loaded export")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object instead of a table")


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from ..engine import resolve_device
    from ..evaluate import benchmark, load_model

    ref: Any = args.model
    if args.export_robustbench:
        device = resolve_device(args.device)
        ref = load_model(args.model, device, tracking_uri=args.tracking_uri)
        _export(ref, args.export_robustbench, args.eps if args.eps is not None else ref.eps,
                args.norm or ref.norm or "linf", device)
    bars = _Bars()
    try:
        result = benchmark(ref, data=args.data, split=args.split, n_ex=args.n_ex, subset_seed=args.subset_seed,
                           attack=args.attack, eps=args.eps,
                           norm=args.norm, batch_size=args.batch_size, device=args.device, seed=args.seed,
                           restarts=args.restarts, data_root=args.data_root, tracking_uri=args.tracking_uri,
                           log_to=None if args.no_mlflow else "auto",
                           state_dir=args.state_dir or DEFAULT_STATE_DIR, log=bars.write, progress=bars)
    except KeyboardInterrupt:
        bars.close()
        if args.attack.startswith("aa-"):
            print("interrupted: rerun the same command to resume AutoAttack from its state in "
                  f"{args.state_dir or DEFAULT_STATE_DIR}", file=sys.stderr)
        raise
    bars.close()
    print(json.dumps(_as_json(result)) if args.json else format_result(result))
    return 0


# ----------------------------------------------------------------------------- pieces


def _export(loaded: Any, out: str, eps: float, norm: str, device: Any) -> None:
    from ..errors import UserError
    from ..export import export_robustbench, load_robustbench
    from ..tracking.model_refs import ExportedModel

    if not loaded.spec:
        raise UserError(f"cannot export {loaded.ref}: its architecture spec is unknown (export from the run's "
                        "checkpoint file instead: mlflow artifacts download -r RUN_ID -a checkpoints)")
    net = loaded.net.graph if isinstance(loaded.net, ExportedModel) else loaded.net
    path = export_robustbench(net, out, spec=loaded.spec, eps=eps, norm=norm, extra={"source": loaded.ref})
    loaded.net = load_robustbench(path, device=device)
    print(f"exported RobustBench state dict to {path} (+ {path.with_suffix('.json').name}); "
          "evaluating the re-loaded export", file=sys.stderr)


class _Bars:
    """One tqdm bar per attack phase on stderr (hidden when stderr is not a terminal)."""

    def __init__(self) -> None:
        self.bar = None
        self.phase: str | None = None

    def __call__(self, phase: str, done: int, total: int) -> None:
        from tqdm import tqdm

        if phase != self.phase:
            self.close()
            self.phase = phase
            self.bar = tqdm(total=total, desc=phase, unit="batch", file=sys.stderr, disable=None, leave=False)
        self.bar.update(done - self.bar.n)

    def write(self, line: str) -> None:
        from tqdm import tqdm

        tqdm.write(line, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar, self.phase = None, None


def format_result(result: Any) -> str:
    """The human-readable result table of a :func:`scoretune.evaluate.benchmark` result."""
    settings, logged, run_id = result.settings, result.logged, result.source_run_id
    state_path = _rel(result.state_path)
    src = settings["model"] + (f" (run {run_id})" if run_id and run_id != settings["model"] else "")
    lines = [
        f"model    {src}",
        f"data     {settings['dataset']} {settings['split']}, n={result.n}" + _sample_note(result),
        f"threat   {result.norm} eps={result.eps:.6g}",
        "",
        f"{'attack':<14}{'accuracy':>10}{'removed':>9}",
        f"{'clean':<14}{result.clean_acc:>9.2%} {'-':>8}",
    ]
    for a, acc in result.per_attack.items():
        lines.append(f"{'  ' + a:<14}{acc:>9.2%} {result.removed.get(a, 0):>8d}")
    if result.robust_acc is not None:
        lines.append(f"{result.attack:<14}{result.robust_acc:>9.2%} "
                     f"{round((result.clean_acc - result.robust_acc) * result.n):>8d}")
    if result.attack.startswith("aa-"):
        lines.append("")
        lines.append("AutoAttack checks: " + ("none fired" if not result.checks else ""))
        for c in result.checks:
            lines.append(f"  [{c.name}] {c.message}" + (f" (reported {c.count}x)" if c.count > 1 else ""))
        if result.resumed:
            lines.append(f"(resumed from {state_path})")
    if result.attack.startswith("pgd-"):
        lines.append("note: PGD is a monitor, not a robustness claim; report aa-standard")
    lines.append(f"time     {result.seconds:.1f} s")
    if logged:
        lines.append(f"mlflow   {', '.join(f'{k}={v:.4f}' for k, v in result.metrics().items())} -> "
                     f"{logged['where']} {logged['run_id']}")
    return "\n".join(lines)


def _sample_note(result: Any) -> str:
    """' of M (class-stratified sample, subset seed S)' when --n-ex took part of the split."""
    if not result.split_size:
        return ""
    return f" of {result.split_size} (class-stratified sample, subset seed {result.settings.get('subset_seed', 0)})"


def _rel(path: str | None) -> str | None:
    return os.path.relpath(path) if path and not os.path.isabs(path) else path


def _as_json(result: Any) -> dict[str, Any]:
    state_path, logged = _rel(result.state_path), result.logged
    return {
        **result.settings, "run_id": result.source_run_id, "clean_acc": result.clean_acc, "robust_acc": result.robust_acc,
        "per_attack": result.per_attack, "removed": result.removed, "metrics": result.metrics(),
        "checks": [{"name": c.name, "message": c.message, "count": c.count} for c in result.checks],
        "split_size": result.split_size, "seconds": result.seconds, "resumed": result.resumed,
        "state_path": str(state_path) if state_path else None, "mlflow": logged,
    }
