"""The plots of a finished search, logged as PNG artifacts of its parent run (Matplotlib, Agg backend).

* ``plots/learning_curves.png``: the primary objective and the robust KL training loss R_Madry per
  epoch; lines coloured by the trial's score, the top-k labelled in the legend (trial id and value),
  the best one thick with a star at its best epoch, early-stopped trials grey and dashed, diverged
  ones grey and dotted; the loss panel is clipped to the healthy trials' range so SCORE's floor line
  (:func:`floor_value`) stays readable.
* ``plots/objective_vs_params.png``: the objective against each searched param (plain tick labels on
  log axes), the best trial starred.
* ``plots/param_importance.png``: Optuna's parameter importances (PED-ANOVA, as :mod:`.study`) over this search's finished trials.
* ``plots/parallel_coordinates.png``: every trial as a line through its (normalised) params and score.
* ``plots/pareto_front.png`` (multi-objective).

:func:`draw_plots` makes the figures from plain data (:class:`Curves`), so tests need no MLflow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from .report import SearchSummary, TrialSummary, finite
from .space import SearchSpace
from .study import optuna_space, param_importances

LOSS_METRICS = ("R_Madry", "train_r_madry", "train_madry_kl")  # the loss panel's metric: the first one a run has
FLOOR_NAMES = ("floor", "search.floor", "floor_value", "R_floor")  # where a floor value may be logged


@dataclass
class Curves:
    """Per-trial epoch curves: ``{trial_id: ([epochs], [values])}`` for the objective and the loss."""

    objective: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)
    loss: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)
    loss_name: str = LOSS_METRICS[0]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _history(cl: Any, run_id: str, metric: str) -> tuple[list[float], list[float]]:
    hist = sorted(cl.get_metric_history(run_id, metric), key=lambda m: m.step)
    return [float(m.step) for m in hist], [float(m.value) for m in hist]


def read_curves(cl: Any, summary: SearchSummary, metric: str) -> Curves:
    """The trials' curves from their MLflow runs."""
    c = Curves()
    for t in summary.trials:
        if not t.run_id:
            continue
        c.objective[t.trial_id] = _history(cl, t.run_id, metric)
        for name in LOSS_METRICS:
            xs, ys = _history(cl, t.run_id, name)
            if xs:
                c.loss[t.trial_id] = (xs, ys)
                c.loss_name = name
                break
    return c


def floor_value(cl: Any, summary: SearchSummary) -> float | None:
    """SCORE's floor (C^l1)^2/2 for the loss panel: a metric or param of the parent run (the names in
    ``FLOOR_NAMES``), else a child run's ``floor`` param; None when the search had no floor."""
    runs = [summary.parent_run_id] + [t.run_id for t in summary.trials[:1] if t.run_id]
    for rid in runs:
        try:
            data = cl.get_run(rid).data
        except Exception:
            continue
        for name in FLOOR_NAMES:
            for source in (data.metrics, data.params):
                try:
                    v = float(source[name])
                except (KeyError, TypeError, ValueError):
                    continue
                if math.isfinite(v):
                    return v
    return None


def refined_floor_value(cl: Any, summary: SearchSummary) -> float | None:
    """The floor refined from the best trial (``stoppers.floor.refine``): the parent's last
    ``floor_refined``; None when it was never refined."""
    try:
        v = float(cl.get_run(summary.parent_run_id).data.metrics["floor_refined"])
    except Exception:
        return None
    return v if math.isfinite(v) else None


def _plain(v: float, _pos: Any = None) -> str:
    """Tick label without powers of ten: 0.05, 0.2, 1, 10."""
    if v == 0:
        return "0"
    return f"{v:.3g}" if abs(v) >= 1e-3 else f"{v:.1e}"


def _scores(summary: SearchSummary, metric: str) -> dict[str, float]:
    return {t.trial_id: float(t.value(metric)) for t in summary.trials if t.value(metric) is not None}


