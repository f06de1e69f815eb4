"""Cluster launch: the cluster configs pass Ray's own validation, ``scoretune launch`` builds the right
commands, ``scoretune status`` finds a search's job and best trial, and a search really runs as a Ray
job on a local two-node cluster (slow)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from scoretune import cli
from scoretune import launch as L

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
VM_CONFIGS = ["local", "aws-gpu", "gcp-gpu"]
TS = "20260101-120000"


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / f"{name}.yaml").read_text())


REPO_SPACES = Path(__file__).resolve().parent.parent / "search_spaces"


@pytest.fixture
def fake_repo(tmp_path, monkeypatch):
    """A minimal checkout (pyproject, platform/scoretune, the AWS config, a space) as the working dir."""
    root = tmp_path / "repo"
    (root / "platform" / "scoretune").mkdir(parents=True)
    (root / "cluster").mkdir()
    (root / "search_spaces").mkdir()
    (root / "pyproject.toml").write_text('[project]\nname = "scoretune"\n')
    shutil.copy(CLUSTER / "aws-gpu.yaml", root / "cluster" / "aws-gpu.yaml")
    shutil.copy(REPO_SPACES / "quickstart.yaml", root / "search_spaces" / "quickstart.yaml")
    monkeypatch.chdir(root)
    monkeypatch.setattr(L, "timestamp", lambda now=None: TS)
    return root


# ----------------------------------------------------------------------------- the cluster configs
@pytest.mark.parametrize("name", VM_CONFIGS)
def test_cluster_config_passes_ray_schema_validation(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = load(name)
    validate_config(raw)  # Ray's ray-schema.json + its own consistency checks, on the file as written
    filled = prepare_config(raw)  # merged with the provider's defaults, as `ray up` does (offline)
    validate_config(filled)
    assert filled["head_node_type"] in filled["available_node_types"]


@pytest.mark.parametrize("name", ["aws-gpu", "gcp-gpu"])
def test_cloud_configs_autoscale_gpu_workers_from_zero(name):
    from ray.autoscaler._private.util import prepare_config

    cfg = prepare_config(load(name))
    workers = {k: v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]}
    assert len(workers) >= 2
    for node in workers.values():
        assert node["resources"]["GPU"] >= 1
        assert node["min_workers"] == 0 and node["max_workers"] >= 1
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert "GPU" not in head["resources"]
    assert cfg["max_workers"] >= max(n["max_workers"] for n in workers.values())


def test_aws_config_has_the_requested_instance_types_and_spot():
    nodes = load("aws-gpu")["available_node_types"]
    types = {n["node_config"]["InstanceType"]: n["node_config"] for n in nodes.values()}
    assert set(types) == {"m5.2xlarge", "g5.xlarge", "g5.12xlarge", "p4d.24xlarge"}
    assert types["g5.xlarge"]["InstanceMarketOptions"] == {"MarketType": "spot"}
    assert "InstanceMarketOptions" not in types["m5.2xlarge"]
    assert {c["ImageId"] for c in types.values()} == {"ami-CHANGE-ME"}  # one Deep Learning AMI, set once


def test_gcp_config_attaches_t4_and_a100_accelerators():
    cfg = load("gcp-gpu")
    accels = {a["acceleratorType"]: n["node_config"]["machineType"]
              for n in cfg["available_node_types"].values() for a in n["node_config"].get("guestAccelerators", [])}
    assert accels == {"nvidia-tesla-t4": "n1-standard-8", "nvidia-tesla-a100": "a2-highgpu-1g"}
    assert "CHANGE-ME" in cfg["provider"]["project_id"]


def test_local_config_lists_head_and_worker_ips_and_ssh_auth():
    cfg = load("local")
    assert cfg["provider"]["type"] == "local"
    assert cfg["provider"]["head_ip"] and len(cfg["provider"]["worker_ips"]) == 2
    assert set(cfg["auth"]) == {"ssh_user", "ssh_private_key"}


@pytest.mark.parametrize("name", VM_CONFIGS)
def test_every_node_installs_torch_then_the_project(name):
    cfg = load(name)
    setup = " && ".join(cfg["setup_commands"])
    assert re.search(r"pip install -q torch==\d+\.\d+\.\d+ && pip install -q -e ~/scoretune", setup)
    assert '"ray[default]==2.60.0"' in setup  # the laptop's Ray version on every node
    assert cfg["file_mounts"]["~/scoretune/platform"] == "./platform"
    assert cfg["file_mounts"]["~/scoretune/pyproject.toml"] == "./pyproject.toml"


@pytest.mark.parametrize("name", VM_CONFIGS)
def test_every_node_gets_the_mlflow_uri_and_the_search_a_shared_storage_path(name):
    cfg = load(name)
    head, worker = " ".join(cfg["head_start_ray_commands"]), " ".join(cfg["worker_start_ray_commands"])
    private = "$(hostname -I | awk '{print $1}')"
    assert f"scoretune server --dir ~/mlflow --env-file ~/mlflow/secrets.env --host {private} --port 5000" in head
    assert "0.0.0.0" not in head and "sqlite" not in head  # private address, PostgreSQL
    assert f"export MLFLOW_TRACKING_URI=http://{private}:5000;" in head
    assert "export MLFLOW_TRACKING_URI=http://$RAY_HEAD_IP:5000;" in worker
    s = L.cluster_settings(cfg)
    scheme = {"aws-gpu": "s3://", "gcp-gpu": "gs://", "local": "/mnt/"}[name]
    assert s.storage_path.startswith(scheme)
    assert f"--artifacts-destination {scheme}" in head  # proxied: workers need no bucket credentials for tracking
    assert s.mlflow_port == 5000 and s.mlflow_server_dir == "~/mlflow" and s.mlflow_auth


@pytest.mark.parametrize("path", sorted(p.relative_to(CLUSTER).as_posix() for p in CLUSTER.rglob("*.yaml")))
def test_every_placeholder_has_a_change_me_comment_next_to_it(path):
    lines = (CLUSTER / path).read_text().splitlines()
    value_lines = [i for i, s in enumerate(lines) if "CHANGE-ME" in s.split("#")[0]]
    assert value_lines or path.startswith("kuberay/"), f"{path} has no placeholder to change"
    for i in value_lines:
        nearby = lines[max(0, i - 4): i + 1]
        assert any("# CHANGE ME" in s for s in nearby), f"{path}:{i + 1} has no '# CHANGE ME' comment: {lines[i]}"


def test_no_credentials_in_any_cluster_file():
    pattern = re.compile(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|BEGIN [A-Z ]*PRIVATE KEY|gcp_credentials|"
                         r"password\s*:|token\s*:", re.IGNORECASE)
    for p in CLUSTER.rglob("*"):
        if p.is_file():
            assert not pattern.search(p.read_text()), p


def test_find_placeholders_lists_every_change_me_value():
    cfg = {"provider": {"project_id": "CHANGE-ME-project"}, "auth": {"ssh_user": "ubuntu"},
           "cmds": ["ok", "mlflow --dest gs://change_me-bucket"], "n": 3}
    assert L.find_placeholders(cfg) == ["provider.project_id", "cmds[1]"]


# ----------------------------------------------------------------------------- KubeRay
def kuberay_docs() -> dict[str, dict]:
    docs = {}
    for p in sorted((CLUSTER / "kuberay").glob("*.yaml")):
        for d in yaml.safe_load_all(p.read_text()):
            docs[d["kind"]] = d
    return docs


def test_kuberay_manifests_are_a_raycluster_and_a_rayjob_of_ray_io_v1():
    docs = kuberay_docs()
    assert set(docs) == {"RayCluster", "RayJob"}
    assert all(d["apiVersion"] == "ray.io/v1" for d in docs.values())


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob"])
def test_kuberay_gpu_workers_ask_kubernetes_and_ray_for_the_same_gpus(kind):
    doc = kuberay_docs()[kind]
    spec = doc["spec"] if kind == "RayCluster" else doc["spec"]["rayClusterSpec"]
    assert spec["rayVersion"] == "2.60.0"
    assert spec["workerGroupSpecs"]
    for group in spec["workerGroupSpecs"]:
        gpus = group["rayStartParams"]["num-gpus"]
        (container,) = group["template"]["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == gpus
        assert int(gpus) >= 1
        assert re.fullmatch(r"rayproject/ray:2\.60\.0-py311-gpu", container["image"])
        assert group["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]


def test_rayjob_runs_the_search_with_the_repo_and_pip_in_its_runtime_env():
    job = kuberay_docs()["RayJob"]["spec"]
    assert job["entrypoint"].startswith("scoretune search search_spaces/")
    assert " --set storage_path=s3://" in job["entrypoint"]
    env = yaml.safe_load(job["runtimeEnvYAML"])
    assert env["working_dir"].endswith(".zip")
    assert "torch==2.13.0" in env["pip"]["packages"]
    assert any(p.startswith("scoretune @ ") for p in env["pip"]["packages"])
    assert env["env_vars"]["MLFLOW_TRACKING_URI"].startswith("http://")
    assert job["metadata"] == {"scoretune_search": "k8s-quickstart"}
    assert job["shutdownAfterJobFinishes"] is True


# ----------------------------------------------------------------------------- scoretune launch
def test_dry_run_prints_the_exact_ray_commands_for_aws(fake_repo, capsys):
    rc = cli.main(["launch", "--cluster", "cluster/aws-gpu.yaml", "search_spaces/quickstart.yaml",
                   "--name", "quick", "--dry-run", "--down"])
    out = capsys.readouterr()
    assert rc == 0
    lines = [s for s in out.out.splitlines() if not s.startswith("#")]
    renv = ('{"py_modules": ["platform/scoretune"], "excludes": [".git", "/.venv", "/runs", "/ray_results", '
            '"/mlruns", "/mlartifacts", "/data", "mlflow.db", "__pycache__", ".pytest_cache", "*.egg-info", '
            '"*.pt", "*.pth", "*.ckpt"], "env_vars": {"SCORETUNE_DATA": "/home/ubuntu/data"}}')
    assert lines == [
        "ray up -y cluster/aws-gpu.yaml",
        "ray dashboard --port 8265 cluster/aws-gpu.yaml",
        "ray job submit --address http://127.0.0.1:8265 --submission-id scoretune-quick-20260101-120000 "
        f"--working-dir . --runtime-env-json '{renv}' "
        """--metadata-json '{"scoretune_search": "quick", "scoretune_space": "search_spaces/quickstart.yaml"}' """
        "-- scoretune search search_spaces/quickstart.yaml --name quick --set storage_path=s3://CHANGE-ME-bucket/scoretune",
        "ray exec cluster/aws-gpu.yaml 'scoretune server --dir ~/mlflow --backup ~/mlflow/backups'",
        "ray rsync-down cluster/aws-gpu.yaml '~/mlflow/backups/' mlflow-backup-scoretune-aws/",
        "ray down -y cluster/aws-gpu.yaml",
    ]
    assert "CHANGE-ME placeholders" in out.err  # a dry run names what still has to be edited


def test_dry_run_without_down_or_follow_submits_no_wait_and_passes_the_tracking_uri(fake_repo, capsys):
    rc = cli.main(["launch", "--cluster", "cluster/aws-gpu.yaml", "search_spaces/quickstart.yaml", "--dry-run",
                   "--no-follow", "--tracking-uri", "http://mlflow.internal:5000", "--dashboard-port", "8300",
                   "--storage-path", "s3://b/st", "--set", "num_samples=16", "--resume"])
    lines = [s for s in capsys.readouterr().out.splitlines() if not s.startswith("#")]
    assert rc == 0 and len(lines) == 3
    assert lines[1] == "ray dashboard --port 8300 cluster/aws-gpu.yaml"
    assert lines[2].endswith(" --no-wait -- scoretune search search_spaces/quickstart.yaml --name quickstart "
                             "--tracking-uri http://mlflow.internal:5000 --set storage_path=s3://b/st "
                             "--set num_samples=16 --resume")
    assert '"MLFLOW_TRACKING_URI": "http://mlflow.internal:5000"' in lines[2]
    assert "--address http://127.0.0.1:8300 --submission-id scoretune-quickstart-20260101-120000" in lines[2]


FAKE_RAY = """\
import json, os, socket, sys, time
with open(os.environ["FAKE_RAY_LOG"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
cmd = sys.argv[1]
if cmd == "get-head-ip":
    print("203.0.113.7" if os.environ.get("FAKE_RAY_UP") else "")
    sys.exit(0 if os.environ.get("FAKE_RAY_UP") else 1)
if cmd == "dashboard":  # a port-forward: listen until killed
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", int(sys.argv[sys.argv.index("--port") + 1]))); s.listen()
    while True:
        time.sleep(1)
if cmd == "job" and "--runtime-env" in sys.argv:  # what the job gets, and how private its file was
    path = sys.argv[sys.argv.index("--runtime-env") + 1]
    with open(os.environ["FAKE_RAY_LOG"] + ".renv", "w") as f:
        json.dump({"path": path, "mode": os.stat(path).st_mode & 0o777, "text": open(path).read()}, f)
sys.exit(int(os.environ.get("FAKE_RAY_SUBMIT_RC", "0")) if cmd == "job" else 0)
"""


@pytest.fixture
def fake_ray(fake_repo, tmp_path, monkeypatch):
    """A stand-in `ray` CLI that records its calls, and a copy of the AWS config with its placeholders filled."""
    from scoretune.commands import launch as cmd

    exe = tmp_path / "ray"
    exe.write_text(f"#!{sys.executable}\n{FAKE_RAY}")
    exe.chmod(0o755)
    log = tmp_path / "calls.jsonl"
    monkeypatch.setattr(cmd, "_ray_exe", lambda: str(exe))
    monkeypatch.setenv("FAKE_RAY_LOG", str(log))
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")  # the config's server wants a login
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "pw-of-alice-123")
    text = (fake_repo / "cluster" / "aws-gpu.yaml").read_text()
    (fake_repo / "cluster" / "ready.yaml").write_text(re.sub(r"CHANGE-ME[\w-]*", "filled", text))
    port = _free_port()

    def calls() -> list[list[str]]:
        return [json.loads(s) for s in log.read_text().splitlines()] if log.exists() else []

    return SimpleNamespace(calls=calls, port=port, renv=Path(str(log) + ".renv"))


def test_launch_on_a_running_cluster_forwards_submits_saves_the_db_and_tears_down(fake_ray, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_RAY_UP", "1")
    rc = cli.main(["launch", "--cluster", "cluster/ready.yaml", "search_spaces/quickstart.yaml", "--name", "q",
                   "--down", "--dashboard-port", str(fake_ray.port)])
    out = capsys.readouterr().out
    assert rc == 0
    calls = fake_ray.calls()
    assert [c[:2] for c in calls] == [["get-head-ip", "cluster/ready.yaml"], ["dashboard", "--port"],
                                      ["job", "submit"], ["exec", "cluster/ready.yaml"],
                                      ["rsync-down", "cluster/ready.yaml"],
                                      ["down", "-y"]]  # no `ray up`: the head was already up
    assert calls[3][2] == "scoretune server --dir ~/mlflow --backup ~/mlflow/backups"  # pg_dump before teardown
    submit = calls[2]
    assert submit[submit.index("--address") + 1] == f"http://127.0.0.1:{fake_ray.port}"
    assert submit[submit.index("--"):] == ["--", "scoretune", "search", "search_spaces/quickstart.yaml", "--name",
                                           "q", "--set", "storage_path=s3://filled/scoretune"]
    assert "cluster scoretune-aws is up (head 203.0.113.7)" in out
    assert "ray attach cluster/ready.yaml -p " in out
    assert not _port_in_use(fake_ray.port)  # the port-forward was stopped


def test_launch_passes_the_mlflow_login_to_the_job_and_never_prints_or_keeps_it(fake_ray, monkeypatch, capsys):
    import yaml

    monkeypatch.setenv("FAKE_RAY_UP", "1")
    assert cli.main(["launch", "--cluster", "cluster/ready.yaml", "search_spaces/quickstart.yaml", "--name", "q",
                     "--dashboard-port", str(fake_ray.port)]) == 0
    out = capsys.readouterr()
    sent = json.loads(fake_ray.renv.read_text())
    env = yaml.safe_load(sent["text"])["env_vars"]
    assert env["MLFLOW_TRACKING_USERNAME"] == "alice" and env["MLFLOW_TRACKING_PASSWORD"] == "pw-of-alice-123"
    assert sent["mode"] == 0o600 and not Path(sent["path"]).exists()  # private, and gone after the submission
    assert "pw-of-alice-123" not in out.out + out.err
    assert all("pw-of-alice-123" not in " ".join(c) for c in fake_ray.calls())  # never on a command line


def test_launch_without_an_mlflow_login_refuses_before_any_cluster_command(fake_ray, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    rc = cli.main(["launch", "--cluster", "cluster/ready.yaml", "search_spaces/quickstart.yaml",
                   "--dashboard-port", str(fake_ray.port)])
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and fake_ray.calls() == []
    assert "requires a login: export MLFLOW_TRACKING_PASSWORD" in line


def test_launch_starts_a_cluster_that_is_down_and_returns_the_jobs_exit_code(fake_ray, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_RAY_SUBMIT_RC", "1")  # `ray job submit` exits 1 when the job FAILED
    rc = cli.main(["launch", "--cluster", "cluster/ready.yaml", "search_spaces/quickstart.yaml",
                   "--dashboard-port", str(fake_ray.port)])
    assert rc == 1
    assert [c[0] for c in fake_ray.calls()] == ["get-head-ip", "up", "dashboard", "job"]
    assert fake_ray.calls()[1] == ["up", "-y", "cluster/ready.yaml"]
    assert not _port_in_use(fake_ray.port)


def _port_in_use(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_launch_refuses_a_config_with_placeholders_before_running_anything(fake_repo, capsys, monkeypatch):
    ran = []
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: ran.append(a))
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: ran.append(a))
    rc = cli.main(["launch", "--cluster", "cluster/aws-gpu.yaml", "search_spaces/quickstart.yaml"])
    err = capsys.readouterr().err
    assert rc == 2 and ran == []
    assert "replace the CHANGE-ME placeholders first" in err and "metadata.scoretune.storage_path" in err


def test_launch_rejects_a_space_outside_the_repo(fake_repo, tmp_path, capsys):
    outside = tmp_path / "elsewhere.yaml"
    outside.write_text("{}\n")
    rc = cli.main(["launch", "--address", "http://127.0.0.1:1", str(outside), "--dry-run"])
    assert rc == 2 and "is outside the repository" in capsys.readouterr().err


def test_launch_rejects_down_without_following(fake_repo, capsys):
    rc = cli.main(["launch", "--cluster", "cluster/aws-gpu.yaml", "search_spaces/quickstart.yaml",
                   "--down", "--no-follow", "--dry-run"])
    assert rc == 2 and "--down waits for the job" in capsys.readouterr().err


def test_address_dry_run_makes_local_tracking_and_storage_paths_absolute(fake_repo, capsys):
    rc = cli.main(["launch", "--address", "127.0.0.1:8265", "search_spaces/quickstart.yaml", "--name", "a1",
                   "--tracking-uri", "store/mlflow.db", "--storage-path", "results", "--env", "SCORETUNE_DATA=/d",
                   "--dry-run"])
    (line,) = [s for s in capsys.readouterr().out.splitlines() if not s.startswith("#")]
    uri = f"sqlite:///{fake_repo / 'store' / 'mlflow.db'}"
    assert rc == 0
    assert line.startswith("ray job submit --address http://127.0.0.1:8265 --submission-id scoretune-a1-20260101")
    assert line.endswith(f"-- scoretune search search_spaces/quickstart.yaml --name a1 --tracking-uri {uri} "
                         f"--set storage_path={fake_repo / 'results'}")
    assert f'"env_vars": {{"SCORETUNE_DATA": "/d", "MLFLOW_TRACKING_URI": "{uri}"}}' in line


def test_runtime_env_uploads_the_repo_without_venv_runs_db_results_git_or_data(tmp_path):
    from ray._private.runtime_env.packaging import create_package

    root = tmp_path / "repo"
    keep = ["pyproject.toml", "platform/scoretune/__init__.py", "platform/scoretune/data.py",
            "search_spaces/s.yaml", "trainables/t.py"]
    drop = [".venv/lib/site.py", "runs/x/last.pt", "mlflow.db", "ray_results/exp/r.json", ".git/HEAD",
            "data/cifar-10-batches-py/data_batch_1", "platform/scoretune/__pycache__/a.pyc", "mlruns/0/m.yaml"]
    for rel in keep + drop:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("x")
    env = L.runtime_env(str(root), {"K": "V"})
    assert env["working_dir"] == str(root) and env["py_modules"] == [f"{root}/platform/scoretune"]
    create_package(str(root), tmp_path / "pkg.zip", include_gitignore=False, excludes=env["excludes"])
    assert sorted(zipfile.ZipFile(tmp_path / "pkg.zip").namelist()) == sorted(keep)


def test_submission_ids_and_job_matching_do_not_confuse_names_sharing_a_prefix():
    sid = L.submission_id("quick", TS)
    assert sid == "scoretune-quick-20260101-120000"
    assert L.is_search_job(sid, None, "quick")
    assert not L.is_search_job("scoretune-quick-2-20260101-120000", None, "quick")
    assert L.is_search_job("raysubmit_abc", {"scoretune_search": "quick"}, "quick")
    assert not L.is_search_job("raysubmit_abc", {"scoretune_search": "quick-2"}, "quick")
    with pytest.raises(Exception, match="is not allowed"):
        L.submission_id("a b", TS)


def test_cluster_hints_forward_the_dashboard_and_mlflow_and_name_the_status_command():
    s = L.cluster_settings(load("aws-gpu"))
    text = "\n".join(L.cluster_hints("cluster/aws-gpu.yaml", s, "quick", "scoretune-quick-1", 8265))
    assert "ray attach cluster/aws-gpu.yaml -p 8265" in text
    assert "ssh -N -L 5000:$(ray exec cluster/aws-gpu.yaml 'hostname -I'" in text  # MLflow: the head's private address
    assert "scoretune status quick --address http://127.0.0.1:8265 --tracking-uri http://127.0.0.1:5000" in text
    assert "ray exec cluster/aws-gpu.yaml 'ray job logs --address http://127.0.0.1:8265 --follow " \
           "scoretune-quick-1'" in text


# ----------------------------------------------------------------------------- scoretune status
def test_search_jobs_keeps_this_searchs_jobs_oldest_first():
    from scoretune.commands.status import search_jobs

    def job(sid, status, start, meta=None):
        return SimpleNamespace(submission_id=sid, status=SimpleNamespace(value=status), start_time=start,
                               end_time=None, message="", metadata=meta or {})

    jobs = [job("scoretune-q-20260102-000000", "RUNNING", 2000), job("scoretune-q-20260101-000000", "FAILED", 1000),
            job("scoretune-q2-20260101-000000", "RUNNING", 1500), job("raysubmit_x", "SUCCEEDED", 500, {"scoretune_search": "q"})]
    rows = search_jobs(jobs, "q")
    assert [(r.submission_id, r.status, r.start_time) for r in rows] == [
        ("raysubmit_x", "SUCCEEDED", 0.5), ("scoretune-q-20260101-000000", "FAILED", 1.0),
        ("scoretune-q-20260102-000000", "RUNNING", 2.0)]


def _log_search(uri: str, name: str, histories: dict[str, list[float]], experiment: str = "searches") -> str:
    from mlflow.tracking import MlflowClient

    cl = MlflowClient(uri)
    exp = cl.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else cl.create_experiment(experiment)
    parent = cl.create_run(exp_id, run_name=name, tags={"scoretune.search_name": name}).info.run_id
    for trial, values in histories.items():
        child = cl.create_run(exp_id, run_name=trial, tags={"mlflow.parentRunId": parent,
                                                            "scoretune.search_name": name}).info.run_id
        cl.log_param(child, "objective.beta", trial[-1])
        for step, v in enumerate(values):
            cl.log_metric(child, "val_pgd_acc", v, step=step)
        cl.set_terminated(child)
    return parent


@pytest.fixture(scope="module")
def search_store(tmp_path_factory):
    """One MLflow store (creating one takes seconds) holding two searches."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('status') / 'mlflow.db'}"
    _log_search(uri, "s1", {"trial_1": [0.20, 0.50, 0.40], "trial_2": [0.30, 0.45]})
    _log_search(uri, "s1-other", {"trial_9": [0.90]})  # another search: ignored
    return uri


def test_status_reports_the_trial_with_the_best_epoch_not_the_best_last_epoch(search_store, capsys):
    rc = cli.main(["status", "s1", "--no-jobs", "--tracking-uri", search_store])
    out = capsys.readouterr().out
    assert rc == 0
    assert "2 trials: 2 finished" in out
    assert re.search(r"best trial so far: trial_1 \(run \w+, FINISHED\) val_pgd_acc=0\.5000", out)
    assert "objective.beta=1" in out


def test_status_of_an_unknown_search_says_what_to_check(search_store, capsys):
    rc = cli.main(["status", "nope", "--no-jobs", "--tracking-uri", search_store])
    assert rc == 2 and "no Ray job and no MLflow run found for search 'nope'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- end to end (slow)
TINY_SPACE = """\
# 2 trials x 1 epoch on digits, with 2-step attacks: the smallest real search
name: e2e-tiny
base:
  data: {name: digits, val_size: 0.1}
  model: {name: small_cnn}
  objective: {method: trades, loss: se, beta: 6.0}
  attack: {eps: 0.2, norm: linf, steps: 2}
  eval: {pgd_steps: 2}
  optim: {name: sgd, lr: 0.2, momentum: 0.9, schedule: cosine}
  epochs: 1
  batch_size: 128
params:
  beta: {choice: [1.0, 6.0]}
sampler: {type: grid}
scheduler: {type: none}
max_concurrent: 2
top_k: 0
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_env(token: str, **extra: str) -> dict[str, str]:
    """This interpreter's bin first on PATH (the job runs `scoretune`), no inherited Ray address or auth
    settings, and the cluster's own auth token (Ray 2.60 clusters use token auth)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["RAY_AUTH_TOKEN"] = token
    return {**env, **extra}


def _node_ports() -> list[str]:
    """Explicit free ports for everything a second node on the same host would otherwise collide on."""
    out = []
    for flag in ("--node-manager-port", "--object-manager-port", "--runtime-env-agent-port",
                 "--dashboard-agent-grpc-port", "--dashboard-agent-listen-port", "--metrics-export-port"):
        out += [flag, str(_free_port())]
    return out + ["--min-worker-port", "0", "--max-worker-port", "0", "--object-store-memory", str(200 * 2**20)]


def _pids_using(marker: str) -> list[int]:
    """Processes whose command line mentions ``marker`` (our cluster's private temp dir)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if marker.encode() in (d / "cmdline").read_bytes():
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def _stop_node(proc: subprocess.Popen) -> None:
    """SIGTERM to our `ray start --block` (it stops the node's processes), then SIGKILL its session."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the process group we created with start_new_session
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait(timeout=10)


@pytest.fixture
def local_ray_cluster():
    """A real two-node Ray cluster on this machine: a head (2 CPUs, dashboard + job API on 127.0.0.1)
    and a worker node (1 CPU), each `ray start --block` in its own session with a private temp dir and
    free ports, so nothing is shared with another Ray on this host; stopped by pid, never `ray stop`."""
    import secrets

    import ray
    import requests

    if ray.is_initialized():  # the shared ray_local instance of this test process
        ray.shutdown()
    temp_dir = tempfile.mkdtemp(prefix="st-ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    ray_exe = str(Path(sys.executable).parent / "ray")
    gcs_port, dash_port = _free_port(), _free_port()
    address = f"http://127.0.0.1:{dash_port}"
    token = secrets.token_hex(32)  # this cluster's own token: nothing read from or written to ~/.ray
    headers = L.auth_headers(token)

    def alive_nodes() -> int:
        r = requests.get(f"{address}/api/v0/nodes", headers=headers, timeout=10)
        r.raise_for_status()
        return sum(n["state"] == "ALIVE" for n in r.json()["data"]["result"]["result"])
    common = ["--block", "--node-ip-address", "127.0.0.1", "--num-gpus", "0", "--disable-usage-stats"]
    procs: list[subprocess.Popen] = []

    def start(args: list[str], node: str) -> None:
        # each node its own temp dir: two raylets sharing one session dir would also share (and clean up)
        # each other's runtime_resources, pulling the job's working dir away under it
        with open(Path(temp_dir) / f"{node}.log", "w") as out:
            procs.append(subprocess.Popen([ray_exe, "start", *args, *common, "--temp-dir", f"{temp_dir}/{node}",
                                           *_node_ports()],
                                          env=_node_env(token, RAY_AUTH_MODE="token"),
                                          stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          start_new_session=True))

    def wait_for(check, what: str, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert all(p.poll() is None for p in procs), f"a Ray node exited: see {temp_dir}/*.log"
            try:
                if check():
                    return
            except Exception:
                pass
            time.sleep(1.0)
        raise TimeoutError(f"{what} not ready after {timeout:.0f} s (logs in {temp_dir})")

    try:
        start(["--head", "--port", str(gcs_port), "--num-cpus", "2", "--include-dashboard", "true",
               "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash_port),
               "--ray-client-server-port", str(_free_port())], "head")
        wait_for(lambda: alive_nodes() == 1, "the head node")
        start(["--address", f"127.0.0.1:{gcs_port}", "--num-cpus", "1"], "worker")
        wait_for(lambda: alive_nodes() == 2, "the worker node")
        yield SimpleNamespace(address=address, temp_dir=temp_dir, token=token)
    finally:
        for proc in reversed(procs):
            _stop_node(proc)
        for pid in _pids_using(temp_dir):  # anything of ours that outlived its node (by pid, ours only)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(1.0)
        leftover = _pids_using(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not leftover, f"Ray processes left behind: {leftover}"


def _scoretune(*args: str, cwd: Path, token: str, timeout: float) -> subprocess.CompletedProcess:
    """The CLI as a user runs it; it holds the cluster's token in RAY_AUTH_TOKEN (RAY_AUTH_MODE unset)."""
    exe = Path(sys.executable).parent / "scoretune"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "scoretune.cli"]
    return subprocess.run([*cmd, *args], cwd=cwd, env=_node_env(token), capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_launch_runs_a_search_as_a_ray_job_on_a_two_node_cluster(local_ray_cluster, tmp_path):
    from ray.job_submission import JobSubmissionClient, JobStatus

    from scoretune.commands.status import query_runs

    # A checkout of this repo with a tiny space in it: the job uploads it as its working dir.
    repo = tmp_path / "repo"
    for rel in ("platform", "trainables", "configs"):
        shutil.copytree(REPO / rel, repo / rel, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", repo / "pyproject.toml")
    (repo / "search_spaces").mkdir()
    (repo / "search_spaces" / "tiny.yaml").write_text(TINY_SPACE)
    (repo / "mlflow.db").write_text("not uploaded")  # excluded from the upload
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    address = local_ray_cluster.address

    r = _scoretune("launch", "--address", address, "search_spaces/tiny.yaml", "--name", "e2e",
                   "--tracking-uri", uri, "--storage-path", str(tmp_path / "ray_results"),
                   "--env", "SCORETUNE_DEBUG=1", cwd=repo,
                   token=local_ray_cluster.token, timeout=900)
    assert r.returncode == 0, f"launch failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    assert re.search(r"submitted Ray job scoretune-e2e-\d{8}-\d{6} \(search 'e2e'\)", r.stdout)
    assert re.search(r"job scoretune-e2e-\d{8}-\d{6}: SUCCEEDED", r.stdout)
    assert "completed 2" in r.stdout  # the search's own report, streamed from the job's logs

    client = JobSubmissionClient(address, headers=L.auth_headers(local_ray_cluster.token))
    (job,) = [j for j in client.list_jobs() if (j.metadata or {}).get("scoretune_search") == "e2e"]
    assert job.status == JobStatus.SUCCEEDED
    assert job.entrypoint.startswith("scoretune search search_spaces/tiny.yaml --name e2e --tracking-uri ")
    assert (tmp_path / "ray_results" / "e2e").is_dir()  # --storage-path reached the search

    parents, trials = query_runs(uri, "e2e")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(trials) == 2 and {t.status for t in trials} == {"FINISHED"}
    assert all(t.score is not None and 0.0 <= t.score <= 1.0 for t in trials)
    assert sorted(float(t.params["beta"]) for t in trials) == [1.0, 6.0]

    s = _scoretune("status", "e2e", "--address", address, "--tracking-uri", uri, cwd=repo,
                   token=local_ray_cluster.token, timeout=300)
    assert s.returncode == 0, s.stderr
    assert re.search(r"scoretune-e2e-\d{8}-\d{6}\s+SUCCEEDED", s.stdout)
    best = max(trials, key=lambda t: t.score)
    assert f"best trial so far: {best.run_name} (run {best.run_id}, FINISHED) val_pgd_acc={best.score:.4f}" in s.stdout


# ----------------------------------------------------------------------------- launch: bad input, secrets
def test_launch_validates_the_space_and_set_before_any_cluster_command(fake_repo, capsys):
    rc = cli.main(["launch", "--cluster", "cluster/aws-gpu.yaml", "search_spaces/quickstart.yaml", "--dry-run",
                   "--set", "nosuchkey=1"])
    assert rc == 2
    out = capsys.readouterr()
    (line,) = out.err.strip().splitlines()
    assert "nosuchkey" in line and out.out == ""


def test_launch_of_a_malformed_space_fails_in_the_dry_run(fake_repo, capsys):
    (fake_repo / "search_spaces" / "quickstart.yaml").write_text("name: q\nparams: {beta: [1, 2\n")
    rc = cli.main(["launch", "--cluster", "cluster/aws-gpu.yaml", "search_spaces/quickstart.yaml", "--dry-run"])
    assert rc == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "malformed YAML" in line


def test_a_malformed_cluster_yaml_is_one_line(fake_repo, capsys):
    (fake_repo / "cluster" / "bad.yaml").write_text("cluster_name: x\nprovider: {type: aws\n  region: [\n")
    rc = cli.main(["launch", "--cluster", "cluster/bad.yaml", "search_spaces/quickstart.yaml", "--dry-run"])
    assert rc == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "bad.yaml" in line and "line" in line


@pytest.mark.parametrize("name", ["caf\u00e9", "../x", "a b", ".hidden"])
def test_launch_and_status_reject_the_names_train_and_search_reject(name, fake_repo, capsys):
    from scoretune.names import is_valid_name

    assert not is_valid_name(name)
    assert cli.main(["launch", "--cluster", "cluster/aws-gpu.yaml", "search_spaces/quickstart.yaml",
                     "--name", name, "--dry-run"]) == 2
    assert cli.main(["status", name, "--no-jobs"]) == 2
    errs = capsys.readouterr().err.strip().splitlines()
    assert len(errs) == 2 and all("--name" in e or "name" in e for e in errs)


def test_launch_masks_secrets_and_keeps_them_off_the_command_line(fake_repo, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "hunter2-pw")
    rc = cli.main(["launch", "--cluster", "cluster/aws-gpu.yaml", "search_spaces/quickstart.yaml", "--dry-run",
                   "--env", "WANDB_API_KEY=sk-live-123", "--env", "SCORETUNE_DATA=/d",
                   "--tracking-uri", "http://alice:s3cret@mlflow.internal:5000"])
    assert rc == 0
    out = capsys.readouterr().out
    for secret in ("hunter2-pw", "sk-live-123", "s3cret"):
        assert secret not in out
    submit = next(line for line in out.splitlines() if line.startswith("ray job submit"))
    assert "--runtime-env RUNTIME_ENV_FILE" in submit and "--runtime-env-json" not in submit
    assert "--tracking-uri" not in submit.split(" -- ", 1)[1]  # the credential URI travels as MLFLOW_TRACKING_URI


def test_runtime_env_file_is_private_and_holds_the_secrets(tmp_path):
    import stat

    import yaml

    path = L.write_runtime_env_file({"env_vars": {"WANDB_API_KEY": "sk"}}, directory=str(tmp_path))
    assert stat.S_IMODE(Path(path).stat().st_mode) == 0o600
    assert yaml.safe_load(Path(path).read_text())["env_vars"]["WANDB_API_KEY"] == "sk"
