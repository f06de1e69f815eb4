"""Experiment configuration: validated pydantic models, YAML loading and ``--set`` overrides.

Every error names the bad field (dotted path) and, where there is a fixed set, the allowed
values, on one line.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import UserError
from .losses import CLIP_MODES, LOSS_NAMES, METHODS

LossName = Literal[LOSS_NAMES]  # type: ignore[valid-type]
MethodName = Literal[METHODS]  # type: ignore[valid-type]
ClipMode = Literal[CLIP_MODES]  # type: ignore[valid-type]


class ConfigError(UserError, ValueError):
    """A configuration problem, with a one-line message naming the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    name: str = "digits"
    root: Optional[str] = None
    val_size: float = Field(0.1, ge=0.0, lt=1.0)
    ddpm_path: Optional[str] = None
    ddpm_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known_dataset(cls, v: str) -> str:
        from .data import available_datasets

        names = available_datasets()
        if v not in names:
            raise ValueError(f"unknown dataset '{v}'; choose one of: {', '.join(names)}")
        return v

    @model_validator(mode="after")
    def _ddpm_pair(self) -> "DataConfig":
        if self.ddpm_fraction > 0 and not self.ddpm_path:
            raise ValueError("ddpm_fraction > 0 needs data.ddpm_path (an .npz with 'image' and 'label')")
        return self


class ModelConfig(_Strict):
    name: str = "small_cnn"
    activation: Optional[str] = None
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known_model(cls, v: str) -> str:
        from .models import available_models

        names = available_models()
        if v not in names and not v.startswith("wrn-"):
            raise ValueError(f"unknown model '{v}'; choose one of: {', '.join(names)} or wrn-<depth>-<width>")
        return v


class ObjectiveConfig(_Strict):
    method: MethodName = "trades"  # type: ignore[valid-type]
    loss: LossName = "se"  # type: ignore[valid-type]
    beta: float = Field(6.0, ge=0.0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    clip_mode: ClipMode = "none"  # type: ignore[valid-type]
    clip: float = Field(0.0, ge=0.0)

    @model_validator(mode="after")
    def _clip_form(self) -> "ObjectiveConfig":
        if self.clip_mode == "value" and self.method != "trades":
            raise ValueError("clip_mode 'value' clips the TRADES robust term; use clip_mode 'smoothing' with pgdat")
        if self.clip_mode == "smoothing" and self.clip >= 1.0:
            raise ValueError("clip_mode 'smoothing' takes a clip value c in [0, 1)")
        return self


class AttackSettings(_Strict):
    eps: float = Field(8 / 255, ge=0.0)
    norm: Literal["linf", "l2"] = "linf"
    steps: int = Field(10, ge=0)
    step_size: Optional[float] = Field(None, gt=0.0)


class EvalSettings(_Strict):
    pgd_steps: int = Field(20, ge=0)
    restarts: int = Field(1, ge=1)
    max_samples: Optional[int] = Field(None, gt=0)
    test: bool = True


class OptimConfig(_Strict):
    name: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.1, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0.0)
    schedule: Literal["cosine", "piecewise", "constant"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0.0)
    milestones: list[float] = Field(default_factory=lambda: [0.5, 0.75])
    gamma: float = Field(0.1, gt=0.0)


class EarlyStopConfig(_Strict):
    rule: Literal["none", "floor"] = "none"
    floor: Optional[float] = Field(None, ge=0.0)
    patience: int = Field(2, ge=1)


class ScalingSettings(_Strict):
    workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)
    gpus_per_worker: Optional[float] = Field(None, ge=0.0)
    max_failures: int = Field(0, ge=-1)
    storage_path: Optional[str] = None
    num_to_keep: Optional[int] = Field(2, ge=1)


