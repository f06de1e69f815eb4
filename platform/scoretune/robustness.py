"""Robustness on tensors: clean accuracy, PGD-k and AutoAttack (no MLflow, Ray or Optuna import).

Robust-accuracy *claims* count only under AutoAttack (Croce & Hein, ICML 2020), here the PyPI
package ``pyautoattack`` 0.2.0; PGD-k (Madry et al. 2018) is the cheap training-time monitor.

AutoAttack versions
-------------------
``standard``  APGD-CE, APGD-T (9 targets), FAB-T (9 targets), Square (5000 queries): the
              RobustBench protocol.
``fast``      ``version='custom'`` with attacks ``['apgd-ce', 'apgd-t']`` *and the standard
              version's settings for them* (APGD-CE with 1 restart, not the custom default 5). It is
              therefore exactly the first two stages of ``standard`` (same seed, same batches), so
              ``aa_fast_acc >= aa_standard_acc`` always holds.

How pyautoattack is driven (and why not its ``state_path``)
-----------------------------------------------------------
pyautoattack 0.2.0's own resume is broken: ``EvaluationState`` writes ``attacks_to_run`` as the
``str`` of a set, so reloading always raises "The state was created with a different set of
attacks"; a restored run would then hit an unbound ``y_adv``; and finished attacks are saved at
most once a minute. :func:`autoattack_accuracy` therefore runs the attacks itself, one attack and
one batch at a time, through the package's ``run_standard_evaluation`` (``attacks_to_run = [a]``,
the version's parameters), and keeps its own JSON state (clean flags, robust flags, finished
attacks, the batch reached in the current attack), written atomically after every batch. An
interrupted evaluation resumes at the batch it stopped in and gives the same numbers as an
uninterrupted one.

AutoAttack's checks are captured as :class:`AACheck` records (:mod:`scoretune.autoattack_checks`).
One check is added here: ``perturbation_bound`` (a misclassified example outside the eps-ball or
the [0, 1] box is not counted as a success; AutoAttack itself only prints the largest perturbation).

Loading models (checkpoints, exports, MLflow references) is :mod:`scoretune.tracking.model_refs`;
the one-call benchmark (resolve, load data, attack, log) is :func:`scoretune.evaluate.benchmark`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from .attacks import AttackConfig, eval_mode, pgd_ce
from .autoattack_checks import AACheck, _capture_checks, _CheckLog
from .errors import UserError
from .thread_governor import Governed, ThreadGovernor

ATTACKS = ("aa-standard", "aa-fast", "pgd-20", "pgd-50", "clean")
AA_VERSIONS: dict[str, tuple[str, ...]] = {
    "standard": ("apgd-ce", "apgd-t", "fab-t", "square"),
    "fast": ("apgd-ce", "apgd-t"),
}
PGD_STEPS = {"pgd-20": 20, "pgd-50": 50}
_AA_NORMS = {"linf": "Linf", "l2": "L2"}
_STATE_FORMAT = "scoretune-aa-state-v1"
_PERTURBATION_TOL = 1e-5  # float32 slack on the eps-ball and the [0, 1] box

Progress = Callable[[str, int, int], None]  # (phase, batches done, batches in phase)
Log = Callable[[str], None]


# ----------------------------------------------------------------------------- results



@dataclass
class AAResult:
    """AutoAttack on ``n`` points.

    ``per_attack[a]``: robust accuracy after attack ``a`` (cumulative, in run order);
    ``removed[a]``: how many points attack ``a`` turned from robust into fooled.
    ``robust``: per-point flags (bool, CPU). ``resumed``: part of the work came from a state file.
    """

    version: str
    attacks: tuple[str, ...]
    eps: float
    norm: str
    n: int
    clean_acc: float
    robust_acc: float
    per_attack: dict[str, float]
    removed: dict[str, int]
    checks: list[AACheck]
    max_perturbation: float
    seconds: float
    resumed: bool
    robust: torch.Tensor

    @property
    def warnings(self) -> list[str]:
        return [c.message for c in self.checks]


@dataclass
class EvalResult:
    """What :func:`evaluate` measured. ``robust_acc`` is None for ``attack='clean'``."""

    attack: str
    eps: float
    norm: str
    n: int
    clean_acc: float
    robust_acc: float | None
    per_attack: dict[str, float] = field(default_factory=dict)
    removed: dict[str, int] = field(default_factory=dict)
    checks: list[AACheck] = field(default_factory=list)
    seconds: float = 0.0
    resumed: bool = False
    # filled by scoretune.evaluate.benchmark: what was evaluated and where the numbers went
    settings: dict[str, Any] = field(default_factory=dict)
    source_run_id: str | None = None
    logged: dict[str, str] | None = None
    state_path: str | None = None
    split_size: int | None = None  # the split's size when n_ex took a sample of it

    @property
    def metric_name(self) -> str | None:
        """The MLflow metric of the robust accuracy (``aa_standard_acc``, ``pgd20_acc``, ...)."""
        return attack_metric(self.attack)

    def metrics(self) -> dict[str, float]:
        """MLflow metrics: ``clean_acc``, the attack's metric and ``aa_<attack>_acc`` per AutoAttack stage."""
        out = {"clean_acc": self.clean_acc}
        if self.robust_acc is not None and self.metric_name:
            out[self.metric_name] = self.robust_acc
        for a, acc in self.per_attack.items():
            out[per_attack_metric(a)] = acc
        return out

    def check_tags(self) -> dict[str, str]:
        """``aa_check.<name>`` -> message (with the report count) for every AutoAttack check that fired."""
        return {f"aa_check.{c.name}": c.message + (f" (reported {c.count}x)" if c.count > 1 else "")
                for c in self.checks}


