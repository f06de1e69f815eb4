"""Search spaces (``search_spaces/*.yaml``): a validated schema for a Ray Tune + Optuna search.

A space names a fixed experiment (``base``: an experiment mapping or the path of an experiment
YAML) and the parameters to search, each a distribution over one experiment key::

    name: quickstart
    base: ../configs/digits_trades_se.yaml      # or an inline ExperimentConfig mapping
    params:
      beta: {loguniform: [1.0, 8.0]}            # alias of objective.beta
      lr:   {choice: [0.1, 0.05]}               # alias of optim.lr
      objective.loss: {choice: [se, kl]}        # any dotted experiment key
    objective: {metric: val_pgd_acc, mode: max} # or a list -> multi-objective (Pareto front)
    scheduler: {type: asha, grace_period: 1, reduction_factor: 2}
    stoppers: {floor: {value: 0.1, patience: 2}}

Validation happens before anything runs: pydantic checks the schema, :func:`validate_space` the
rules across the base experiment (every point the search can sample must make a valid experiment);
every error is one line naming the key and, where there is a fixed set, the allowed values.

This module imports pydantic/yaml and the experiment config only (no Ray, no MLflow).
"""

from __future__ import annotations

import itertools
import math
import os
import typing
from pathlib import Path
from typing import Any, Iterator, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..config import (
    ALIASES,
    ConfigError,
    ExperimentConfig,
    apply_params,
    batch_split_problem,
    deep_merge,
    format_validation_error,
    parse_overrides,
    read_yaml,
)
from ..engine import ENGINE_METRICS
from ..names import Name

DISTRIBUTIONS = ("loguniform", "uniform", "int", "choice")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ParamSpec(_Strict):
    """Exactly one of ``loguniform: [lo, hi]``, ``uniform: [lo, hi]``, ``int: [lo, hi]`` (both ends
    included) or ``choice: [v1, v2, ...]``."""

    loguniform: Optional[tuple[float, float]] = None
    uniform: Optional[tuple[float, float]] = None
    int_: Optional[tuple[int, int]] = Field(None, alias="int")
    choice: Optional[list[Any]] = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _one_kind(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            raise ValueError(
                f"expected a mapping with one of: {', '.join(DISTRIBUTIONS)} (e.g. {{loguniform: [1.0, 8.0]}})"
            )
        data = {k: v for k, v in data.items() if v is not None}
        given = [k for k in data if k in DISTRIBUTIONS or k == "int_"]
        unknown = [k for k in data if k not in DISTRIBUTIONS and k != "int_"]
        if unknown:
            raise ValueError(f"unknown distribution '{unknown[0]}'; choose one of: {', '.join(DISTRIBUTIONS)}")
        if len(given) != 1:
            raise ValueError(f"give exactly one of: {', '.join(DISTRIBUTIONS)} (got {len(given)})")
        return data

    @model_validator(mode="after")
    def _ranges(self) -> "ParamSpec":
        kind = self.kind
        if kind == "choice":
            if not self.choice:
                raise ValueError("choice: needs a non-empty list of values")
            for v in self.choice:
                if v is not None and not isinstance(v, (bool, int, float, str)):
                    raise ValueError(f"choice: values must be numbers, strings, booleans or null (got {v!r})")
            if len({repr(v) for v in self.choice}) != len(self.choice):
                raise ValueError(f"choice: values must be distinct (got {self.choice})")
            return self
        lo, hi = self.bounds
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError(f"{kind}: bounds must be finite (got [{lo}, {hi}])")
        if not lo < hi:
            raise ValueError(f"{kind}: needs lo < hi (got [{lo}, {hi}])")
        if kind == "loguniform" and lo <= 0:
            raise ValueError(f"loguniform: needs lo > 0 (got [{lo}, {hi}]); use uniform for ranges that include 0")
        return self

    @property
    def kind(self) -> str:
        for k in ("loguniform", "uniform", "choice"):
            if getattr(self, k) is not None:
                return k
        return "int"

    @property
    def bounds(self) -> tuple[float, float]:
        v = {"loguniform": self.loguniform, "uniform": self.uniform, "int": self.int_}[self.kind]
        return v  # type: ignore[return-value]

    def probe_values(self) -> list[Any]:
        """The values that decide validity: every choice, or the two ends of a range."""
        return list(self.choice) if self.kind == "choice" else list(self.bounds)

    def contains(self, value: Any) -> bool:
        if self.kind == "choice":
            return value in self.choice  # type: ignore[operator]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        lo, hi = self.bounds
        if self.kind == "int" and int(value) != value:
            return False
        return lo <= value <= hi

    def describe(self) -> str:
        if self.kind == "choice":
            return f"choice{self.choice}"
        lo, hi = self.bounds
        return f"{self.kind}[{lo:g}, {hi:g}]"

    def optuna_distribution(self):
        import optuna

        d = optuna.distributions
        if self.kind == "choice":
            return d.CategoricalDistribution(list(self.choice))  # type: ignore[arg-type]
        lo, hi = self.bounds
        if self.kind == "int":
            return d.IntDistribution(int(lo), int(hi))
        return d.FloatDistribution(float(lo), float(hi), log=self.kind == "loguniform")


class ObjectiveSpec(_Strict):
    metric: str = "val_pgd_acc"
    mode: Literal["max", "min"] = "max"

    def __str__(self) -> str:
        return f"{self.metric}:{self.mode}"


class ResourcesSpec(_Strict):
    """Per trial: ``workers`` Ray Train workers (1 = the engine runs inside the Tune trial process),
    ``cpus`` and ``gpus`` per worker."""

    workers: int = Field(1, ge=1)
    cpus: float = Field(1.0, gt=0.0)
    gpus: float = Field(0.0, ge=0.0)


class SchedulerSpec(_Strict):
    """``asha``: AsyncHyperBand on ``epoch`` (``max_t`` defaults to the epoch budget); ``none``: FIFO."""

    type: Literal["asha", "none"] = "asha"
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2.0, gt=1.0)
    max_t: Optional[int] = Field(None, ge=1)


