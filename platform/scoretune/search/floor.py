"""The floor (C^l1)^2/2 of SCORE's floor stopper (Corollary 1 of Pang et al. 2022): the space's
``stoppers.floor.value``, or estimated from the exact toy posterior or a proxy checkpoint's posterior.
"""

from __future__ import annotations

from typing import Callable

from ..errors import UserError
from .space import SearchSpace


def resolve_floor(space: SearchSpace, out: Callable[[str], None] = print) -> float | None:
    """The floor of the floor stopper (None without one): the given value, or estimated (Corollary 1 of
    Pang et al. 2022) from the exact toy posterior or from a proxy checkpoint's posterior."""
    f = space.stoppers.floor
    if f is None:
        return None
    if f.value is not None:
        return float(f.value)
    import torch

    from ..bounds import InnerMax, estimate_C, madry_floor
    from ..data import load_dataset, to_float, toy_posterior

    base = space.base_config()
    if f.proxy_checkpoint is None:
        if base.data.name != "toy":
            raise UserError("stoppers.floor.estimate needs toy data or stoppers.floor.proxy_checkpoint")
        ds = load_dataset("toy", val_size=base.data.val_size, seed=base.seed, **base.data.options)
        xs = to_float(ds.train.x[: f.samples]).double()
        c = estimate_C(toy_posterior, xs, InnerMax(eps=base.attack.eps, norm=base.attack.norm, grid=401),
                       "l1", keep_values=False)
        source = f"toy: exact posterior, exact (grid) inner max, mean over {xs.shape[0]} samples"
    else:
        from ..engine import model_from_checkpoint

        net, _ = model_from_checkpoint(f.proxy_checkpoint)
        ds = load_dataset(base.data.name, root=base.data.root, val_size=base.data.val_size, seed=base.seed,
                          **base.data.options)
        split = ds.val if len(ds.val) else ds.train
        xs = to_float(split.x[: f.samples])
        gen = torch.Generator().manual_seed(space.seed)
        inner = InnerMax(eps=base.attack.eps, norm=base.attack.norm, restarts=2, steps=20,
                         pixel_range=ds.info.pixel_range, generator=gen)
        c = estimate_C(net, xs, inner, "l1", logits=True, keep_values=False)
        source = f"proxy {f.proxy_checkpoint}"
    floor = madry_floor(c)
    out(f"floor (C^l1)^2/2 = {floor:.4g} (C^l1 = {c}, {source})")
    return floor
