"""Hostile and careless input (issue 25): YAML bombs, huge files, duplicate keys, absurd model specs,
quotes in filter values, an in-memory store and usage telemetry, each refused (or handled) in one line."""

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scoretune.cli import main
from scoretune.config import ConfigError, build_config, load_config, parse_overrides

REPO = Path(__file__).resolve().parent.parent
FAST = ["--set", "epochs=1", "--set", "attack.steps=1", "--set", "eval.pgd_steps=1", "--set", "eval.test=false",
        "--set", "eval.max_samples=32"]


def billion_laughs(key: str) -> str:
    """Nine levels of ten aliases each: 10^9 strings once expanded, 1 KB on disk."""
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    return "\n".join(lines) + f"\n{key}: *a9\n"


def one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def scoretune(*args, cwd, env=None, timeout=300):
    """``scoretune ARGS`` in a child process; by default with this environment less what an earlier test in
    this process may have left there for MLflow and Ray (``mlflow.set_tracking_uri`` exports its URI)."""
    if env is None:
        env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    return subprocess.run([sys.executable, "-m", "scoretune.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


# ----------------------------------------------------------------------------- 1, 2, 7: YAML
def refused_at_once(*args, cwd) -> str:
    """The one error line of ``scoretune ARGS`` in a child process, which must exit 2 within 60 s (a child,
    so that a YAML bomb that is not refused is killed rather than filling this process's memory)."""
    t0 = time.monotonic()
    try:
        r = scoretune(*args, cwd=cwd, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"scoretune {' '.join(args)} still running after 60 s")
    assert time.monotonic() - t0 < 30
    errors = [line for line in r.stderr.splitlines() if "error" in line.lower()]  # MLflow may log INFO lines
    assert r.returncode == 2 and len(errors) == 1, r.stderr[-2000:]
    return errors[0]


def test_a_billion_laughs_config_is_refused_at_once_naming_the_file(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(billion_laughs("epochs"))
    err = refused_at_once("train", str(bomb), "--no-mlflow", cwd=tmp_path)
    assert str(bomb) in err and "aliases" in err and "SCORETUNE_YAML_MAX_NODES" in err


def test_a_billion_laughs_in_a_space_is_refused_naming_the_file(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("base: {}\n" + billion_laughs("points_to_evaluate"))
    err = refused_at_once("search", str(space), cwd=tmp_path)
    assert str(space) in err and "aliases" in err


@pytest.mark.timeout(30)
def test_a_50_mb_config_is_refused_before_it_is_parsed(tmp_path):
    big = tmp_path / "big.yaml"
    with big.open("w") as f:
        f.write("epochs: 3\n")
        f.write("# padding\n" * 5_000_000)
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match="over the 1,000,000-byte limit") as e:
        load_config(big)
    assert time.monotonic() - t0 < 1
    assert str(big) in str(e.value) and "SCORETUNE_YAML_MAX_BYTES" in str(e.value)


def test_the_size_limit_is_configurable(tmp_path, monkeypatch):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("epochs: 3\n" + "# padding\n" * 200)
    assert load_config(cfg).epochs == 3
    monkeypatch.setenv("SCORETUNE_YAML_MAX_BYTES", "1000")
    with pytest.raises(ConfigError, match="1,000-byte limit"):
        load_config(cfg)


def test_a_key_written_twice_is_refused_naming_both_lines(tmp_path):
    cfg = tmp_path / "twice.yaml"
    cfg.write_text("epochs: 3\nbatch_size: 64\nepochs: 30\n")
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    msg = str(e.value)
    assert str(cfg) in msg and "'epochs' is written twice" in msg and "line 3" in msg and "line 1" in msg


def test_a_key_written_twice_in_a_section_is_refused_too(tmp_path):
    cfg = tmp_path / "twice.yaml"
    cfg.write_text("objective:\n  beta: 3\n  loss: kl\n  beta: 6\n")
    with pytest.raises(ConfigError, match="'beta' is written twice"):
        load_config(cfg)


def test_anchors_and_merge_keys_still_work(tmp_path):
    cfg = tmp_path / "anchors.yaml"
    cfg.write_text("x-optim: &optim {lr: 0.05, momentum: 0.8}\noptim:\n  <<: *optim\n  lr: 0.1\n")
    from scoretune.config import read_yaml

    assert read_yaml(cfg)["optim"] == {"lr": 0.1, "momentum": 0.8}


def test_a_set_value_holding_a_bomb_is_refused():
    bomb = "[" + ", ".join(["&x [a, a, a, a, a, a, a, a, a, a]"] + ["*x"] * 3000) + "]"
    with pytest.raises(ConfigError, match="--set epochs: YAML refused"):
        parse_overrides([f"epochs={bomb}"])


# ----------------------------------------------------------------------------- 3: model specs
@pytest.mark.timeout(60)
def test_a_checkpoint_whose_spec_asks_for_a_giant_model_is_refused_before_allocating(tmp_path, capsys, one_thread):
    import json

    import torch

    from scoretune.engine import Trainer

    ckpt = tmp_path / "giant.pt"
    Trainer(build_config({"epochs": 1})).save(ckpt)
    state = torch.load(ckpt, weights_only=True)
    state["model_spec"] = json.dumps({**json.loads(state["model_spec"]), "name": "wrn-2800-400", "options": {}})
    torch.save(state, ckpt)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    err = one_line_error(capsys, ["evaluate", str(ckpt), "--no-mlflow"])
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024 < 200
    assert str(ckpt) in err and "wrn-2800-400" in err and "SCORETUNE_MAX_MODEL_PARAMS" in err


@pytest.mark.parametrize("name,shape,classes,options", [
    ("mlp", (1, 8, 8), 10, {}), ("toy_mlp", (1,), 2, {}), ("small_cnn", (3, 32, 32), 7, {"channels": (8, 16, 4)}),
    ("preact_resnet18", (1, 28, 28), 5, {}), ("wrn-16-4", (3, 32, 32), 10, {}), ("wrn-70-16", (3, 32, 32), 10, {})])
def test_the_parameter_estimate_is_the_count_of_the_model_built(name, shape, classes, options):
    from scoretune.models import build_model, count_parameters, estimate_parameters

    net = build_model(name, input_shape=shape, num_classes=classes, device="meta", **options)
    assert estimate_parameters(name, input_shape=shape, num_classes=classes, **options) == count_parameters(net)


# ----------------------------------------------------------------------------- 4: filter strings
NASTY = ["o'brien données", 'say "hi"', "both ' and \"", "back\\slash", "ends in \\", "\\'", "100%", "a_b",
         "x' or tags.`scoretune.kind` != '", "🙂 ünïcödé", "O'BRIEN DONNÉES", "a\\'b", "", "two\nlines"]


def test_every_tag_value_finds_exactly_its_own_run(tracking_uri):
    from mlflow import MlflowClient

    from scoretune.tracking.runs import search_by_tags

    cl = MlflowClient(tracking_uri=tracking_uri)
    exp = cl.create_experiment("quotes")
    ids = {v: cl.create_run(exp, tags={"k": v, "scoretune.kind": "train"}).info.run_id for v in NASTY}
    for value in NASTY:
        found = search_by_tags(cl, [exp], {"k": value, "scoretune.kind": "train"})
        assert [r.info.run_id for r in found] == [ids[value]], value


def test_a_value_cannot_change_the_query():
    from scoretune.tracking.runs import tag_filter

    from mlflow.utils.search_utils import SearchUtils

    for value in NASTY:
        parsed = SearchUtils.parse_search_filter(tag_filter({"k": value, "scoretune.kind": "train"}))
        assert [c["key"] for c in parsed] == ["k", "scoretune.kind"], value
        assert parsed[1]["value"] == "train"


@pytest.mark.slow
def test_train_works_in_a_folder_with_a_quote_and_accents(tmp_path):
    folder = tmp_path / "o'brien données"
    folder.mkdir()
    r = scoretune("train", *FAST, "--set", "name=q", cwd=folder)
    assert r.returncode == 0, r.stderr
    r = scoretune("train", *FAST, "--set", "name=q", "--set", "epochs=2", "--resume", cwd=folder)
    assert r.returncode == 0, r.stderr
    from mlflow import MlflowClient

    cl = MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")
    runs = cl.search_runs([cl.get_experiment_by_name("q").experiment_id])
    assert len(runs) == 1 and runs[0].data.metrics["epoch"] == 2


# ----------------------------------------------------------------------------- 5: in-memory store
@pytest.mark.parametrize("uri", ["sqlite:///", "sqlite://", "sqlite:///:memory:"])
def test_an_in_memory_store_is_refused_before_the_run_starts(tmp_path, capsys, monkeypatch, uri):
    monkeypatch.chdir(tmp_path)
    t0 = time.monotonic()
    err = one_line_error(capsys, ["train", *FAST, "--tracking-uri", uri])
    assert time.monotonic() - t0 < 30
    assert "in-memory" in err and "sqlite:///mlflow.db" in err
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------- 6: unwritable artifacts
@pytest.mark.parametrize("how", ["mlruns is a file", "read-only folder"])
def test_an_unwritable_artifact_folder_is_refused_before_a_run_is_created(tmp_path, how):
    work, store = tmp_path / "work", tmp_path / "store"
    work.mkdir(), store.mkdir()
    if how == "mlruns is a file":  # refused even to root, unlike permissions
        (work / "mlruns").write_text("not a folder")
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into a read-only folder; the 'mlruns is a file' case covers root")
        work.chmod(0o555)
    try:
        err = refused_at_once("train", *FAST, "--tracking-uri", f"sqlite:///{store / 'm.db'}", cwd=work)
    finally:
        work.chmod(0o755)
    assert "mlruns" in err and "not writable" in err
    from mlflow import MlflowClient

    cl = MlflowClient(tracking_uri=f"sqlite:///{store / 'm.db'}")
    assert cl.search_runs([e.experiment_id for e in cl.search_experiments()]) == []


# ----------------------------------------------------------------------------- 8: telemetry
CI_VARS = ("PYTEST_CURRENT_TEST", "CI", "GITHUB_ACTIONS", "GITLAB_CI", "JENKINS_URL", "BUILDKITE", "TF_BUILD",
           "CIRCLECI", "TRAVIS", "TEAMCITY_VERSION", "CODEBUILD_BUILD_ARN", "BITBUCKET_BUILD_NUMBER")


def _user_env(home: Path) -> dict[str, str]:
    """This environment as a user's shell would have it: no CI markers (MLflow turns telemetry off under
    CI or pytest), no telemetry setting, HOME a fresh folder."""
    env = {k: v for k, v in os.environ.items() if k not in CI_VARS and k not in (
        "MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK", "RAY_USAGE_STATS_ENABLED", "XDG_CONFIG_HOME")}
    env.update(HOME=str(home), OMP_NUM_THREADS="1")
    return env


def test_telemetry_is_off_in_scoretune_processes_unless_the_user_opted_in(tmp_path):
    code = ("import scoretune, os, mlflow.telemetry.utils as u; "
            "print(u.is_telemetry_disabled(), os.environ['RAY_USAGE_STATS_ENABLED'])")
    env = _user_env(tmp_path)
    off = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert off.stdout.split() == ["True", "0"], off.stderr
    env.update(MLFLOW_DISABLE_TELEMETRY="false", RAY_USAGE_STATS_ENABLED="1")
    on = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert on.stdout.split() == ["False", "1"], on.stderr


# ----------------------------------------------------------------------------- property: fast and small
YAML_TEXT = st.one_of(
    st.text(max_size=300),
    st.lists(st.sampled_from(["epochs: 3", "epochs: 4", "&a [x, x]", "*a", "- *a", "a: &a [x, x, x]",
                              "b: [*a, *a, *a, *a]", "c: &c [*b, *b, *b, *b]", "d: [*c, *c, *c, *c]", "<<: *a",
                              "objective: {beta: 3}", "[[[[[[", "{a: {b: {c:", "!!python/object:os.system", "? x",
                              "'", "\"\\u0000\"", "%YAML 1.1", "---", "...", "  - 1", "key: |", "  text"]),
             max_size=40).map("\n".join),
)


def bomb(levels: int, width: int, key: str) -> str:
    lines = [f"l0: &l0 [{', '.join(['x'] * width)}]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + f"\n{key}: *l{levels}\n"


YAML_TEXT = st.one_of(YAML_TEXT, st.builds(bomb, st.integers(1, 9), st.integers(2, 10),
                                           st.sampled_from(["epochs", "objective", "points_to_evaluate"])))


def _bounded(call):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.monotonic()
    try:
        call()
    except ConfigError as e:
        assert len(str(e).splitlines()) == 1
    assert time.monotonic() - t0 < 5
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024 < 200


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(YAML_TEXT)
def test_no_yaml_document_makes_loading_a_config_slow_or_big(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("prop") / "c.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    _bounded(lambda: load_config(path))


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(["epochs", "objective.beta", "model.options", "data.options.x"]),
                          YAML_TEXT), max_size=3))
def test_no_set_string_makes_building_a_config_slow_or_big(pairs):
    _bounded(lambda: build_config({}, [f"{k}={v}" for k, v in pairs]))


# ----------------------------------------------------------------------------- 9: the space, before anything starts
def test_a_search_whose_base_eps_is_over_the_l2_diameter_fails_before_ray_or_mlflow(tmp_path):
    """``--set base.attack.norm=l2 --set base.attack.eps=9`` on the digits quickstart (l2 diameter 8): one
    line naming the field, in seconds, with neither Ray nor MLflow imported and nothing written."""
    code = ("import sys; from scoretune.cli import main; rc = main(sys.argv[1:]); "
            "print('started:', *(['ray'] if 'ray' in sys.modules and sys.modules['ray'].is_initialized() else []), "
            "*(['mlflow-run'] if 'mlflow' in sys.modules and sys.modules['mlflow'].active_run() else [])); "
            "sys.exit(rc)")
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", code, "search", str(REPO / "search_spaces" / "quickstart.yaml"),
                        "--set", "base.attack.norm=l2", "--set", "base.attack.eps=9"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert time.monotonic() - t0 < 30  # about 4 s, imports included, on an idle core
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stdout.split() == ["started:"], r.stdout  # no Ray started, no MLflow run created
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "base: attack.eps: 9 is larger than the l2 diameter 8" in err[0], r.stderr
    assert sorted(os.listdir(tmp_path)) == []  # no mlflow.db, no ray_results


def _space_error(raw: dict) -> str:
    from scoretune.search.space import build_space

    with pytest.raises(ConfigError) as e:
        build_space(raw, source="s.yaml")
    assert len(str(e.value).splitlines()) == 1
    return str(e.value)


L2_BASE = {"data": {"name": "mnist5k"}, "model": {"name": "mlp"}, "attack": {"norm": "l2", "eps": 1.0}, "epochs": 2}


def test_a_searched_eps_range_over_the_l2_diameter_is_named():
    base = {**L2_BASE, "data": {"name": "digits"}}
    msg = _space_error({"name": "t", "base": base, "params": {"eps": {"uniform": [0.1, 9.0]}}})
    assert "params.eps.uniform: value 9.0 makes an invalid experiment: attack.eps: 9 is larger than the l2 " \
           "diameter 8" in msg


def test_eps_against_the_diameter_of_each_searched_dataset():
    """eps 20 fits mnist5k's l2 diameter (28), not digits' (8): only the pair is invalid."""
    params = {"eps": {"uniform": [0.5, 20.0]}, "data.name": {"choice": ["mnist5k", "digits"]}}
    msg = _space_error({"name": "t", "base": L2_BASE, "params": params})
    assert "the combination eps=20.0, data.name='digits' makes an invalid experiment: attack.eps: 20" in msg
    # too many combinations for all of them (2 x 2 x 600 > 512): every pair is still checked
    msg = _space_error({"name": "t", "base": L2_BASE,
                        "params": {**params, "beta": {"choice": [float(b) for b in range(1, 601)]}}})
    assert "the combination eps=20.0, data.name='digits' makes an invalid experiment" in msg


def test_a_norm_choice_is_checked_against_the_searched_eps():
    params = {"norm": {"choice": ["l2", "linf"]}, "eps": {"uniform": [0.1, 2.0]}}
    msg = _space_error({"name": "t", "base": L2_BASE, "params": {"attack.norm": params["norm"], "eps": params["eps"]}})
    assert "attack.norm='linf'" in msg and "eps=2.0" in msg and "attack.eps: 2 is out of range for linf" in msg


# ----------------------------------------------------------------------------- 11: a refused write is no outage
def test_a_write_mlflow_refuses_is_not_an_outage():
    from mlflow.exceptions import MlflowException, RestException

    from scoretune.tracking.buffer import is_transient

    assert not is_transient(MlflowException("Invalid artifact path: '../..'. Names may be treated as files"))
    assert is_transient(MlflowException("API request to http://h:5000/api/2.0/mlflow/runs/create failed with "
                                        "exception HTTPConnectionPool: Max retries exceeded"))
    assert is_transient(RestException({"error_code": "INTERNAL_ERROR", "message": "server restarting"}))
    try:
        raise MlflowException("(sqlite3.OperationalError) database is locked")
    except MlflowException as e:
        assert is_transient(e)


@pytest.mark.timeout(60)
def test_sync_of_a_journal_with_a_dot_dot_artifact_reports_the_refused_write_and_keeps_the_journal(tmp_path):
    import json

    journal = tmp_path / "j.jsonl"
    entries = [{"format": "scoretune-tracking-journal", "version": 1, "experiments": {"1": "evil"}},
               {"seq": 1, "op": "create_run", "run": "pending-k1", "key": "k1",
                "args": {"experiment_id": "1", "experiment": "evil", "run_name": "r", "tags": {}, "start_time": 1}},
               {"seq": 2, "op": "log_text", "run": "pending-k1",
                "args": {"text": "pwned", "artifact_file": "../../evil.txt"}},
               {"seq": 3, "op": "set_tag", "run": "pending-k1", "args": {"key": "after", "value": "yes"}}]
    journal.write_text("".join(json.dumps(e) + "\n" for e in entries))
    store = tmp_path / "store"
    store.mkdir()
    t0 = time.monotonic()
    r = scoretune("sync", str(journal), "--tracking-uri", f"sqlite:///{store / 'm.db'}", "--timeout", "20",
                  cwd=store, timeout=120)
    assert time.monotonic() - t0 < 20  # not retried for --timeout as if the server were down
    assert "degraded" not in r.stdout + r.stderr and "not answering" not in r.stdout + r.stderr
    errors = [line for line in r.stderr.splitlines() if "error" in line]
    assert r.returncode == 2 and len(errors) == 1, r.stderr
    assert "refused 1 write" in errors[0] and "write 2 (log_text of '../../evil.txt'" in errors[0]
    assert "Invalid artifact path" in errors[0] and "kept for inspection" in errors[0]
    assert journal.exists() and not (tmp_path / "evil.txt").exists()
    from mlflow import MlflowClient

    cl = MlflowClient(tracking_uri=f"sqlite:///{store / 'm.db'}")
    runs = cl.search_runs([cl.get_experiment_by_name("evil").experiment_id])
    assert len(runs) == 1 and runs[0].data.tags["after"] == "yes"  # the writes after it were delivered


# ----------------------------------------------------------------------------- 10: messages naming the file or field
@pytest.fixture(scope="module")
def hostile_files(tmp_path_factory):
    """Every file case 10 needs, made once: checkpoints whose stored config is invalid, a store that is no
    database, SVHN files that are no MATLAB, a binary and a version-garbled journal, a binary env file."""
    import json

    import torch

    from scoretune.engine import Trainer

    d = tmp_path_factory.mktemp("hostile")
    Trainer(build_config({"epochs": 1, "device": "cpu"})).save(d / "good.pt")
    for name, section, field, value in [("eps1e9", "attack", "eps", 1e9), ("imagenet", "data", "name", "imagenet")]:
        state = torch.load(d / "good.pt", weights_only=True)
        cfg = json.loads(state["config"])
        cfg[section][field] = value
        state["config"] = json.dumps(cfg)
        torch.save(state, d / f"{name}.pt")
    (d / "notdb.db").write_bytes(b"this is not a database\n" * 100)
    (d / "svhn").mkdir()
    for split in ("train", "test"):
        (d / "svhn" / f"{split}_32x32.mat").write_bytes(b"")
    (d / "binary.jsonl").write_bytes(bytes(range(256)) * 4)
    (d / "garbled.jsonl").write_text('{"format": "scoretune-tracking-journal", "version": "1.x"}\n')
    (d / "binary.env").write_bytes(b"\xff\xfe\x00MLFLOW\x80\x81")
    (d / "binary.env").chmod(0o600)
    return d


RUN_ID = "0123456789abcdef0123456789abcdef"
CASE_10 = [  # id, argv ({d}: the files' folder), what the one line must say
    ("train: store no database", ["train", *FAST, "--tracking-uri", "sqlite:///{d}/notdb.db"],
     ["notdb.db", "not an SQLite database"]),
    ("promote: store no database", ["promote", "--search", "x", "--tracking-uri", "sqlite:///{d}/notdb.db"],
     ["notdb.db", "not an SQLite database"]),
    ("status: store no database", ["status", "x", "--tracking-uri", "sqlite:///{d}/notdb.db"],
     ["notdb.db", "not an SQLite database"]),
    ("evaluate: store no database", ["evaluate", RUN_ID, "--tracking-uri", "sqlite:///{d}/notdb.db"],
     ["notdb.db", "not an SQLite database"]),
    ("svhn .mat no MATLAB", ["train", *FAST, "--no-mlflow", "--set", "data.name=svhn", "--set", "data.root={d}/svhn"],
     ["train_32x32.mat", "not a readable SVHN MATLAB file", "re-download"]),
    ("checkpoint eps 1e9", ["evaluate", "{d}/eps1e9.pt", "--no-mlflow", "--attack", "clean"],
     ["eps1e9.pt", "stored config is invalid", "attack.eps: 1e+09"]),
    ("checkpoint unknown dataset", ["evaluate", "{d}/imagenet.pt", "--no-mlflow", "--attack", "clean"],
     ["imagenet.pt", "data.name: unknown dataset 'imagenet'"]),
    ("toy huge --n-samples", ["toy", "--n-samples", "100000000000", "--forms", "expectation", "--no-mlflow",
                              "--out", "{d}/toy_out"],
     ["--n-samples", "100,000,000,000", "use at most"]),
    ("tracking port 99999", ["train", *FAST, "--tracking-uri", "http://127.0.0.1:99999"],
     ["http://127.0.0.1:99999", "port"]),
    ("sync binary journal", ["sync", "{d}/binary.jsonl", "--tracking-uri", "sqlite:///{d}/sync.db"],
     ["binary.jsonl", "not a scoretune tracking journal", "UTF-8"]),
    ("sync garbled version", ["sync", "{d}/garbled.jsonl", "--tracking-uri", "sqlite:///{d}/sync.db"],
     ["garbled.jsonl", "journal version '1.x'"]),
    ("server binary --env-file", ["server", "--dir", "{d}/srv", "--env-file", "{d}/binary.env"],
     ["binary.env", "not a text file of KEY=VALUE lines"]),
    ("wrn-x-y", ["train", *FAST, "--no-mlflow", "--set", "model.name=wrn-x-y"], ["model.name", "wrn-x-y"]),
    ("wrn depth not 6n+4", ["train", *FAST, "--no-mlflow", "--set", "model.name=wrn-5-2"],
     ["model.name", "6n+4"]),
    ("unknown activation", ["train", *FAST, "--no-mlflow", "--set", "model.activation=bogus"],
     ["model.activation", "'bogus'", "relu"]),
    ("unknown model option", ["train", *FAST, "--no-mlflow", "--set", "model.options.bogus=1"],
     ["model.options", "'bogus'", "channels"]),
    ("config device tpu", ["train", *FAST, "--no-mlflow", "--set", "device=tpu"], ["device", "'tpu'", "cuda:N"]),
    ("evaluate --device tpu", ["evaluate", "{d}/good.pt", "--no-mlflow", "--device", "tpu"], ["--device", "'tpu'"]),
    ("toy --eps inf", ["toy", "--eps", "inf", "--no-mlflow", "--out", "{d}/toy_out"], ["--eps", "finite"]),
]


@pytest.mark.parametrize("argv,says", [c[1:] for c in CASE_10], ids=[c[0] for c in CASE_10])
def test_each_rejection_is_one_line_naming_the_file_or_field(hostile_files, tmp_path, capsys, monkeypatch, argv,
                                                             says, one_thread):
    """Exit 2 (a UserError the command raised, not the CLI's catch-all, which exits 1 and names an exception
    type), one line on stderr, no traceback, naming what is wrong; nothing large allocated first."""
    monkeypatch.chdir(tmp_path)
    for var in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "SCORETUNE_DEBUG"):
        monkeypatch.delenv(var, raising=False)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    err = one_line_error(capsys, [a.format(d=hostile_files) for a in argv])
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024 < 200
    assert "Traceback" not in err and "SCORETUNE_DEBUG" not in err
    for s in says:
        assert s in err, err


# ----------------------------------------------------------------------------- 8: nothing sent anywhere
NET_HOOK = '''import os, sys

LOG = os.environ.get("SCORETUNE_TEST_NET_LOG")


def loopback(host):
    h = str(host).strip("[]").lower()
    return h in ("localhost", "", "::1", "0.0.0.0", "::") or h.startswith(("127.", "::ffff:127."))


def hook(event, args):
    if event in ("socket.connect", "socket.getaddrinfo"):
        host = args[1][0] if event == "socket.connect" and isinstance(args[1], tuple) else args[0]
        if event == "socket.connect" and not isinstance(args[1], tuple):
            return  # a Unix socket
        if host is not None and not loopback(host):
            with open(LOG, "a") as f:
                f.write(f"{event} {host!r} (pid {os.getpid()}) {' '.join(sys.argv)[:300]}\\n")


if LOG:
    sys.addaudithook(hook)
'''


def _watched_env(tmp_path: Path) -> tuple[dict[str, str], Path, Path]:
    """A user's environment (no CI markers, no telemetry settings, a fresh HOME) whose Python processes record
    every connect() and name lookup beyond loopback (a ``sitecustomize`` audit hook) in the returned log."""
    hook, home, log = tmp_path / "hook", tmp_path / "home", tmp_path / "net.log"
    hook.mkdir(), home.mkdir()
    (hook / "sitecustomize.py").write_text(NET_HOOK)
    env = _user_env(home)
    env.update(SCORETUNE_TEST_NET_LOG=str(log),
               PYTHONPATH=os.pathsep.join([str(hook), *[p for p in sys.path if p and Path(p).is_dir()]]))
    for var in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        env.pop(var, None)
    return env, home, log


def test_the_connect_watch_sees_a_connection(tmp_path):
    env, _home, log = _watched_env(tmp_path)
    code = ("import socket\ntry:\n    socket.create_connection(('192.0.2.1', 9), timeout=0.01)\n"
            "except OSError:\n    pass\ntry:\n    socket.getaddrinfo('example.invalid', 80)\n"
            "except OSError:\n    pass\n")
    subprocess.run([sys.executable, "-c", code], env=env, timeout=60, check=True)
    text = log.read_text()
    assert "socket.connect '192.0.2.1'" in text and "socket.getaddrinfo 'example.invalid'" in text


@pytest.mark.slow
def test_a_default_train_connects_nowhere_beyond_loopback_and_writes_nothing_under_home(tmp_path):
    env, home, log = _watched_env(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    r = scoretune("train", *FAST, cwd=work, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (work / "mlflow.db").is_file()  # it logged, to the local store
    assert not log.exists(), log.read_text()
    assert sorted(str(p.relative_to(home)) for p in home.rglob("*")) == []  # MLflow's telemetry.json included


# ----------------------------------------------------------------------------- property: spaces, fast and small
SPACE_KEYS = ["num_samples", "params.beta.loguniform", "params.lr.choice", "base.attack.eps", "base.attack.norm",
              "base.epochs", "points_to_evaluate", "params", "base.model.options", "stoppers", "objective"]


def _quickstart_raw() -> dict:
    from scoretune.config import read_yaml

    return read_yaml(REPO / "search_spaces" / "quickstart.yaml")


@settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(YAML_TEXT)
def test_no_yaml_document_makes_loading_a_space_slow_or_big(tmp_path_factory, text):
    from scoretune.search.space import load_space

    path = tmp_path_factory.mktemp("prop") / "space.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    _bounded(lambda: load_space(path))


@settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(SPACE_KEYS), YAML_TEXT), max_size=3))
def test_no_set_string_makes_building_a_space_slow_or_big(pairs):
    from scoretune.search.space import build_space

    raw = _quickstart_raw()
    _bounded(lambda: build_space(raw, [f"{k}={v}" for k, v in pairs], source="quickstart.yaml"))