class SamplerSpec(_Strict):
    """``tpe`` (seeded, multivariate; multi-objective too), ``random``, or ``grid`` (every combination of
    ``choice`` params once: num_samples defaults to the grid size)."""

    type: Literal["tpe", "random", "grid"] = "tpe"
    n_startup_trials: Optional[int] = Field(None, ge=1)


class FloorSpec(_Strict):
    """SCORE's floor rule: stop a trial after ``patience`` epochs with ``metric`` (``train_r_madry``: the
    robust cross-entropy at the CE-PGD maximiser, R_Madry) below (C^l1)^2/2. Give the floor as ``value``,
    or ``estimate: auto``: the exact posterior for the toy; other data a short proxy training at the
    search's eps, cached under ``storage_path/floor_cache`` (``proxy_epochs``, ``proxy_beta``; see
    :mod:`scoretune.floor_estimate`), or ``proxy_checkpoint``: a trained scoretune checkpoint whose
    posterior stands in for p_d. ``samples``: points of the validation split C^l1 is averaged over.
    ``refine``: the floor falls, during the search, to (C^l1)^2/2 of the best trial's best model so
    far (every trial measures ``val_c_l1`` at its best epochs: ``base.early_stop.refine``; see
    :class:`scoretune.stopping.FloorRefiner`); never above the estimated or given floor."""

    value: Optional[float] = None
    estimate: Union[Literal["auto"], bool] = False
    proxy_checkpoint: Optional[str] = None
    proxy_epochs: Optional[int] = Field(None, ge=1)
    proxy_beta: Optional[float] = Field(None, ge=0.0)  # None: 1 on images, 0 otherwise
    patience: int = Field(2, ge=1)
    metric: str = "train_r_madry"
    samples: int = Field(512, ge=1)
    refine: bool = False

    @field_validator("value")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        if v is not None and (not math.isfinite(v) or v < 0):
            raise ValueError(f"the floor must be a finite number >= 0 (see `scoretune bound`), got {v}")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> "FloorSpec":
        if self.estimate is True:
            self.estimate = "auto"
        if (self.value is None) == (not self.estimate):
            raise ValueError("give either value: F (the floor (C^l1)^2/2, see `scoretune bound`) or estimate: auto")
        return self


class PlateauSpec(_Strict):
    metric: str = "val_pgd_acc"
    mode: Literal["max", "min"] = "max"
    patience: int = Field(5, ge=1)
    min_delta: float = Field(0.0, ge=0.0)


