"""The per-epoch table of a training: printed and logged to MLflow exactly once per epoch.

Rows may arrive in any order and more than once (a resumed run replays its history, the Ray Train
follower polls checkpoints, the final history comes at the end); :class:`EpochTable` emits epoch
``e`` only right after epoch ``e - 1``, so every epoch is printed and logged once, in order. Epochs an
MLflow run already holds (a resumed run) are passed as ``logged_epochs`` and are not logged again.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Iterable

from ..engine import selection_metric

COLUMNS = [
    ("epoch", "epoch", "{:>5.0f}"),
    ("lr", "lr", "{:>8.4f}"),
    ("train_loss", "loss", "{:>7.4f}"),
    ("train_r_madry", "R_Madry", "{:>7.4f}"),
    ("train_adv_acc", "tr_adv", "{:>6.3f}"),
    ("val_clean_acc", "val_cln", "{:>7.3f}"),
    ("val_pgd_acc", "val_pgd", "{:>7.3f}"),
    ("test_clean_acc", "tst_cln", "{:>7.3f}"),
    ("test_pgd_acc", "tst_pgd", "{:>7.3f}"),
    ("epoch_time", "sec", "{:>6.1f}"),
]


def format_header() -> str:
    return " ".join(f"{title:>{len(fmt.format(0.0))}}" for _, title, fmt in COLUMNS)


def format_row(row: dict[str, Any]) -> str:
    cells = []
    for key, _title, fmt in COLUMNS:
        width = len(fmt.format(0.0))
        v = row.get(key)
        cells.append(fmt.format(v) if isinstance(v, (int, float)) else f"{'-':>{width}}")
    return " ".join(cells)


class EpochTable:
    """Prints and logs each epoch's row exactly once, in epoch order (see the module docstring)."""

    def __init__(self, out: Callable[[str], None] = print, logger: Any = None, logged_epochs: int = 0):
        self.out = out
        self.logger = logger
        self.logged_epochs = int(logged_epochs)
        self.rows: dict[int, dict[str, float]] = {}
        self.best_score = float("-inf")
        self._lock = threading.Lock()
        self.out(format_header())

    @property
    def last_epoch(self) -> int:
        return max(self.rows, default=0)

    @property
    def best_row(self) -> dict[str, float] | None:
        return max(self.rows.values(), key=selection_metric, default=None)

    def add(self, history: Iterable[dict[str, float]]) -> list[dict[str, float]]:
        """Emit the rows of ``history`` after the last emitted epoch (a history always starts at epoch 1)."""
        new = []
        with self._lock:
            for row in history:
                epoch = int(row["epoch"])
                if epoch != self.last_epoch + 1:
                    continue
                self.rows[epoch] = row
                self.best_score = max(self.best_score, selection_metric(row))
                if self.logger is not None and epoch > self.logged_epochs:
                    self.logger.log_metrics({**row, "best_val_metric": self.best_score}, step=epoch)
                self.out(format_row(row))
                new.append(row)
        return new
