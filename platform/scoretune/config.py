"""Experiment configuration: validated pydantic models, YAML loading and ``--set`` overrides.

Every error names the bad field (dotted path) and, where there is a fixed set, the allowed
values, on one line. Each rule lives once, on the model of its section (rules between sections on
:class:`ExperimentConfig`); the sections build their runtime objects (:meth:`ObjectiveConfig.build`,
:meth:`AttackSettings.build`, :meth:`ExperimentConfig.eval_attack`).

Ranges: every float is finite and no number field takes a boolean. ``attack.eps`` follows
:func:`scoretune.attacks.eps_problem`: at most the diameter of the input box, i.e. <= 1 for linf
on [0, 1] pixels and <= sqrt(number of input values) for l2 (checked here for a dataset registered
with its input shape, else when the data is loaded, by :meth:`AttackSettings.build`); the toy's
inputs are unbounded (any finite eps).
``optim.milestones`` are fractions of the post-warm-up schedule in (0, 1), ``optim.gamma`` a decay
factor in (0, 1], ``seed`` in [0, 2^32), ``name`` follows :func:`scoretune.names.name_problem`, and
``batch_size`` must be divisible by ``scaling.workers``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from . import safe_yaml
from .attacks import AttackConfig, eps_problem, resolve_attack_mode
from .errors import UserError
from .losses import CLIP_MODES, LOSS_NAMES, METHODS, Objective
from .names import Name

LossName = Literal[LOSS_NAMES]  # type: ignore[valid-type]
MethodName = Literal[METHODS]  # type: ignore[valid-type]
ClipMode = Literal[CLIP_MODES]  # type: ignore[valid-type]

SEED_LIMIT = 2**32
"""Seeds are in [0, 2^32): numpy's range; the engine derives ``seed * 1000 + rank`` from it."""

PIXEL_RANGE = (0.0, 1.0)
"""The input box of every image dataset (the toy's inputs are unbounded): the range of attack.eps."""


class ConfigError(UserError, ValueError):
    """A configuration problem, with a one-line message naming the field."""


def _numeric(annotation: Any) -> bool:
    """A field that takes a number: int or float, alone or in a Union (Optional, or a number or a keyword
    such as ``floor: 0.1 | auto``); a bool field is none."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    args = typing.get_args(annotation) if union else (annotation,)
    return bool not in args and any(a in (int, float) for a in args)


class _Strict(BaseModel):
    """Unknown keys refused; every float finite (``allow_inf_nan=False``); a number field refuses a
    boolean (YAML ``epochs: true`` is an error, not 1)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, v: Any, info: ValidationInfo) -> Any:
        if isinstance(v, bool) and _numeric(cls.model_fields[info.field_name].annotation):
            raise ValueError("must be a number, not true/false")
        return v


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
            raise ValueError(f"unknown dataset {v!r}; choose one of: {', '.join(names)}")
        return v

    @field_validator("ddpm_fraction")
    @classmethod
    def _ddpm_pair(cls, v: float, info: ValidationInfo) -> float:
        if v > 0 and not info.data.get("ddpm_path"):
            raise ValueError("> 0 needs data.ddpm_path (an .npz with 'image' and 'label')")
        return v


class ModelConfig(_Strict):
    name: str = "small_cnn"
    activation: Optional[str] = None
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known_model(cls, v: str) -> str:
        from .models import model_name_problem

        problem = model_name_problem(v)
        if problem:
            raise ValueError(problem)
        return v

    @field_validator("activation")
    @classmethod
    def _known_activation(cls, v: str | None) -> str | None:
        from .models import available_activations

        if v is not None and str(v).lower().replace("-", "_") not in available_activations():
            raise ValueError(f"unknown activation {v!r}; choose one of: {', '.join(available_activations())} "
                             "(or leave it out for the model's default)")
        return v

    @model_validator(mode="after")
    def _known_options(self) -> "ModelConfig":
        from .models import model_options

        allowed = model_options(self.name)
        unknown = sorted(set(self.options) - set(allowed))
        if unknown:
            raise ValueError(f"options: unknown option(s) {', '.join(map(repr, unknown))} for model {self.name!r}; "
                             f"allowed: {', '.join(sorted(allowed)) or 'none'}")
        return self


