"""Comparing and summarising trials: pure functions and records (no Ray, no MLflow but its tags).

* Ranking: better / best-epoch values, Pareto dominance and front.
* How a trial ended (:func:`classify_trial`): a stopper's :class:`~scoretune.stopping.Stop` -> stopped_floor
  / stopped_plateau; its epoch budget reached -> completed; otherwise (ASHA) -> stopped_asha. A trial at
  chance accuracy or with an exploding loss is ``diverged`` whatever stopped it (:func:`divergence`);
  :func:`status_label` is the short form the run name starts with (``[asha@3]``, ``[floor@7]``).
* The summary: :class:`TrialSummary` rows, the :class:`SearchSummary`, the results table and report.
* Paper-style tables: trials grouped by configuration (seeds pooled), mean +- std (n).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from ..stopping import Stop
from ..tracking import finite, tags
from ..tracking.runs import rank_key
from .space import ObjectiveSpec

STATUSES = ("completed", "stopped_asha", "stopped_floor", "stopped_plateau", "diverged", "failed")
EARLY = ("stopped_asha", "stopped_floor", "stopped_plateau")


def better(a: float, b: float, mode: str) -> bool:
    """True when ``a`` is strictly better than ``b`` under ``mode`` ('max' or 'min')."""
    return a > b if mode == "max" else a < b


def best_row(rows: Iterable[Mapping[str, Any]], metric: str, mode: str) -> Mapping[str, Any] | None:
    """The first row with the best finite ``metric`` (the trial's best epoch), or None."""
    best = None
    for row in rows:
        v = row.get(metric)
        if finite(v) and (best is None or better(float(v), float(best[metric]), mode)):
            best = row
    return best


def best_values(rows: Iterable[Mapping[str, Any]], objectives: Sequence[Any]) -> dict[str, float]:
    """``best_<metric>`` for every objective, read at the best epoch of the primary objective,
    plus ``best_epoch``; empty when no row has the primary metric."""
    rows = list(rows)
    primary = objectives[0]
    row = best_row(rows, primary.metric, primary.mode)
    if row is None:
        return {}
    out = {f"best_{o.metric}": float(row[o.metric]) for o in objectives if finite(row.get(o.metric))}
    if finite(row.get("epoch")):
        out["best_epoch"] = float(row["epoch"])
    return out


def dominates(a: Sequence[float], b: Sequence[float], modes: Sequence[str]) -> bool:
    """``a`` Pareto-dominates ``b``: at least as good in every objective, strictly better in one."""
    at_least = all(x >= y if m == "max" else x <= y for x, y, m in zip(a, b, modes))
    strictly = any(better(x, y, m) for x, y, m in zip(a, b, modes))
    return at_least and strictly


def pareto_front(points: Sequence[Sequence[float]], modes: Sequence[str]) -> list[int]:
    """Indices of the non-dominated points (the Pareto front), in input order."""
    return [i for i, p in enumerate(points)
            if not any(dominates(q, p, modes) for j, q in enumerate(points) if j != i)]


STOPPED = {"floor": "stopped_floor", "plateau": "stopped_plateau"}  # a Stop's kind -> the trial's status


def classify_trial(stop: Stop | None, last_epoch: float | None, budget: int, scheduler: str) -> tuple[str, str]:
    """(status, reason) of a trial that ended without an error; ``stop``: a stopper's verdict on it."""
    if stop is not None:
        return STOPPED.get(stop.kind, "stopped_early"), stop.reason
    epochs = int(last_epoch or 0)
    if epochs >= budget:
        return "completed", f"reached the epoch budget ({budget})"
    if scheduler == "asha":
        return "stopped_asha", f"ASHA stopped it after epoch {epochs} of {budget} (below the rung cutoff)"
    return "stopped_early", f"ended after epoch {epochs} of {budget}"


def stop_of(trial_id: str, stoppers: Sequence[Any]) -> Stop | None:
    """The first of the search's stoppers' verdicts on ``trial_id`` (None: no stopper stopped it)."""
    return next((s.stops[trial_id] for s in stoppers if trial_id in s.stops), None)


LOSS_KEYS = ("train_loss", "train_robust", "train_madry_kl", "train_r_madry")
ACC_KEYS = ("val_clean_acc", "train_clean_acc")
KL_KEYS = ("train_r_madry", "train_madry_kl", "train_attack_ce")  # the robust KL/CE estimate of a row
EXPLODE_FACTOR = 3.0   # a training loss this many times its lowest value (after it was lower) has exploded
CHANCE_MARGIN = 0.05   # clean accuracy within this of 1/num_classes is chance


def divergence(rows: Sequence[Mapping[str, Any]], num_classes: int | None = None) -> str | None:
    """Why a trial's epoch rows show it diverged, or None:

    * a non-finite training loss;
    * the total training loss rose to ``EXPLODE_FACTOR`` times its lowest value;
    * (``num_classes`` known) a last-epoch clean accuracy within ``CHANCE_MARGIN`` of chance
      ``1/num_classes`` together with a robust KL estimate above ``2 ln(num_classes)`` (confidently
      wrong: a near-uniform network has about ``ln(num_classes)``) or a training loss that did not go
      down since the first epoch. A trial that is merely slow (a tiny lr, still near uniform after one
      epoch) is at chance too, but not diverged."""
    rows = sorted(rows, key=lambda r: float(r.get("epoch", 0)))
    if not rows:
        return None
    for r in rows:
        for k in LOSS_KEYS:
            v = r.get(k)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isfinite(v):
                return f"{k} became {v} at epoch {int(r.get('epoch', 0))}"
    last = rows[-1]
    ep = int(last.get("epoch", 0))
    if num_classes and num_classes > 1:
        chance = 1.0 / num_classes
        acc_key = next((k for k in ACC_KEYS if finite(last.get(k))), None)
        if acc_key is not None and float(last[acc_key]) <= chance + CHANCE_MARGIN:
            at = f"{acc_key}={float(last[acc_key]):.3f} at epoch {ep} is chance (1/{num_classes})"
            kl_key = next((k for k in KL_KEYS if finite(last.get(k))), None)
            if kl_key is not None and float(last[kl_key]) > 2.0 * math.log(num_classes):
                return f"{at}, {kl_key}={float(last[kl_key]):.3g}"
            losses = [float(r["train_loss"]) for r in rows if finite(r.get("train_loss"))]
            if len(losses) >= 2 and losses[-1] >= losses[0]:
                return f"{at}, train_loss not falling ({losses[0]:.3g} -> {losses[-1]:.3g})"
    for k in ("train_loss",):  # the robust terms may rise in healthy training; the total should not
        vals = [float(r[k]) for r in rows if finite(r.get(k))]
        if len(vals) >= 2:
            low = min(vals[:-1])
            if low > 0 and vals[-1] >= EXPLODE_FACTOR * low:
                return f"{k} exploded from {low:.3g} to {vals[-1]:.3g} by epoch {ep}"
    return None


_SHORT = {"completed": "done", "stopped_asha": "asha", "stopped_floor": "floor", "stopped_plateau": "plateau",
          "stopped_early": "stopped", "running": "running"}


def status_label(status: str, epoch: int | None = None) -> str:
    """The bracketed status the UI shows first in a trial's run name: ``[done@12]``, ``[asha@3]``,
    ``[floor@7]``, ``[plateau@5]``, ``[diverged]``, ``[failed]``, ``[running]``."""
    if status in ("diverged", "failed", "running") or epoch is None:
        return f"[{_SHORT.get(status, status)}]"
    return f"[{_SHORT.get(status, status)}@{int(epoch)}]"


# ----------------------------------------------------------------------------- the summary: trial rows, tables, the report
CLEAN = "val_clean_acc"  # logged at the best epoch too, for the tables' clean column


def trial_summary_metrics(rows: Sequence[Mapping[str, Any]], objectives: Sequence[Any]) -> dict[str, float]:
    """The metrics a trial's run gets once, when it ends: ``best_<objective>`` (every objective, and the
    clean validation accuracy, at the primary objective's best epoch, the first one on a tie),
    ``best_epoch`` and ``epochs_run``."""
    clean = [] if any(o.metric == CLEAN for o in objectives) else [ObjectiveSpec(metric=CLEAN)]
    out = best_values(rows, [*objectives, *clean])
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
    aa_n: int | None = None  # the examples AutoAttack attacked (the split may hold fewer than n_ex)
    rank: int | None = None  # the run's ``rank`` metric as logged (1 = best; see finalize.log_ranks)

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
    confirmed: Any = None  # the confirmation stage's result (.confirm.Confirmation), when the space has one

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
    with_value.sort(key=lambda t: rank_key(float(t.value(primary.metric)), primary.mode,  # type: ignore[arg-type]
                                           t.best_epoch, t.trial_id))
    return with_value + sorted(without, key=lambda t: (t.status, t.trial_id))


def tied(trials: Sequence[TrialSummary], metric: str) -> set[str]:
    """The ids of trials whose ``metric`` (4 decimals, as the tables print it) equals another trial's:
    marked ``=`` in the tables, ranked by :func:`~scoretune.tracking.runs.rank_key`'s tie-breakers."""
    seen: dict[str, list[str]] = {}
    for t in trials:
        v = t.value(metric)
        if v is not None and t.status != "diverged":
            seen.setdefault(f"{v:.4f}", []).append(t.trial_id)
    return {tid for ids in seen.values() if len(ids) > 1 for tid in ids}


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
    ties = tied(summary.trials, objs[0].metric)
    for t in summary.trials:
        mark = ("*" if t.trial_id in front else "") + ("!" if t.feasible is False else "") + ("=" if t.trial_id in ties else "")
        cells = [t.trial_id + mark, t.status, str(t.epochs),
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
    """``0.4650±0.0353`` (AutoAttack accuracy and its binomial standard error), ``-`` when not run."""
    if t.aa_acc is None:
        return "-"
    return f"{t.aa_acc:.4f}" + (f"±{t.aa_se:.4f}" if t.aa_se is not None else "")


def aa_n_of(run_tags: Mapping[str, str]) -> int | None:
    """The number of examples a run's AutoAttack attacked (its ``eval.aa_<version>_acc.n_ex`` tag)."""
    for k, v in run_tags.items():
        if k.startswith(f"{tags.EVAL_PREFIX}aa_") and k.endswith("_acc.n_ex"):
            try:
                return int(v)
            except ValueError:
                return None
    return None


def aa_setting(trials: Sequence[TrialSummary], aa: Any) -> str:
    """``AutoAttack: fast, val split, n=135 (aa_acc ± binomial standard error)``: the n actually attacked
    (every n when the models differ), else the requested n_ex."""
    ns = sorted({t.aa_n for t in trials if t.aa_n is not None})
    n = ", ".join(map(str, ns)) if ns else str(aa.n_ex)
    return f"AutoAttack: {aa.version}, {aa.split} split, n={n} (aa_acc ± binomial standard error)"


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
    if SEED in space.params:
        by = [k for k in space.params if k != SEED]
        lines += ["", "over seeds (mean ± std (n), %):", format_groups(group_by_config(summary_trials(summary), by), by)]
    if summary.confirmed is not None and summary.confirmed.rows:
        c = summary.confirmed
        lines += ["", f"confirmed with seeds {c.seeds} (mean ± std (n), %; best mean AutoAttack first):",
                  format_groups(c.rows, c.by)]
    if any(t.aa_acc is not None for t in summary.trials) and getattr(space, "autoattack", None) is not None:
        lines.append(aa_setting(summary.trials, space.autoattack))
    ties = tied(summary.trials, space.primary.metric)
    if ties:
        lines.append(f"tied on {space.primary.metric} (marked =): {len(ties)} trials, ranked by the earlier best epoch, "
                     "then the trial id")
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


# ----------------------------------------------------------------------------- seeds: configurations as mean +- std
SEED = "seed"
COLUMNS = {"clean": ("clean_acc", "best_val_clean_acc"), "PGD": ("best_val_pgd_acc",), "AutoAttack": ("aa_acc",)}


@dataclass(frozen=True)
class Stat:
    """Mean, sample standard deviation (0 for one value) and count of one column of a configuration."""

    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat | None:
        xs = [float(v) for v in values if finite(v)]
        if not xs:
            return None
        m = sum(xs) / len(xs)
        var = sum((x - m) ** 2 for x in xs) / (len(xs) - 1) if len(xs) > 1 else 0.0
        return cls(m, var ** 0.5, len(xs))


@dataclass
class ConfigRow:
    """One configuration (the values of the grouping params) over its seeds."""

    config: dict[str, Any]
    stats: dict[str, Stat | None]
    runs: list[str] = field(default_factory=list)

    @property
    def config_id(self) -> str:
        return config_id(self.config)


def config_id(point: Mapping[str, Any], exclude: Sequence[str] = (SEED,)) -> str:
    """A short stable id of a configuration: its params but ``exclude`` (the seed), order-free."""
    import hashlib
    import json

    key = json.dumps({k: point[k] for k in sorted(point) if k not in exclude}, default=str, sort_keys=True)
    return hashlib.sha1(key.encode()).hexdigest()[:8]


def group_by_config(trials: Sequence[Mapping[str, Any]], by: Sequence[str],
                    columns: Mapping[str, Sequence[str]] = COLUMNS) -> list[ConfigRow]:
    """Trials (``{"point": params, "metrics": ..., "run": id}``) grouped by the values of ``by``; each
    column is the mean +- std over the group of the first of its metric names a trial has. Best first:
    by the last column (AutoAttack), rows without it after those with it, then by the one before (PGD)."""
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for t in trials:
        groups.setdefault(tuple(str(t["point"].get(k)) for k in by), []).append(t)
    rows = []
    for members in groups.values():
        stats = {col: Stat.of([next((m["metrics"][n] for n in names if finite(m["metrics"].get(n))), None)
                               for m in members]) for col, names in columns.items()}
        rows.append(ConfigRow({k: members[0]["point"].get(k) for k in by}, stats, [m.get("run") for m in members]))
    rows.sort(key=lambda r: tuple(-r.stats[c].mean if r.stats[c] else math.inf for c in reversed(list(columns))))
    return rows


def format_groups(rows: Sequence[ConfigRow], by: Sequence[str], fmt: str = "md") -> str:
    """The paper-style table of :func:`group_by_config`: one row per configuration, each column
    ``mean ± std (n)``, the best row in bold (md, latex); ``csv`` has mean, std and n columns."""
    columns = list(rows[0].stats) if rows else list(COLUMNS)

    def value(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    if fmt == "csv":
        head = list(by) + [f"{c}_{s}" for c in columns for s in ("mean", "std", "n")]
        lines = [",".join(head)]
        for r in rows:
            cells = [value(r.config[k]) for k in by]
            for c in columns:
                s = r.stats[c]
                cells += ["", "", "0"] if s is None else [f"{s.mean:.6f}", f"{s.std:.6f}", str(s.n)]
            lines.append(",".join(cells))
        return "\n".join(lines)

    def cell(s: Stat | None) -> str:
        if s is None:
            return "-"
        return (f"${s.mean * 100:.2f} \\pm {s.std * 100:.2f}$ ({s.n})" if fmt == "latex"
                else f"{s.mean * 100:.2f} ± {s.std * 100:.2f} ({s.n})")

    body = [[value(r.config[k]) for k in by] + [cell(r.stats[c]) for c in columns] for r in rows]
    head = list(by) + [f"{c} (%)" for c in columns]
    if fmt == "latex":
        bold = [f"\\textbf{{{x}}}" for x in body[0]] if body else []
        lines = ["\\begin{tabular}{" + "l" * len(by) + "c" * len(columns) + "}", "\\toprule",
                 " & ".join(head) + " \\\\", "\\midrule"]
        lines += [" & ".join(cells) + " \\\\" for cells in ([bold] + body[1:] if body else [])]
        return "\n".join(lines + ["\\bottomrule", "\\end{tabular}"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, cells in enumerate(body):
        lines.append("| " + " | ".join(f"**{c}**" if i == 0 else c for c in cells) + " |")
    return "\n".join(lines)


def summary_trials(summary: SearchSummary) -> list[dict[str, Any]]:
    """The finished search's trials as :func:`group_by_config` takes them (failed ones left out)."""
    return [{"point": t.point, "run": t.run_id, "metrics": {**t.best, "aa_acc": t.aa_acc}}
            for t in summary.trials if t.status != "failed"]
