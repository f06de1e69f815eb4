"""The plots of a finished search, logged as PNG artifacts of its parent run: learning curves
(the primary objective and the robust KL loss R_Madry with the floor), the objective against each
searched param, and (multi-objective) the Pareto front. Matplotlib with the Agg backend.
"""

from __future__ import annotations

from typing import Any

from .space import SearchSpace
from .summary import SearchSummary


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _history(cl: Any, run_id: str, metric: str) -> tuple[list[float], list[float]]:
    hist = sorted(cl.get_metric_history(run_id, metric), key=lambda m: m.step)
    return [float(m.step) for m in hist], [float(m.value) for m in hist]


def log_plots(cl: Any, summary: SearchSummary, space: SearchSpace) -> list[str]:
    """Learning curves, objective vs each searched param, and (multi-objective) the Pareto front, as
    PNG artifacts of the parent run; returns the artifact names."""
    plt = _pyplot()
    names = []
    primary = space.primary
    floor = None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for t in summary.trials:
        if not t.run_id:
            continue
        for ax, metric in zip(axes, (primary.metric, "train_r_madry")):
            xs, ys = _history(cl, t.run_id, metric)
            if xs:
                ax.plot(xs, ys, marker=".", lw=1, alpha=0.8, label=t.trial_id)
        xs, ys = _history(cl, t.run_id, "floor")
        floor = ys[-1] if ys else floor
    axes[0].set(xlabel="epoch", ylabel=primary.metric, title=f"{primary.metric} per trial")
    axes[1].set(xlabel="epoch", ylabel="train_r_madry (R_Madry)", title="robust CE at the CE-PGD point")
    if floor is not None:
        line = axes[1].axhline(floor, color="k", ls="--", lw=1, label=f"floor (C^l1)^2/2 = {floor:.3g}")
        axes[1].legend(handles=[line], fontsize=8, loc="upper right")
    if len(summary.trials) <= 12:
        axes[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    cl.log_figure(summary.parent_run_id, fig, "plots/learning_curves.png")
    plt.close(fig)
    names.append("plots/learning_curves.png")

    params = list(space.params)
    fig, axes = plt.subplots(1, len(params), figsize=(4 * len(params), 3.5), squeeze=False)
    for ax, p in zip(axes[0], params):
        spec = space.params[p]
        pts = [(t.point.get(p), t.value(primary.metric)) for t in summary.trials if t.value(primary.metric) is not None]
        if spec.kind == "choice":
            cats = [str(c) for c in spec.choice or []]
            ax.scatter([cats.index(str(x)) for x, _ in pts if str(x) in cats],
                       [y for x, y in pts if str(x) in cats])
            ax.set_xticks(range(len(cats)), cats, rotation=45, fontsize=8)
        else:
            ax.scatter([x for x, _ in pts], [y for _, y in pts])
            if spec.kind == "loguniform":
                from matplotlib.ticker import NullFormatter

                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set(xlabel=p, ylabel=f"best {primary.metric}")
    fig.tight_layout()
    cl.log_figure(summary.parent_run_id, fig, "plots/objective_vs_params.png")
    plt.close(fig)
    names.append("plots/objective_vs_params.png")

    if space.multi_objective:
        o1, o2 = space.objective[0], space.objective[1]
        fig, ax = plt.subplots(figsize=(5, 4))
        pts = [(t.value(o1.metric), t.value(o2.metric)) for t in summary.trials
               if t.value(o1.metric) is not None and t.value(o2.metric) is not None]
        ax.scatter([a for a, _ in pts], [b for _, b in pts], c="0.6", label="trials")
        front = sorted((t.value(o1.metric), t.value(o2.metric)) for t in summary.pareto)
        ax.plot([a for a, _ in front], [b for _, b in front], "o-", c="C3", label="Pareto front")
        ax.set(xlabel=f"{o1.metric} ({o1.mode})", ylabel=f"{o2.metric} ({o2.mode})")
        ax.legend()
        fig.tight_layout()
        cl.log_figure(summary.parent_run_id, fig, "plots/pareto_front.png")
        plt.close(fig)
        names.append("plots/pareto_front.png")
    return names