def attack_metric(attack: str) -> str | None:
    """``aa-standard`` -> ``aa_standard_acc``, ``pgd-20`` -> ``pgd20_acc``, ``clean`` -> None."""
    if attack == "clean":
        return None
    if attack.startswith("pgd-"):
        return f"pgd{attack[4:]}_acc"
    return attack.replace("-", "_") + "_acc"


def per_attack_metric(name: str) -> str:
    """``apgd-ce`` -> ``aa_apgd_ce_acc``."""
    return "aa_" + name.replace("-", "_") + "_acc"


# ----------------------------------------------------------------------------- helpers


def _model_device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def _resolve_device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    have = _model_device(model)
    if device is None:
        return have
    want = torch.device(device)
    if want.type != have.type or (want.index is not None and have.index is not None and want.index != have.index):
        raise ValueError(f"the model is on {have} but device={want}; move it first with model.to('{want}')")
    return want


def _batches(n: int, batch_size: int) -> list[slice]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def _frac(flags: torch.Tensor) -> float:
    """Fraction of True flags, as an exact count / n (so equal counts give equal floats)."""
    return int(flags.sum()) / int(flags.numel())


def _check_xy(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} rows but y has {y.shape[0]}; they must match")
    if x.shape[0] == 0:
        raise ValueError("nothing to evaluate: x is empty")


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, *, batch_size: int = 256,
            device: torch.device | str | None = None) -> torch.Tensor:
    """Predicted labels (CPU int64) of ``model`` in eval mode."""
    dev = _resolve_device(model, device)
    out = []
    with eval_mode(model):
        for s in _batches(x.shape[0], batch_size):
            out.append(model(x[s].to(dev)).argmax(-1).cpu())
    return torch.cat(out)


def clean_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256,
                   device: torch.device | str | None = None) -> float:
    """Fraction of ``x`` that ``model`` (eval mode) classifies as ``y``."""
    _check_xy(x, y)
    return _frac(predict(model, x, batch_size=batch_size, device=device) == y.cpu())


