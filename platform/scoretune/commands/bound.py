"""``scoretune bound --data NAME --eps E``: the data constant C^D of SCORE for all eight divergences
and the floor (C^l1)^2/2 of the early-stopping rule, printed and logged to MLflow.

C^D = E_x max_{x' in B(x)} D(p_d(.|x), p_d(.|x')) (Pang et al., ICML 2022, Theorem 1). For ``toy``
p_d is exact (and the inner max an exact grid search); for any other dataset p_d is unknown and a
trained model (``--proxy CHECKPOINT``) stands in for it, so the numbers are the proxy's estimate.
"""

from __future__ import annotations

import argparse

from ._argtypes import eps_value, positive_int, torch_threads

HELP = "estimate SCORE's data constant C^D (eight divergences) and the floor (C^l1)^2/2; log them to MLflow"
EXPERIMENT = "scoretune-bounds"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, metavar="NAME", help="dataset (toy: exact posterior; others need --proxy)")
    p.add_argument("--eps", required=True, type=eps_value, help="radius of the threat ball B(x), e.g. 1 (toy) or 8/255")
    p.add_argument("--norm", choices=("linf", "l2"), default="linf", help="threat-ball norm (default linf)")
    p.add_argument("--proxy", metavar="CHECKPOINT", default=None,
                   help="a scoretune checkpoint (best.pt) whose posterior stands in for p_d "
                        "(required unless --data toy)")
    p.add_argument("--n", type=positive_int, default=None,
                   help="number of data points averaged over (default: 10000 for toy, 1000 otherwise)")
    p.add_argument("--split", choices=("train", "val", "test"), default="test",
                   help="which split the points come from (default test; toy: fresh samples of the mixture)")
    p.add_argument("--data-root", default=None, metavar="DIR",
                   help="directory with the dataset files "
                        "(default: the proxy's training config, $SCORETUNE_DATA or ./data)")
    p.add_argument("--method", choices=("auto", "pgd", "grid"), default="auto",
                   help="inner max: grid (exact, 1-D data only), pgd, or auto = grid for 1-D data else pgd")
    p.add_argument("--grid", type=positive_int, default=401, help="grid points over [x-eps, x+eps] (default 401)")
    p.add_argument("--restarts", type=positive_int, default=3, help="PGD restarts (default 3)")
    p.add_argument("--steps", type=positive_int, default=30, help="PGD steps per restart (default 30)")
    p.add_argument("--seed", type=int, default=0, help="seed of the samples and the PGD starts")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 can be much faster on a busy machine)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///mlflow.db in the working dir)")
    p.add_argument("--experiment", default=EXPERIMENT, help=f"MLflow experiment (default {EXPERIMENT})")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")


def _points(args: argparse.Namespace):
    """(posterior, xs, pixel_range, source) for the requested data."""
    import torch

    from ..data import available_datasets, load_dataset, to_float, toy_posterior
    from ..errors import UserError

    if args.data not in available_datasets():
        raise UserError(f"unknown dataset '{args.data}'; choose one of: {', '.join(available_datasets())}")
    if args.data == "toy":
        if args.proxy:
            raise UserError("--proxy is not used with --data toy: its posterior p_d(y|x) is exact; drop --proxy")
        n = args.n or 10_000
        ds = load_dataset("toy", val_size=0, seed=args.seed, n_train=n if args.split == "train" else 0,
                          n_val=n if args.split == "val" else 0, n_test=n if args.split == "test" else 0)
        split = getattr(ds, args.split)
        return toy_posterior, split.x.double(), None, "exact toy posterior"
    if not args.proxy:
        raise UserError(f"--proxy CHECKPOINT is required for --data {args.data}: C^D needs p_d(y|x), which is known "
                        "exactly only for toy; pass a trained model's checkpoint (e.g. runs/NAME/best.pt)")
    from ..engine import model_from_checkpoint, resolve_device

    device = resolve_device(args.device)
    net, cfg = model_from_checkpoint(args.proxy, device=device)
    if cfg.data.name != args.data:
        raise UserError(f"the proxy {args.proxy} was trained on '{cfg.data.name}', not '{args.data}'; "
                        f"pass --data {cfg.data.name} or a checkpoint trained on {args.data}")
    ds = load_dataset(args.data, root=args.data_root or cfg.data.root, val_size=cfg.data.val_size, seed=cfg.seed,
                      **cfg.data.options)
    split = getattr(ds, args.split)
    if len(split) == 0:
        raise UserError(f"the {args.split} split of {args.data} is empty; choose another --split")
    n = min(args.n or 1000, len(split))
    idx = torch.randperm(len(split), generator=torch.Generator().manual_seed(args.seed))[:n]
    xs = to_float(split.x[idx]).to(device)
    return net, xs, ds.info.pixel_range, f"proxy {args.proxy}"


def run(args: argparse.Namespace) -> int:
    with torch_threads(args.threads):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    import math

    import torch

    from ..attacks import eps_problem
    from ..bounds import InnerMax, estimate_C, madry_floor
    from ..errors import UserError
    from ..losses import LOSS_NAMES

    posterior, xs, pixel_range, source = _points(args)
    one_d = xs[0].numel() == 1
    method = ("grid" if one_d else "pgd") if args.method == "auto" else args.method
    if method == "grid" and not one_d:
        raise UserError(f"--method grid needs 1-D inputs; {args.data} has shape {tuple(xs.shape[1:])}: "
                        "use --method pgd")
    problem = eps_problem(args.eps, args.norm, pixel_range, xs[0].numel())
    if problem:
        raise UserError(f"--eps: {problem}")
    kw = dict(grid=args.grid) if method == "grid" else dict(restarts=args.restarts, steps=args.steps)
    inner = InnerMax(eps=args.eps, norm=args.norm, pixel_range=pixel_range,
                     generator=torch.Generator(device=xs.device).manual_seed(args.seed), **kw)
    print(f"C^D on {xs.shape[0]} points of {args.data} ({args.split}), eps={inner.eps:g} ({inner.norm}), "
          f"posterior: {source}, inner max: {inner.method}")
    print(f"{'divergence':>10} {'C^D':>10} {'stderr':>9}")
    estimates = {}
    for name in LOSS_NAMES:
        est = estimate_C(posterior, xs, inner, name, keep_values=False)
        estimates[name] = est
        print(f"{name:>10} {est.mean:>10.5f} {est.stderr:>9.2g}")
    floor = madry_floor(estimates["l1"])
    print(f"floor (C^l1)^2/2 = {floor:.5g}   (use: scoretune train ... --early-stop floor --floor {floor:.4g})")
    if not args.no_mlflow:
        from ..tracking import RunLogger, tags

        logger = RunLogger(args.tracking_uri, args.experiment, run_name=f"C-{args.data}-eps{inner.eps:g}-{inner.norm}",
                           tags={tags.KIND: "bound", tags.DATASET: args.data})
        logger.log_params({"data": args.data, "eps": inner.eps, "norm": inner.norm, "n": xs.shape[0],
                           "split": args.split, "method": inner.method, "posterior": source, "seed": args.seed, **kw})
        metrics = {"madry_floor": floor}
        for name, est in estimates.items():
            metrics[f"C_{name}"] = est.mean
            if math.isfinite(est.stderr):
                metrics[f"C_{name}_stderr"] = est.stderr
        logger.log_metrics(metrics)
        logger.end("FINISHED")
        print(f"logged to MLflow run {logger.run_id} (experiment {args.experiment}) in {logger.uri}")
    return 0