def _colour(plt: Any, scores: Mapping[str, float], mode: str):
    """A trial id -> colour function: viridis by score (bright = better) and the matching ScalarMappable."""
    import matplotlib as mpl

    vals = list(scores.values()) or [0.0, 1.0]
    lo, hi = min(vals), max(vals)
    if lo == hi:
        lo, hi = lo - 1e-9, hi + 1e-9
    cmap = mpl.colormaps["viridis" if mode == "max" else "viridis_r"]
    norm = mpl.colors.Normalize(lo, hi)
    return (lambda tid: cmap(norm(scores[tid])) if tid in scores else "0.6"), mpl.cm.ScalarMappable(norm, cmap)


TOP_COLOURS = ("crimson", "tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown")


def _style(t: TrialSummary) -> dict[str, Any]:
    if t.status == "diverged":
        return {"ls": ":", "color": "0.55", "lw": 1.0, "alpha": 0.9}
    if t.status == "failed":
        return {"ls": ":", "color": "0.75", "lw": 0.8, "alpha": 0.7}
    if t.status != "completed":
        return {"ls": "--", "color": "0.6", "lw": 1.0, "alpha": 0.8}
    return {"ls": "-", "lw": 1.4, "alpha": 0.95}


def loss_clip(curves: Curves, summary: SearchSummary, *floors: float | None) -> tuple[float, float] | None:
    """The loss panel's y-range: the healthy (not diverged/failed) trials' values with a margin, and the
    floor lines (None: not drawn); None when there is nothing to clip to."""
    healthy = {t.trial_id for t in summary.trials if t.status not in ("diverged", "failed")}
    vals = [v for tid, (_, ys) in curves.loss.items() if tid in healthy for v in ys if finite(v)]
    vals += [f for f in floors if f is not None]
    if not vals:
        return None
    lo, hi = min(vals), max(vals)
    pad = 0.08 * (hi - lo or abs(hi) or 1.0)
    return max(0.0, lo - pad) if lo >= 0 else lo - pad, hi + pad


