"""``scoretune data ls``: which datasets are under a data root, whether each loads with its loader and
whether its files are the official ones (the published MD5s); DDPM ``.npz`` files; interrupted fetches."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .download import file_digest
from .fetch import DOWNLOADS, STAGING_PREFIX, Recipe, recipes

VERIFIED = "verified"  # loads, and every file has the official MD5
LOADS = "loads"        # loads, but some file is not the official one (a subset, a re-packed copy)
BROKEN = "broken"      # there, but the loader refuses it
MISSING = "missing"
PARTIAL = "partial"    # an interrupted download or fetch


@dataclass(frozen=True)
class Entry:
    name: str
    state: str
    path: Path | None
    detail: str


def inventory(root: Path, *, verify: bool = True) -> list[Entry]:
    """One entry per known dataset, ``.npz`` file and interrupted fetch under ``root``.

    ``verify``: also compare each file's MD5 with the official one (reads every byte)."""
    root = Path(root).expanduser().absolute()
    out = [_dataset_entry(r, root, verify) for r in recipes().values()]
    if root.is_dir():
        out += [_npz_entry(p) for p in sorted(root.glob("*.npz"))]
        for part in sorted((root / DOWNLOADS).glob("*.part")):
            out.append(Entry(part.name[: -len(".part")], PARTIAL, part,
                             f"{part.stat().st_size / 2**20:.1f} MiB downloaded: run the same scoretune data fetch "
                             "again to resume"))
        for stage in sorted(root.glob(f"{STAGING_PREFIX}*")):
            out.append(Entry(stage.name, PARTIAL, stage,
                             "staging folder of an interrupted fetch (never loaded; the next fetch removes it)"))
    return out


def _dataset_entry(r: Recipe, root: Path, verify: bool) -> Entry:
    from . import DatasetError, load_dataset

    names = [m for m, _ in r.members]
    where = next((d for d in (root / r.target, root) if any((d / m).is_file() for m in names)), None)
    if where is None:
        return Entry(r.dataset, MISSING, None, f"not in {root}: scoretune data fetch {r.dataset} --root {root}")
    try:
        ds = load_dataset(r.dataset, root=root, val_size=0)
    except DatasetError as e:
        return Entry(r.dataset, BROKEN, where, str(e))
    sizes = f"{len(ds.train)} train + {len(ds.test)} test images"
    if not verify:
        return Entry(r.dataset, LOADS, where, f"{sizes} (not verified)")
    differ = [m for m, md5 in r.members if file_digest(where / m, "md5") != md5]
    if differ:
        return Entry(r.dataset, LOADS, where, f"{sizes}; not the official files ({', '.join(differ)} differ)")
    return Entry(r.dataset, VERIFIED, where, f"{sizes}; the official files (md5)")


def _npz_entry(path: Path) -> Entry:
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as z:
            if not {"image", "label"} <= set(z.files):
                return Entry(path.name, BROKEN, path, f"arrays {', '.join(z.files) or 'none'}; DDPM data needs "
                                                      "'image' and 'label'")
            shape = z["label"].shape
    except (OSError, ValueError, EOFError) as e:
        return Entry(path.name, BROKEN, path, f"not a readable .npz ({type(e).__name__}: {e})")
    return Entry(path.name, LOADS, path, f"DDPM-style data, {shape[0] if shape else 0} images (data.ddpm_path)")
