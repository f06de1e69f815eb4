"""Promotion and the MLflow UI command, on a hand-built MLflow store shaped like a search's (no Ray)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from scoretune.errors import UserError
from scoretune.tracking.promote import promote


def _run(cl, exp, name, parent=None, tags=None, params=None, history=None):
    from mlflow.entities import Metric, Param

    all_tags = dict(tags or {})
    if parent is not None:
        all_tags["mlflow.parentRunId"] = parent
    run = cl.create_run(exp, run_name=name, tags=all_tags)
    rid = run.info.run_id
    if params:
        cl.log_batch(rid, params=[Param(k, str(v)) for k, v in params.items()])
    ts = int(time.time() * 1000)
    for metric, values in (history or {}).items():
        cl.log_batch(rid, metrics=[Metric(metric, v, ts, i + 1) for i, v in enumerate(values)])
    cl.set_terminated(rid)
    return rid


def _net(seed):
    from scoretune.models import build_model

    torch.manual_seed(seed)
    return build_model("toy_mlp", input_shape=(1,), num_classes=2, mean=(0.0,), std=(1.0,)).eval()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Search 's1': child a (best 0.5, aa 0.40, model), b (best 0.6, aa 0.35, model), c (best 0.9, no model);
    search 's0': one child without a model."""
    from scoretune.tracking import client, get_or_create_experiment, log_torch_model

    d = tmp_path_factory.mktemp("promote")
    uri = f"sqlite:///{d / 'mlflow.db'}"
    cl = client(uri)
    exp = get_or_create_experiment(cl, "s1")
    parent = _run(cl, exp, "s1", tags={"scoretune.kind": "search", "scoretune.search_name": "s1"},
                  params={"search.objective": "val_pgd_acc:max"})
    example = np.linspace(-2, 2, 2, dtype=np.float32).reshape(2, 1)
    ids, nets = {}, {}
    for key, best, hist, aa, model in [("a", 0.5, [0.3, 0.5, 0.4], [0.40], True),
                                       ("b", 0.6, [0.6, 0.55], [0.35], True),
                                       ("c", 0.9, [0.9], [0.5], False)]:
        rid = _run(cl, exp, key, parent=parent, tags={"scoretune.kind": "trial", "scoretune.trial_id": key},
                   history={"val_pgd_acc": hist, "best_val_pgd_acc": [best], "aa_acc": aa})
        if model:
            nets[key] = _net(len(ids))
            cl.set_tag(rid, "scoretune.model_uri", log_torch_model(uri, rid, nets[key], example))
        ids[key] = rid
    parent0 = _run(cl, exp, "s0", tags={"scoretune.kind": "search", "scoretune.search_name": "s0"},
                   params={"search.objective": "val_pgd_acc:max"})
    _run(cl, exp, "z", parent=parent0, tags={"scoretune.trial_id": "z"}, history={"best_val_pgd_acc": [0.7]})
    return SimpleNamespace(uri=uri, cl=cl, ids=ids, nets=nets, example=example)


def test_promote_registers_the_best_child_that_has_a_model_and_sets_the_alias(store):
    res = promote("s1", tracking_uri=store.uri)
    assert res.run_id == store.ids["b"]  # c is better but has no model
    assert (res.trial_id, res.metric, res.value) == ("b", "val_pgd_acc", pytest.approx(0.6))
    assert res.uri == "models:/scoretune-s1@champion"
    mv = store.cl.get_model_version_by_alias("scoretune-s1", "champion")
    assert mv.run_id == store.ids["b"] and str(mv.version) == res.version


def test_promote_by_another_metric_uses_its_best_value_in_history(store):
    res = promote("s1", metric="aa_acc", alias="aa-champ", model_name="digits-aa", tracking_uri=store.uri)
    assert res.run_id == store.ids["a"] and res.value == pytest.approx(0.40)
    assert store.cl.get_model_version_by_alias("digits-aa", "aa-champ").run_id == store.ids["a"]
    assert res.uri == "models:/digits-aa@aa-champ"


def test_promote_with_mode_min_picks_the_lowest(store):
    res = promote("s1", metric="val_pgd_acc", mode="min", alias="worst", tracking_uri=store.uri)
    assert res.run_id == store.ids["a"] and res.value == pytest.approx(0.3)


def test_promoting_again_moves_the_alias_to_a_new_version(store):
    first = promote("s1", alias="again", model_name="again", tracking_uri=store.uri)
    second = promote("s1", metric="aa_acc", alias="again", model_name="again", tracking_uri=store.uri)
    assert int(second.version) == int(first.version) + 1
    assert store.cl.get_model_version_by_alias("again", "again").run_id == store.ids["a"]


def test_unknown_search_names_the_searches_in_the_store(store):
    with pytest.raises(UserError, match=r"no search named 'nope' .*searches in this store: s0, s1"):
        promote("nope", tracking_uri=store.uri)


def test_search_without_models_says_so(store):
    with pytest.raises(UserError, match="no trial of search 's0' has a logged model"):
        promote("s0", tracking_uri=store.uri)


def test_unknown_metric_lists_the_available_ones(store):
    with pytest.raises(UserError, match="no trial with a model has metric 'auto_acc'; available: aa_acc"):
        promote("s1", metric="auto_acc", tracking_uri=store.uri)


def test_promote_command_prints_the_alias_uri(store, capsys):
    from scoretune.cli import main

    assert main(["promote", "--search", "s1", "--model-name", "cli-model", "--tracking-uri", store.uri]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == "models:/cli-model@champion" and "promoted trial b" in out[0]


def test_fresh_process_loads_the_promoted_model_and_gets_the_same_outputs(store):
    res = promote("s1", model_name="load-check", tracking_uri=store.uri)
    x = np.linspace(-3, 3, 7, dtype=np.float32).reshape(7, 1)
    with torch.no_grad():
        expected = store.nets["b"](torch.from_numpy(x)).numpy()
    code = textwrap.dedent(f"""
        import json, mlflow, numpy as np, torch
        mlflow.set_tracking_uri({store.uri!r})
        net = mlflow.pytorch.load_model({res.uri!r})
        x = torch.from_numpy(np.linspace(-3, 3, 7, dtype=np.float32).reshape(7, 1))
        with torch.no_grad():
            print(json.dumps(net(x).numpy().tolist()))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = np.array(json.loads(proc.stdout.strip().splitlines()[-1]))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_ui_command_serves_the_store_on_localhost(store, capsys):
    from scoretune.cli import main

    assert main(["ui", "--tracking-uri", store.uri, "--port", "5123", "--print-command"]) == 0
    cmd = capsys.readouterr().out.split()
    assert cmd[1:4] == ["-m", "mlflow", "ui"]
    assert cmd[cmd.index("--backend-store-uri") + 1] == store.uri
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd[cmd.index("--port") + 1] == "5123"


def test_ui_command_without_a_store_says_how_to_get_one(tmp_path, capsys):
    from scoretune.cli import main

    assert main(["ui", "--tracking-uri", str(tmp_path / "none.db")]) == 2
    assert "no MLflow store at" in capsys.readouterr().err


def test_promote_leaves_no_registry_uri_behind_for_later_clients(store):
    import os

    import mlflow

    before = os.environ.get("MLFLOW_REGISTRY_URI")
    promote("s1", tracking_uri=store.uri)
    assert os.environ.get("MLFLOW_REGISTRY_URI") == before
    assert mlflow.get_registry_uri() == mlflow.get_tracking_uri()  # unset again: a client of another store uses its own
