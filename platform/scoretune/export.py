"""Export a trained model in RobustBench's checkpoint convention, and load such an export back.

Convention (what ``robustbench.utils.load_model`` reads): ``torch.save({'state_dict': sd}, path)``
where ``sd`` is a plain ``{name: tensor}`` state dict (RobustBench strips a ``module.`` prefix and
falls back to a bare state dict; we write the ``{'state_dict': ...}`` form, with CPU tensors, so it
loads with ``torch.load(weights_only=True)``). The model takes **[0, 1] inputs** (NCHW images):
scoretune models normalise inside themselves, so the state dict keeps the ``normalize.mean`` /
``normalize.std`` buffers. For RobustBench's own architectures (e.g. ``DMWideResNet``, which
holds mean/std as plain attributes), drop the ``normalize.*`` keys; the other key names already
match for ``wrn-*`` models (see ``scoretune.models``).

A JSON sidecar next to the weights (``OUT.pt`` -> ``OUT.json``) records the model spec
(``engine.model_spec``: architecture, input shape, classes, mean/std, dataset, pixel range) and the
threat model, so :func:`load_robustbench` rebuilds the network without the training config.
The weights are the EMA weights when the checkpoint has them (what scoretune evaluates).
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .errors import UserError

SIDECAR_FORMAT = "scoretune-robustbench-v1"
_THREAT = {"linf": "Linf", "l2": "L2"}


def sidecar_path(path: str | os.PathLike) -> Path:
    """``OUT.pt`` -> ``OUT.json``."""
    p = Path(path)
    if p.suffix == ".json":
        raise UserError(f"export path {p} ends in .json, which is the sidecar's name; use e.g. {p.with_suffix('.pt')}")
    return p.with_suffix(".json")


def export_robustbench(
    source: str | os.PathLike | nn.Module,
    path: str | os.PathLike,
    *,
    spec: dict[str, Any] | None = None,
    eps: float | None = None,
    norm: str | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``source`` (a scoretune checkpoint path, or a model plus its ``spec``) to ``path``.

    Writes ``{'state_dict': ...}`` to ``path`` and the sidecar ``path.with_suffix('.json')``
    (``format``, ``model_spec``, ``threat_model``, ``eps``, ``norm``, ``inputs``, ``extra``).
    eps/norm default to the checkpoint's training attack. Returns ``path``.
    """
    if isinstance(source, nn.Module):
        if spec is None:
            raise ValueError("export_robustbench(model, ...) needs spec= (engine.model_spec of the model)")
        net = source
    else:
        from .engine import load_checkpoint, model_from_checkpoint

        state = load_checkpoint(source)
        net, cfg = model_from_checkpoint(state)
        spec = json.loads(state["model_spec"]) if spec is None else spec
        eps = float(cfg.attack.eps) if eps is None else eps
        norm = cfg.attack.norm if norm is None else norm
    sd = OrderedDict((k, v.detach().to("cpu").clone().contiguous()) for k, v in net.state_dict().items())
    path = Path(path)
    side = sidecar_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"state_dict": sd}, tmp)
    os.replace(tmp, path)
    meta = {
        "format": SIDECAR_FORMAT,
        "weights": path.name,
        "state_dict_key": "state_dict",
        "inputs": "[0, 1] pixels, NCHW; the model normalises inside (normalize.mean/std buffers)",
        "model_spec": spec,
        "threat_model": _THREAT.get(norm or "", None),
        "eps": eps,
        "norm": norm,
        "extra": dict(extra or {}),
    }
    side.write_text(json.dumps(meta, indent=2))
    return path


def read_sidecar(path: str | os.PathLike) -> dict[str, Any]:
    """The sidecar JSON of the export ``path``."""
    side = sidecar_path(path)
    if not side.is_file():
        raise UserError(f"no sidecar {side} next to {path}: the model spec is needed to rebuild the network "
                        "(pass spec= to load_robustbench)")
    try:
        meta = json.loads(side.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"sidecar {side} is unreadable ({e}); re-export the model") from None
    if meta.get("format") != SIDECAR_FORMAT:
        raise UserError(f"{side} is not a scoretune RobustBench sidecar (format {meta.get('format')!r})")
    return meta


def is_robustbench_export(path: str | os.PathLike) -> bool:
    """True when ``path`` has a scoretune RobustBench sidecar next to it."""
    try:
        side = sidecar_path(path)
    except UserError:
        return False
    if not side.is_file():
        return False
    try:
        return json.loads(side.read_text()).get("format") == SIDECAR_FORMAT
    except (OSError, ValueError):
        return False


def robustbench_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of a RobustBench-style file, read as RobustBench does (``state_dict`` key or
    bare dict; a ``module.`` prefix stripped)."""
    from .engine import CheckpointError

    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"export not found: {path}") from None
    except Exception as e:  # noqa: BLE001 - truncated / not a torch file
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read {path}: {first} (file corrupt or not a state dict)") from None
    sd = ck["state_dict"] if isinstance(ck, dict) and "state_dict" in ck else ck
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} holds no state dict of tensors")
    return OrderedDict((k[len("module."):] if k.startswith("module.") else k, v) for k, v in sd.items())


def load_robustbench(
    path: str | os.PathLike,
    *,
    spec: dict[str, Any] | None = None,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """Rebuild the scoretune network of the export ``path`` (spec from its sidecar unless given), eval mode."""
    from .engine import build_model_from_spec

    spec = spec if spec is not None else read_sidecar(path).get("model_spec")
    if not spec:
        raise UserError(f"the sidecar of {path} has no model_spec; re-export the model")
    net = build_model_from_spec(spec)
    try:
        net.load_state_dict(robustbench_state_dict(path), strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0][:200]
        raise UserError(f"{path} does not fit the architecture in its sidecar: {first}") from None
    return net.to(device).eval()