class ObjectiveConfig(_Strict):
    """The training objective; :meth:`build` makes the :class:`scoretune.losses.Objective`, whose
    ``__post_init__`` holds the rules between fields (checked here once, at validation)."""

    method: MethodName = "trades"  # type: ignore[valid-type]
    loss: LossName = "se"  # type: ignore[valid-type]
    beta: float = Field(6.0, ge=0.0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    clip_mode: ClipMode = "none"  # type: ignore[valid-type]
    # a number, or 'auto': the clip c whose per-sample bound is the floor, -log(1 - c) = (C^l1)^2/2
    # (scoretune.floor_estimate.clip_for_floor); resolved, with clip_mode 'smoothing', before training
    clip: Union[float, Literal["auto"]] = 0.0

    @field_validator("clip", mode="before")
    @classmethod
    def _clip_finite(cls, v: Any) -> Any:
        """inf/NaN is refused as one error on the field (not one per branch of the union)."""
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isfinite(v):
            raise PydanticCustomError("finite_number", "Input should be a finite number")
        return v

    def build(self) -> Objective:
        if self.clip == "auto":
            raise ConfigError("objective.clip: 'auto' is set from the estimated floor before training; "
                              "run through `scoretune train`/`search`, or call scoretune.floor_estimate.resolve_auto")
        return Objective(**self.model_dump())

    @model_validator(mode="after")
    def _builds(self) -> "ObjectiveConfig":
        if self.clip == "auto":
            if self.clip_mode == "value":
                raise ValueError("clip: 'auto' sets a label-smoothing clip (clip_mode 'smoothing' or 'none'), "
                                 "not clip_mode 'value'")
            return self
        if isinstance(self.clip, bool) or not math.isfinite(self.clip) or self.clip < 0:
            raise ValueError(f"clip: must be a number >= 0 or 'auto', got {self.clip!r}")
        self.build()  # its ValueError names the field ("clip_mode: ..."), shown as objective.clip_mode
        return self


class AttackSettings(_Strict):
    """The threat model B(x) and the training attack's budget; :meth:`build` makes the attacks.

    ``bn`` is how BatchNorm runs during the training attack (``eval``: running statistics,
    untouched; ``train``: batch statistics, running statistics updated at every attack step;
    ``train_frozen``: batch statistics, running statistics untouched) and ``target`` what the
    PGD-AT attack maximises the divergence from (``onehot``, or ``smoothed``: the label-smoothed
    one-hot of the loss; TRADES attacks toward p(x) and ignores it). ``auto`` is the official
    SCORE code's choice for the objective: PGD-AT ``train``/``onehot``, TRADES ``eval``
    (:func:`scoretune.attacks.resolve_attack_mode`); ``bn: eval, target: smoothed`` is how
    scoretune ran PGD-AT before these settings. ``start`` is where the training attack starts:
    ``normal`` (x + 0.001 N(0, I)) or ``uniform`` (a uniform point of B(x)); ``auto`` = PGD-AT
    ``uniform``, TRADES ``normal`` (:func:`scoretune.attacks.resolve_start`). TRADES with ``bn:
    train_frozen, start: uniform`` is the official ``trades_loss_LSE`` (the paper's Tables 3-4).
    The evaluation attack always runs in eval mode.
    """

    eps: float = Field(8 / 255, ge=0.0)
    norm: Literal["linf", "l2"] = "linf"
    steps: int = Field(10, ge=0)
    step_size: Optional[float] = Field(None, gt=0.0)
    bn: Literal["auto", "eval", "train", "train_frozen"] = "auto"
    target: Literal["auto", "onehot", "smoothed"] = "auto"
    start: Literal["auto", "normal", "uniform"] = "auto"
    # linear eps ramp of the training attack (the evaluation attack keeps eps): epoch e (0-based) of the
    # first eps_warmup_epochs trains at eps * (e + 1) / eps_warmup_epochs (engine.eps_ramp_factor); 0: off
    eps_warmup_epochs: float = Field(0.0, ge=0.0)

    def resolved(self, method: str) -> tuple[str, str]:
        """``(bn, target)`` the training attack of ``method`` runs with (``auto`` resolved)."""
        return resolve_attack_mode(method, self.bn, self.target)

    def build(self, pixel_range: tuple[float, float] | None, input_dims: int | None = None,
              steps: int | None = None) -> AttackConfig:
        """The PGD attack in B(x) on inputs in ``pixel_range``: the training attack, or with ``steps``
        an evaluation attack of that many steps (``step_size`` is kept only when the step counts
        agree, else the default 2.5 eps / steps). ``input_dims`` (the data's number of input values)
        completes the eps range check for l2 (eps <= the box's diameter)."""
        problem = eps_problem(self.eps, self.norm, pixel_range, input_dims)
        if problem:
            raise ConfigError(f"attack.eps: {problem}")
        n = self.steps if steps is None else steps
        return AttackConfig(eps=self.eps, norm=self.norm, steps=n,
                            step_size=self.step_size if n == self.steps else None, pixel_range=pixel_range,
                            bn=self.bn, target=self.target, start=self.start)


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
    gamma: float = Field(0.1, gt=0.0, le=1.0)

    @field_validator("milestones")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        # engine.lr_factor: the LR is multiplied by gamma once progress (the fraction of the
        # post-warm-up steps done, in [0, 1)) reaches a milestone
        for m in v:
            if not 0.0 < m < 1.0:
                raise ValueError(f"each milestone is a fraction of the schedule in (0, 1) (got {m!r})")
        return v


class EarlyStopConfig(_Strict):
    """``rule: floor`` stops after ``patience`` epochs with ``metric`` below ``floor`` = (C^l1)^2/2:
    a number, or ``auto`` (estimated before training by :mod:`scoretune.floor_estimate`: the exact
    posterior for the toy, else a cached proxy trained at the run's eps). ``probe_fraction``: the
    share of the training split on which ``train_r_madry`` is measured each epoch (CE-PGD).
    ``refine``: measure ``val_c_l1`` (C^l1 of the model on ``refine_samples`` validation points) at
    each epoch that improves ``val_pgd_acc``, and let the rule's floor fall to (val_c_l1)^2/2 of the
    best model so far (:class:`scoretune.stopping.FloorRefiner`)."""

    rule: Literal["none", "floor"] = "none"
    floor: Union[float, Literal["auto"], None] = Field(None, validate_default=True)
    patience: int = Field(2, ge=1)
    metric: str = "train_r_madry"
    probe_fraction: float = Field(0.1, ge=0.0, le=1.0)
    refine: bool = False
    refine_samples: int = Field(256, ge=1)

    @field_validator("floor")
    @classmethod
    def _floor_given(cls, v: float | str | None, info: ValidationInfo) -> float | str | None:
        if v is None and info.data.get("rule") == "floor":
            raise ValueError("rule 'floor' needs early_stop.floor = (C^l1)^2/2 or 'auto' (see `scoretune bound`)")
        if isinstance(v, (int, float)) and not isinstance(v, bool) and (not math.isfinite(v) or v < 0):
            raise ValueError(f"floor must be a finite number >= 0 or 'auto', got {v}")
        return v


class ScalingSettings(_Strict):
    workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)
    gpus_per_worker: Optional[float] = Field(None, ge=0.0)
    max_failures: int = Field(0, ge=-1)
    storage_path: Optional[str] = None
    num_to_keep: Optional[int] = Field(2, ge=1)