class AutoAttackSpec(_Strict):
    """AutoAttack on the top-k trials' best models once the search ends (``version: none`` turns it
    off). Runs on a fixed class-stratified sample of ``n_ex`` examples of the held-out ``split``
    (:func:`scoretune.data.eval_subset`, seeded by ``subset_seed``: the same examples for every model)
    at the trials' own eps/norm and logs ``aa_<version>_acc`` and ``aa_acc`` to each trial's child run."""

    version: Literal["fast", "standard", "none"] = "fast"
    n_ex: int = Field(200, ge=1)
    subset_seed: int = Field(0, ge=0)
    split: Literal["val", "test"] = "val"
    batch_size: int = Field(250, ge=1)


class ConfirmSpec(_Strict):
    """The confirmation stage (:mod:`.confirm`): after the search, each of the ``top_k`` best
    configurations is trained again with ``seeds`` new seeds (a count: the first seeds the search did not
    use; or a list) at its full epoch budget (no ASHA; the floor and plateau stoppers as configured), and
    AutoAttack (``attack``) on ``n_ex`` examples of ``split`` ranks them by mean accuracy. The winner of a
    search picked on one seed's validation PGD is otherwise a winner's curse: the paper's differences are
    0.2-1.2 AutoAttack points, within one seed's spread."""

    top_k: int = Field(3, ge=1)
    seeds: Union[int, list[int]] = 5
    split: Literal["val", "test"] = "test"
    attack: Literal["aa-standard", "aa-fast"] = "aa-standard"
    n_ex: int = Field(1000, ge=1)
    subset_seed: int = Field(0, ge=0)
    batch_size: int = Field(250, ge=1)

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: Any) -> Any:
        if isinstance(v, int) and v < 1:
            raise ValueError("give a number of seeds >= 1 (e.g. 5) or a list of seeds")
        if isinstance(v, list) and (not v or len(set(v)) != len(v) or min(v) < 0):
            raise ValueError("give distinct seeds >= 0, e.g. [100, 101, 102]")
        return v

    def seed_list(self, used: set[int]) -> list[int]:
        """The confirmation's seeds: the list given, or the first ``seeds`` integers above those in ``used``."""
        if isinstance(self.seeds, list):
            return list(self.seeds)
        start = max(used, default=-1) + 1
        return list(range(start, start + self.seeds))

    def autoattack(self) -> AutoAttackSpec:
        """The AutoAttack settings of the confirmation runs."""
        return AutoAttackSpec(version=self.attack[len("aa-"):], n_ex=self.n_ex, subset_seed=self.subset_seed,
                              split=self.split, batch_size=self.batch_size)

    def describe(self) -> str:
        return (f"top_k={self.top_k} seeds={self.seeds} {self.attack} on {self.split} (n_ex={self.n_ex}, "
                f"subset_seed={self.subset_seed})")


class WarmStartSpec(_Strict):
    """Start the Optuna study from an earlier search's finished trials (:mod:`.study`): ``from`` is a
    search name (the ``scoretune.search_name`` of its parent run) or an MLflow experiment name;
    ``max_trials`` keeps that many of them (the best first; default all)."""

    from_: str = Field(alias="from", min_length=1)
    max_trials: Optional[int] = Field(None, ge=1)

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ConstraintSpec(_Strict):
    """A feasibility constraint on a reported metric, read at the trial's best epoch: ``min`` and/or
    ``max`` (both included). Set on each Optuna trial (``Trial.set_constraint``): constrained TPE."""

    metric: str
    min: Optional[float] = None
    max: Optional[float] = None

    @model_validator(mode="after")
    def _some_bound(self) -> "ConstraintSpec":
        if self.min is None and self.max is None:
            raise ValueError(f"give min: and/or max: for {self.metric} (e.g. {{metric: {self.metric}, min: 0.8}})")
        for b in (self.min, self.max):
            if b is not None and not math.isfinite(b):
                raise ValueError(f"bounds must be finite (got {b})")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min:g} is above max {self.max:g}")
        return self

    def violation(self, value: float | None) -> float:
        """Optuna's constraint value: <= 0 when ``value`` satisfies the constraint, else how far it is off
        (a missing or non-finite value is infeasible: 1.0)."""
        if value is None or not math.isfinite(value):
            return 1.0
        out = -math.inf
        if self.min is not None:
            out = max(out, self.min - value)
        if self.max is not None:
            out = max(out, value - self.max)
        return float(out)

    def describe(self) -> str:
        parts = ([f">= {self.min:g}"] if self.min is not None else []) + ([f"<= {self.max:g}"] if self.max is not None else [])
        return f"{self.metric} {' and '.join(parts)}"


