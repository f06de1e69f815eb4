"""The MLflow side of a training, whatever runs it (this process or Ray Train workers).

:class:`TrainingRun` opens the run (params, tags, ``config.json``) or continues the one that already
holds this run's checkpoints (found by its ``scoretune.run_dir`` tag, logging only the epochs it does not
hold yet), prints and logs each epoch once (:class:`~scoretune.drivers.progress.EpochTable`), marks the
run FAILED / KILLED with the error when training raises, and at the end logs the selected checkpoint as
``checkpoints/<file>`` and its network as the run's MLflow model. A run left RUNNING by a killed process
is continued on resume, or ended (KILLED, tagged superseded) when the same run directory starts over.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable

from ..tracking import tags
from .progress import EpochTable

Out = Callable[[str], None]


def example_input(model_spec: dict[str, Any], n: int = 2):
    """An input example for MLflow's model signature, drawn in the data's pixel range."""
    import numpy as np

    shape = (n, *model_spec["input_shape"])
    rng = np.random.default_rng(0)
    lo_hi = model_spec.get("pixel_range")
    if lo_hi:
        return rng.uniform(lo_hi[0], lo_hi[1], size=shape).astype(np.float32)
    return rng.standard_normal(shape).astype(np.float32)


class TrainingRun:
    """The MLflow run of one training, and its per-epoch table (see the module docstring).

    Use as a context manager: an exception inside marks the run FAILED (KILLED for Ctrl-C), says how
    many finished epochs were kept, and propagates."""

    def __init__(self, cfg: Any, run_path: str, *, tracking_uri: str | None = None, experiment: str | None = None,
                 use_mlflow: bool = True, continuing: bool = False, extra_tags: dict[str, str] | None = None,
                 resume_hint: str = "rerun with --resume to continue", out: Out = print):
        self.cfg, self.run_path, self.out, self.resume_hint = cfg, str(run_path), out, resume_hint
        self.logger = None
        logged = 0
        if use_mlflow:
            self.logger, logged = self._open(tracking_uri, experiment or cfg.name, continuing, extra_tags or {})
        self.table = EpochTable(out, self.logger, logged_epochs=logged)

    def _open(self, tracking_uri: str | None, experiment: str, continuing: bool, extra: dict[str, str]):
        from ..tracking import RunLogger, client, get_or_create_experiment
        from ..tracking.runs import find_train_run, logged_epochs

        cl = client(tracking_uri)
        old = find_train_run(cl, get_or_create_experiment(cl, experiment), self.run_path)
        if old is not None and continuing:
            logger = RunLogger(tracking_uri, experiment, run_id=old.info.run_id)
            logged = logged_epochs(logger.client, old.info.run_id)
            self.out(f"MLflow run {logger.run_id} in {logger.uri} (continued after epoch {logged})")
            return logger, logged
        if old is not None and old.info.status == "RUNNING":  # its process was killed: end it, never duplicate
            cl.set_tag(old.info.run_id, tags.SUPERSEDED, "a new training in the same run directory")
            cl.set_terminated(old.info.run_id, status="KILLED")
        logger = RunLogger(tracking_uri, experiment, run_name=self.cfg.name,
                           tags={tags.KIND: "train", tags.DATASET: self.cfg.data.name, tags.RUN_DIR: self.run_path,
                                 **extra})
        try:
            logger.log_params(self.cfg.flat())
            logger.log_text(self.cfg.model_dump_json(indent=2), "config.json")
        except BaseException as e:  # the run exists: end it rather than leave it RUNNING
            logger.set_tags({tags.STATUS: "failed", tags.ERROR: f"{type(e).__name__}: {e}"[:5000]})
            logger.end("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
            raise
        self.out(f"MLflow run {logger.run_id} in {logger.uri}")
        return logger, 0

    def __enter__(self) -> "TrainingRun":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            return
        if self.logger is not None:
            self.logger.set_tags({tags.STATUS: "failed", tags.ERROR: f"{exc_type.__name__}: {exc}"[:5000]})
            self.logger.end("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        if self.table.last_epoch:
            print(f"kept {self.table.last_epoch} finished epoch(s) in {self.run_path}; {self.resume_hint}",
                  file=sys.stderr)

    def finish(self, status: str, checkpoint_file: Path | None, artifact_name: str | None = None) -> dict[str, Any]:
        """Tag how training ended, log the selected checkpoint and its model, end the run; the summary."""
        from ..engine import load_checkpoint, model_from_checkpoint

        summary: dict[str, Any] = {"best": self.table.best_row, "epochs": self.table.last_epoch,
                                   "stop_reason": status, "run_path": self.run_path}
        if self.logger is not None:
            self.logger.set_tags({tags.STATUS: status, tags.CHECKPOINTS: self.run_path})
            if checkpoint_file is not None and checkpoint_file.exists():
                name = artifact_name or checkpoint_file.name
                if name == checkpoint_file.name:
                    self.logger.log_artifact(checkpoint_file, "checkpoints")
                else:
                    import shutil
                    import tempfile

                    with tempfile.TemporaryDirectory(prefix="scoretune-") as tmp:
                        shutil.copyfile(checkpoint_file, Path(tmp) / name)
                        self.logger.log_artifact(Path(tmp) / name, "checkpoints")
                state = load_checkpoint(checkpoint_file)
                net, _ = model_from_checkpoint(state)
                summary["model_uri"] = self.logger.log_model(net, example_input(json.loads(state["model_spec"])))
                self.out(f"logged model {summary['model_uri']} (run {self.logger.run_id})")
            self.logger.end("KILLED" if status == "interrupted" else "FINISHED")
            summary["run_id"] = self.logger.run_id
        row = self.table.best_row
        if row:
            self.out("best epoch {:.0f}: val_clean_acc={:.4f} val_pgd_acc={:.4f}".format(
                row["epoch"], row.get("val_clean_acc", float("nan")), row.get("val_pgd_acc", float("nan"))))
        return summary