def device_problem(device: str) -> str | None:
    """Why ``device`` names no device scoretune runs on (None when it does): the one rule for ``device`` and
    every ``--device`` flag."""
    if isinstance(device, str) and (device in ("auto", "cpu", "mps", "cuda") or re.fullmatch(r"cuda:[0-9]+", device)):
        return None
    return f"unknown device {device!r}; choose one of: auto, cpu, cuda, cuda:N, mps"


def batch_split_problem(batch_size: int, workers: int) -> str | None:
    """Why ``batch_size`` cannot be split evenly over ``workers`` (None when it can): the one rule."""
    if batch_size % workers:
        return (f"batch_size {batch_size} is not divisible by {workers} workers (scaling.workers): the global "
                "batch is split evenly; pick a worker count that divides it (or change batch_size)")
    return None


class ExperimentConfig(_Strict):
    name: Name = "scoretune"
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
    seed: int = Field(0, ge=0, lt=SEED_LIMIT)
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
        problem = device_problem(v)
        if problem:
            raise ValueError(problem)
        return v

    @model_validator(mode="after")
    def _across_sections(self) -> "ExperimentConfig":
        # eps in range for the data's input box (l2: the diameter needs the input size, known here for
        # a dataset registered with its shape; for another, AttackSettings.build completes it)
        from .data import static_input_shape

        shape = static_input_shape(self.data.name)
        problem = eps_problem(self.attack.eps, self.attack.norm, None if self.data.name == "toy" else PIXEL_RANGE,
                              math.prod(shape) if shape else None)
        if problem:
            raise ValueError(f"attack.eps: {problem}")
        problem = batch_split_problem(self.batch_size, self.scaling.workers)
        if problem:
            raise ValueError(problem)
        es = self.early_stop
        if es.rule == "floor" and es.metric in ("train_r_madry", "val_r_madry") and (
                self.eval.pgd_steps == 0 or (es.metric == "train_r_madry" and es.probe_fraction == 0)):
            raise ValueError(f"early_stop.metric: the floor rule watches {es.metric}, measured by the evaluation "
                             "attack: set eval.pgd_steps > 0 (and early_stop.probe_fraction > 0)")
        if es.refine and (self.eval.pgd_steps == 0 or self.data.val_size == 0):
            raise ValueError("early_stop.refine: the floor is refined from the model of best val_pgd_acc, which "
                             "needs a validation split and its PGD: set data.val_size > 0 and eval.pgd_steps > 0, "
                             "or refine: false")
        return self

    def eval_attack(self, pixel_range: tuple[float, float] | None,
                    input_dims: int | None = None) -> AttackConfig | None:
        """PGD-``eval.pgd_steps`` in the training threat model (None when ``eval.pgd_steps`` is 0)."""
        if self.eval.pgd_steps == 0:
            return None
        return self.attack.build(pixel_range, input_dims, steps=self.eval.pgd_steps)

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


