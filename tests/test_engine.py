"""The single-process training engine on real (bundled) data."""

import math

import pytest
import torch
from resume_check import assert_same_weights, straight_and_resumed
from scoretune.config import build_config
from scoretune.engine import (
    CheckpointError,
    NonFiniteLossError,
    Trainer,
    evaluate_loader,
    load_checkpoint,
    lr_factor,
    model_from_checkpoint,
)

DIGITS_TRADES_SE = {
    "data": {"name": "digits"},
    "model": {"name": "small_cnn"},
    "objective": {"method": "trades", "loss": "se", "beta": 6.0},
    "attack": {"eps": 0.2, "steps": 10},
    "eval": {"pgd_steps": 20, "test": False},
    "optim": {"lr": 0.2},
    "epochs": 10,
    "batch_size": 64,
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """TRADES-SE, eps 0.2, 10 epochs on digits: the foundation issue's acceptance run."""
    out = tmp_path_factory.mktemp("digits")
    cfg = build_config({**DIGITS_TRADES_SE, "output_dir": str(out)})
    trainer = Trainer(cfg)
    for _ in range(cfg.epochs):
        trainer.train_one_epoch()
    path = trainer.save(out / "last.pt")
    return trainer, path


def _test_accuracy(net, trainer, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return evaluate_loader(net, trainer.test_loader, trainer.eval_attack, device=trainer.device, prefix="test", generator=gen)


def test_trades_se_on_digits_beats_85_clean_and_35_pgd20(trained):
    trainer, _ = trained
    metrics = _test_accuracy(trainer.eval_model, trainer)
    assert metrics["test_clean_acc"] > 0.85
    assert metrics["test_pgd_acc"] > 0.35
    assert len(trainer.history) == 10 and trainer.history[-1]["epoch"] == 10


def test_training_reports_the_madry_kl_robust_loss(trained):
    trainer, _ = trained
    first, last = trainer.history[0], trainer.history[-1]
    assert 0 < last["train_attack_ce"] < first["train_attack_ce"]
    assert all(math.isfinite(r["train_loss"]) for r in trainer.history)


def test_checkpoint_round_trip_gives_identical_accuracy(trained):
    trainer, path = trained
    net, cfg = model_from_checkpoint(path)
    assert cfg.objective.loss == "se"
    a = _test_accuracy(trainer.eval_model, trainer, seed=1)
    # in the trainer's layout (channels_last) the rebuilt network runs the same kernels: identical numbers
    same = _test_accuracy(net.to(memory_format=trainer.memory_format), trainer, seed=1)
    assert same == a and a["test_clean_acc"] > 0.85
    # in the contiguous layout only the float summation order differs: the loss at the PGD point agrees
    # to 1e-4, and a PGD step that lands on a decision boundary may flip one or two examples
    contiguous = _test_accuracy(net.to(memory_format=torch.contiguous_format), trainer, seed=1)
    assert contiguous["test_clean_acc"] == a["test_clean_acc"]
    assert contiguous["test_pgd_acc"] == pytest.approx(a["test_pgd_acc"], abs=2.5 / 449)  # 449 test digits
    assert contiguous["test_r_madry"] == pytest.approx(a["test_r_madry"], rel=1e-4)


def test_resuming_reproduces_an_uninterrupted_run_exactly(tmp_path):
    raw = {**DIGITS_TRADES_SE, "epochs": 3, "attack": {"eps": 0.2, "steps": 2}, "eval": {"pgd_steps": 2, "test": False}}
    cfg = build_config(raw)
    straight, resumed = straight_and_resumed(cfg, tmp_path / "ckpt.pt", 3)
    assert resumed.epoch == 1
    for _ in range(2):
        resumed.train_one_epoch()
    assert_same_weights(straight.net, resumed.net)
    assert [r["epoch"] for r in resumed.history] == [1.0, 2.0, 3.0]


def test_nan_loss_raises_a_clear_error():
    cfg = build_config({**DIGITS_TRADES_SE, "optim": {"lr": 1e12, "momentum": 0.0, "nesterov": False},
                        "epochs": 2, "attack": {"eps": 0.2, "steps": 1}})
    trainer = Trainer(cfg)
    with pytest.raises(NonFiniteLossError, match="non-finite training loss.*lower optim.lr"):
        for _ in range(2):
            trainer.train_one_epoch()


def test_corrupt_checkpoint_is_a_one_line_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"this is not a zip file")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(bad)
    assert "cannot read checkpoint" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_checkpoints_refuse_pickled_code(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"model": Evil()}, path, pickle_module=pickle)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


@pytest.mark.parametrize(
    "schedule,step,expected",
    [("cosine", 0, 1.0), ("cosine", 50, 0.5), ("cosine", 100, 0.0),
     ("piecewise", 49, 1.0), ("piecewise", 50, 0.1), ("piecewise", 80, 0.01), ("constant", 70, 1.0)],
)
def test_lr_schedules(schedule, step, expected):
    cfg = build_config({"optim": {"schedule": schedule}}).optim
    assert lr_factor(step, cfg, total_steps=100, steps_per_epoch=10) == pytest.approx(expected, abs=1e-9)


def test_warmup_ramps_linearly():
    cfg = build_config({"optim": {"warmup_epochs": 1}}).optim
    assert [lr_factor(s, cfg, 100, 10) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])


def test_ema_weights_lag_the_trained_weights():
    cfg = build_config({**DIGITS_TRADES_SE, "epochs": 1, "ema_decay": 0.9,
                        "attack": {"eps": 0.2, "steps": 1}, "eval": {"pgd_steps": 0, "test": False}})
    trainer = Trainer(cfg)
    trainer.train_one_epoch()
    w = dict(trainer.net.named_parameters())
    diffs = [(trainer.ema.module.state_dict()[k] - p).abs().max().item() for k, p in w.items()]
    assert max(diffs) > 0
    assert trainer.eval_model is trainer.ema.module


