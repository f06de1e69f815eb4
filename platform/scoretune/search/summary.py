"""What a finished search returns and prints: :class:`TrialSummary` rows, the :class:`SearchSummary`,
the ranking of trials and their Pareto front, the results table and the end-of-search report.

No Ray, no MLflow: :mod:`.finalize` fills these from the store, the command prints them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from .ranking import best_values, finite, pareto_front


def trial_summary_metrics(rows: Sequence[Mapping[str, Any]], objectives: Sequence[Any]) -> dict[str, float]:
    """The metrics a trial's run gets once, when it ends: ``best_<objective>`` (every objective at the
    primary objective's best epoch, the first one on a tie), ``best_epoch`` and ``epochs_run``."""
    out = best_values(rows, objectives)
    epochs = [float(r["epoch"]) for r in rows if finite(r.get("epoch"))]
    out["epochs_run"] = max(epochs, default=0.0)
    return out


def point_label(point: Mapping[str, Any]) -> str:
    """``beta=3.21 lr=0.05 loss=se`` (4 significant digits)."""
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in point.items())


@dataclass
class TrialSummary:
    """One row of the results table."""

    trial_id: str
    run_id: str | None
    status: str
    point: dict[str, Any]
    epochs: int
    best: dict[str, float] = field(default_factory=dict)
    reason: str = ""
    model_uri: str | None = None
    feasible: bool | None = None  # None: the space has no constraints (see .feasibility)
    aa_acc: float | None = None
    aa_se: float | None = None

    def value(self, metric: str) -> float | None:
        v = self.best.get(f"best_{metric}")
        return v if finite(v) else None

    @property
    def best_epoch(self) -> int | None:
        v = self.best.get("best_epoch")
        return int(v) if finite(v) else None


@dataclass
class SearchSummary:
    """A finished search: its trials (best first), Pareto front, and where its runs and results are."""

    name: str
    trials: list[TrialSummary]
    pareto: list[TrialSummary]
    parent_run_id: str
    experiment_id: str
    tracking_uri: str
    ray_path: str
    objectives: list[Any]
    space: Any = None
    importance: dict[str, dict[str, float]] = field(default_factory=dict)  # see .importance

    @property
    def best(self) -> TrialSummary | None:
        ranked = [t for t in self.trials if ranks(t, self.objectives[0].metric) and t.feasible is not False]
        return ranked[0] if ranked else None

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.trials:
            out[t.status] = out.get(t.status, 0) + 1
        return out


def ranks(t: TrialSummary, metric: str) -> bool:
    """``t`` takes a place by ``metric``: it has a value, and it did not diverge."""
    return t.value(metric) is not None and t.status != "diverged"


def rank_trials(trials: list[TrialSummary], objectives: Sequence[Any]) -> list[TrialSummary]:
    """Trials with a value first, best primary objective first; then the others by status. A diverged
    trial is never ranked above a healthy one, whatever its PGD accuracy (it gets no model)."""
    primary = objectives[0]
    with_value = [t for t in trials if ranks(t, primary.metric)]
    without = [t for t in trials if t not in with_value]
    sign = -1.0 if primary.mode == "max" else 1.0
    with_value.sort(key=lambda t: sign * float(t.value(primary.metric)))  # type: ignore[arg-type]
    return with_value + sorted(without, key=lambda t: t.status)


def front_of(trials: Sequence[TrialSummary], objectives: Sequence[Any]) -> list[TrialSummary]:
    """The Pareto front of the trials that have a value for every objective."""
    cand = [t for t in trials if t.status != "failed" and t.feasible is not False
            and all(t.value(o.metric) is not None for o in objectives)]
    pts = [[float(t.value(o.metric)) for o in objectives] for t in cand]  # type: ignore[arg-type]
    return [cand[i] for i in pareto_front(pts, [o.mode for o in objectives])]


