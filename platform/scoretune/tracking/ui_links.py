"""Deep links into the MLflow UI (3.x) for a search: the model-training view of its runs table, sorted
by the best objective, with the searched params and the best-epoch metrics as columns; and a compare
page for the top-k trials.

What the MLflow UI reads (checked against the 3.17 JS bundle and in Chromium):

* ``workflowType=machine_learning`` in the page's query: the training view (runs table, Models tab)
  instead of the GenAI traces page; the experiment tag ``mlflow.experimentKind`` =
  ``custom_model_development`` makes that view the experiment's own default.
* ``viewStateShareKey=KEY``: the page state saved in the experiment tag ``mlflow.sharedViewState.KEY``
  (JSON) -- the search facets ``searchFilter``, ``orderByKey``, ``orderByAsc`` and the UI state
  ``selectedColumns`` (``params.`beta```, ``metrics.`best_val_pgd_acc```, ``tags.`...```),
  ``runsHiddenMode``, ``hideEmptyCharts`` ... The URL's own ``searchFilter`` / ``orderByKey`` would
  win over it, so the link carries only the key.
* ``compareRunCharts`` / ``compareRunSections`` in that state: the charts of the runs page's Chart view
  (``compareRunsMode=CHART`` in the query), in the given order; MLflow appends a chart for every other
  metric after them when the section is marked reordered.

The compare link is the runs page's Chart view of the top-k, not MLflow's ``#/compare-runs`` page: that
page's parallel-coordinates plot starts from the first metric the runs share (``epoch``) and the first
three differing params in alphabetical order, held in the component's state only (no query parameter
or stored state sets them). The Chart view's parallel-coordinates chart takes its params and metrics
from the shared view state. The logged-models page sorts by creation time, newest first, in the
page's state only: finalize logs the top-k's models worst first, so the best is on top. The registry's
list page (``#/models``) rewrites its own query, so it falls back to the browser's last view (GenAI at
first), and greets a first visit with a "new Model Registry UI" dialog that only the browser's local
storage dismisses; a registered model's own page (``#/models/NAME``) keeps the query and has no dialog,
so the link goes there once ``promote`` has registered a version of the search.

No Ray import; the command (``scoretune ui``) prints the links.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Sequence
from urllib.parse import quote

from . import tags
from .runs import tag_filter

VIEW_TAG_PREFIX = "mlflow.sharedViewState."
EXPERIMENT_KIND = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"
IDENTITY_PARAMS = ("method", "model", "data", "eps", "norm", "epochs", "workers", "floor")
SUMMARY_METRICS = ("rank", "best_epoch", "epochs_run", "aa_acc")
CURVES = ("val_clean_acc", "train_loss", "train_r_madry")  # charted after the objectives' own curves
MODEL_SECTION = "Model metrics"  # MLflow's chart section of the metrics whose names have no ``prefix/``


@dataclass(frozen=True)
class SearchLinks:
    search: str
    experiment_id: str
    parent_run_id: str
    runs: str               # the runs table of the search's trials
    parent: str             # the parent run (its description: the summary table)
    compare: str | None     # the Chart view of the top-k trials (parallel coordinates, then curves)
    models: str             # the registered model that ``promote`` filled (its versions and alias), else the registry
    promoted: str | None    # that registered model's name (None: not promoted yet)
    logged_models: str      # the experiment's logged models (trial-<id>, with their metrics)
    top: list[str]          # run ids of the top-k, best first


def column(kind: str, key: str) -> str:
    """A runs-table column id: ``params.`beta```, ``metrics.`best_val_pgd_acc```, ``tags.`...```."""
    return f"{kind}.`{key}`"


def objectives_of(parent: Any) -> list[tuple[str, str]]:
    """``[(metric, mode)]`` of a search's parent run (param ``search.objective`` = ``m:max,m2:min``)."""
    out = []
    for part in parent.data.params.get("search.objective", "").split(","):
        metric, _, mode = part.strip().partition(":")
        if metric:
            out.append((metric, mode or "max"))
    return out or [("val_pgd_acc", "max")]


