"""``scoretune evaluate MODEL``: AutoAttack / PGD / clean accuracy of a checkpoint or MLflow model.

Results are printed as a table and logged to MLflow: into the model's own run when MODEL came
from one (run id, ``runs:/``, a registered version or logged model), else into a new run of the
experiment ``scoretune-eval``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from ._argtypes import eps_value, positive_int

HELP = "evaluate a checkpoint or MLflow model under AutoAttack / PGD and log the numbers to MLflow"
EVAL_EXPERIMENT = "scoretune-eval"
DEFAULT_STATE_DIR = os.path.join("runs", "eval_state")
# Copies of scoretune.evaluate.ATTACKS / REF_HELP: importing that module pulls in torch, and
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
                   help="evaluate the first N examples of the split (default: all)")
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
    from ..errors import UserError
    from ..evaluate import evaluate, load_model, model_fingerprint

    device = resolve_device(args.device)
    loaded = load_model(args.model, device, tracking_uri=args.tracking_uri)
    x, y, info, dataset = _eval_data(loaded, args)
    eps = args.eps if args.eps is not None else loaded.eps
    if eps is None:
        raise UserError(f"no eps is known for {args.model}; pass --eps (e.g. --eps 8/255)")
    norm = args.norm or loaded.norm or "linf"
    if args.export_robustbench:
        _export(loaded, args.export_robustbench, eps, norm, device)
    settings = {"model": args.model, "attack": args.attack, "eps": eps, "norm": norm, "dataset": dataset,
                "split": args.split, "n_ex": int(x.shape[0]), "seed": args.seed, "batch_size": args.batch_size}
    state_path = None
    if args.attack.startswith("aa-"):
        key = json.dumps({**settings, "weights": model_fingerprint(loaded.net)}, sort_keys=True)
        name = hashlib.sha256(key.encode()).hexdigest()[:16]
        state_path = Path(args.state_dir or DEFAULT_STATE_DIR) / f"{name}.json"
    bars = _Bars()
    try:
        result = evaluate(loaded.net, x, y, attack=args.attack, eps=eps, norm=norm, batch_size=args.batch_size,
                          device=device, seed=args.seed, restarts=args.restarts, pixel_range=info.pixel_range,
                          state_path=state_path, log=bars.write, progress=bars)
    except KeyboardInterrupt:
        bars.close()
        if state_path is not None:
            print(f"interrupted: rerun the same command to resume AutoAttack from {state_path}", file=sys.stderr)
        raise
    bars.close()
    logged = None if args.no_mlflow else log_result(result, loaded, settings, args.tracking_uri)
    if args.json:
        print(json.dumps(_as_json(result, settings, loaded, logged, state_path)))
    else:
        print(format_result(result, settings, loaded, logged, state_path))
    return 0


# ----------------------------------------------------------------------------- pieces


def _eval_data(loaded: Any, args: argparse.Namespace):
    """(x, y, dataset info, dataset name) for the requested split, first ``--n-ex`` examples."""
    from ..data import available_datasets, load_dataset, to_float
    from ..errors import UserError

    name = args.data or loaded.dataset
    if not name:
        raise UserError(f"cannot tell which dataset {args.model} was trained on; pass --data NAME "
                        f"(one of: {', '.join(available_datasets())})")
    same = name == loaded.dataset
    try:
        ds = load_dataset(
            name, root=args.data_root or (loaded.data_root if same else None),
            val_size=loaded.val_size if same and loaded.val_size is not None else 0.1,
            seed=loaded.data_seed if same and loaded.data_seed is not None else 0,
            **(loaded.data_options if same else {}),
        )
    except (ValueError, TypeError) as e:
        if type(e).__name__ == "DatasetError":
            raise
        raise UserError(str(e)) from None
    split = ds.test if args.split == "test" else ds.val
    if len(split) == 0:
        raise UserError(f"the {args.split} split of {name} is empty (trained with data.val_size=0?); use --split test")
    n = min(len(split), args.n_ex or len(split))
    x, y = to_float(split.x[:n]), split.y[:n]
    spec_shape = tuple(loaded.spec["input_shape"]) if loaded.spec and loaded.spec.get("input_shape") else None
    if spec_shape is not None and spec_shape != tuple(x.shape[1:]):
        raise UserError(f"the model takes inputs of shape {spec_shape} but {name} has {tuple(x.shape[1:])}; "
                        "pass the --data it was trained on")
    return x, y, ds.info, name


def _export(loaded: Any, out: str, eps: float, norm: str, device: Any) -> None:
    from ..errors import UserError
    from ..evaluate import ExportedModel
    from ..export import export_robustbench, load_robustbench

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


def log_result(result: Any, loaded: Any, settings: dict[str, Any], tracking_uri: str | None) -> dict[str, str]:
    """Log ``result`` to the model's run (metrics + ``eval.*``/``aa_check.*`` tags), else to a new run
    in experiment ``scoretune-eval``. Returns ``{'run_id', 'tracking_uri', 'where'}``."""
    import time

    from mlflow.entities import Metric, RunTag

    from ..tracking import RunLogger, client, finite_metrics, resolve_tracking_uri

    metrics = finite_metrics(result.metrics())
    prefix = f"eval.{result.metric_name or 'clean'}."
    tags = {prefix + k: str(v) for k, v in settings.items() if k != "attack"}
    tags[prefix + "seconds"] = f"{result.seconds:.1f}"
    if result.attack.startswith("aa-"):
        tags[prefix + "aa_checks"] = ",".join(c.name for c in result.checks) or "none"
        tags.update(result.check_tags())
    if loaded.run_id:
        uri = loaded.tracking_uri or resolve_tracking_uri(tracking_uri)
        cl = client(uri)
        ts = int(time.time() * 1000)
        cl.log_batch(loaded.run_id, metrics=[Metric(k, v, ts, 0) for k, v in metrics.items()],
                     tags=[RunTag(k, v[:5000]) for k, v in tags.items()])
        return {"run_id": loaded.run_id, "tracking_uri": uri, "where": "model run"}
    logger = RunLogger(tracking_uri, EVAL_EXPERIMENT, run_name=f"eval {Path(loaded.ref).name} {result.attack}",
                       tags={"scoretune.kind": "eval", "scoretune.model_ref": loaded.ref})
    logger.log_params(settings)
    logger.log_metrics(metrics)
    logger.set_tags(tags)
    logger.end("FINISHED")
    return {"run_id": logger.run_id, "tracking_uri": logger.uri, "where": f"new run in '{EVAL_EXPERIMENT}'"}


def format_result(result: Any, settings: dict[str, Any], loaded: Any, logged: dict[str, str] | None,
                  state_path: Path | None) -> str:
    """The human-readable result table."""
    src = loaded.ref + (f" (run {loaded.run_id})" if loaded.run_id and loaded.run_id != loaded.ref else "")
    lines = [
        f"model    {src}",
        f"data     {settings['dataset']} {settings['split']}, n={result.n}",
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


def _as_json(result: Any, settings: dict[str, Any], loaded: Any, logged: dict[str, str] | None,
             state_path: Path | None) -> dict[str, Any]:
    return {
        **settings, "run_id": loaded.run_id, "clean_acc": result.clean_acc, "robust_acc": result.robust_acc,
        "per_attack": result.per_attack, "removed": result.removed, "metrics": result.metrics(),
        "checks": [{"name": c.name, "message": c.message, "count": c.count} for c in result.checks],
        "seconds": result.seconds, "resumed": result.resumed,
        "state_path": str(state_path) if state_path else None, "mlflow": logged,
    }
