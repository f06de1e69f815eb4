"""The one way scoretune starts or joins Ray.

    with ray_session(address, num_cpus=4) as where:   # "local Ray" | "Ray cluster at ..."
        ...

* A Ray this process is already connected to is used as is (and left running).
* ``address`` (or ``$RAY_ADDRESS``): join that cluster ('auto', host:port, ray://host:10001).
* Otherwise a local Ray is started on 127.0.0.1 only, without the dashboard, and shut down at the end.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator

from ..errors import UserError


@contextlib.contextmanager
def ray_session(address: str | None = None, *, num_cpus: int | None = None,
                out: Callable[[str], None] = print) -> Iterator[str]:
    import ray

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    if ray.is_initialized():
        yield "the connected Ray"
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    try:
        if address:
            ray.init(address=address, log_to_driver=False)
            where = f"Ray cluster at {address}"
        else:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                     _node_ip_address="127.0.0.1")
            where = "local Ray"
    except ConnectionError as e:
        raise UserError(f"cannot connect to the Ray cluster at {address}: {e} (start it with `ray start --head`, "
                        "or leave --address out to run locally)") from None
    try:
        res = ray.cluster_resources()
        out(f"{where}: {res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs")
        yield where
    finally:
        ray.shutdown()