def table_rows(summary: SearchSummary, params: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the results table (best first): trial, status, epochs run, best epoch, the
    searched params, the objectives at the best epoch, AutoAttack accuracy (+- its standard error), run id."""
    objs = summary.objectives
    head = ["trial", "status", "ep", "best_ep"] + list(params) + [f"{o.metric}({o.mode})" for o in objs]
    head += ["aa_acc", "run"]
    rows = []
    front = {t.trial_id for t in summary.pareto}
    for t in summary.trials:
        cells = [t.trial_id + ("*" if t.trial_id in front else "") + ("!" if t.feasible is False else ""), t.status, str(t.epochs),
                 "-" if t.best_epoch is None else str(t.best_epoch)]
        for p in params:
            v = t.point.get(p)
            cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
        for o in objs:
            v = t.value(o.metric)
            cells.append("-" if v is None else f"{v:.4f}")
        cells.append(format_aa(t))
        cells.append(t.run_id or "-")
        rows.append(cells)
    return head, rows


def format_aa(t: TrialSummary) -> str:
    """``0.4650+-0.0353`` (AutoAttack accuracy and its binomial standard error), ``-`` when not run."""
    if t.aa_acc is None:
        return "-"
    return f"{t.aa_acc:.4f}" + (f"+-{t.aa_se:.4f}" if t.aa_se is not None else "")


def aa_se(acc: float, n: int) -> float:
    """The binomial standard error sqrt(p (1 - p) / n) of an accuracy ``acc`` measured on ``n`` examples."""
    import math

    return math.sqrt(max(acc * (1.0 - acc), 0.0) / max(int(n), 1))


def format_table(summary: SearchSummary, params: Sequence[str]) -> str:
    """The results table: one line per trial, best first."""
    head, rows = table_rows(summary, params)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def aa_reranks(summary: SearchSummary) -> TrialSummary | None:
    """The trial AutoAttack ranks first when that is not the PGD-best trial (else None)."""
    with_aa = [t for t in summary.trials if t.aa_acc is not None]
    best = summary.best
    if len(with_aa) < 2 or best is None:
        return None
    top = max(with_aa, key=lambda t: t.aa_acc)  # type: ignore[arg-type, return-value]
    return None if top.trial_id == best.trial_id or top.aa_acc == best.aa_acc else top


def format_report(summary: SearchSummary, space: Any) -> str:
    """The end-of-search report: the table, the Pareto front, where things are."""
    space = summary.space or space
    lines = ["", format_table(summary, list(space.params))]
    counts = summary.counts()
    lines.append("")
    lines.append(", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    best = summary.best
    if best is not None:
        v = best.value(space.primary.metric)
        lines.append(f"best trial {best.trial_id}: {space.primary.metric}={v:.4f} ({point_label(best.point)}); "
                     f"MLflow run {best.run_id}" + (f"; model {best.model_uri}" if best.model_uri else ""))
    infeasible = [t.trial_id for t in summary.trials if t.feasible is False]
    if infeasible:
        lines.append(f"infeasible (marked !, never best or on the front): {len(infeasible)} trials")
    if space.multi_objective:
        lines.append(f"Pareto front ({len(summary.pareto)} trials, marked *): "
                     + ", ".join(t.trial_id for t in summary.pareto))
    lines.append(f"MLflow: {summary.tracking_uri}  experiment {summary.experiment_id}  parent run "
                 f"{summary.parent_run_id}")
    lines.append(f"Ray results: {summary.ray_path}")
    top = aa_reranks(summary)
    if top is not None and best is not None:
        lines.append(f"AutoAttack ranks the top trials differently from {space.primary.metric}: {top.trial_id} "
                     f"(aa_acc {top.aa_acc:.4f}) beats {best.trial_id} (aa_acc {format_aa(best)}); to promote by "
                     "robustness under AutoAttack:")
        lines.append(f"next: scoretune promote --search {summary.name} --metric aa_acc   |   scoretune ui")
    else:
        lines.append(f"next: scoretune promote --search {summary.name}   |   scoretune ui")
    return "\n".join(lines)
