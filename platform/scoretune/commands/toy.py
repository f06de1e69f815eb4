"""``scoretune toy``: the two toy demonstrations of SCORE (Pang et al., ICML 2022) on the 1-D mixture.

1. Expectation form: Standard, PGD-AT (KL), PGD-AT (SE), SCORE and TRADES trained with the exact
   posterior on ``--n-samples`` points a step; SCORE converges to p_d(y|x), Madry-type training
   elsewhere. 2. Finite-sample form: 6 labelled pairs, SCORE vs Standard.
Plots (PNG) go to ``--out``; numbers and plots are logged to MLflow (experiment ``scoretune-toy``).
"""

from __future__ import annotations

import argparse

from ._argtypes import positive_int, torch_threads

HELP = "reproduce SCORE's toy demos (exact 1-D posterior): who converges to p_d(y|x); plots + MLflow"
EXPERIMENT = "scoretune-toy"


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got '{text}'") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {v}")
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--iters", type=positive_int, default=80,
                   help="Adam steps per expectation-form variant (default 80)")
    p.add_argument("--finite-iters", type=positive_int, default=400,
                   help="Adam steps per finite-sample variant (default 400)")
    p.add_argument("--n-samples", type=positive_int, default=60_000,
                   help="points of p(x) per expectation-form step (default 60000, as in the paper)")
    p.add_argument("--fixed-samples", action="store_true",
                   help="one fixed draw of --n-samples points instead of a fresh draw every step")
    p.add_argument("--lr", type=_positive_float, default=0.03, help="Adam learning rate (default 0.03)")
    p.add_argument("--eps", type=_positive_float, default=1.0, help="threat radius (default 1, as in the paper)")
    p.add_argument("--forms", choices=("both", "expectation", "finite"), default="both",
                   help="which demo(s) to run (default both)")
    p.add_argument("--out", default="toy_out", metavar="DIR", help="directory for the PNG plots (default toy_out)")
    p.add_argument("--seed", type=int, default=0, help="seed of the samples, the initial weights and PGD")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch CPU threads (default 1: the tensors are small, more threads mostly add overhead)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///mlflow.db in the working dir)")
    p.add_argument("--experiment", default=EXPERIMENT, help=f"MLflow experiment (default {EXPERIMENT})")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")


def run(args: argparse.Namespace) -> int:
    with torch_threads(args.threads):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from .. import toy

    cfg = toy.ToyConfig(eps=args.eps, n_samples=args.n_samples, resample=not args.fixed_samples, iters=args.iters,
                        finite_iters=args.finite_iters, lr=args.lr, seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    forms = ("expectation", "finite") if args.forms == "both" else (args.forms,)
    demos, pngs = [], []
    t0 = time.perf_counter()
    constants = toy.toy_constants(cfg)
    for form in forms:
        print(f"== {form} form (eps={cfg.eps:g}, "
              + (f"{cfg.n_samples} {'fresh' if cfg.resample else 'fixed'} samples/step, {cfg.iters} steps)"
                 if form == "expectation" else f"{cfg.n_pairs} labelled pairs, {cfg.finite_iters} steps)"))
        demo_fn = toy.run_expectation_demo if form == "expectation" else toy.run_finite_demo
        demo = demo_fn(cfg, constants=constants, progress=print)
        demos.append(demo)
        for kind, plot in (("posterior", toy.plot_posteriors), ("risks", toy.plot_risks)):
            path = out / f"toy_{form}_{kind}.png"
            fig = plot(demo, path)
            import matplotlib.pyplot as plt

            plt.close(fig)
            pngs.append(path)
    seconds = time.perf_counter() - t0
    c = demos[0]
    print(f"C^l1 = {c.C_l1}  C^KL = {c.C_kl}  floor (C^l1)^2/2 = {c.floor:.5f}  (eps={cfg.eps:g})")
    for demo in demos:
        ranked = sorted(demo.results.values(), key=lambda r: r.final["gap_data"])
        print(f"{demo.form}: mean |p_theta(y=1|x) - p_d(y=1|x)| under p(x), closest first: "
              + ", ".join(f"{r.label} {r.final['gap_data']:.4f}" for r in ranked))
    print(f"plots: {', '.join(str(p) for p in pngs)}  ({seconds:.0f}s)")
    if not args.no_mlflow:
        from ..tracking import RunLogger, tags

        logger = RunLogger(args.tracking_uri, args.experiment, run_name=f"toy-eps{cfg.eps:g}-seed{cfg.seed}",
                           tags={tags.KIND: "toy", tags.DATASET: "toy"})
        logger.log_params({**toy.config_dict(cfg), "forms": ",".join(forms)})
        logger.log_metrics({"seconds": seconds, "C_l1": c.C_l1.mean, "C_l1_stderr": c.C_l1.stderr,
                            "C_kl": c.C_kl.mean, "C_kl_stderr": c.C_kl.stderr, "madry_floor": c.floor})
        for demo in demos:
            for name, res in demo.results.items():
                prefix = f"{demo.form}.{name}."
                for row in res.history:  # the curves, one step per evaluation; the last is the final value
                    logger.log_metrics({prefix + k: v for k, v in row.items() if k != "iter"}, step=int(row["iter"]))
                logger.log_metrics({prefix + "seconds": res.seconds}, step=int(res.history[-1]["iter"]))
        for path in pngs:
            logger.log_artifact(path, "plots")
        logger.end("FINISHED")
        print(f"logged to MLflow run {logger.run_id} (experiment {args.experiment}) in {logger.uri}")
    return 0
