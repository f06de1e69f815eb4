"""``scoretune data fetch``: the canonical CIFAR-10/100 and SVHN files (or any file with a SHA-256, e.g. DDPM
``.npz`` data), downloaded, checked and put exactly where :mod:`.files` reads them, atomically.

Layout under the data root (default ``$SCORETUNE_DATA`` or ``./data``):

* ``cifar10``  -> ``ROOT/cifar-10-batches-py/`` (the top folder of ``cifar-10-python.tar.gz``)
* ``cifar100`` -> ``ROOT/cifar-100-python/``    (the top folder of ``cifar-100-python.tar.gz``)
* ``svhn``     -> ``ROOT/svhn/train_32x32.mat`` and ``ROOT/svhn/test_32x32.mat``
* a file given by ``--url`` alone -> ``ROOT/<its file name>``

Downloads go to ``ROOT/.downloads/`` (``<file>.part`` while incomplete: a rerun resumes it). The
dataset is assembled in a staging folder ``ROOT/.fetch-<name>-*``, loaded there with the dataset's own
loader, and only then renamed into place: a fetch killed at any point leaves nothing at the loader's
paths (the next fetch removes the staging folder). Archives are extracted with ``tarfile``'s ``data``
filter (no path outside the folder, no links out, no devices).

The sources and digests are torchvision's (``torchvision/datasets/cifar.py``, ``svhn.py``): the MD5s the
sources publish.
"""

from __future__ import annotations

import os
import shutil
import sys
import tarfile
import tempfile
import urllib.parse
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TextIO

from .download import FetchError, OfflineError, Remote, download

DOWNLOADS = ".downloads"
STAGING_PREFIX = ".fetch-"


@dataclass(frozen=True)
class Recipe:
    """How to get one dataset.

    ``target``: the path under the root the loader reads (a folder; for ``kind == "file"`` the file).
    ``kind``: ``"tar"`` (one ``.tar.gz`` whose top folder is ``target``), ``"files"`` (the remotes go
    into ``target/``) or ``"file"`` (the one remote is ``target``).
    ``members``: (file name, MD5) of the files the loader reads in ``target`` (the official ones).
    """

    dataset: str
    target: str
    kind: str
    remotes: tuple[Remote, ...]
    members: tuple[tuple[str, str], ...] = ()
    loadable: bool = True  # a registered dataset: the staged copy must load with load_dataset(dataset)


_CIFAR = "https://www.cs.toronto.edu/~kriz/"
_SVHN = "http://ufldl.stanford.edu/housenumbers/"