class ExperimentConfig(_Strict):
    name: str = "scoretune"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    attack: AttackSettings = Field(default_factory=AttackSettings)
    eval: EvalSettings = Field(default_factory=EvalSettings)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    early_stop: EarlyStopConfig = Field(default_factory=EarlyStopConfig)
    scaling: ScalingSettings = Field(default_factory=ScalingSettings)
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=1)
    seed: int = 0
    device: str = "auto"
    amp: Literal["auto", "on", "off"] = "auto"
    # NHWC memory layout for a conv model on image data (model and batches); 'auto' = on for such
    # models on every device (CPU: 1.2x per step for the small CNN, see benchmarks/README.md).
    channels_last: Literal["auto", "on", "off"] = "auto"
    ema_decay: Optional[float] = Field(None, gt=0.0, lt=1.0)
    output_dir: str = "runs"

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v == "auto" or v == "cpu" or v == "mps" or v == "cuda" or v.startswith("cuda:"):
            return v
        raise ValueError(f"unknown device '{v}'; choose one of: auto, cpu, cuda, cuda:N, mps")

    @model_validator(mode="after")
    def _eps_in_range(self) -> "ExperimentConfig":
        if self.data.name != "toy" and self.attack.norm == "linf" and self.attack.eps > 1.0:
            raise ValueError(
                f"attack.eps={self.attack.eps} is out of range for [0,1] pixel data: use a value in [0, 1] "
                "such as 8/255 = 0.0314 (eps is in pixel units, not /255)"
            )
        if self.early_stop.rule == "floor" and self.early_stop.floor is None:
            raise ValueError("early_stop.rule 'floor' needs early_stop.floor = (C^l1)^2/2 (see `scoretune bound`)")
        return self

    def flat(self) -> dict[str, Any]:
        """Dotted-key view (``objective.beta`` -> 6.0) for logging as params."""
        return flatten(self.model_dump())

    def to_json(self) -> str:
        return json.dumps(self.model_dump(), sort_keys=True)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def format_validation_error(err: ValidationError) -> str:
    """One line per problem, ``field.path: message (got value)``, joined by '; '."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "config"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see `scoretune train --help`)"
        got = e.get("input")
        got_s = "" if e["type"] in ("extra_forbidden", "missing") or isinstance(got, dict) else f" (got {got!r})"
        parts.append(f"{loc}: {msg}{got_s}")
    return "; ".join(parts)


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """``["objective.beta=3", "data.name=toy"]`` -> nested dict; values are parsed as YAML scalars."""
    nested: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ConfigError(f"--set expects key=value, got '{pair}'")
        key, raw = pair.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else None
        node = nested
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: '{p}' is not a section")
        node[parts[-1]] = value
    return nested


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping; missing files and syntax errors become one-line ConfigErrors."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p} (pass the path to a YAML file)")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{p}: malformed YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a YAML mapping at the top level, got {type(data).__name__}")
    return data


def build_config(raw: dict[str, Any], overrides: list[str] | None = None, source: str = "config") -> ExperimentConfig:
    merged = deep_merge(raw, parse_overrides(overrides))
    try:
        return ExperimentConfig.model_validate(merged)
    except ValidationError as e:
        raise ConfigError(f"{source}: {format_validation_error(e)}") from None


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load an experiment YAML (or defaults when ``path`` is None) and apply ``key=value`` overrides."""
    raw = read_yaml(path) if path is not None else {}
    return build_config(raw, overrides, source=str(path) if path else "config")


# ----------------------------------------------------------------------------- dotted keys

ALIASES: dict[str, str] = {
    "beta": "objective.beta",
    "loss": "objective.loss",
    "method": "objective.method",
    "clip": "objective.clip",
    "clip_mode": "objective.clip_mode",
    "label_smoothing": "objective.label_smoothing",
    "lr": "optim.lr",
    "weight_decay": "optim.weight_decay",
    "momentum": "optim.momentum",
    "optimizer": "optim.name",
    "schedule": "optim.schedule",
    "warmup_epochs": "optim.warmup_epochs",
    "eps": "attack.eps",
    "attack_steps": "attack.steps",
    "step_size": "attack.step_size",
    "model": "model.name",
    "activation": "model.activation",
    "epochs": "epochs",
    "batch_size": "batch_size",
    "ema_decay": "ema_decay",
}
"""Short names for the usual searched keys (``beta`` -> ``objective.beta``)."""


def set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    """``set_dotted(d, "objective.beta", 3.0)`` creates intermediate mappings as needed."""
    node = d
    parts = dotted.split(".")
    for p in parts[:-1]:
        nxt = node.get(p)
        if not isinstance(nxt, dict):
            nxt = node[p] = {}
        node = nxt
    node[parts[-1]] = value


def apply_params(base: dict[str, Any], targets: dict[str, str], point: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of ``base`` with every sampled value written at its dotted key."""
    raw = copy.deepcopy(base)
    for name, value in point.items():
        set_dotted(raw, targets.get(name, ALIASES.get(name, name)), value)
    return raw


def pin_data_paths(raw: dict[str, Any], cwd: str | os.PathLike | None = None) -> dict[str, Any]:
    """A copy of the experiment mapping ``raw`` whose data paths are absolute (against ``cwd``, default
    the working directory), default root included (``data.root`` > ``$SCORETUNE_DATA`` > ``./data``).

    Ray workers and Tune trials run in their own working directory: a driver pins the paths before it
    hands a config to them, so ``./data`` means what it means for a single-process run."""
    out = copy.deepcopy(raw)
    data = out.setdefault("data", {})
    here = Path(cwd) if cwd is not None else Path.cwd()
    root = data.get("root") or os.environ.get("SCORETUNE_DATA") or "data"
    if "://" not in str(root):
        data["root"] = str((here / Path(str(root)).expanduser()).absolute())
    ddpm = data.get("ddpm_path")
    if ddpm and "://" not in str(ddpm):
        data["ddpm_path"] = str((here / Path(str(ddpm)).expanduser()).absolute())
    return out