def draw_learning_curves(plt: Any, summary: SearchSummary, space: SearchSpace, curves: Curves,
                         floor: float | None, refined: float | None = None):
    primary = space.primary
    scores = _scores(summary, primary.metric)
    colour, mappable = _colour(plt, scores, primary.mode)
    top = [t.trial_id for t in summary.trials if t.trial_id in scores and t.status != "diverged"][: max(space.top_k, 1)]
    best = top[0] if top else None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), layout="constrained")
    ax_obj, ax_loss = axes
    order = sorted(summary.trials, key=lambda t: (t.trial_id in top, t.trial_id == best))  # the best drawn last
    ranked: dict[int, Any] = {}  # rank -> its line on the objective panel: the legend lists #1, #2, ... in order
    others: list[Any] = []
    for t in order:
        st = _style(t)
        if t.status == "completed" or t.trial_id in top:
            st = {**st, "color": colour(t.trial_id)}
        if t.trial_id in top:  # the top-k apart at a glance (viridis gives near-equal scores one colour)
            st = {**st, "color": TOP_COLOURS[top.index(t.trial_id) % len(TOP_COLOURS)]}
        if t.trial_id == best:
            st = {**st, "lw": 2.8, "ls": "-", "zorder": 5}
        rank = top.index(t.trial_id) + 1 if t.trial_id in top else None
        label = f"#{rank} {t.trial_id}  {scores[t.trial_id]:.3f} (ep {t.best_epoch})" if rank else None
        for ax, data in ((ax_obj, curves.objective), (ax_loss, curves.loss)):
            xs, ys = data.get(t.trial_id, ([], []))
            if xs:
                (line,) = ax.plot(xs, ys, marker="." if len(xs) < 30 else None, ms=4,
                                  label=label if ax is ax_obj else None, **st)
                if ax is ax_obj and rank:
                    ranked[rank] = line
        if t.trial_id == best and t.best_epoch is not None:
            others += ax_obj.plot([t.best_epoch], [scores[t.trial_id]], marker="*", ms=16, color="crimson", zorder=6,
                                  ls="none", label=f"best epoch of {t.trial_id}")
    from matplotlib.lines import Line2D

    extra = [Line2D([], [], color="0.6", ls="--", label="stopped early (ASHA / floor / plateau)")]
    if any(t.status == "diverged" for t in summary.trials):
        extra.append(Line2D([], [], color="0.55", ls=":", label="diverged"))
    handles = [ranked[r] for r in sorted(ranked)] + others
    ax_obj.legend(handles=handles + extra, fontsize=7.5, loc="lower right", title=f"top {len(top)} by {primary.metric}",
                  title_fontsize=8)
    ax_obj.set(xlabel="epoch", ylabel=primary.metric, title=f"{primary.metric} per epoch ({len(summary.trials)} trials)")
    ax_loss.set(xlabel="epoch", ylabel=f"{curves.loss_name} (robust CE at the CE-PGD point)",
                title="R_Madry estimate and SCORE's floor")
    if floor is not None:
        ax_loss.axhline(floor, color="crimson", ls="--", lw=1.4, label=f"floor (C^l1)^2/2 = {floor:.3g}")
    if refined is not None and refined != floor:
        ax_loss.axhline(refined, color="darkorange", ls="-.", lw=1.4,
                        label=f"floor refined from the best model = {refined:.3g}")
    clip = loss_clip(curves, summary, floor, refined)
    if clip is not None:
        ax_loss.set_ylim(*clip)
        hidden = [t.trial_id for t in summary.trials if any(v > clip[1] for v in curves.loss.get(t.trial_id, ([], []))[1])]
        if hidden:
            ax_loss.text(0.01, 0.98, f"clipped: {', '.join(hidden[:4])}{' ...' if len(hidden) > 4 else ''} above",
                         transform=ax_loss.transAxes, fontsize=7, va="top", color="0.4")
    if ax_loss.get_legend_handles_labels()[0]:
        ax_loss.legend(fontsize=8, loc="upper right")
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs: no 1.5
    cb = fig.colorbar(mappable, ax=axes, fraction=0.025, pad=0.01)
    cb.set_label(f"best {primary.metric}")
    return fig