class StoppersSpec(_Strict):
    floor: Optional[FloorSpec] = None
    plateau: Optional[PlateauSpec] = None


class SearchSpace(_Strict):
    """A whole search: ``base`` experiment + searched ``params`` + how to search and stop."""

    name: Name
    base: dict[str, Any] = Field(default_factory=dict)
    params: dict[str, ParamSpec]
    objective: list[ObjectiveSpec] = Field(default_factory=lambda: [ObjectiveSpec()])
    num_samples: Optional[int] = Field(None, ge=1)
    max_concurrent: int = Field(2, ge=1)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    sampler: SamplerSpec = Field(default_factory=SamplerSpec)
    stoppers: StoppersSpec = Field(default_factory=StoppersSpec)
    points_to_evaluate: list[dict[str, Any]] = Field(default_factory=list)
    seed: int = 0
    storage_path: str = "ray_results"
    keep_checkpoints: int = Field(2, ge=1)
    top_k: int = Field(3, ge=0)
    autoattack: AutoAttackSpec = Field(default_factory=AutoAttackSpec)
    tracking_uri: Optional[str] = None
    experiment: Optional[str] = None
    warm_start: Optional[WarmStartSpec] = None
    constraints: list[ConstraintSpec] = Field(default_factory=list)
    study_storage: Optional[str] = None  # Optuna RDB URL; default: see search.study_storage
    confirm: Optional[ConfirmSpec] = None  # the confirmation stage; none by default

    @field_validator("confirm", mode="before")
    @classmethod
    def _confirm_none(cls, v: Any) -> Any:
        return None if v in (None, False, "none", "None", "null") else v

    @field_validator("params")
    @classmethod
    def _some_params(cls, v: dict) -> dict:
        if not v:
            raise ValueError("give at least one searched parameter, e.g. beta: {loguniform: [1.0, 8.0]}")
        return v

    @field_validator("objective", mode="before")
    @classmethod
    def _objective_list(cls, v: Any) -> Any:
        if isinstance(v, (dict, str)):
            v = [v]
        if isinstance(v, list):
            v = [{"metric": o} if isinstance(o, str) else o for o in v]
            if not v:
                raise ValueError("give at least one objective, e.g. {metric: val_pgd_acc, mode: max}")
        return v

    @model_validator(mode="after")
    def _trials_measure_c_l1(self) -> "SearchSpace":
        f = self.stoppers.floor
        if f is not None and f.refine:
            early_stop = self.base.get("early_stop") or {}
            if not isinstance(early_stop, dict):
                raise ValueError("base.early_stop must be a mapping")
            self.base = {**self.base, "early_stop": {**early_stop, "refine": True}}
        return self

    # -- derived views
    @property
    def targets(self) -> dict[str, str]:
        """Searched name -> dotted experiment key."""
        return {name: ALIASES.get(name, name) for name in self.params}

    @property
    def primary(self) -> ObjectiveSpec:
        return self.objective[0]

    @property
    def multi_objective(self) -> bool:
        return len(self.objective) > 1

    @property
    def experiment_name(self) -> str:
        return self.experiment or self.name

    @property
    def total_samples(self) -> int:
        if self.num_samples is not None:
            return self.num_samples
        if self.sampler.type == "grid":
            return self.grid_size()
        return 8

    def base_config(self) -> ExperimentConfig:
        return ExperimentConfig.model_validate(self.base)

    def experiment_config(self, point: dict[str, Any], *, name: str | None = None) -> ExperimentConfig:
        """The experiment of one sampled point (``{"beta": 3.2, "lr": 0.05}``)."""
        raw = apply_params(self.base, self.targets, point)
        if name is not None:
            raw["name"] = name
        return ExperimentConfig.model_validate(raw)

    def epoch_budget(self, point: dict[str, Any] | None = None) -> int:
        """Epochs a trial of ``point`` runs when nothing stops it early (capped by ASHA's ``max_t``)."""
        epochs = int(apply_params(self.base, self.targets, point or {}).get("epochs", self.base_config().epochs))
        if self.scheduler.type == "asha" and self.scheduler.max_t is not None:
            return min(epochs, self.scheduler.max_t)
        return epochs

    def max_epochs(self) -> int:
        """The largest epoch budget of any point (ASHA's default ``max_t``)."""
        key = "epochs"
        for name, dotted in self.targets.items():
            if dotted == key:
                return int(max(self.params[name].probe_values()))
        return self.base_config().epochs

    def seeds_used(self) -> set[int]:
        """The seeds the search's trials train with: the base's, and every value a ``seed`` param can take."""
        used = {int(self.base.get("seed", 0) or 0)}
        spec = self.params.get("seed")
        if spec is not None:
            if spec.choice:
                used |= {int(v) for v in spec.choice}
            elif spec.int_:
                used |= set(range(int(spec.int_[0]), int(spec.int_[1]) + 1))
        return used

    def grid_size(self) -> int:
        """The number of grid points: the product of the ``choice`` params' lengths."""
        n = 1
        for spec in self.params.values():
            n *= len(spec.choice or [])
        return n

    def summary(self) -> dict[str, str]:
        """Search settings as flat strings (the parent MLflow run's params)."""
        out = {
            "search.name": self.name,
            "search.objective": ", ".join(str(o) for o in self.objective),
            "search.num_samples": str(self.total_samples),
            "search.max_concurrent": str(self.max_concurrent),
            "search.sampler": self.sampler.type,
            "search.scheduler": self.scheduler.type if self.scheduler.type == "none" else (
                f"asha(grace_period={self.scheduler.grace_period}, reduction_factor={self.scheduler.reduction_factor:g}, "
                f"max_t={self.scheduler.max_t or self.max_epochs()})"),
            "search.resources": f"workers={self.resources.workers} cpus={self.resources.cpus:g} gpus={self.resources.gpus:g}",
            "search.seed": str(self.seed),
            "search.top_k": str(self.top_k),
        }
        for name, spec in self.params.items():
            out[f"space.{name}"] = spec.describe()
        if self.stoppers.floor is not None:
            f = self.stoppers.floor
            out["search.stopper.floor"] = (f"value={f.value:g}" if f.value is not None else "estimate=auto") + \
                f" patience={f.patience} metric={f.metric}" + (" refine=best" if f.refine else "")
        if self.confirm is not None:
            out["search.confirm"] = self.confirm.describe()
        if self.warm_start is not None:
            out["search.warm_start"] = self.warm_start.from_ + (
                f" (max_trials={self.warm_start.max_trials})" if self.warm_start.max_trials else "")
        if self.constraints:
            out["search.constraints"] = "; ".join(c.describe() for c in self.constraints)
        if self.stoppers.plateau is not None:
            p = self.stoppers.plateau
            out["search.stopper.plateau"] = f"{p.metric}:{p.mode} patience={p.patience} min_delta={p.min_delta:g}"
        return out


