"""What mattered: Optuna's parameter importance for each objective of a finished search.

PED-ANOVA (``optuna.importance.PedAnovaImportanceEvaluator``, Watanabe et al., IJCAI 2023), not
fANOVA, because

* it asks what a search asks -- which parameters separate the *top* trials (here the best
  ``max(10%, 3 trials)``) from the rest -- so a region where every value fails (a too-high lr that
  gives 0% accuracy) does not swamp it as it does fANOVA's global variance;
* it is a closed form over Parzen estimators (milliseconds, deterministic, no scikit-learn random
  forest), which matters with a few dozen trials, early-stopped ones included.

The study's COMPLETE trials count (warm-started ones too: they are evidence about the same space);
importances are normalised to sum to 1 per objective. Logged on the parent run as metrics
``importance.<metric>.<param>`` and the plot ``importance.png``; :func:`format_importance` is the text
printed under the summary table.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Mapping, Sequence

METHOD = "PED-ANOVA"


def param_importances(study: Any, objectives: Sequence[Any], *, feasible_only: bool = False) -> dict[str, dict[str, float]]:
    """Objective metric -> {param: importance} (largest first); {} when there are too few trials."""
    import optuna

    trials = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if feasible_only:
        trials = [t for t in trials if all(c <= 0 for c in t.constraints.values())]
    if len(trials) < 3:
        return {}
    out: dict[str, dict[str, float]] = {}
    quantile = min(0.5, max(0.1, 3 / len(trials)))
    ev = optuna.importance.PedAnovaImportanceEvaluator(target_quantile=quantile)
    view = _TrialsView(study, trials)
    for i, o in enumerate(objectives):
        sign = -1.0 if o.mode == "max" else 1.0  # PED-ANOVA ranks params by how they reach *low* targets

        def target(t: Any, i: int = i, sign: float = sign) -> float:
            return sign * float(t.values[i])

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                imp = optuna.importance.get_param_importances(view, evaluator=ev, target=target, normalize=True)
            except (ValueError, RuntimeError, ZeroDivisionError):
                continue
        out[o.metric] = {k: float(v) for k, v in sorted(imp.items(), key=lambda kv: -kv[1]) if math.isfinite(v)}
    return out


class _TrialsView:
    """A read-only stand-in for a study that shows only ``trials`` (what ``get_param_importances`` reads)."""

    def __init__(self, study: Any, trials: list[Any]):
        self._study = study
        self._trials = trials

    def get_trials(self, deepcopy: bool = True, states: Any = None) -> list[Any]:
        return [t for t in self._trials if states is None or t.state in states]

    def _get_trials(self, deepcopy: bool = True, states: Any = None, use_cache: bool = False) -> list[Any]:
        return self.get_trials(deepcopy, states)

    @property
    def trials(self) -> list[Any]:
        return list(self._trials)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)


def importance_metrics(imp: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """``importance.<metric>.<param>`` -> value (the parent run's metrics)."""
    return {f"importance.{m}.{p}": v for m, d in imp.items() for p, v in d.items()}


def format_importance(imp: Mapping[str, Mapping[str, float]]) -> str:
    """The lines printed under the summary table (empty without importances)."""
    if not imp:
        return ""
    lines = [f"parameter importance ({METHOD}: what separates the top trials from the rest; sums to 1):"]
    for m, d in imp.items():
        lines.append(f"  {m}: " + ", ".join(f"{p} {v:.2f}" for p, v in d.items()))
    return "\n".join(lines)


def importance_figure(imp: Mapping[str, Mapping[str, float]]):
    """One horizontal bar chart per objective (matplotlib Figure, Agg)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    n = max(1, len(imp))
    fig = Figure(figsize=(6, 1.2 + 0.45 * max(len(d) for d in imp.values()) * n))
    for k, (m, d) in enumerate(imp.items()):
        ax = fig.add_subplot(n, 1, k + 1)
        names = list(d)[::-1]
        ax.barh(names, [d[p] for p in names], color="#3b75af")
        ax.set_xlim(0, 1)
        ax.set_xlabel(f"importance for {m} ({METHOD})")
    fig.tight_layout()
    return fig


def log_importance(cl: Any, parent_run_id: str, imp: Mapping[str, Mapping[str, float]]) -> None:
    """Metrics ``importance.<metric>.<param>`` and the artifact ``importance.png`` on the parent run."""
    if not imp:
        return
    from .mlflow_io import log_metrics

    log_metrics(cl, parent_run_id, importance_metrics(imp), step=0)
    cl.log_figure(parent_run_id, importance_figure(imp), "importance.png")
