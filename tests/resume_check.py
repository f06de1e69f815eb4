"""The straight-vs-resumed training check that the engine and attack tests share."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def straight_and_resumed(cfg: Any, checkpoint: Path, epochs: int) -> tuple[Any, Any]:
    """Train ``cfg`` for ``epochs`` epochs without a break, and again for one epoch, saved to ``checkpoint``
    and resumed from it in a fresh :class:`~scoretune.engine.Trainer`. Returns ``(straight, resumed)``;
    ``resumed`` stands after epoch 1, for the caller to train on. All three at a fixed thread count: the
    thread governor follows the machine's load, and the count changes torch's float summation order."""
    from scoretune.engine import Trainer
    from scoretune.thread_governor import INERT

    def trainer() -> Trainer:
        t = Trainer(cfg)
        t.governor = INERT
        return t

    straight = trainer()
    for _ in range(epochs):
        straight.train_one_epoch()
    first = trainer()
    first.train_one_epoch()
    first.save(checkpoint)
    resumed = trainer()
    resumed.resume(checkpoint)
    return straight, resumed


def assert_same_weights(a: Any, b: Any) -> None:
    """Every tensor of two networks' state dicts equal, bit for bit."""
    import torch

    for k, v in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[k], v, rtol=0, atol=0, msg=k)