def draw_objective_vs_params(plt: Any, summary: SearchSummary, space: SearchSpace):
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    primary = space.primary
    params = list(space.params)
    fig, axes = plt.subplots(1, len(params), figsize=(3.8 * len(params), 3.6), squeeze=False)
    trials = [t for t in summary.trials if t.value(primary.metric) is not None]
    best = summary.best
    for ax, p in zip(axes[0], params):
        spec = space.params[p]
        cats = [str(c) for c in spec.choice or []] if spec.kind == "choice" else []

        def x_of(t: TrialSummary) -> float | None:
            v = t.point.get(p)
            if cats:
                return float(cats.index(str(v))) if str(v) in cats else None
            return float(v) if finite(v) else None

        for group, kw in ((("completed",), {"c": "C0", "marker": "o", "label": "completed"}),
                          (("stopped_asha", "stopped_floor", "stopped_plateau", "stopped_early"),
                           {"c": "0.55", "marker": "s", "label": "stopped early"}),
                          (("diverged",), {"c": "C3", "marker": "x", "label": "diverged"})):
            pts = [(x_of(t), t.value(primary.metric)) for t in trials if t.status in group and x_of(t) is not None]
            if pts:
                ax.scatter([a for a, _ in pts], [b for _, b in pts], s=28, alpha=0.85, **kw)
        if best is not None and x_of(best) is not None:
            ax.scatter([x_of(best)], [best.value(primary.metric)], marker="*", s=260, c="gold", edgecolors="k",
                       zorder=5, label=f"best {best.trial_id}")
        if cats:
            ax.set_xticks(range(len(cats)), cats, rotation=30, fontsize=8)
            ax.set_xlim(-0.5, len(cats) - 0.5)
        elif spec.kind == "loguniform":
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FuncFormatter(_plain))
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set(xlabel=p + (" (log scale)" if spec.kind == "loguniform" else ""), ylabel=f"best {primary.metric}",
               title=f"{primary.metric} vs {p}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="best")
    fig.suptitle(f"search {summary.name}: best {primary.metric} ({primary.mode}) of each trial against its params",
                 fontsize=10)
    fig.tight_layout()
    return fig


def importances(summary: SearchSummary, space: SearchSpace) -> dict[str, float]:
    """Optuna's PED-ANOVA parameter importances of this search's trials with a score (empty when fewer than 3);
    the study's ``importance.png`` also counts warm-start trials."""
    import optuna

    primary = space.primary
    dists = optuna_space(space)
    study = optuna.create_study(direction="maximize" if primary.mode == "max" else "minimize")
    n = 0
    for t in summary.trials:
        v = t.value(primary.metric)
        params = {k: t.point.get(k) for k in dists}
        if v is None or any(params[k] is None for k in dists):
            continue
        try:
            study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=float(v)))
            n += 1
        except ValueError:  # a value outside the space (a points_to_evaluate entry): leave it out
            continue
    if n < 3:
        return {}
    return param_importances(study, [primary]).get(primary.metric, {})


def draw_importance(plt: Any, summary: SearchSummary, space: SearchSpace, imp: Mapping[str, float]):
    fig, ax = plt.subplots(figsize=(5.5, 0.6 * max(len(imp), 2) + 1.2))
    names = list(imp)[::-1]
    ax.barh(names, [imp[n] for n in names], color="C0")
    for i, n in enumerate(names):
        ax.text(imp[n], i, f" {imp[n]:.2f}", va="center", fontsize=8)
    ax.set(xlabel="importance (Optuna PED-ANOVA, sums to 1)", ylabel="param",
           title=f"what drives {space.primary.metric} ({len(summary.trials)} trials)")
    ax.set_xlim(0, max(list(imp.values()) + [0.01]) * 1.2)
    fig.tight_layout()
    return fig


def draw_parallel(plt: Any, summary: SearchSummary, space: SearchSpace):
    """Parallel coordinates: one axis per param (log params on a log scale) and the score."""
    primary = space.primary
    params = list(space.params)
    scores = _scores(summary, primary.metric)
    colour, mappable = _colour(plt, scores, primary.mode)
    trials = [t for t in summary.trials if t.trial_id in scores]
    axes_names = params + [primary.metric]

    def norm_axis(name: str) -> tuple[Any, list[tuple[float, str]]]:
        if name == primary.metric:
            vals = [scores[t.trial_id] for t in trials]
            lo, hi = (min(vals), max(vals)) if vals else (0.0, 1.0)
            hi = hi if hi > lo else lo + 1e-9
            return (lambda v: (float(v) - lo) / (hi - lo)), [(0.0, _plain(lo)), (1.0, _plain(hi))]
        spec = space.params[name]
        if spec.kind == "choice":
            cats = [str(c) for c in spec.choice or []]
            k = max(len(cats) - 1, 1)
            return (lambda v: cats.index(str(v)) / k if str(v) in cats else float("nan")), \
                [(i / k, c) for i, c in enumerate(cats)]
        lo, hi = (float(b) for b in spec.bounds)
        if spec.kind == "loguniform":
            f = lambda v: (math.log(float(v)) - math.log(lo)) / (math.log(hi) - math.log(lo))
        else:
            f = lambda v: (float(v) - lo) / (hi - lo)
        return f, [(0.0, _plain(lo)), (1.0, _plain(hi))]

    maps = [norm_axis(n) for n in axes_names]
    fig, ax = plt.subplots(figsize=(2.0 * len(axes_names) + 2, 4.2), layout="constrained")
    for t in sorted(trials, key=lambda t: scores[t.trial_id] * (1 if primary.mode == "max" else -1)):
        ys = []
        for n, (f, _) in zip(axes_names, maps):
            v = scores[t.trial_id] if n == primary.metric else t.point.get(n)
            try:
                ys.append(f(v))
            except (TypeError, ValueError):
                ys.append(float("nan"))
        best = summary.best is not None and t.trial_id == summary.best.trial_id
        ax.plot(range(len(axes_names)), ys, color=colour(t.trial_id), lw=3 if best else 1.2,
                ls="-" if t.status == "completed" or best else "--", alpha=0.9, zorder=5 if best else 2)
    for i, (_, ticks) in enumerate(maps):
        ax.axvline(i, color="0.3", lw=0.8)
        for y, lab in ticks:
            ax.text(i + 0.03, y, lab, fontsize=7, va="center")
    ax.set_xticks(range(len(axes_names)), axes_names)
    ax.set_yticks([])
    ax.set_ylim(-0.08, 1.08)
    ax.set(title=f"parallel coordinates: params and best {primary.metric} (dashed: stopped early)")
    cb = fig.colorbar(mappable, ax=ax, fraction=0.03, pad=0.01)
    cb.set_label(f"best {primary.metric}")
    return fig


