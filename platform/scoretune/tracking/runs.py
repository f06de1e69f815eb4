"""Finding scoretune's runs in an MLflow store: a search's parent runs and their child runs.

No Ray import: ``promote`` and ``status`` use this without starting anything.
"""

from __future__ import annotations

from typing import Any

from . import tags


def find_parent_runs(cl: Any, name: str, *, ray_path: str | None = None) -> list[Any]:
    """The parent runs of searches called ``name`` (newest first), in every experiment."""
    exps = [e.experiment_id for e in cl.search_experiments()]
    if not exps:
        return []
    flt = f"tags.`{tags.KIND}` = 'search' and tags.`{tags.SEARCH}` = '{name}'"
    if ray_path:
        flt += f" and tags.`{tags.RAY_PATH}` = '{ray_path}'"
    return list(cl.search_runs(exps, filter_string=flt, order_by=["attributes.start_time DESC"], max_results=100))


def all_parent_runs(cl: Any, max_results: int = 200) -> list[Any]:
    """The parent runs of every search in the store (newest first)."""
    exps = [e.experiment_id for e in cl.search_experiments()]
    if not exps:
        return []
    return list(cl.search_runs(exps, filter_string=f"tags.`{tags.KIND}` = 'search'",
                               order_by=["attributes.start_time DESC"], max_results=max_results))


def child_runs(cl: Any, parent: Any) -> list[Any]:
    """Every child run of ``parent`` (a Run), oldest first."""
    flt = f"tags.`{tags.PARENT}` = '{parent.info.run_id}'"
    out, token = [], None
    while True:
        page = cl.search_runs([parent.info.experiment_id], filter_string=flt,
                              order_by=["attributes.start_time ASC"], max_results=1000, page_token=token)
        out.extend(page)
        token = getattr(page, "token", None)
        if not token:
            return out


def find_train_run(cl: Any, experiment_id: str, run_path: str) -> Any | None:
    """The newest ``scoretune train`` run whose checkpoints live in ``run_path`` (tag ``scoretune.run_dir``)."""
    flt = f"tags.`{tags.KIND}` = 'train' and tags.`{tags.RUN_DIR}` = '{run_path}'"
    runs = cl.search_runs([experiment_id], filter_string=flt, order_by=["attributes.start_time DESC"],
                          max_results=20)
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


def search_trials(cl: Any, parent: Any) -> list[dict[str, Any]]:
    """The trials of search ``parent`` (a Run) as rows ``{"point", "metrics", "run"}``: the searched params
    (those the parent logged as ``space.<name>``) with their values, the run's metrics and its id. Runs a
    resume superseded and trials that failed are left out."""
    searched = [k[len("space."):] for k in parent.data.params if k.startswith("space.")]
    rows = []
    for run in child_runs(cl, parent):
        t = run.data.tags
        if tags.SUPERSEDED in t or t.get(tags.STATUS) == "failed":
            continue
        point = {k: param_number(run.data.params[k]) for k in searched if k in run.data.params}
        rows.append({"point": point, "metrics": dict(run.data.metrics), "run": run.info.run_id})
    return rows
