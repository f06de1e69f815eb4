"""The end-of-search AutoAttack as Ray tasks (scoretune.search.finalize): the top-k models are attacked
side by side, and each gets the number the in-driver AutoAttack gives for the same seed."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A 1-epoch TRADES-SE small CNN on digits, saved as a search trial saves it."""
    from ray.tune import Checkpoint
    from scoretune.config import build_config
    from scoretune.engine import Trainer

    from trainables.ray_checkpoint import write_checkpoint_dir

    cfg = build_config({"data": {"name": "digits", "val_size": 0.1}, "model": {"name": "small_cnn"},
                        "objective": {"method": "trades", "loss": "se", "beta": 6.0},
                        "attack": {"eps": 0.2, "steps": 2}, "eval": {"pgd_steps": 2, "test": False},
                        "optim": {"lr": 0.2}, "epochs": 1, "batch_size": 64, "seed": 0, "device": "cpu"})
    trainer = Trainer(cfg)
    trainer.train_one_epoch()
    d = tmp_path_factory.mktemp("ckpt")
    write_checkpoint_dir(d, trainer.state_dict())
    return Checkpoint.from_directory(str(d))


def _space():
    from scoretune.search.space import SearchSpace

    return SearchSpace.model_validate({
        "name": "aa", "base": {"data": {"name": "digits", "val_size": 0.1}}, "params": {"beta": {"uniform": [1, 2]}},
        "resources": {"workers": 1, "cpus": 1, "gpus": 0}, "autoattack": {"version": "fast", "n_ex": 24},
    })


@pytest.mark.slow
def test_top_k_autoattack_as_ray_tasks_logs_the_in_driver_numbers(ray_local, checkpoint, tmp_path):
    from mlflow.tracking import MlflowClient
    from scoretune.search.finalize import AutoAttackJob, attack_checkpoint, run_autoattack_jobs

    space = _space()
    in_driver = attack_checkpoint(checkpoint, space.autoattack, threads=1)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cl = MlflowClient(tracking_uri=uri)
    exp = cl.create_experiment("aa")
    runs = [cl.create_run(exp).info.run_id for _ in range(2)]
    jobs = [AutoAttackJob(trial_id=f"t{i}", run_id=r, checkpoint=checkpoint, epoch=1) for i, r in enumerate(runs)]
    lines: list[str] = []
    got = run_autoattack_jobs(cl, uri, jobs, space.autoattack, space.resources, out=lines.append)
    assert got == {"t0": in_driver.robust_acc, "t1": in_driver.robust_acc}
    assert sum("AutoAttack 1/2 finished: trial t" in x for x in lines) == 1  # progress as each model is done
    assert sum("AutoAttack 2/2 finished: trial t" in x for x in lines) == 1
    for r in runs:
        m = cl.get_run(r).data.metrics
        assert m["aa_acc"] == in_driver.robust_acc and m["aa_fast_acc"] == in_driver.robust_acc
        assert m["clean_acc"] == in_driver.clean_acc
        assert cl.get_run(r).data.tags["eval.aa_fast_acc.n_ex"] == "24"


@pytest.mark.slow
def test_a_failing_autoattack_task_tags_its_run_and_the_others_are_logged(ray_local, checkpoint, tmp_path):
    from mlflow.tracking import MlflowClient
    from ray.tune import Checkpoint
    from scoretune.search.finalize import AutoAttackJob, run_autoattack_jobs
    from scoretune.tracking import tags

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cl = MlflowClient(tracking_uri=uri)
    exp = cl.create_experiment("aa")
    ok, bad = (cl.create_run(exp).info.run_id for _ in range(2))
    (tmp_path / "empty").mkdir()
    jobs = [AutoAttackJob("ok", ok, checkpoint, 1), AutoAttackJob("bad", bad, Checkpoint.from_directory(str(tmp_path / "empty")), 1)]
    got = run_autoattack_jobs(cl, uri, jobs, _space().autoattack, _space().resources, out=lambda _: None)
    assert got["bad"] is None and 0.0 <= got["ok"] <= 1.0
    assert tags.AUTOATTACK_ERROR in cl.get_run(bad).data.tags
    assert "aa_acc" in cl.get_run(ok).data.metrics


def test_task_progress_reports_each_model_as_it_finishes_and_a_heartbeat_meanwhile():
    """:func:`gather` in completion order, with a line per finished task and one per silent ``heartbeat_s``."""
    from scoretune.drivers.task_progress import TaskProgress, gather

    finish_order = [[], ["b"], [], ["a"], ["c"]]  # what each wait() returns: nothing (a heartbeat) or one ref

    def wait(pending, num_returns, timeout):
        assert num_returns == 1 and timeout == 15.0
        ready = finish_order.pop(0)
        return [r for r in ready if r in pending], [r for r in pending if r not in ready]

    def get(ref):
        if ref == "c":
            raise RuntimeError("boom")
        return {"a": 0.5, "b": 0.25}[ref]

    lines: list[str] = []
    ticks = iter(range(0, 1000, 10))
    progress = TaskProgress("AutoAttack", 3, lines.append, clock=lambda: float(next(ticks)))
    got = gather({"ta": "a", "tb": "b", "tc": "c"}, {"ta": "trial ta", "tb": "trial tb", "tc": "trial tc"}, progress,
                 wait=wait, get=get)
    assert got["ta"] == 0.5 and got["tb"] == 0.25 and isinstance(got["tc"], RuntimeError)
    tails = [line.split("]", 1)[1].strip() for line in lines]
    assert tails == [
        "AutoAttack 0/3 finished, still running: trial ta, trial tb, trial tc (10 s)",
        "AutoAttack 1/3 finished: trial tb (20 s); still running: trial ta, trial tc",
        "AutoAttack 1/3 finished, still running: trial ta, trial tc (30 s)",
        "AutoAttack 2/3 finished: trial ta (40 s); still running: trial tc",
        "AutoAttack 3/3 failed: trial tc (50 s)",
    ]