# ----------------------------------------------------------------------------- loading


def _resolve_base(raw: dict[str, Any], path: Path | None) -> dict[str, Any]:
    base = raw.get("base", {})
    if base is None:
        return {}
    if isinstance(base, (str, os.PathLike)):
        p = Path(base).expanduser()
        if not p.is_absolute() and path is not None and not p.exists():
            p = path.parent / p
        try:
            return read_yaml(p)
        except ConfigError as e:
            raise ConfigError(f"base: {e}") from None
    if not isinstance(base, dict):
        raise ConfigError(f"base: expected an experiment mapping or the path of an experiment YAML, "
                          f"got {type(base).__name__}")
    return base


def build_space(raw: dict[str, Any], overrides: list[str] | None = None, *, source: str = "search space",
                path: Path | None = None) -> SearchSpace:
    """Validate a raw space mapping (plus ``key=value`` overrides such as ``num_samples=4`` or
    ``base.epochs=2``) into a :class:`SearchSpace`; raises a one-line :class:`ConfigError`."""
    raw = dict(raw)
    extra = parse_overrides(overrides)
    if isinstance(extra.get("base"), str):  # ``--set base=configs/other.yaml`` swaps the whole base
        raw["base"] = extra.pop("base")
        path = None
    try:
        raw["base"] = _resolve_base(raw, path)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    extra_params = extra.get("params")
    for name, spec in (extra_params.items() if isinstance(extra_params, dict) else ()):
        # ``--set params.lr.choice=[0.1]`` replaces the distribution the file gave (not merged with it)
        if isinstance(spec, dict) and any(k in DISTRIBUTIONS for k in spec) and isinstance(raw.get("params"), dict):
            raw["params"] = {**raw["params"], name: {}}
    merged = deep_merge(raw, extra)
    try:
        space = SearchSpace.model_validate(merged)
    except ValidationError as e:
        raise ConfigError(f"{source}: {_format_space_error(e)}") from None
    return validate_space(space, source)


