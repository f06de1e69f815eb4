"""``scoretune ui`` without a browser: a ``--search`` that names no search is one error line, printed before
anything else (no "MLflow UI ... on http://..." header first); the registered model a search was promoted to."""

from __future__ import annotations


def test_ui_with_an_unknown_search_prints_only_the_error(tmp_path, capsys):
    from mlflow.tracking import MlflowClient
    from scoretune import cli

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(tracking_uri=uri).create_experiment("e")  # a store, with no search in it
    assert cli.main(["ui", "--tracking-uri", uri, "--search", "nosuch"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.strip().splitlines()[-1] == f"scoretune ui: error: --search: no search named 'nosuch' in {uri} (scoretune ui without " \
                          "--search links the newest one)"


def test_the_registered_model_of_a_search_is_the_one_promote_tagged_with_its_name(tmp_path):
    from mlflow.tracking import MlflowClient
    from scoretune.tracking.ui_links import registered_model_of

    cl = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    for name, search in (("scoretune-a", "a"), ("mine", "b"), ("other", "ab")):
        cl.create_registered_model(name)
        cl.create_model_version(name, source=str(tmp_path), tags={"scoretune.search_name": search})
    assert registered_model_of(cl, "b") == "mine" and registered_model_of(cl, "a") == "scoretune-a"
    assert registered_model_of(cl, "c") is None