def test_a_searched_batch_size_must_split_over_the_trial_workers():
    msg = _space_error({"name": "t", "base": {**L2_BASE, "batch_size": 64}, "resources": {"workers": 2},
                        "params": {"batch_size": {"choice": [64, 33]}}})
    assert "params.batch_size.choice: value 33: batch_size 33 is not divisible by 2 workers" in msg


# Ray's dashboard process (started even with include_dashboard=False, for its usage-stats module) asks the cloud
# metadata servers which cloud it is on, with usage stats off: usage_stats_head.run calls
# get_cluster_config_to_report (ray/_common/usage/usage_lib.py) before it checks them. A Ray bug, in the README's
# known gaps; the only outside connection a search may make, and only from that process.
RAY_METADATA_PROBE = ("169.254.169.254", "metadata.google.internal")


@pytest.mark.slow
def test_a_small_search_connects_nowhere_beyond_loopback_but_rays_known_metadata_probe(tmp_path):
    env, _home, log = _watched_env(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    r = scoretune("search", str(REPO / "search_spaces" / "quickstart.yaml"), "--set", "num_samples=2",
                  "--set", "max_concurrent=1", "--set", "base.epochs=1", "--set", "base.attack.steps=1",
                  "--set", "base.eval.pgd_steps=1", "--set", "scheduler.grace_period=1", "--set", "stoppers.floor=null",
                  "--set", "autoattack.version=none", "--set", "top_k=0", cwd=work, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = log.read_text().splitlines() if log.exists() else []
    # 192.0.2.2 (TEST-NET) is Ray's node-IP probe: a UDP connect that sends nothing
    outside = [ln for ln in lines if "'192.0.2.2'" not in ln]
    probe = [ln for ln in outside if "ray/dashboard/dashboard.py" in ln and any(f"'{h}'" in ln for h in RAY_METADATA_PROBE)]
    assert [ln for ln in outside if ln not in probe] == []  # the driver, the trials, MLflow, Optuna: nothing