def model_fingerprint(model: nn.Module) -> str:
    """A hash of every parameter and buffer (names, dtypes, shapes, values): identifies the weights."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(model.state_dict().items()):
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def data_digest(x: torch.Tensor, y: torch.Tensor) -> str:
    """A hash of the evaluation inputs and labels."""
    h = hashlib.blake2b(digest_size=16)
    for t in (x, y):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- PGD


def pgd_accuracy(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    norm: str = "linf",
    steps: int = 20,
    restarts: int = 1,
    *,
    step_size: float | None = None,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    seed: int = 0,
    pixel_range: tuple[float, float] | None = (0.0, 1.0),
    progress: Progress | None = None,
) -> float:
    """Robust accuracy under PGD-``steps`` on cross-entropy with ``restarts`` random restarts.

    Uses :func:`scoretune.attacks.pgd_ce` (step 2.5 eps / steps unless ``step_size``). A point
    counts as robust only if it is classified correctly both clean and at the attack's output, so
    the result never exceeds the clean accuracy. Seeded: the same call gives the same number.
    """
    return _frac(_pgd_flags(model, x, y, eps, norm, steps, restarts, step_size=step_size,
                            batch_size=batch_size, device=device, seed=seed, pixel_range=pixel_range,
                            progress=progress)[1])


def _pgd_flags(model, x, y, eps, norm, steps, restarts, *, step_size, batch_size, device, seed,
               pixel_range, progress) -> tuple[torch.Tensor, torch.Tensor]:
    """(clean-correct flags, robust flags), both CPU bool."""
    _check_xy(x, y)
    dev = _resolve_device(model, device)
    cfg = AttackConfig(eps=eps, norm=norm, steps=steps, step_size=step_size, pixel_range=pixel_range)
    gen = torch.Generator(device=dev)
    gen.manual_seed(seed)
    clean = torch.zeros(x.shape[0], dtype=torch.bool)
    robust = torch.zeros(x.shape[0], dtype=torch.bool)
    batches = _batches(x.shape[0], batch_size)
    with eval_mode(model):
        for i, s in enumerate(batches):
            xb, yb = x[s].to(dev), y[s].to(dev)
            with torch.no_grad():
                ok = model(xb).argmax(-1) == yb
            clean[s] = ok.cpu()
            if bool(ok.any()):
                x_adv = pgd_ce(model, xb[ok], yb[ok], cfg, restarts=restarts, generator=gen)
                with torch.no_grad():
                    still = model(x_adv).argmax(-1) == yb[ok]
                idx = torch.arange(s.start, s.stop)[ok.cpu()]
                robust[idx] = still.cpu()
            if progress:
                progress(f"pgd-{steps}", i + 1, len(batches))
    return clean, robust


# ----------------------------------------------------------------------------- AutoAttack: state


def _flags_str(t: torch.Tensor) -> str:
    return "".join("1" if b else "0" for b in t.tolist())


def _flags(s: str) -> torch.Tensor:
    return torch.tensor([c == "1" for c in s], dtype=torch.bool)


def _read_state(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text())
        if not isinstance(state, dict) or not isinstance(state.get("key"), dict) \
                or state["key"].get("format") != _STATE_FORMAT:
            raise ValueError("not a scoretune AutoAttack state")
    except (OSError, ValueError) as e:
        raise UserError(f"AutoAttack state file {path} is unreadable ({e}); "
                        "delete it to restart the evaluation") from None
    diff = sorted(k for k in set(key) | set(state["key"]) if key.get(k) != state["key"].get(k))
    if diff:
        raise UserError(
            f"AutoAttack state file {path} belongs to a different evaluation (differs in: {', '.join(diff)}); "
            "delete it or use another state path (--state-dir)"
        )
    return state


def _write_state(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- AutoAttack


def _adversary(model: nn.Module, eps: float, norm: str, version: str, seed: int, device: torch.device,
               n_classes: int):
    """A pyautoattack ``AutoAttack`` with ``version``'s attack parameters (``fast``: standard's)."""
    from pyautoattack import AutoAttack

    if version == "standard":
        adv = AutoAttack(model, eps=eps, norm=_AA_NORMS[norm], version="standard", device=device, seed=seed)
    else:
        adv = AutoAttack(model, eps=eps, norm=_AA_NORMS[norm], version="custom",
                         attacks=list(AA_VERSIONS[version]), device=device, seed=seed)
        adv.apgd.n_restarts = 1  # the standard version's APGD-CE (custom's default is 5 restarts)
        adv.apgd_targeted.n_restarts = 1
    targets = max(1, min(9, n_classes - 1))
    adv.apgd_targeted.n_target_classes = targets
    adv.fab.n_target_classes = targets
    adv.verbose = False
    return adv


def _perturbation(x_adv: torch.Tensor, x: torch.Tensor, norm: str) -> torch.Tensor:
    d = (x_adv - x).flatten(1)
    return d.abs().amax(1) if norm == "linf" else d.norm(dim=1)


def autoattack_accuracy(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    norm: str = "linf",
    version: str = "standard",
    *,
    batch_size: int = 250,
    device: torch.device | str | None = None,
    seed: int = 0,
    state_path: str | os.PathLike | None = None,
    log: Log | None = None,
    progress: Progress | None = None,
) -> AAResult:
    """AutoAttack robust accuracy of ``model`` (eval mode) on ``x`` in [0, 1], ``y``.

    ``version``: ``standard`` or ``fast`` (see the module docstring). ``seed`` seeds every attack
    (pyautoattack reseeds torch's global RNG per attack). ``state_path``: a JSON file written after
    every batch; an existing one for the same evaluation (model weights, data, eps, norm, version,
    seed, batch size) is resumed, one for another evaluation raises :class:`UserError`.
    ``log`` receives one line per finished attack and per check that fires; ``progress`` gets
    ``(attack, batches done, batches)`` after every batch.
    """
    if version not in AA_VERSIONS:
        raise ValueError(f"unknown AutoAttack version '{version}'; choose one of: {', '.join(AA_VERSIONS)}")
    if norm not in _AA_NORMS:
        raise ValueError(f"AutoAttack norm must be one of {', '.join(_AA_NORMS)}, got '{norm}'")
    _check_xy(x, y)
    if float(x.min()) < 0.0 or float(x.max()) > 1.0:
        raise UserError(
            "AutoAttack assumes inputs in [0, 1] (it clamps to that box); these range over "
            f"[{float(x.min()):.3g}, {float(x.max()):.3g}]: use a PGD attack (pgd-20) for unbounded inputs"
        )
    dev = _resolve_device(model, device)
    x, y = x.detach().cpu().float(), y.detach().cpu().long()
    path = Path(state_path) if state_path is not None else None
    attacks = AA_VERSIONS[version]
    key = {"format": _STATE_FORMAT, "version": version, "attacks": list(attacks), "eps": float(eps),
           "norm": norm, "seed": int(seed), "batch_size": int(batch_size), "n": int(x.shape[0]),
           "data": data_digest(x, y), "model": model_fingerprint(model)}
    state = _read_state(path, key) if path is not None else None
    resumed = state is not None
    if state is None:
        state = {"key": key, "clean": None, "robust": None, "done": [], "current": None, "checks": [],
                 "max_perturbation": 0.0, "seconds": 0.0}
    sink = _CheckLog(log, state["checks"])
    clock = [time.perf_counter()]

    def save() -> None:
        now = time.perf_counter()
        state["seconds"] += now - clock[0]
        if state["current"] is not None:
            state["current"]["seconds"] += now - clock[0]
        clock[0] = now
        state["checks"] = sink.to_json()
        if path is not None:
            _write_state(path, state)

    governor = ThreadGovernor(torch.get_num_threads(), dev)  # its long loops: threads sized to the free CPUs
    with eval_mode(model), _capture_checks(sink), governor:
        if state["clean"] is None:
            state["clean"] = state["robust"] = _flags_str(predict(model, x, batch_size=batch_size, device=dev) == y)
            save()
        robust = _flags(state["robust"])
        with torch.no_grad():
            n_classes = int(model(x[:1].to(dev)).shape[-1])
        adversary = _adversary(Governed(model, governor), eps, norm, version, seed, dev, n_classes)
        done = {d["attack"] for d in state["done"]}
        for attack in attacks:
            if attack in done:
                continue
            cur = state["current"]
            if cur is None or cur["attack"] != attack:
                cur = state["current"] = {"attack": attack, "todo": torch.nonzero(robust).flatten().tolist(),
                                          "next": 0, "start_robust": int(robust.sum()), "seconds": 0.0}
            todo = torch.tensor(cur["todo"], dtype=torch.long)
            batches = _batches(len(todo), batch_size) if len(todo) else []
            for b in range(cur["next"], len(batches)):
                idx = todo[batches[b]]
                fooled = _attack_batch(adversary, model, attack, x[idx], y[idx], eps, norm, dev, sink, state)
                robust[idx[fooled]] = False
                state["robust"] = _flags_str(robust)
                cur["next"] = b + 1
                save()
                if progress:
                    progress(attack, b + 1, len(batches))
            save()
            n_rob = int(robust.sum())
            state["done"].append({"attack": attack, "robust_acc": n_rob / x.shape[0],
                                  "removed": cur["start_robust"] - n_rob, "seconds": cur["seconds"]})
            state["current"] = None
            save()
            if log:
                log(f"robust accuracy after {attack}: {n_rob / x.shape[0]:.2%} "
                    f"(removed {cur['start_robust'] - n_rob}, {cur['seconds']:.1f} s)")
        per_attack = {d["attack"]: d["robust_acc"] for d in state["done"]}
        clean_acc = _frac(_flags(state["clean"]))
        from pyautoattack import checks

        checks.check_square_sr({"clean": clean_acc, **per_attack}, logger=logging.getLogger("auto-attack"))
    save()
    return AAResult(
        version=version, attacks=tuple(attacks), eps=float(eps), norm=norm, n=int(x.shape[0]),
        clean_acc=clean_acc, robust_acc=_frac(robust), per_attack=per_attack,
        removed={d["attack"]: int(d["removed"]) for d in state["done"]}, checks=sink.as_list(),
        max_perturbation=float(state["max_perturbation"]), seconds=float(state["seconds"]),
        resumed=resumed, robust=robust,
    )


def _attack_batch(adversary, model, attack, xb, yb, eps, norm, dev, sink, state) -> torch.Tensor:
    """Run one AutoAttack stage on one batch of still-robust points; returns 'fooled' flags (CPU).

    A point counts as fooled only if the model misclassifies the returned example *and* it lies
    in the eps-ball and the [0, 1] box (else a ``perturbation_bound`` check is recorded).
    """
    adversary.attacks_to_run = [attack]
    xb, yb = xb.to(dev), yb.to(dev)
    x_adv, _ = adversary.run_standard_evaluation(xb, yb, batch_size=xb.shape[0])
    x_adv = x_adv.to(dev)
    with torch.no_grad():
        wrong = model(x_adv).argmax(-1) != yb
    dist = _perturbation(x_adv, xb, norm)
    inside = (dist <= eps + _PERTURBATION_TOL) & (x_adv.flatten(1).amin(1) >= -_PERTURBATION_TOL) \
        & (x_adv.flatten(1).amax(1) <= 1 + _PERTURBATION_TOL)
    if bool((wrong & ~inside).any()):
        sink.add(f"{attack} returned {int((wrong & ~inside).sum())} misclassified point(s) outside the "
                 f"{norm} eps-ball / [0, 1] box (max distance {float(dist.max()):.5f}); not counted",
                 "perturbation_bound")
    fooled = wrong & inside
    if bool(fooled.any()):
        state["max_perturbation"] = max(state["max_perturbation"], float(dist[fooled].max()))
    return fooled.cpu()


# ----------------------------------------------------------------------------- one entry point


def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    attack: str = "aa-standard",
    eps: float,
    norm: str = "linf",
    batch_size: int = 250,
    device: torch.device | str | None = None,
    seed: int = 0,
    restarts: int = 1,
    pixel_range: tuple[float, float] | None = (0.0, 1.0),
    state_path: str | os.PathLike | None = None,
    log: Log | None = None,
    progress: Progress | None = None,
) -> EvalResult:
    """RobustBench-like one-call evaluation of ``model`` on ``x`` (natural scale, [0, 1] images), ``y``.

    ``attack``: ``aa-standard`` | ``aa-fast`` (AutoAttack, :func:`autoattack_accuracy`),
    ``pgd-20`` | ``pgd-50`` (:func:`pgd_accuracy` with ``restarts``) or ``clean``.
    """
    if attack not in ATTACKS:
        raise ValueError(f"unknown attack '{attack}'; choose one of: {', '.join(ATTACKS)}")
    t0 = time.perf_counter()
    if attack.startswith("aa-"):
        r = autoattack_accuracy(model, x, y, eps, norm, attack[3:], batch_size=batch_size, device=device,
                                seed=seed, state_path=state_path, log=log, progress=progress)
        return EvalResult(attack=attack, eps=r.eps, norm=norm, n=r.n, clean_acc=r.clean_acc,
                          robust_acc=r.robust_acc, per_attack=r.per_attack, removed=r.removed,
                          checks=r.checks, seconds=r.seconds, resumed=r.resumed)
    if attack == "clean":
        acc = clean_accuracy(model, x, y, batch_size=batch_size, device=device)
        return EvalResult(attack=attack, eps=float(eps), norm=norm, n=int(x.shape[0]), clean_acc=acc,
                          robust_acc=None, seconds=time.perf_counter() - t0)
    clean, robust = _pgd_flags(model, x, y, eps, norm, PGD_STEPS[attack], restarts, step_size=None,
                               batch_size=batch_size, device=device, seed=seed, pixel_range=pixel_range,
                               progress=progress)
    return EvalResult(attack=attack, eps=float(eps), norm=norm, n=int(x.shape[0]),
                      clean_acc=_frac(clean), robust_acc=_frac(robust),
                      seconds=time.perf_counter() - t0)
