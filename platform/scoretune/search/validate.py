"""The rules of a search space that pydantic cannot express, checked before anything runs: the base
experiment, every param key and every value the search can sample (choice values one by one and in
combination, range end points), objective and stopper metrics, points_to_evaluate, grid, ASHA and
worker settings. Every error is one :class:`~scoretune.config.ConfigError` line naming the key and,
where there is a fixed set, the allowed values.

No Ray, no MLflow. :func:`scoretune.search.space.build_space` calls :func:`validate_space`; this module
does not import :mod:`.space` (the ``space`` arguments are :class:`~scoretune.search.space.SearchSpace`).
"""

from __future__ import annotations

import itertools
import math
import typing
from typing import Any, Literal, Union

from pydantic import BaseModel, ValidationError

from ..config import ALIASES, ConfigError, ExperimentConfig, apply_params, batch_split_problem, format_validation_error
from ..engine import ENGINE_METRICS

_MAX_JOINT_CHECKS = 512  # joint validation of every combination of probe values up to this many


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


def _check_joint(space: Any, source: str) -> None:
    """Every combination of probe values (choices, range ends) together, when there are few enough:
    catches cross-field rules such as clip_mode 'value' with method 'pgdat'."""
    names = list(space.params)
    probes = [space.params[n].probe_values() for n in names]
    if len(names) < 2 or math.prod(len(p) for p in probes) > _MAX_JOINT_CHECKS:
        return
    for combo in itertools.product(*probes):
        point = dict(zip(names, combo))
        try:
            ExperimentConfig.model_validate(apply_params(space.base, space.targets, point))
        except ValidationError as e:
            shown = ", ".join(f"{k}={v!r}" for k, v in point.items())
            raise ConfigError(
                f"{_where(source)}params: the combination {shown} makes an invalid experiment: "
                f"{format_validation_error(e)} (narrow the choices or ranges)"
            ) from None