_FIELD_PREFIX = re.compile(r"^([A-Za-z_][A-Za-z0-9_.]*): (.+)$", re.DOTALL)


def _loc_part(p: Any) -> str:
    t = str(p)
    return t if re.fullmatch(r"[A-Za-z0-9_\-]+", t) else repr(p)


def _one_line(text: str) -> str:
    lines = text.splitlines()
    return " ".join(lines) if len(lines) > 1 else text


def _blamed_field(title: str, loc: tuple, msg: str) -> tuple[str, str] | None:
    """(dotted field, rest) when a validator of a config model starts its message with one of that
    model's fields (``"clip_mode: ..."`` from the objective section: ``objective.clip_mode``)."""
    m = _FIELD_PREFIX.match(msg)
    model: Any = {c.__name__: c for c in _Strict.__subclasses__()}.get(title)
    for p in loc:
        field = model.model_fields.get(p) if model is not None and isinstance(p, str) else None
        ann = field.annotation if field is not None else None
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    if m is None or model is None or m.group(1).split(".")[0] not in model.model_fields:
        return None
    return ".".join([*(str(p) for p in loc), m.group(1)]), m.group(2)


def format_validation_error(err: ValidationError) -> str:
    """One line per problem, ``field.path: message (got value)``, joined by '; '.

    A validator of a config model may name the field it blames first (``"clip_mode: ..."`` from
    the objective section becomes ``objective.clip_mode: ...``); a whole-config error names its fields."""
    parts = []
    for e in err.errors():
        loc = ".".join(_loc_part(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "finite_number":
            msg = "must be finite"
        elif e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see `scoretune train --help`)"
        elif e["type"] == "value_error":
            blamed = _blamed_field(err.title, e["loc"], msg)
            if blamed:
                loc, msg = blamed
        got = e.get("input")
        skip = e["type"] in ("extra_forbidden", "missing") or got is None or isinstance(got, dict) or "(got " in msg or repr(got) in msg
        got_s = "" if skip else f" (got {_short_repr(got)})"
        parts.append(f"{loc}: {msg}{got_s}" if loc else f"{msg}{got_s}")
    return _one_line("; ".join(parts))


def _short_repr(v: Any, limit: int = 80) -> str:
    r = repr(v)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """``["objective.beta=3", "data.name=toy"]`` -> nested dict; values are parsed as YAML scalars."""
    nested: dict[str, Any] = {}
    for pair in pairs or []:
        if not isinstance(pair, str) or "=" not in pair:
            raise ConfigError(_one_line(f"--set expects key=value, got {pair!r}"))
        key, raw = pair.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(_one_line(f"--set {key!r}: expects a dotted key such as objective.beta"))
        try:
            value = safe_yaml.load(raw, f"--set {key}") if raw != "" else None
        except safe_yaml.YamlError as e:
            raise ConfigError(_one_line(str(e).replace("malformed YAML", f"malformed value {_short_repr(raw)}", 1))) from None
        node = nested
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(_one_line(f"--set {key}: {p!r} is not a section"))
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
    """Read a YAML mapping through :mod:`scoretune.safe_yaml` (size, node and duplicate-key caps); a
    missing file, a syntax error or a cap becomes a one-line ConfigError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p} (pass the path to a YAML file)")
    try:
        data = safe_yaml.read(p)
    except safe_yaml.YamlError as e:
        raise ConfigError(str(e)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a YAML mapping at the top level, got {type(data).__name__}")
    return data


def build_config(raw: dict[str, Any], overrides: list[str] | None = None, source: str = "config") -> ExperimentConfig:
    """The validated config of the mapping ``raw`` with ``key=value`` overrides; a one-line
    :class:`ConfigError` naming the field otherwise."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of config sections, got {type(raw).__name__}")
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
    "eps_warmup_epochs": "attack.eps_warmup_epochs",
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