def searched_params(children: Sequence[Any]) -> list[str]:
    """The searched params of a search's trial runs (their params, less the identifying constants),
    in the order the first trial logged them."""
    seen: list[str] = []
    for r in children:
        for k in r.data.params:
            if k not in IDENTITY_PARAMS and "." not in k and k not in seen:
                seen.append(k)
    return seen


def chart_id(*parts: str) -> str:
    """A stable id for a chart or chart section of a shared view (the same view gets the same ids)."""
    return "scoretune-" + hashlib.sha256("/".join(parts).encode()).hexdigest()[:12]


def parallel_chart(params: Sequence[str], metrics: Sequence[str], runs: int) -> dict[str, Any]:
    """MLflow's parallel-coordinates chart config: one axis per param, then one per metric, a line per
    run (up to ``runs`` runs)."""
    return {"uuid": chart_id("parallel", *params, *metrics), "type": "PARALLEL",
            "metricSectionId": chart_id(MODEL_SECTION), "runsCountToCompare": runs, "deleted": False,
            "isGenerated": False, "selectedParams": list(params), "selectedMetrics": list(metrics), "showAllRuns": False}


def line_chart(metric: str, runs: int) -> dict[str, Any]:
    """MLflow's line chart config of a per-epoch metric against the step (the epoch), a line per run."""
    return {"uuid": chart_id("line", metric), "type": "LINE", "metricSectionId": chart_id(MODEL_SECTION),
            "runsCountToCompare": runs, "deleted": False, "isGenerated": True, "displayName": metric,
            "metricKey": metric, "lineSmoothness": 0, "xAxisScaleType": "linear", "scaleType": "linear",
            "range": {}, "xAxisKey": "step", "selectedXAxisMetricKey": "", "yAxisKey": "metric",
            "yAxisExpressions": [], "ignoreOutliers": False, "useGlobalXaxisKey": True,
            "useGlobalLineSmoothing": True}


def charts(objs: Sequence[tuple[str, str]], params: Sequence[str], children: Sequence[Any]) -> dict[str, Any]:
    """The Chart view's charts: the parallel coordinates of every searched param and ``best_<objective>``
    first, then the per-epoch curves of the objectives and :data:`CURVES` that the trials logged. The
    section is marked reordered, so MLflow appends the other metrics' charts after these."""
    logged = {k for r in children for k in r.data.metrics}
    curves = [m for m in dict.fromkeys([m for m, _ in objs] + list(CURVES)) if m in logged]
    runs = max(10, len(children))
    return {"compareRunCharts": [parallel_chart(params, [f"best_{m}" for m, _ in objs], runs)]
                                + [line_chart(m, runs) for m in curves],
            "compareRunSections": [{"uuid": chart_id(MODEL_SECTION), "name": MODEL_SECTION, "display": True,
                                    "isReordered": True, "deleted": False, "isGenerated": True}],
            "globalLineChartConfig": {"xAxisKey": "step", "lineSmoothness": 0, "selectedXAxisMetricKey": ""}}


def run_filter(parent: Any, runs: Sequence[str] = ()) -> str:
    """The search filter of a search's trials (of the run ids ``runs`` only, when given)."""
    where = tag_filter({tags.PARENT: parent.info.run_id})
    if runs:
        where += " and attributes.run_id IN (" + ", ".join(f"'{r}'" for r in runs) + ")"
    return where


def view_state(parent: Any, children: Sequence[Any], runs: Sequence[str] = ()) -> dict[str, Any]:
    """The shared view state of a search's runs table and its Chart view (see the module docstring);
    with ``runs`` (run ids), of those runs only."""
    objs = objectives_of(parent)
    metric, mode = objs[0]
    params = searched_params(children)
    cols = [column("params", p) for p in params]
    cols += [column("metrics", f"best_{m}") for m, _ in objs]
    cols += [column("metrics", m) for m in SUMMARY_METRICS]
    cols += [column("tags", tags.REASON)]
    ranked = any("rank" in r.data.metrics for r in children)
    return {
        "searchFilter": run_filter(parent, runs),
        # the search's ranking (finalize logs ``rank``: ties broken as the summary breaks them), else the objective
        "orderByKey": column("metrics", "rank") if ranked else column("metrics", f"best_{metric}"),
        "orderByAsc": ranked or mode == "min",
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "modelVersionFilter": "All Runs",
        "datasetsFilter": [],
        "selectedColumns": cols,
        "runsHiddenMode": "SHOW_ALL",
        "hideEmptyCharts": True,
        "columnOrder": [],
        "columnWidths": {},
        "viewMaximized": False,
        "runListHidden": False,
        "isAccordionReordered": False,
        "useGroupedValuesInCharts": True,
        "groupBy": None,
        "groupsExpanded": {},
        **charts(objs, params, children),
    }