def recipes() -> dict[str, Recipe]:
    """The datasets ``scoretune data fetch NAME`` knows, by name."""
    return {
        "cifar10": Recipe(
            "cifar10", "cifar-10-batches-py", "tar",
            (Remote(_CIFAR + "cifar-10-python.tar.gz", "cifar-10-python.tar.gz", "md5",
                    "c58f30108f718f92721af3b95e74349a"),),
            (("data_batch_1", "c99cafc152244af753f735de768cd75f"), ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
             ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"), ("data_batch_4", "634d18415352ddfa80567beed471001a"),
             ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb"), ("test_batch", "40351d587109b95175f43aff81a1287e")),
        ),
        "cifar100": Recipe(
            "cifar100", "cifar-100-python", "tar",
            (Remote(_CIFAR + "cifar-100-python.tar.gz", "cifar-100-python.tar.gz", "md5",
                    "eb9058c3a382ffc7106e4002c42a8d85"),),
            (("train", "16019d7e3df5f24257cddd939b257f8d"), ("test", "f0ef6b0ae62326f3e7ffdfab6717acfc")),
        ),
        "svhn": Recipe(
            "svhn", "svhn", "files",
            (Remote(_SVHN + "train_32x32.mat", "train_32x32.mat", "md5", "e26dedcc434d2e4c54c9b2d4a06d8373"),
             Remote(_SVHN + "test_32x32.mat", "test_32x32.mat", "md5", "eb5a983be6a315427106f1b164d9cef3")),
            (("train_32x32.mat", "e26dedcc434d2e4c54c9b2d4a06d8373"),
             ("test_32x32.mat", "eb5a983be6a315427106f1b164d9cef3")),
        ),
    }


def recipe(name: str) -> Recipe:
    known = recipes()
    if name not in known:
        raise FetchError(f"no known source for dataset '{name}'; choose one of {', '.join(known)}, or give --url URL "
                         "--sha256 HEX for any file")
    return known[name]


def plain_file(url: str, sha256: str) -> Recipe:
    """Any file (e.g. DDPM ``.npz`` data): ``ROOT/<its file name>``, checked with ``sha256``."""
    filename = _url_filename(url)
    return Recipe(filename, filename, "file", (Remote(url, filename, "sha256", sha256.lower()),), loadable=False)


def with_mirror(base: Recipe, urls: Sequence[str], sha256s: Sequence[str]) -> Recipe:
    """``base`` fetched from other URLs: a URL ending in ``/`` is a mirror of the source folder (the
    published digests are kept); a file URL replaces the file of the same name (or the only one), checked
    with the ``--sha256`` in the same position when given, else with the published digest."""
    if sha256s and len(sha256s) != len(urls):
        raise FetchError(f"give one --sha256 per --url ({len(urls)} --url, {len(sha256s)} --sha256)")
    remotes = list(base.remotes)
    for i, url in enumerate(urls):
        sha = sha256s[i].lower() if sha256s else None
        if url.endswith("/"):
            if sha:
                raise FetchError(f"--url {url} is a folder (it ends in /): its files keep their published digests, "
                                 "so drop --sha256 or give each file's URL")
            remotes = [replace(r, url=url + r.filename) for r in remotes]
            continue
        name = _url_filename(url)
        hits = [k for k, r in enumerate(remotes) if r.filename == name] or ([0] if len(remotes) == 1 else [])
        if not hits:
            raise FetchError(f"--url {url}: {name} is none of {base.dataset}'s files "
                             f"({', '.join(r.filename for r in remotes)}); give one URL per file, or a folder URL "
                             "ending in /")
        k = hits[0]
        remotes[k] = replace(remotes[k], url=url, **({"algorithm": "sha256", "digest": sha} if sha else {}))
    return replace(base, remotes=tuple(remotes))


def _url_filename(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise FetchError(f"--url must be an http:// or https:// URL, got {url!r}")
    name = Path(urllib.parse.unquote(parts.path)).name
    if not name or name.startswith(".") or name in ("..",):
        raise FetchError(f"--url {url} names no file (its path must end in a file name)")
    return name


# --------------------------------------------------------------------------------------------------
# fetch
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FetchResult:
    dataset: str
    path: Path
    fetched: bool  # False: it was there already (nothing downloaded)


def manual_hint(r: Recipe, root: Path) -> str:
    """What to download by hand, and where to put it."""
    files = " and ".join(f"{x.url} ({x.algorithm} {x.digest})" for x in r.remotes)
    them = "them" if len(r.remotes) > 1 else "it"
    where = {"tar": f"extract it in {root} (it makes {root / r.target})",
             "files": f"put {them} in {root / r.target}",
             "file": f"save it as {root / r.target}"}[r.kind]
    return f"download {files} by hand and {where}, or save {them} in {root / DOWNLOADS} and run this again"


def fetch(r: Recipe, root: Path, *, force: bool = False, keep_downloads: bool = False,
          stream: TextIO | None = None) -> FetchResult:
    """Download, check and install ``r`` under ``root``; see the module docstring."""
    stream = sys.stderr if stream is None else stream
    root = Path(root).expanduser().absolute()
    target = root / r.target
    if target.exists() and not force:
        missing = [m for m, _ in r.members if not (target / m).is_file()]
        if missing:
            raise FetchError(f"{target} exists but lacks {', '.join(missing)}: move it away, or pass --force to "
                             "replace it")
        return FetchResult(r.dataset, target, fetched=False)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f"{STAGING_PREFIX}{r.dataset}-*"):  # left by a killed fetch: never read by a loader
        shutil.rmtree(stale, ignore_errors=True)
    downloads = root / DOWNLOADS
    files = []
    for remote in r.remotes:
        try:
            files.append(download(remote, downloads / remote.filename, stream=stream))
        except OfflineError as e:
            raise OfflineError(f"{e}; {manual_hint(r, root)}") from None
    stage = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{r.dataset}-", dir=root))
    try:
        staged = _assemble(r, files, stage, stream)
        _check_staged(r, stage, staged)
        _install(staged, target, stage)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    if not keep_downloads:
        for f in files:
            f.unlink(missing_ok=True)
        try:
            downloads.rmdir()
        except OSError:
            pass  # other downloads (or .part files) are still there
    return FetchResult(r.dataset, target, fetched=True)


def _assemble(r: Recipe, files: list[Path], stage: Path, stream: TextIO) -> Path:
    """The dataset laid out in ``stage`` as the loader reads it; returns the path to rename to the target."""
    if r.kind == "tar":
        archive = files[0]
        stream.write(f"{archive.name}: extracting\n")
        stream.flush()
        try:
            with tarfile.open(archive, "r:*") as tar:
                tar.extractall(stage, filter="data")
        except tarfile.FilterError as e:
            archive.unlink(missing_ok=True)
            raise FetchError(f"refusing {archive.name}: {e} (an unsafe archive; it was deleted)") from None
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            archive.unlink(missing_ok=True)
            raise FetchError(f"cannot extract {archive.name} ({type(e).__name__}: {e}); it was deleted: run this "
                             "again") from None
        staged = stage / r.target
        missing = [m for m, _ in r.members if not (staged / m).is_file()]
        if missing:
            raise FetchError(f"{archive.name} has no {r.target}/{missing[0]}: it is not the {r.dataset} python version")
        return staged
    if r.kind == "files":
        staged = stage / r.target
        staged.mkdir()
        for f in files:
            _link_or_copy(f, staged / f.name)
        return staged
    staged = stage / r.target
    _link_or_copy(files[0], staged)
    return staged


def _check_staged(r: Recipe, stage: Path, staged: Path) -> None:
    """Load the staged copy with the project's loader (a registered dataset) or check an ``.npz``."""
    if r.loadable:
        from . import DatasetError, load_dataset

        try:
            load_dataset(r.dataset, root=stage, val_size=0)
        except DatasetError as e:
            raise FetchError(f"the fetched {r.dataset} does not load, so nothing was installed: {e}") from None
    elif staged.suffix == ".npz":
        import numpy as np

        try:
            with np.load(staged, allow_pickle=False) as z:
                names = set(z.files)
        except (OSError, ValueError, EOFError) as e:
            raise FetchError(f"{staged.name} is not a readable .npz ({type(e).__name__}: {e})") from None
        if not {"image", "label"} <= names:
            raise FetchError(f"{staged.name} has arrays {', '.join(sorted(names)) or 'none'}, but DDPM data needs "
                             "'image' and 'label'")


def _install(staged: Path, target: Path, stage: Path) -> None:
    """Rename ``staged`` to ``target`` (an old ``target`` is moved into ``stage`` first, then removed)."""
    if target.exists():
        os.rename(target, stage / ".replaced")
    os.rename(staged, target)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
