"""Shared pieces of the benchmark scripts: fixed data, seeded models, the textbook reference
training step, interleaved timing, the machine description and process trees (from ``/proc``).

Importable from the tests (``sys.path.insert(0, repo_root)``; ``from benchmarks._common import ...``)
and from the scripts (which put the repository root on ``sys.path`` themselves).
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT / "platform", ROOT):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from scoretune.attacks import AttackConfig  # noqa: E402
from scoretune.losses import Objective  # noqa: E402
from scoretune.models import build_model  # noqa: E402

# The threat model of every step benchmark: 10-step linf PGD, eps 8/255, step 2/255.
ATTACK = AttackConfig(eps=8 / 255, norm="linf", steps=10, step_size=2 / 255, pixel_range=(0.0, 1.0))
# The attack's random start only: both steps train on the same point (layout rounding without PGD's sign()).
NO_ATTACK = AttackConfig(eps=8 / 255, norm="linf", steps=0, step_size=2 / 255, pixel_range=(0.0, 1.0))
OBJECTIVES = {
    "trades_se": Objective(method="trades", loss="se", beta=6.0),
    "pgdat_se": Objective(method="pgdat", loss="se"),
}
# CIFAR-10 statistics, as the models would get them from the dataset registry.
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)


def fixed_batch(batch_size: int, *, seed: int = 0, shape=(3, 32, 32), num_classes: int = 10, device="cpu"):
    """Random-but-fixed images in [0, 1] and labels (same seed -> same batch on every run)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((batch_size, *shape), generator=g)
    y = torch.randint(0, num_classes, (batch_size,), generator=g)
    return x.to(device), y.to(device)


def seeded_model(name: str, *, seed: int = 0, device="cpu", num_classes: int = 10) -> torch.nn.Module:
    """``build_model(name)`` for 32x32x3 inputs with weights drawn from ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return build_model(name, input_shape=(3, 32, 32), num_classes=num_classes, mean=MEAN, std=STD).to(device)


def sgd(model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimiser of every step benchmark (the engine's default kind: SGD, Nesterov momentum, wd)."""
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)


# ----------------------------------------------------------------------------- the reference step


def _se(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Squared error ||P - Q||_2^2 per sample (SCORE's SE)."""
    return ((p - q) ** 2).sum(dim=1)


def reference_step(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    objective: Objective,
    attack: AttackConfig,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
) -> dict[str, float]:
    """One TRADES-SE / PGD-AT-SE training step written the textbook way, fp32, no tricks.

    The attack as the official SCORE code runs it (P2333/SCORE, ``without_DDPM/train_cifar.py``):
    TRADES in eval mode (BatchNorm uses its running statistics, ``attack_trades_divergence``)
    takes a clean forward for the target p(x), starts at x + 0.001 N(0, I) and maximises
    SE(p(x), p(x')); PGD-AT in train mode (``attack_pgd_divergence``, called while the model
    trains: BatchNorm normalises with batch statistics and every attack forward updates the
    running statistics) starts uniformly in the eps-ball and maximises SE(onehot(y), p(x')).
    Each of the ``attack.steps`` steps is one forward and ``torch.autograd.grad``, a signed
    ascent step of ``attack.alpha`` and the projection ``x + clip(x' - x, -eps, eps)`` onto the
    eps-ball, then onto the pixel box (the start point is projected the same way).
    Then, in train mode, separate clean (TRADES only) and adversarial forwards, the loss
    (TRADES: SE(onehot, p(x)) + beta SE(p(x), p(x')); PGD-AT: SE(onehot, p(x'))), backward and
    one optimiser step.  The start noise is drawn from ``generator`` exactly as the engine draws
    it (TRADES: one ``randn``; PGD-AT: one ``rand``), so both start from the same point.
    ``attack.bn``/``attack.target``/``attack.start`` must be ``auto`` (the engine's default: these semantics).

    Returns the batch means ``loss``, ``natural`` and ``robust`` as floats.
    """
    if objective.loss != "se" or objective.clip_mode != "none" or objective.label_smoothing != 0:
        raise ValueError("the reference step implements SE without clipping or label smoothing only")
    if attack.norm != "linf":
        raise ValueError("the reference step implements the linf attack only")
    if (attack.bn, attack.target, attack.start) != ("auto", "auto", "auto"):
        raise ValueError("the reference step implements the official attack modes (attack bn/target/start 'auto') only")
    eps, alpha = attack.eps, attack.alpha
    lo, hi = attack.pixel_range
    onehot = None

    def project(x_new: torch.Tensor) -> torch.Tensor:
        # x + clip(x' - x, -eps, eps), then the pixel box: the same rounding as the engine, because
        # sign() turns one-ulp differences into different adversarial points (on PreActResNet-18 the
        # min/max form moves the loss by up to 2e-4).
        return (x + (x_new - x).clamp(-eps, eps)).clamp(lo, hi)

    if objective.method == "trades":
        model.eval()
        with torch.no_grad():
            p_nat = F.softmax(model(x), dim=1)
        x_adv = project(x + 0.001 * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype))
    else:
        model.train()
        x_adv = project(x + (2 * torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) - 1) * eps)
    for _ in range(attack.steps):
        x_adv.requires_grad_(True)
        p_adv = F.softmax(model(x_adv), dim=1)
        if objective.method == "trades":
            attack_loss = _se(p_nat, p_adv).sum()
        else:
            if onehot is None:
                onehot = F.one_hot(y, p_adv.shape[1]).float()
            attack_loss = _se(onehot, p_adv).sum()
        (grad,) = torch.autograd.grad(attack_loss, [x_adv])
        x_adv = project(x_adv.detach() + alpha * grad.sign())
    model.train()
    if objective.method == "trades":
        p_nat = F.softmax(model(x), dim=1)
    logits_adv = model(x_adv)
    onehot = F.one_hot(y, logits_adv.shape[1]).float()
    p_adv = F.softmax(logits_adv, dim=1)
    if objective.method == "trades":
        natural = _se(onehot, p_nat)
        robust = _se(p_nat, p_adv)
        loss = natural + objective.beta * robust
    else:
        robust = _se(onehot, p_adv)
        natural = torch.zeros_like(robust)
        loss = robust
    loss = loss.mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {"loss": float(loss.detach()), "natural": float(natural.detach().mean()), "robust": float(robust.detach().mean())}


# ----------------------------------------------------------------------------- machine description


def cpu_model() -> str:
    """The CPU's model name (and family/model numbers) from /proc/cpuinfo, else ``platform.processor()``."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "cpu family", "model") and key not in fields:
                fields[key] = value.strip()
            if not line.strip() and fields:
                break
    except OSError:
        return platform.processor() or "unknown"
    name = fields.get("model name", platform.processor() or "unknown")
    if "cpu family" in fields:
        name += f" (family {fields['cpu family']}, model {fields.get('model', '?')})"
    return name


def machine_info(device: torch.device | str = "cpu") -> dict[str, object]:
    """What a benchmark number depends on: CPU, core count, load, torch version and threads, GPU."""
    info: dict[str, object] = {
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "loadavg": tuple(round(v, 2) for v in os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    device = torch.device(device)
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, their children, ...), read from ``/proc`` (no psutil): what a
    benchmark or test kills after a driver, since Ray's workers leave the driver's process group."""
    tree: dict[int, list[int]] = {}
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        tree.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        kids = tree.get(todo.pop(), [])
        out += kids
        todo += kids
    return out
