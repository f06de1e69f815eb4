"""The search's own state file, ``scoretune_search.json`` in the Ray experiment directory (a local path
or a storage URI): the resolved space, the tracking URI, the MLflow parent run id, the floor, the name,
the attempt number (1 for the first run, +1 for every ``--resume``) and ``trial_base``, the base
experiment as the trials got it (data paths pinned), which a resume checks the dataset against.
"""

from __future__ import annotations

import json
from typing import Any

from trainables.ray_checkpoint import read_json_file, storage_fs

from ..errors import UserError

STATE_FILE = "scoretune_search.json"


def read_state(ray_path: str) -> dict[str, Any]:
    """The state of the search at ``ray_path``; a one-line UserError when there is none."""
    fs, root = storage_fs(ray_path)
    state = read_json_file(fs, f"{root}/{STATE_FILE}")
    if not isinstance(state, dict):
        raise UserError(f"{ray_path} is not a scoretune search (no {STATE_FILE}); start it without --resume")
    return state


def write_state(ray_path: str, state: dict[str, Any]) -> None:
    """Write ``state`` (replacing the file at once on a local disk: write, then rename)."""
    fs, root = storage_fs(ray_path)
    fs.create_dir(root, recursive=True)
    data = json.dumps(state, indent=1).encode()
    tmp = f"{root}/{STATE_FILE}.tmp"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    try:
        fs.move(tmp, f"{root}/{STATE_FILE}")
    except (OSError, NotImplementedError):  # object stores without rename: write in place
        with fs.open_output_stream(f"{root}/{STATE_FILE}") as f:
            f.write(data)
        fs.delete_file(tmp)