def test_global_batch_must_split_evenly_across_workers():
    cfg = build_config({**DIGITS_TRADES_SE, "batch_size": 63})
    with pytest.raises(ValueError, match="not divisible by 2 workers"):
        Trainer(cfg, world_size=2)


def test_resuming_with_a_larger_budget_follows_the_new_schedule(tmp_path):
    raw = {**DIGITS_TRADES_SE, "epochs": 1, "attack": {"eps": 0.2, "steps": 1}, "eval": {"pgd_steps": 0, "test": False}}
    short = Trainer(build_config(raw))
    short.train_one_epoch()
    assert short.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-9)  # end of a 1-epoch cosine
    short.save(tmp_path / "ckpt.pt")
    longer = Trainer(build_config({**raw, "epochs": 2}))
    longer.resume(tmp_path / "ckpt.pt")
    assert longer.optimizer.param_groups[0]["lr"] == pytest.approx(0.2 * 0.5, rel=1e-6)  # half-way through 2 epochs


def _first_batch(loader):
    loader.set_epoch(0)
    return next(iter(loader))


def test_conv_models_on_images_train_in_channels_last_by_default():
    trainer = Trainer(build_config({**DIGITS_TRADES_SE, "epochs": 1}))
    convs = [m for m in trainer.net.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    assert not any(c.weight.is_contiguous() for c in convs)
    for loader in (trainer.train_loader, trainer.val_loader, trainer.test_loader):
        x, _ = _first_batch(loader)  # 1-channel digits: NHWC and NCHW strides coincide
        assert x.is_contiguous(memory_format=torch.channels_last)
    assert trainer.memory_format is torch.channels_last


@pytest.mark.parametrize("raw", [
    {**DIGITS_TRADES_SE, "channels_last": "off"},
    {**DIGITS_TRADES_SE, "model": {"name": "mlp"}},  # no convolution: nothing to gain
])
def test_channels_last_off_or_without_convolutions_keeps_the_contiguous_layout(raw):
    trainer = Trainer(build_config(raw))
    assert trainer.memory_format is torch.contiguous_format
    assert all(p.is_contiguous() for p in trainer.net.parameters())


def test_channels_last_changes_only_rounding_of_the_training_loss():
    """Same weights, batch and (no) attack: the two layouts give the same per-sample loss to 1e-5."""
    from scoretune.engine import train_step

    raw = {**DIGITS_TRADES_SE, "attack": {"eps": 0.2, "steps": 0}}
    nhwc, nchw = Trainer(build_config(raw)), Trainer(build_config({**raw, "channels_last": "off"}))
    nchw.net.load_state_dict(nhwc.net.state_dict())
    x, y = _first_batch(nchw.train_loader)
    losses = []
    for t, xb in ((nhwc, x.contiguous(memory_format=torch.channels_last)), (nchw, x)):
        terms, _, _ = train_step(t.model, xb, y, t.objective, t.train_attack, t.optimizer, device=t.device)
        losses.append(terms["loss"])
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-5)
    for a, b in zip(nhwc.net.parameters(), nchw.net.parameters()):  # and the same SGD update
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_refine_measures_c_l1_at_each_epoch_that_improves_val_pgd_and_only_then():
    from scoretune.bounds import InnerMax, estimate_C
    from scoretune.data import eval_subset, to_float

    raw = {**DIGITS_TRADES_SE, "epochs": 5, "attack": {"eps": 0.2, "steps": 2}, "eval": {"pgd_steps": 2, "test": False},
           "early_stop": {"refine": True, "refine_samples": 64}}
    trainer = Trainer(build_config(raw))
    first = trainer.train_one_epoch()  # the first epoch always improves on nothing
    gen = torch.Generator().manual_seed(0 * 1000 + 31 + 0)  # seed 0, epoch index 0
    inner = InnerMax(eps=0.2, steps=20, restarts=2, pixel_range=trainer.dataset.info.pixel_range, generator=gen)
    sample = eval_subset(trainer.dataset.val, 64)  # the stratified sample of refine_samples val points
    again = estimate_C(trainer.eval_model, to_float(sample.x), inner, "l1", logits=True)
    assert first["val_c_l1"] == pytest.approx(again.mean, rel=1e-5)
    assert first["val_c_l1_se"] == pytest.approx(again.stderr, rel=1e-4)
    rows = [first] + [trainer.train_one_epoch() for _ in range(4)]
    best = -1.0
    for row in rows:
        improves = row["val_pgd_acc"] > best
        best = max(best, row["val_pgd_acc"])
        assert ("val_c_l1" in row) == improves, row
    assert all(0.0 <= r["val_c_l1"] <= 2.0 for r in rows if "val_c_l1" in r)


def test_eval_max_samples_evaluates_a_class_stratified_sample_of_a_class_sorted_split():
    """mnist5k's val and test splits are stored in class order: eval.max_samples 200 evaluates 20
    digits of every class (the first 200 would be val 0-4, test 0-1), the same sample every run."""
    from collections import Counter

    cfg = build_config({"data": {"name": "mnist5k"}, "model": {"name": "small_cnn"},
                        "eval": {"pgd_steps": 0, "max_samples": 200}, "epochs": 1})
    trainers = Trainer(cfg), Trainer(cfg)
    for split in ("val_loader", "test_loader"):
        (x, y), (x_again, _) = ([torch.cat(part) for part in zip(*getattr(t, split))] for t in trainers)
        assert Counter(y.tolist()) == {c: 20 for c in range(10)}, split
        assert torch.equal(x, x_again)