def _format_space_error(err: ValidationError) -> str:
    text = format_validation_error(err)
    return text.replace("(check the spelling; see `scoretune train --help`)",
                        "(check the spelling; see search_spaces/quickstart.yaml for the keys)").replace(".int_", ".int")


def load_space(path: str | os.PathLike, overrides: list[str] | None = None) -> SearchSpace:
    """Read and validate ``SPACE.yaml`` (a ``base:`` path is relative to the working directory or,
    failing that, to the YAML's folder)."""
    p = Path(path)
    raw = read_yaml(p)
    return build_space(raw, overrides, source=str(p), path=p)


# ----------------------------------------------------------------------------- the rules pydantic cannot express (base x params)
_MAX_JOINT_CHECKS = 512  # joint validation of every combination of probe values up to this many, else pairs
_MAX_PAIR_CHECKS = 5_000  # pairs of probe values validated at most (under 1 s), the smallest pairs first


def _field_annotation(dotted: str) -> tuple[bool, Any]:
    """(known, annotation) of a dotted experiment key; keys under a dict field (``data.options.x``)
    are known with annotation ``Any``."""
    model: Any = ExperimentConfig
    parts = dotted.split(".")
    for i, p in enumerate(parts):
        fields = getattr(model, "model_fields", None)
        if fields is None or p not in fields:
            return False, None
        ann = fields[p].annotation
        inner = _strip_optional(ann)
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            if i == len(parts) - 1:
                return True, inner  # a whole section
            model = inner
            continue
        if typing.get_origin(inner) is dict or inner is dict:
            return True, Any
        return (i == len(parts) - 1), ann
    return False, None


def _strip_optional(ann: Any) -> Any:
    if typing.get_origin(ann) is Union:
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return ann


def allowed_values(dotted: str) -> tuple[Any, ...] | None:
    """The fixed set of values of a Literal-typed key (``objective.loss`` -> the eight losses), else None."""
    known, ann = _field_annotation(dotted)
    inner = _strip_optional(ann) if known else None
    if inner is not None and typing.get_origin(inner) is Literal:
        return typing.get_args(inner)
    return None


def _is_int_field(dotted: str) -> bool:
    known, ann = _field_annotation(dotted)
    return known and _strip_optional(ann) is int


def _where(source: str) -> str:
    return f"{source}: " if source else ""


def _check_value(space: Any, name: str, kind: str, value: Any, source: str) -> None:
    """One sampled value on top of ``base`` must make a valid experiment; raise a one-line ConfigError."""
    dotted = space.targets[name]
    allowed = allowed_values(dotted)
    if allowed is not None and value not in allowed:
        what = dotted.split(".")[-1]
        raise ConfigError(
            f"{_where(source)}params.{name}.{kind}: unknown {what} {value!r} for {dotted}; "
            f"choose from: {', '.join(str(a) for a in allowed)}"
        )
    try:
        ExperimentConfig.model_validate(apply_params(space.base, space.targets, {name: value}))
    except ValidationError as e:
        raise ConfigError(
            f"{_where(source)}params.{name}.{kind}: value {value!r} makes an invalid experiment: "
            f"{format_validation_error(e)}"
        ) from None


