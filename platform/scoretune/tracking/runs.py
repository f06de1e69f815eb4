"""Finding scoretune's runs in an MLflow store: a search's parent runs and their child runs.

Every MLflow filter string scoretune sends is built by :func:`tag_filter`, which quotes the values
(a path such as ``/home/o'brien données`` is a value, never part of the query), and every search by
tag values goes through :func:`search_by_tags`. No Ray import: ``promote`` and ``status`` use this
without starting anything.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from . import tags


def _literal(value: str) -> str | None:
    """``value`` as an MLflow filter string literal that MLflow reads back exactly, else None.

    MLflow strips a literal's outer quotes and unescapes nothing, so a value is written in single quotes
    when it holds no ``'`` and in double quotes when it holds no ``"``; a value ending in a backslash
    (which the SQL tokenizer reads as escaping the closing quote) or holding both quotes has no exact form.
    """
    if value.endswith("\\"):
        return None
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    return None


def tag_filter(values: Mapping[str, str]) -> str:
    """The MLflow filter string ``tags.`k` = 'v' and ...`` for ``values`` ({tag: value}), quoted so that
    no value can change the query. A value with no exact literal becomes a ``LIKE`` pattern with ``_``
    for each character that cannot be written (a superset of the runs wanted: :func:`search_by_tags`
    keeps the exact matches)."""
    clauses = []
    for key, value in values.items():
        if "`" in key:
            raise ValueError(f"tag key {key!r}: a backtick cannot be quoted in an MLflow filter")
        value = str(value)
        lit = _literal(value)
        if lit is not None:
            clauses.append(f"tags.`{key}` = {lit}")
        else:
            pattern = "".join("_" if c in "'\"\\" else c for c in value)
            clauses.append(f"tags.`{key}` LIKE '{pattern}'")
    return " and ".join(clauses)


def tags_match(run: Any, values: Mapping[str, str]) -> bool:
    """Whether ``run`` holds every tag of ``values`` with exactly that value."""
    return all(run.data.tags.get(k) == str(v) for k, v in values.items())


def search_by_tags(cl: Any, experiment_ids: Sequence[str], values: Mapping[str, str], **kwargs: Any) -> list[Any]:
    """``cl.search_runs`` of the runs holding exactly the tag ``values`` (``order_by``, ``max_results``
    and ``page_token`` passed on); the list carries the next page's ``token`` (None on the last page)."""
    page = cl.search_runs(list(experiment_ids), filter_string=tag_filter(values), **kwargs)
    out = _Page(r for r in page if tags_match(r, values))
    out.token = getattr(page, "token", None)
    return out


class _Page(list):
    token: str | None = None


def find_parent_runs(cl: Any, name: str, *, ray_path: str | None = None) -> list[Any]:
    """The parent runs of searches called ``name`` (newest first), in every experiment."""
    exps = [e.experiment_id for e in cl.search_experiments()]
    if not exps:
        return []
    values = {tags.KIND: "search", tags.SEARCH: name, **({tags.RAY_PATH: ray_path} if ray_path else {})}
    return search_by_tags(cl, exps, values, order_by=["attributes.start_time DESC"], max_results=100)


def all_parent_runs(cl: Any, max_results: int = 200) -> list[Any]:
    """The parent runs of every search in the store (newest first)."""
    exps = [e.experiment_id for e in cl.search_experiments()]
    if not exps:
        return []
    return search_by_tags(cl, exps, {tags.KIND: "search"}, order_by=["attributes.start_time DESC"],
                          max_results=max_results)


SEARCH_STAGE, CONFIRM_STAGE = "search", "confirm"


def stage_of(run: Any) -> str:
    """The stage a search's child run belongs to: ``confirm`` (tag ``scoretune.stage``) or ``search``."""
    return run.data.tags.get(tags.STAGE, SEARCH_STAGE)


def rank_key(value: float, mode: str, best_epoch: float | None, trial_id: str) -> tuple:
    """The one ranking rule of a search's trials (summary, description, plots, ``promote``, the runs
    table's ``rank`` metric): the better value first; on a tie the earlier best epoch (it got there with
    less training), then the smaller trial id (a stable order)."""
    import math

    epoch = best_epoch if best_epoch is not None and math.isfinite(best_epoch) else math.inf
    return (-value if mode == "max" else value, epoch, trial_id)


def child_runs(cl: Any, parent: Any, stage: str | None = None) -> list[Any]:
    """Every child run of ``parent`` (a Run), oldest first; only those of ``stage`` (``search`` or
    ``confirm``, see :func:`stage_of`) when given."""
    out, token = [], None
    while True:
        page = search_by_tags(cl, [parent.info.experiment_id], {tags.PARENT: parent.info.run_id},
                              order_by=["attributes.start_time ASC"], max_results=1000, page_token=token)
        out.extend(r for r in page if stage is None or stage_of(r) == stage)
        token = page.token
        if not token:
            return out


def find_train_run(cl: Any, experiment_id: str, run_path: str) -> Any | None:
    """The newest ``scoretune train`` run whose checkpoints live in ``run_path`` (tag ``scoretune.run_dir``)."""
    runs = search_by_tags(cl, [experiment_id], {tags.KIND: "train", tags.RUN_DIR: str(run_path)},
                          order_by=["attributes.start_time DESC"], max_results=20)
    return runs[0] if runs else None


def logged_epochs(cl: Any, run_id: str) -> int:
    """The last epoch a run has logged (its ``epoch`` metric's largest step; 0 when none)."""
    return max((int(m.step) for m in cl.get_metric_history(run_id, "epoch")), default=0)


def param_number(text: str) -> Any:
    """A logged param value as the number it was (``3`` -> 3, ``0.05`` -> 0.05), else the text."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            continue
    return text


def search_trials(cl: Any, parent: Any, stage: str = SEARCH_STAGE) -> list[dict[str, Any]]:
    """The trials of search ``parent`` (a Run) in ``stage`` (``search``, or ``confirm``: the confirmation
    runs) as rows ``{"point", "metrics", "run"}``: the searched params (those the parent logged as
    ``space.<name>``, and ``seed``) with their values, the run's metrics and its id. Runs a resume
    superseded and trials that failed are left out."""
    searched = [k[len("space."):] for k in parent.data.params if k.startswith("space.")]
    searched += ["seed"] if "seed" not in searched else []
    rows = []
    for run in child_runs(cl, parent, stage):
        t = run.data.tags
        if tags.SUPERSEDED in t or t.get(tags.STATUS) == "failed":
            continue
        point = {k: param_number(run.data.params[k]) for k in searched if k in run.data.params}
        rows.append({"point": point, "metrics": dict(run.data.metrics), "run": run.info.run_id})
    return rows
