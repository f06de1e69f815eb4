"""Test-only hooks of the Ray Train loop, switched on through ``extra_loop_config``.

``{"_test_probe_dir": DIR}`` makes every worker write, in DIR:

* ``rank{r}.pid`` / ``rank{r}.node`` -- its process id and Ray node id (rewritten by a restarted worker);
* ``rank{r}.starts``                 -- one line per (re)start: the number of epochs it resumed from;
* ``rank{r}.epoch{e}``               -- a marker when epoch ``e`` (1-based) starts;
* ``rank{r}.final.json``             -- when the loop ends: its history, per-rank batch size, number of
                                        training batches, the sum of its network's parameters and
                                        whether MLflow got imported in the worker.

``{"_test_hold_epoch": E, "_test_hold_s": S}`` additionally makes each worker sleep S seconds right
after writing its epoch-E marker the first time (not after a restart), so a test can kill it there,
in the middle of epoch E; before writing that marker it waits until Ray Train has committed the
checkpoints reported so far (a worker that dies before the controller has collected the last report
loses that report: the run would resume one epoch earlier). Without these keys nothing is written and nothing waits.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Probe:
    directory: Path | None
    rank: int
    hold_epoch: int | None = None
    hold_s: float = 0.0

    @classmethod
    def from_config(cls, config: dict[str, Any], rank: int) -> "Probe":
        d = config.get("_test_probe_dir")
        hold = config.get("_test_hold_epoch")
        return cls(Path(d) if d else None, rank, int(hold) if hold is not None else None,
                   float(config.get("_test_hold_s", 0.0)))

    def _write(self, name: str, text: str, mode: str = "w") -> None:
        if self.directory is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / f"rank{self.rank}.{name}", mode) as f:
            f.write(text)

    def started(self, resumed_epochs: int, node_id: str) -> None:
        self._write("pid", str(os.getpid()))
        self._write("node", node_id)
        self._write("starts", f"{resumed_epochs}\n", mode="a")

    def epoch_start(self, epoch: int) -> None:
        if self.directory is None:
            return
        marker = self.directory / f"rank{self.rank}.epoch{epoch}"
        hold = not marker.exists() and self.hold_epoch == epoch and self.hold_s > 0
        if hold:  # make sure the previous epoch's checkpoint is committed before anyone gets killed
            import ray.train

            ray.train.get_all_reported_checkpoints(
                consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED, timeout_s=self.hold_s)
        self._write(f"epoch{epoch}", str(time.time()))
        if hold:
            time.sleep(self.hold_s)

    def finished(self, trainer: Any) -> None:
        if self.directory is None:
            return
        from scoretune.engine import unwrap

        param_sum = float(sum(p.detach().double().sum().item() for p in unwrap(trainer.net).parameters()))
        self._write("final.json", json.dumps({
            "history": trainer.history, "batch_size": trainer.train_loader.batch_size,
            "train_batches": len(trainer.train_loader), "param_sum": param_sum,
            "mlflow_imported": "mlflow" in sys.modules,
        }))