def validate_space(space: Any, source: str = "") -> Any:
    """Check what pydantic cannot: the base experiment, every param key and every value the search can
    sample, objective and stopper metrics, points_to_evaluate. Raises :class:`ConfigError` (one line)."""
    try:
        base = ExperimentConfig.model_validate(space.base)
    except ValidationError as e:
        raise ConfigError(f"{_where(source)}base: {format_validation_error(e)}") from None
    alias_list = ", ".join(sorted(ALIASES))
    for name, spec in space.params.items():
        dotted = space.targets[name]
        known, ann = _field_annotation(dotted)
        if not known:
            raise ConfigError(
                f"{_where(source)}params.{name}: unknown parameter; use a dotted experiment key "
                f"(e.g. objective.beta, optim.lr) or an alias: {alias_list}"
            )
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            raise ConfigError(f"{_where(source)}params.{name}: '{dotted}' is a section; search one of its keys "
                              f"(e.g. {dotted}.{next(iter(ann.model_fields))})")
        if spec.kind in ("uniform", "loguniform") and _is_int_field(dotted):
            lo, hi = spec.bounds
            raise ConfigError(f"{_where(source)}params.{name}.{spec.kind}: {dotted} takes integers; "
                              f"use int: [{int(lo)}, {int(hi)}]")
        for value in spec.probe_values():
            _check_value(space, name, spec.kind, value, source)
    _check_joint(space, source)
    metrics = set(ENGINE_METRICS)
    if base.data.val_size == 0:
        metrics -= {"val_clean_acc", "val_pgd_acc", "val_r_madry"}
    if not base.eval.test:
        metrics -= {"test_clean_acc", "test_pgd_acc", "test_r_madry"}
    if base.eval.pgd_steps == 0:
        metrics -= {"val_pgd_acc", "test_pgd_acc", "train_r_madry", "val_r_madry", "test_r_madry", "probe_time"}
    if base.early_stop.probe_fraction == 0:
        metrics -= {"train_r_madry", "probe_time"}
    known_metrics = ", ".join(m for m in ENGINE_METRICS if m in metrics)
    for i, obj in enumerate(space.objective):
        if obj.metric not in metrics:
            raise ConfigError(f"{_where(source)}objective.{i}.metric: '{obj.metric}' is not reported by the trials "
                              f"of this base experiment; choose one of: {known_metrics}")
    if len({o.metric for o in space.objective}) != len(space.objective):
        raise ConfigError(f"{_where(source)}objective: each metric may appear once")
    stoppers = [("stoppers.floor.metric", space.stoppers.floor), ("stoppers.plateau.metric", space.stoppers.plateau)]
    for key, st in stoppers:
        if st is not None and st.metric not in metrics:
            raise ConfigError(f"{_where(source)}{key}: '{st.metric}' is not reported by the trials; "
                              f"choose one of: {known_metrics}")
    for i, c in enumerate(space.constraints):
        if c.metric not in metrics:
            raise ConfigError(f"{_where(source)}constraints.{i}.metric: '{c.metric}' is not reported by the trials "
                              f"of this base experiment; choose one of: {known_metrics}")
    if space.constraints and space.sampler.type == "grid":
        raise ConfigError(f"{_where(source)}constraints: the grid sampler cannot use constraints; "
                          "use sampler.type: tpe (or random)")
    if space.sampler.type == "grid":
        ranged = [n for n, s in space.params.items() if s.kind != "choice"]
        if ranged:
            raise ConfigError(f"{_where(source)}sampler.type: grid needs choice params only; "
                              f"params.{ranged[0]} is a {space.params[ranged[0]].kind} range")
    sch = space.scheduler
    if sch.type == "asha" and sch.grace_period > (sch.max_t or space.max_epochs()):
        raise ConfigError(f"{_where(source)}scheduler.grace_period: {sch.grace_period} epochs is more than "
                          f"max_t={sch.max_t or space.max_epochs()}; lower it (ASHA needs grace_period <= max_t)")
    if space.sampler.type == "grid" and space.num_samples is not None and space.num_samples > space.grid_size():
        raise ConfigError(f"{_where(source)}num_samples: {space.num_samples} is more than the {space.grid_size()} "
                          "grid points; lower it or leave it out")
    for i, point in enumerate(space.points_to_evaluate):
        for name, value in point.items():
            if name not in space.params:
                raise ConfigError(f"{_where(source)}points_to_evaluate.{i}.{name}: not a searched param; "
                                  f"choose from: {', '.join(space.params)}")
            if not space.params[name].contains(value):
                raise ConfigError(f"{_where(source)}points_to_evaluate.{i}.{name}: {value!r} is outside "
                                  f"{space.params[name].describe()}")
        missing = [n for n in space.params if n not in point]
        if missing:
            raise ConfigError(f"{_where(source)}points_to_evaluate.{i}: give a value for every searched param "
                              f"(missing: {', '.join(missing)})")
    split = batch_split_problem(base.batch_size, space.resources.workers)
    if split:
        raise ConfigError(f"{_where(source)}resources.workers: {split}")
    for name, dotted in space.targets.items():  # a searched batch size is split over the trial's workers too
        # (an int range: a value that does not split is among its first `workers` values)
        spec = space.params[name]
        if dotted == "batch_size" and spec.kind in ("choice", "int") and space.resources.workers > 1:
            values = spec.choice if spec.kind == "choice" else range(int(spec.bounds[0]), int(spec.bounds[1]) + 1)
            bad = next((v for v in values if isinstance(v, int) and batch_split_problem(v, space.resources.workers)),
                       None)
            if bad is not None:
                raise ConfigError(f"{_where(source)}params.{name}.{spec.kind}: value {bad!r}: "
                                  f"{batch_split_problem(bad, space.resources.workers)} (resources.workers)")
    floor = space.stoppers.floor
    clip_auto = (space.base.get("objective") or {}).get("clip") == "auto"
    if (floor is not None and floor.estimate) or clip_auto:
        key = "stoppers.floor.estimate" if floor is not None and floor.estimate else "base.objective.clip"
        searched = [n for n, t in space.targets.items() if t in ("attack.eps", "attack.norm", "data.name")]
        if searched:
            raise ConfigError(f"{_where(source)}{key}: the floor depends on {space.targets[searched[0]]}, which "
                              f"params.{searched[0]} searches; fix it in base, or give stoppers.floor.value")
        if base.attack.eps == 0:
            raise ConfigError(f"{_where(source)}{key}: base attack.eps is 0, so C^l1 = 0 and the floor can never "
                              "act; set attack.eps > 0 or drop the floor")
    if clip_auto and any(t == "objective.clip_mode" for t in space.targets.values()):
        raise ConfigError(f"{_where(source)}base.objective.clip: 'auto' sets clip_mode 'smoothing'; do not search "
                          "objective.clip_mode with it")
    return space


