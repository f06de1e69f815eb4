"""``scoretune ui`` without a browser: a ``--search`` that names no search is one error line, printed before
anything else (no "MLflow UI ... on http://..." header first)."""

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
