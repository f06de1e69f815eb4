"""Evaluation: clean / PGD / AutoAttack accuracies, AutoAttack's checks and resume, model loading
from checkpoints and MLflow (run ids, registered-model URIs in a fresh process), the RobustBench
export, and the ``scoretune evaluate`` command.

One model serves every test: a digits MLP trained with TRADES-SE at eps 0.2 through
``scoretune train``'s code path (checkpoint + MLflow run + logged torch.export model). An MLP keeps
AutoAttack cheap on a CPU (standard AutoAttack on 100 points takes ~20 s single-threaded). Torch
runs single-threaded here: on a shared, oversubscribed 2-core machine two OpenMP threads make the
attacks' many tiny ops ~20x slower.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from scoretune.errors import UserError
from scoretune.robustness import (
    ATTACKS,
    autoattack_accuracy,
    clean_accuracy,
    evaluate,
    pgd_accuracy,
)
from scoretune.tracking.model_refs import REF_HELP, ExportedModel, load_model

EPS = 0.2
N_EX = 100


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    """Train 4 epochs, logged to MLflow; ``x``/``y`` are the 100 test digits ``--n-ex 100`` evaluates."""
    from scoretune.drivers.train import train
    from scoretune.config import build_config
    from scoretune.data import eval_subset, load_dataset

    root = tmp_path_factory.mktemp("evaltrain")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = build_config({
        "name": "digits-mlp", "data": {"name": "digits", "val_size": 0.1},
        "model": {"name": "mlp", "options": {"hidden": [128]}},
        "objective": {"method": "trades", "loss": "se", "beta": 6.0},
        "attack": {"eps": EPS, "norm": "linf", "steps": 10}, "eval": {"pgd_steps": 10},
        "optim": {"lr": 0.2}, "epochs": 4, "batch_size": 64, "device": "cpu", "output_dir": str(root / "runs"),
    }, [])
    summary = train(cfg, tracking_uri=uri, experiment="eval-fixture", out=lambda s: None)
    sample = eval_subset(load_dataset("digits", val_size=0.1).test, N_EX)
    loaded = load_model(summary["best_checkpoint"])
    return {
        "uri": uri, "root": root, "ckpt": summary["best_checkpoint"], "run_id": summary["run_id"],
        "model_uri": summary["model_uri"], "net": loaded.net,
        "x": sample.x.float(), "y": sample.y,
    }


class Quantised(torch.nn.Module):
    """Input quantisation round(x k)/k in front of a network: torch.round has zero gradient, so
    every gradient w.r.t. the input vanishes (obfuscated gradients, Athalye et al. 2018). With k=16
    the digits pixels (multiples of 1/16) pass unchanged: it adds no real robustness."""

    def __init__(self, net: torch.nn.Module, k: int = 16):
        super().__init__()
        self.net, self.k = net, k

    def forward(self, x):
        return self.net(torch.round(x * self.k) / self.k)


class Interrupting(torch.nn.Module):
    """Counts forward calls; raises KeyboardInterrupt on the ``at``-th one (None: never)."""

    def __init__(self, net: torch.nn.Module, at: int | None):
        super().__init__()
        self.net, self.at, self.calls = net, at, 0

    def forward(self, x):
        self.calls += 1
        if self.at is not None and self.calls >= self.at:
            raise KeyboardInterrupt
        return self.net(x)


def _cli(argv, capsys):
    from scoretune.cli import main

    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


# ----------------------------------------------------------------------------- the numbers


def test_pgd_accuracy_is_seeded_and_below_clean_accuracy(trained):
    net, x, y = trained["net"], trained["x"], trained["y"]
    clean = clean_accuracy(net, x, y, batch_size=64)
    pgd_a = pgd_accuracy(net, x, y, EPS, "linf", steps=20, batch_size=64, seed=3)
    pgd_b = pgd_accuracy(net, x, y, EPS, "linf", steps=20, batch_size=64, seed=3)
    assert clean >= 0.9
    assert pgd_a == pgd_b
    assert 0.2 <= pgd_a <= clean - 0.2
    assert pgd_accuracy(net, x, y, 0.0, "linf", steps=20) == pytest.approx(clean)


def test_autoattack_fast_is_below_pgd20_which_is_below_clean(trained):
    net, x, y = trained["net"], trained["x"], trained["y"]
    pgd = evaluate(net, x, y, attack="pgd-20", eps=EPS)
    fast = evaluate(net, x, y, attack="aa-fast", eps=EPS)
    assert fast.clean_acc == pytest.approx(pgd.clean_acc)
    # measured: clean 0.95, PGD-20 0.49, APGD-CE 0.44, + APGD-T 0.17
    assert fast.robust_acc <= pgd.robust_acc - 0.1 < pgd.clean_acc - 0.3
    assert list(fast.per_attack) == ["apgd-ce", "apgd-t"]
    assert fast.per_attack["apgd-ce"] >= fast.per_attack["apgd-t"] == fast.robust_acc
    assert sum(fast.removed.values()) == round((fast.clean_acc - fast.robust_acc) * N_EX)
    assert fast.checks == []
    assert fast.metrics() == {"clean_acc": fast.clean_acc, "aa_fast_acc": fast.robust_acc,
                              "aa_apgd_ce_acc": fast.per_attack["apgd-ce"],
                              "aa_apgd_t_acc": fast.per_attack["apgd-t"]}


@pytest.mark.slow
def test_autoattack_standard_extends_fast_and_is_at_most_pgd20(trained):
    net, x, y = trained["net"], trained["x"], trained["y"]
    std = autoattack_accuracy(net, x, y, EPS, "linf", "standard", seed=0)
    fast = autoattack_accuracy(net, x, y, EPS, "linf", "fast", seed=0)
    pgd = pgd_accuracy(net, x, y, EPS, "linf", steps=20)
    assert list(std.per_attack) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    # fast is exactly standard's first two stages (same seed, settings and batches)
    assert std.per_attack["apgd-ce"] == fast.per_attack["apgd-ce"]
    assert std.per_attack["apgd-t"] == fast.per_attack["apgd-t"]
    accs = list(std.per_attack.values())
    assert accs == sorted(accs, reverse=True)
    assert std.robust_acc <= fast.robust_acc <= pgd <= std.clean_acc
    assert std.max_perturbation <= EPS + 1e-5
    assert [c.name for c in std.checks] == []
    assert int(std.robust.sum()) == round(std.robust_acc * N_EX)


class StraightThrough(torch.nn.Module):
    """The same quantised forward pass with the identity as its backward pass (BPDA, Athalye et al.
    2018): the adaptive attack on :class:`Quantised`."""

    def __init__(self, net: torch.nn.Module, k: int = 16):
        super().__init__()
        self.net, self.k = net, k

    def forward(self, x):
        return self.net(x + (torch.round(x * self.k) / self.k - x).detach())


@pytest.mark.slow
def test_obfuscated_gradients_fool_pgd_but_not_autoattack(trained):
    """Measured on the first 100 test digits: clean 0.95; PGD-20 0.94 (zero gradients: only its
    random start moves); AutoAttack: APGD-CE 0.94, APGD-T 0.90, FAB-T 0.90, Square 0.45 (Square
    removes 45 points). Both the zero-gradient check (APGD-T's DLR gradient, once per target class)
    and the Square check fire. An adaptive attack (straight-through gradients, AutoAttack-fast)
    gets to 0.22, close to the bare net's 0.17: Square exposes the masking but is an upper bound."""
    q = Quantised(trained["net"])
    x, y = trained["x"], trained["y"]
    pgd = evaluate(q, x, y, attack="pgd-20", eps=EPS)
    aa = evaluate(q, x, y, attack="aa-standard", eps=EPS)
    assert pgd.robust_acc >= pgd.clean_acc - 0.05  # PGD sees (almost) perfect robustness
    assert aa.per_attack["apgd-t"] >= aa.clean_acc - 0.15  # so do the gradient attacks
    assert aa.removed["square"] >= 30  # the black-box Square attack exposes it
    assert aa.robust_acc <= pgd.robust_acc - 0.3
    checks = {c.name: c for c in aa.checks}
    assert set(checks) == {"zero_gradients", "square_success"}
    assert re.match(r"there are \d+ points with zero gradient", checks["zero_gradients"].message)
    assert checks["zero_gradients"].count == 9  # once per APGD-T target class
    assert aa.check_tags()["aa_check.square_success"].startswith("Square Attack has decreased the robust accuracy")
    adaptive = evaluate(StraightThrough(trained["net"]), x, y, attack="aa-fast", eps=EPS)
    assert adaptive.robust_acc <= aa.robust_acc - 0.1


def test_softmax_output_check_is_captured_not_printed(trained, capfd):
    class Softmax(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x).softmax(-1)

    r = autoattack_accuracy(Softmax(trained["net"]), trained["x"][:20], trained["y"][:20], EPS, version="fast")
    checks = {c.name: c for c in r.checks}
    assert "softmax_output" in checks
    assert "probability distribution" in checks["softmax_output"].message
    assert "probability distribution" not in capfd.readouterr().err


def test_interrupted_autoattack_resumes_from_its_state_file_with_the_same_numbers(trained, tmp_path):
    x, y = trained["x"], trained["y"]
    ref = autoattack_accuracy(trained["net"], x, y, EPS, version="fast", batch_size=32)
    path = tmp_path / "aa.json"
    model = Interrupting(trained["net"], at=None)

    def stop_after_first_apgd_t_batch(attack, done, total):
        if attack == "apgd-t" and done == 1 < total:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        autoattack_accuracy(model, x, y, EPS, version="fast", batch_size=32, state_path=path,
                            progress=stop_after_first_apgd_t_batch)
    state = json.loads(path.read_text())
    assert [d["attack"] for d in state["done"]] == ["apgd-ce"]
    assert state["current"]["attack"] == "apgd-t" and state["current"]["next"] == 1
    model.calls, model.at = 0, 20  # an interrupt inside a batch (in APGD-T) keeps the last finished one
    with pytest.raises(KeyboardInterrupt):
        autoattack_accuracy(model, x, y, EPS, version="fast", batch_size=32, state_path=path)
    assert json.loads(path.read_text())["current"]["next"] == 1
    model.at = None
    resumed = autoattack_accuracy(model, x, y, EPS, version="fast", batch_size=32, state_path=path)
    assert resumed.resumed and not ref.resumed
    assert resumed.per_attack == ref.per_attack
    assert resumed.removed == ref.removed
    assert torch.equal(resumed.robust, ref.robust)
    calls = model.calls
    again = autoattack_accuracy(model, x, y, EPS, version="fast", batch_size=32, state_path=path)
    assert again.robust_acc == ref.robust_acc and model.calls - calls <= 2  # nothing is attacked again


def test_state_file_of_another_evaluation_is_refused(trained, tmp_path):
    x, y = trained["x"][:10], trained["y"][:10]
    path = tmp_path / "aa.json"
    autoattack_accuracy(trained["net"], x, y, EPS, version="fast", state_path=path)
    with pytest.raises(UserError, match=r"different evaluation \(differs in: eps\)"):
        autoattack_accuracy(trained["net"], x, y, 0.1, version="fast", state_path=path)
    path.write_text("{not json")
    with pytest.raises(UserError, match="unreadable.*delete it"):
        autoattack_accuracy(trained["net"], x, y, EPS, version="fast", state_path=path)


def test_autoattack_refuses_inputs_outside_the_unit_box(trained):
    with pytest.raises(UserError, match=r"\[0, 1\].*pgd-20"):
        autoattack_accuracy(trained["net"], trained["x"][:4] * 2 - 0.5, trained["y"][:4], EPS)


class AlwaysZero(torch.nn.Module):
    """Predicts class 0 for every input: its accuracy is the share of 0s among the examples evaluated."""

    def forward(self, x):
        return torch.nn.functional.one_hot(torch.zeros(x.shape[0], dtype=torch.long), 10).to(x.dtype)


def test_n_ex_evaluates_a_class_stratified_sample_of_a_class_sorted_split(tmp_path, monkeypatch):
    """mnist5k's test split is stored in class order (its first 200 digits are 0s and 1s, where a
    constant-0 model would score 50%): --n-ex 200 evaluates 20 digits of each class, and the run
    records n_ex and the subset seed."""
    from mlflow import MlflowClient
    from scoretune.evaluate import benchmark

    monkeypatch.chdir(tmp_path)  # the new run's artifact store
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = benchmark(AlwaysZero(), data="mnist5k", n_ex=200, subset_seed=3, attack="clean", eps=0.3,
                       device="cpu", tracking_uri=uri, log_to="auto")
    assert result.n == 200 and result.split_size == 1000
    assert result.clean_acc == pytest.approx(0.1, abs=1e-12)
    params = MlflowClient(uri).get_run(result.logged["run_id"]).data.params
    assert (params["n_ex"], params["subset_seed"]) == ("200", "3")


def test_n_ex_at_least_the_split_evaluates_all_of_it():
    from scoretune.evaluate import benchmark

    result = benchmark(AlwaysZero(), data="mnist5k", n_ex=5000, attack="clean", eps=0.3, device="cpu")
    assert result.n == 1000 and result.split_size is None and result.clean_acc == pytest.approx(0.1, abs=1e-12)


# ----------------------------------------------------------------------------- loading


def test_run_id_loads_the_logged_torch_export_model_with_its_training_defaults(trained):
    loaded = load_model(trained["run_id"], tracking_uri=trained["uri"])
    assert isinstance(loaded.net, ExportedModel)
    assert (loaded.kind, loaded.run_id, loaded.dataset, loaded.eps, loaded.norm) == (
        "mlflow", trained["run_id"], "digits", EPS, "linf")
    net = loaded.net.eval()  # a bare torch.export GraphModule raises NotImplementedError here
    assert not net.training
    with pytest.raises(RuntimeError, match="frozen in eval mode"):
        net.train()
    x = trained["x"][:8].clone().requires_grad_(True)
    out = net(x)
    assert torch.allclose(out, trained["net"](x), atol=1e-5)
    (g,) = torch.autograd.grad(out.logsumexp(-1).sum(), [x])
    assert g.abs().sum() > 0
    assert pgd_accuracy(net, trained["x"], trained["y"], EPS, steps=20) == pgd_accuracy(
        trained["net"], trained["x"], trained["y"], EPS, steps=20)


def test_logged_model_uri_resolves_its_source_run(trained):
    loaded = load_model(trained["model_uri"], tracking_uri=trained["uri"])  # models:/m-<id>
    assert trained["model_uri"].startswith("models:/m-")
    assert (loaded.run_id, loaded.dataset, loaded.eps) == (trained["run_id"], "digits", EPS)
    assert isinstance(loaded.net, ExportedModel)


def test_run_without_a_logged_model_falls_back_to_its_checkpoint_artifact(trained):
    from scoretune.tracking import RunLogger

    run = RunLogger(trained["uri"], "no-model")
    run.log_params({"data.name": "digits", "attack.eps": 0.1, "attack.norm": "linf"})
    run.log_artifact(trained["ckpt"], "checkpoints")
    run.end()
    loaded = load_model(run.run_id, tracking_uri=trained["uri"])
    assert not isinstance(loaded.net, ExportedModel) and not loaded.net.training
    assert (loaded.dataset, loaded.eps, loaded.norm) == ("digits", 0.1, "linf")  # from the params
    assert loaded.spec["name"] == "mlp"
    x = trained["x"]
    assert torch.equal(loaded.net(x), trained["net"](x))


def test_checkpoint_ref_carries_dataset_and_threat_model(trained):
    loaded = load_model(trained["ckpt"])
    assert (loaded.kind, loaded.run_id, loaded.dataset, loaded.eps, loaded.norm) == (
        "checkpoint", None, "digits", EPS, "linf")
    assert loaded.spec["name"] == "mlp" and loaded.spec["pixel_range"] == [0.0, 1.0]
    assert not loaded.net.training


def test_registered_model_uri_is_evaluated_in_a_fresh_process(trained, tmp_path):
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(trained["uri"])
    mv = mlflow.register_model(trained["model_uri"], "digits-mlp")
    MlflowClient(trained["uri"]).set_registered_model_alias("digits-mlp", "champion", mv.version)
    exe = Path(sys.executable).parent / "scoretune"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "scoretune.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(
        cmd + ["evaluate", "models:/digits-mlp@champion", "--attack", "pgd-20", "--n-ex", str(N_EX),
               "--tracking-uri", trained["uri"]],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    printed = float(re.search(r"^pgd-20\s+([\d.]+)%", proc.stdout, re.M).group(1)) / 100
    expected = pgd_accuracy(trained["net"], trained["x"], trained["y"], EPS, steps=20, batch_size=250)
    assert printed == pytest.approx(expected, abs=1e-4)
    assert f"model run {trained['run_id']}" in proc.stdout
    run = MlflowClient(trained["uri"]).get_run(trained["run_id"])
    assert run.data.metrics["pgd20_acc"] == pytest.approx(expected)
    assert run.data.tags["eval.pgd20_acc.n_ex"] == str(N_EX)
    assert run.data.tags["eval.pgd20_acc.model"] == "models:/digits-mlp@champion"


# ----------------------------------------------------------------------------- the command


def test_cli_logs_autoattack_into_the_models_run(trained, tmp_path, monkeypatch, capsys):
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    rc, out, err = _cli(["evaluate", trained["run_id"], "--attack", "aa-fast", "--n-ex", "50",
                         "--tracking-uri", trained["uri"]], capsys)
    assert rc == 0, err
    m = MlflowClient(trained["uri"]).get_run(trained["run_id"]).data
    for name in ("clean_acc", "aa_fast_acc", "aa_apgd_ce_acc", "aa_apgd_t_acc"):
        assert re.search(rf"{name}={m.metrics[name]:.4f}", out)
    assert m.metrics["aa_fast_acc"] <= m.metrics["aa_apgd_ce_acc"] <= m.metrics["clean_acc"]
    assert m.tags["eval.aa_fast_acc.aa_checks"] == "none"
    assert m.tags["eval.aa_fast_acc.eps"] == str(EPS)
    states = list((tmp_path / "runs" / "eval_state").glob("*.json"))
    assert len(states) == 1  # the default --state-dir
    rc, out2, _ = _cli(["evaluate", trained["run_id"], "--attack", "aa-fast", "--n-ex", "50", "--no-mlflow",
                        "--tracking-uri", trained["uri"]], capsys)
    assert rc == 0 and f"(resumed from {states[0].relative_to(tmp_path)})" in out2


def test_cli_logs_a_checkpoint_into_a_new_eval_run(trained, tmp_path, monkeypatch, capsys):
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    uri = trained["uri"]
    rc, out, err = _cli(["evaluate", trained["ckpt"], "--attack", "pgd-20", "--n-ex", str(N_EX), "--subset-seed", "2",
                         "--json", "--tracking-uri", uri], capsys)
    assert rc == 0, err
    res = json.loads(out)
    assert res["mlflow"]["where"] == "new run in 'scoretune-eval'"
    run = MlflowClient(uri).get_run(res["mlflow"]["run_id"])
    assert run.data.metrics["pgd20_acc"] == pytest.approx(res["robust_acc"])
    assert run.data.params["model"] == trained["ckpt"] and run.data.params["n_ex"] == str(N_EX)
    assert run.data.params["subset_seed"] == "2" and res["split_size"] == 449  # of digits' 449 test images
    assert run.data.tags["scoretune.kind"] == "eval"


def test_cli_eps_override_accepts_fractions(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc, out, err = _cli(["evaluate", trained["ckpt"], "--attack", "pgd-20", "--eps", "0/255", "--n-ex", "50",
                         "--no-mlflow", "--json"], capsys)
    assert rc == 0, err
    res = json.loads(out)
    assert res["eps"] == 0.0 and res["robust_acc"] == pytest.approx(res["clean_acc"])


@pytest.mark.parametrize("ref,message", [
    ("corrupt", r"cannot read checkpoint .*bad\.pt.*corrupt"),
    ("missing.pt", r"checkpoint not found: missing\.pt"),
    ("not-a-model", r"unknown model reference 'not-a-model': expected a checkpoint file"),
    ("0123456789abcdef0123456789abcdef", r"cannot resolve '0123456789abcdef0123456789abcdef' in the MLflow store"),
    ("models:/nobody@champion", r"cannot resolve 'models:/nobody@champion' in the MLflow store"),
    ("no-store", r"cannot resolve 'models:/x@champion': the MLflow store sqlite:///.*nowhere\.db does not exist"),
])
def test_bad_model_refs_give_a_one_line_error(ref, message, trained, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    uri = trained["uri"]
    if ref == "corrupt":
        (tmp_path / "bad.pt").write_bytes(b"PK\x03\x04 definitely not a checkpoint")
        ref = "bad.pt"
    if ref == "no-store":
        ref, uri = "models:/x@champion", f"sqlite:///{tmp_path / 'nowhere.db'}"
    rc, out, err = _cli(["evaluate", ref, "--tracking-uri", uri], capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("scoretune evaluate: error: "), lines
    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "nowhere.db").exists()  # no empty store is created on the way


def test_cli_copies_of_the_attack_names_match_the_library():
    from scoretune.commands import evaluate as cmd

    assert cmd.ATTACKS == ATTACKS and cmd.REF_HELP == REF_HELP


# ----------------------------------------------------------------------------- RobustBench export


def test_robustbench_export_round_trips(trained, tmp_path):
    from scoretune.export import export_robustbench, load_robustbench

    out = export_robustbench(trained["ckpt"], tmp_path / "rb" / "model.pt")
    raw = torch.load(out, map_location="cpu", weights_only=True)
    assert list(raw) == ["state_dict"]
    assert {"normalize.mean", "normalize.std"} <= set(raw["state_dict"])
    side = json.loads((tmp_path / "rb" / "model.json").read_text())
    assert side["model_spec"]["name"] == "mlp" and side["threat_model"] == "Linf" and side["eps"] == EPS
    net = load_robustbench(out)
    x = trained["x"]
    assert torch.equal(net(x), trained["net"](x))
    # RobustBench also accepts a DataParallel 'module.' prefix; so do we
    torch.save({"state_dict": {"module." + k: v for k, v in raw["state_dict"].items()}}, tmp_path / "rb" / "dp.pt")
    net2 = load_robustbench(tmp_path / "rb" / "dp.pt", spec=side["model_spec"])
    assert torch.equal(net2(x), net(x))


def test_cli_export_then_evaluates_the_reloaded_export(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc, out, err = _cli(["evaluate", trained["ckpt"], "--attack", "clean", "--no-mlflow", "--json",
                         "--export-robustbench", "export/m.pt"], capsys)
    assert rc == 0, err
    assert json.loads(out)["clean_acc"] == pytest.approx(
        clean_accuracy(trained["net"], *_test_split()))
    rc, out, err = _cli(["evaluate", "export/m.pt", "--attack", "pgd-20", "--n-ex", str(N_EX), "--no-mlflow",
                         "--json"], capsys)
    assert rc == 0, err
    res = json.loads(out)
    assert (res["dataset"], res["eps"], res["norm"]) == ("digits", EPS, "linf")
    assert res["robust_acc"] == pytest.approx(
        pgd_accuracy(trained["net"], trained["x"], trained["y"], EPS, steps=20, batch_size=250))


def _test_split():
    from scoretune.data import load_dataset

    ds = load_dataset("digits", val_size=0.1)
    return ds.test.x.float(), ds.test.y
