"""``scoretune data fetch|ls``: get CIFAR-10/100 and SVHN (or any file with a SHA-256) into the data root, and
list what is there. See :mod:`scoretune.data.fetch` and :mod:`scoretune.data.inventory`."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "fetch CIFAR-10/100, SVHN or a DDPM .npz into the data root (data fetch), or list what is there (data ls)"

DATASETS = ("cifar10", "cifar100", "svhn")
INTERRUPTED = "the partial download is kept (ROOT/.downloads/*.part): run the same command again to resume"



def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="data_command", metavar="{fetch,ls}")
    sub.required = True
    f = sub.add_parser("fetch", help="download, check and unpack a dataset where its loader reads it",
                       description="Download NAME from its canonical source (checked against the published "
                                   "checksum; an interrupted download resumes), then unpack it atomically where "
                                   "data.name=NAME reads it. --url URL --sha256 HEX without NAME fetches any file "
                                   "(e.g. DDPM .npz data) to ROOT/<its name>.")
    f.add_argument("name", nargs="?", choices=DATASETS, help="the dataset")
    _root(f)
    f.add_argument("--url", action="append", default=[], metavar="URL",
                   help="fetch from a mirror: a folder URL ending in / (published checksums kept), or a file URL "
                        "(one per file; checked with the --sha256 in the same position if given). Without NAME: "
                        "any file, with --sha256")
    f.add_argument("--sha256", action="append", default=[], metavar="HEX", help="the SHA-256 of the --url file")
    f.add_argument("--force", action="store_true", help="fetch again and replace what is there")
    f.add_argument("--keep-download", action="store_true",
                   help="keep the downloaded archive in ROOT/.downloads (default: delete it once installed)")
    ls = sub.add_parser("ls", help="list the datasets under the data root and whether they load and verify",
                        description="List CIFAR-10/100, SVHN, .npz files and interrupted fetches under the data "
                                    "root, with whether each loads and has the official checksums.")
    _root(ls)
    ls.add_argument("--no-verify", action="store_true", help="skip the MD5 check (it reads every byte)")


def _root(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", default=None, help="the data root (default $SCORETUNE_DATA, else ./data: "
                                                "what data.root defaults to)")


def data_root(arg: str | None) -> Path:
    """``--root``, else ``$SCORETUNE_DATA``, else ``./data``, absolute (what ``data.root`` defaults to)."""
    import os

    return Path(arg or os.environ.get("SCORETUNE_DATA") or "./data").expanduser().absolute()


def run(args: argparse.Namespace) -> int:
    if args.data_command == "fetch":
        return _fetch(args)
    return _ls(args)


def _fetch(args: argparse.Namespace) -> int:
    from ..data.fetch import FetchError, fetch, plain_file, recipe, with_mirror

    root = data_root(args.root)
    if args.name is None:
        if len(args.url) != 1 or len(args.sha256) != 1:
            raise FetchError("give a dataset (cifar10, cifar100, svhn), or one --url URL with its --sha256 HEX")
        r = plain_file(args.url[0], args.sha256[0])
    else:
        if args.sha256 and not args.url:
            raise FetchError("--sha256 goes with --url (the published checksums are built in)")
        r = with_mirror(recipe(args.name), args.url, args.sha256)
    result = fetch(r, root, force=args.force, keep_downloads=args.keep_download)
    if result.fetched:
        print(f"{result.dataset}: ready in {result.path}" + (f" (data.root={root})" if r.loadable else ""))
    else:
        print(f"{result.dataset}: already in {result.path} (scoretune data ls checks it; --force fetches it again)")
    return 0


def _ls(args: argparse.Namespace) -> int:
    from ..data.inventory import inventory

    root = data_root(args.root)
    print(f"data root {root}" + ("" if root.is_dir() else " (does not exist yet)"))
    entries = inventory(root, verify=not args.no_verify)
    width = max(len(e.name) for e in entries)
    for e in entries:
        where = f"  {e.path}" if e.path else ""
        print(f"  {e.name:<{width}}  {e.state:<8}  {e.detail}{where}")
    print("  built in: digits, mnist5k, toy (nothing to fetch)")
    return 0