def _joint_points(space: Any) -> Iterator[dict[str, Any]]:
    """The points :func:`_check_joint` validates: every combination of probe values, or, when there are
    more than ``_MAX_JOINT_CHECKS``, every combination of each pair of params' probe values (a rule
    between two fields, such as eps against the norm's diameter, is still checked at every pair), the
    pairs with the fewest combinations first, up to ``_MAX_PAIR_CHECKS`` points."""
    names = list(space.params)
    probes = {n: space.params[n].probe_values() for n in names}
    if math.prod(len(p) for p in probes.values()) <= _MAX_JOINT_CHECKS:
        for combo in itertools.product(*probes.values()):
            yield dict(zip(names, combo))
        return
    by_size = sorted(itertools.combinations(names, 2), key=lambda ab: len(probes[ab[0]]) * len(probes[ab[1]]))
    pairs = (({a: va, b: vb} for va, vb in itertools.product(probes[a], probes[b])) for a, b in by_size)
    yield from itertools.islice(itertools.chain.from_iterable(pairs), _MAX_PAIR_CHECKS)


def _check_joint(space: Any, source: str) -> None:
    """Probe values (choices, range ends) of several params together (:func:`_joint_points`): catches
    cross-field rules such as clip_mode 'value' with method 'pgdat', or eps 9 with norm l2 on digits."""
    if len(space.params) < 2:
        return
    for point in _joint_points(space):
        try:
            ExperimentConfig.model_validate(apply_params(space.base, space.targets, point))
        except ValidationError as e:
            shown = ", ".join(f"{k}={v!r}" for k, v in point.items())
            raise ConfigError(
                f"{_where(source)}params: the combination {shown} makes an invalid experiment: "
                f"{format_validation_error(e)} (narrow the choices or ranges)"
            ) from None