def share_key(state: dict[str, Any]) -> str:
    """A stable key for a view state (the same state gets the same tag)."""
    return "scoretune-" + hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()[:16]


def publish_view(cl: Any, experiment_id: str, state: dict[str, Any]) -> str:
    """Store ``state`` as a shared view of the experiment and mark the experiment as model training;
    returns the share key."""
    key = share_key(state)
    cl.set_experiment_tag(experiment_id, VIEW_TAG_PREFIX + key, json.dumps(state))
    cl.set_experiment_tag(experiment_id, EXPERIMENT_KIND, TRAINING_KIND)
    return key


def registered_model_of(cl: Any, search: str) -> str | None:
    """The registered model holding the newest version that ``promote`` registered for ``search`` (its
    versions carry the tag ``scoretune.search_name``); None before any promote."""
    versions = [v for v in cl.search_model_versions(tag_filter({tags.SEARCH: search}))
                if v.tags.get(tags.SEARCH) == search]
    return max(versions, key=lambda v: int(v.creation_timestamp or 0)).name if versions else None


def search_links(cl: Any, base_url: str, *, search: str | None = None, top_k: int = 3) -> SearchLinks | None:
    """The links of search ``search`` (default: the newest search in the store); None when the store
    has no search. Publishes the runs table's view state on the experiment (idempotent)."""
    from .runs import SEARCH_STAGE, all_parent_runs, child_runs, find_parent_runs, rank_key, stage_of

    parents = find_parent_runs(cl, search) if search else all_parent_runs(cl, max_results=1)
    if not parents:
        return None
    parent = parents[0]
    eid = parent.info.experiment_id
    children = [r for r in child_runs(cl, parent) if tags.SUPERSEDED not in r.data.tags]
    state = view_state(parent, children)
    key = publish_view(cl, eid, state)
    base = base_url.rstrip("/")
    ml = "workflowType=machine_learning"
    metric, mode = objectives_of(parent)[0]
    scored = [r for r in children if f"best_{metric}" in r.data.metrics and r.data.tags.get(tags.STATUS) != "diverged"
              and stage_of(r) == SEARCH_STAGE]  # the search's trials (a confirmation's runs repeat them)
    scored.sort(key=lambda r: rank_key(r.data.metrics[f"best_{metric}"], mode, r.data.metrics.get("best_epoch"),
                                       r.data.tags.get(tags.TRIAL, "")))
    top = [r.info.run_id for r in scored[: max(top_k, 0)]]
    compare = None
    if len(top) >= 2:
        ckey = publish_view(cl, eid, view_state(parent, children, runs=top))
        compare = f"{base}/#/experiments/{eid}/runs?viewStateShareKey={ckey}&compareRunsMode=CHART&{ml}"
    name = parent.data.tags.get(tags.SEARCH, parent.info.run_name)
    promoted = registered_model_of(cl, name)
    # the registry's list page rewrites its query (the view falls back to GenAI) and greets with a pop-up;
    # a registered model's own page keeps the query and has no pop-up
    models = f"{base}/#/models/{quote(promoted, safe='')}?{ml}" if promoted else f"{base}/#/models?{ml}"
    return SearchLinks(
        search=name, experiment_id=eid, parent_run_id=parent.info.run_id,
        runs=f"{base}/#/experiments/{eid}/runs?viewStateShareKey={key}&{ml}",
        parent=f"{base}/#/experiments/{eid}/runs/{parent.info.run_id}?{ml}",
        compare=compare, models=models, promoted=promoted, logged_models=f"{base}/#/experiments/{eid}/models?{ml}",
        top=top)