def draw_pareto(plt: Any, summary: SearchSummary, space: SearchSpace):
    o1, o2 = space.objective[0], space.objective[1]
    fig, ax = plt.subplots(figsize=(5, 4))
    pts = [(t.value(o1.metric), t.value(o2.metric)) for t in summary.trials
           if t.value(o1.metric) is not None and t.value(o2.metric) is not None]
    ax.scatter([a for a, _ in pts], [b for _, b in pts], c="0.6", label="trials")
    front = sorted((t.value(o1.metric), t.value(o2.metric)) for t in summary.pareto)
    ax.plot([a for a, _ in front], [b for _, b in front], "o-", c="C3", label="Pareto front")
    ax.set(xlabel=f"{o1.metric} ({o1.mode})", ylabel=f"{o2.metric} ({o2.mode})", title="Pareto front")
    ax.legend()
    fig.tight_layout()
    return fig


def draw_plots(summary: SearchSummary, space: SearchSpace, curves: Curves, floor: float | None,
               refined: float | None = None) -> dict[str, Any]:
    """Artifact name -> Matplotlib figure, for every plot of the search (the caller closes them)."""
    plt = _pyplot()
    figs = {"plots/learning_curves.png": draw_learning_curves(plt, summary, space, curves, floor, refined),
            "plots/objective_vs_params.png": draw_objective_vs_params(plt, summary, space)}
    try:
        imp = importances(summary, space)
    except Exception:  # importance needs a few varied trials; a plot is not worth failing the search for
        imp = {}
    if imp:
        figs["plots/param_importance.png"] = draw_importance(plt, summary, space, imp)
    if len(_scores(summary, space.primary.metric)) >= 2:
        figs["plots/parallel_coordinates.png"] = draw_parallel(plt, summary, space)
    if space.multi_objective:
        figs["plots/pareto_front.png"] = draw_pareto(plt, summary, space)
    return figs


def log_plots(cl: Any, summary: SearchSummary, space: SearchSpace) -> list[str]:
    """Draw the plots (see the module docstring) and log them as PNG artifacts of the parent run;
    returns the artifact names."""
    plt = _pyplot()
    figs = draw_plots(summary, space, read_curves(cl, summary, space.primary.metric), floor_value(cl, summary),
                      refined_floor_value(cl, summary))
    for name, fig in figs.items():
        cl.log_figure(summary.parent_run_id, fig, name)
        plt.close(fig)
    return list(figs)
