"""The GPU path: bf16 autocast, channels_last, ``use_gpu`` Ray Train with one worker, AutoAttack on CUDA.

Every test here is marked ``cuda`` and skips without a CUDA device; ``benchmarks/gpu_check.sh`` runs
them (``pytest -m cuda``) on the first GPU at hand. Digits and the small CNN keep each test to seconds.
"""

from __future__ import annotations

import pytest
import torch

from scoretune.config import build_config

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DIGITS = {
    "data": {"name": "digits", "val_size": 0.25},
    "model": {"name": "small_cnn"},
    "objective": {"method": "trades", "loss": "se", "beta": 6.0},
    "attack": {"eps": 0.2, "steps": 3},
    "eval": {"pgd_steps": 3, "test": False},
    "optim": {"lr": 0.2},
    "epochs": 1,
    "batch_size": 64,
    "seed": 0,
}


def test_training_step_on_cuda_autocasts_to_bf16_and_keeps_fp32_weights():
    from scoretune.engine import Trainer, autocast_context

    trainer = Trainer(build_config({**DIGITS, "device": "cuda"}))
    assert trainer.device.type == "cuda"
    x, _ = next(iter(trainer.train_loader))
    with autocast_context(trainer.device, "auto"):
        logits = trainer.net(x)
    assert logits.dtype == torch.bfloat16
    row = trainer.train_one_epoch()
    assert all(p.dtype == torch.float32 for p in trainer.net.parameters())
    assert 0.0 < row["train_loss"] < 10.0 and 0.0 <= row["val_pgd_acc"] <= 1.0


def test_amp_off_on_cuda_computes_in_fp32():
    from scoretune.engine import Trainer, autocast_context

    trainer = Trainer(build_config({**DIGITS, "device": "cuda", "amp": "off"}))
    x, _ = next(iter(trainer.train_loader))
    with autocast_context(trainer.device, "off"):
        assert trainer.net(x).dtype == torch.float32


def test_conv_model_on_cuda_trains_in_channels_last():
    from scoretune.engine import Trainer

    trainer = Trainer(build_config({**DIGITS, "device": "cuda"}))
    convs = [m for m in trainer.net.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1]
    assert convs and all(c.weight.is_cuda and c.weight.is_contiguous(memory_format=torch.channels_last)
                         for c in convs)
    assert trainer.memory_format is torch.channels_last


def test_bf16_training_loss_on_cuda_is_close_to_fp32_on_the_same_start():
    """bf16 autocast changes rounding, not the loss: one epoch from the same weights and batches."""
    from scoretune.engine import Trainer

    bf16 = Trainer(build_config({**DIGITS, "device": "cuda"})).train_one_epoch()
    fp32 = Trainer(build_config({**DIGITS, "device": "cuda", "amp": "off"})).train_one_epoch()
    assert bf16["train_loss"] == pytest.approx(fp32["train_loss"], rel=0.1)


def test_ray_train_with_use_gpu_and_one_worker_trains_on_the_gpu(ray_local, tmp_path):
    import ray

    from trainables.ray_checkpoint import load_state
    from trainables.train_loop import build_torch_trainer

    if ray.cluster_resources().get("GPU", 0) < 1:
        pytest.skip("the local Ray sees no GPU")
    cfg = build_config({**DIGITS, "name": "gpu1", "device": "cuda", "epochs": 2,
                        "scaling": {"workers": 1, "use_gpu": True, "gpus_per_worker": 1}})
    result = build_torch_trainer(cfg, name=cfg.name, storage_path=str(tmp_path / "ray_results")).fit()
    assert result.error is None
    state = load_state(result.checkpoint)
    assert int(state["epoch"]) == 2
    assert all(v.device.type == "cpu" for v in state["model"].values() if torch.is_tensor(v))  # saved portable


def test_autoattack_on_cuda_gives_the_cpu_accuracy():
    """AutoAttack (fast) of the same network on the same 64 digits: on CUDA within 2 examples of CPU."""
    from scoretune.data import load_dataset
    from scoretune.engine import Trainer
    from scoretune.robustness import evaluate

    trainer = Trainer(build_config({**DIGITS, "device": "cpu", "epochs": 2}))
    for _ in range(2):
        trainer.train_one_epoch()
    net = trainer.net.eval()
    ds = load_dataset("digits", val_size=0.25, seed=0)
    x, y = ds.test.x[:64].float(), ds.test.y[:64]
    if x.max() > 1.0:
        x = x / 255.0
    cpu = evaluate(net, x, y, attack="aa-fast", eps=0.2, device="cpu", seed=0)
    gpu = evaluate(net.to("cuda"), x, y, attack="aa-fast", eps=0.2, device="cuda", seed=0)
    assert gpu.clean_acc == pytest.approx(cpu.clean_acc, abs=1 / 64 + 1e-9)
    assert gpu.robust_acc == pytest.approx(cpu.robust_acc, abs=2 / 64 + 1e-9)
    assert gpu.robust_acc <= gpu.clean_acc
