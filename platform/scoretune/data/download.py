"""One file over HTTP(S): resumable into ``<dest>.part`` (HTTP Range), checked against a known digest, then
renamed to ``dest``; a byte progress bar on a stream. Standard library only (``urllib``, ``hashlib``).

A ``.part`` left by an interrupted download is resumed: the server is asked for the bytes after it
(``Range: bytes=N-``); a server that ignores the range (answers 200) is read from the start again.
The digest covers the whole file; a mismatch deletes the download and raises :class:`ChecksumError`.
A connection failure raises :class:`OfflineError` (the caller says what to download by hand).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from ..errors import UserError

_CHUNK = 1 << 20
_TIMEOUT_S = 60.0


class FetchError(UserError):
    """A download or an extraction failed; the message is one line saying what to do."""


class ChecksumError(FetchError):
    """The downloaded bytes do not have the published digest."""


class OfflineError(FetchError):
    """The server cannot be reached (no network, DNS, refused, timed out)."""


@dataclass(frozen=True)
class Remote:
    """A file to download: where from, its name on disk and its published digest (``md5`` or ``sha256``)."""

    url: str
    filename: str
    algorithm: str
    digest: str

    def __post_init__(self) -> None:
        if self.algorithm not in ("md5", "sha256"):
            raise ValueError(f"Remote: algorithm must be md5 or sha256, got {self.algorithm!r}")
        size = 32 if self.algorithm == "md5" else 64
        if len(self.digest) != size or any(c not in "0123456789abcdef" for c in self.digest.lower()):
            raise FetchError(f"{self.filename}: {self.algorithm} must be {size} hex digits, got {self.digest!r}")


@dataclass
class ByteProgress:
    """A progress bar in bytes on ``stream``: redrawn in place on a terminal (at most every
    ``interval_s``), one line per tenth of the file otherwise (logs, CI)."""

    label: str
    total: int | None
    stream: TextIO = field(default_factory=lambda: sys.stderr)
    interval_s: float = 0.2
    _start: float = field(default_factory=time.monotonic)
    _last: float = 0.0
    _last_tenth: int = -1
    _tty: bool | None = None
    _width: int = 0  # of the line drawn last (a shorter one is padded over it)

    def update(self, done: int, final: bool = False) -> None:
        if self._tty is None:
            self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        now = time.monotonic()
        if self._tty:
            if not final and now - self._last < self.interval_s:
                return
            self._last = now
            text = self.line(done, now)
            text, self._width = text.ljust(self._width), len(text)
            self.stream.write("\r" + text + ("\n" if final else ""))
        else:
            tenth = 10 * done // self.total if self.total else -1
            if not final and (tenth <= self._last_tenth or tenth >= 10):
                return
            self._last_tenth = tenth
            self.stream.write(self.line(done, now) + "\n")
        self.stream.flush()

    def line(self, done: int, now: float) -> str:
        rate = done / max(now - self._start, 1e-6)
        mib = 1024 * 1024
        if self.total:
            frac = min(done / self.total, 1.0)
            bar = "#" * int(30 * frac)
            return (f"  {self.label} [{bar:<30}] {100 * frac:5.1f}%  {done / mib:.1f}/{self.total / mib:.1f} MiB"
                    f"  {rate / mib:.1f} MiB/s")
        return f"  {self.label} {done / mib:.1f} MiB  {rate / mib:.1f} MiB/s"


def file_digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def download(remote: Remote, dest: Path, *, stream: TextIO | None = None) -> Path:
    """Download ``remote`` to ``dest`` (resuming ``dest.part``), check its digest, return ``dest``.

    A ``dest`` already there with the right digest is kept (no request). ``stream``: where the
    progress bar goes (default stderr)."""
    stream = sys.stderr if stream is None else stream
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_file():
        if file_digest(dest, remote.algorithm) == remote.digest.lower():
            return dest
        dest.unlink()
    part = dest.with_name(dest.name + ".part")
    _fetch_into(remote, part, stream)
    actual = file_digest(part, remote.algorithm)
    if actual != remote.digest.lower():
        part.unlink()
        raise ChecksumError(f"checksum mismatch for {remote.filename} from {remote.url}: expected {remote.algorithm} "
                            f"{remote.digest.lower()}, got {actual}; the download was deleted (a wrong --url or "
                            "--sha256, or a corrupted transfer: run it again)")
    os.replace(part, dest)
    return dest


def _fetch_into(remote: Remote, part: Path, stream: TextIO) -> None:
    """Append the missing bytes of ``remote`` to ``part`` (all of them when the server ignores Range)."""
    offset = part.stat().st_size if part.is_file() else 0
    headers = {"User-Agent": "scoretune-data-fetch", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(remote.url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=_TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # the .part is already complete (or longer than the file): let the digest decide
            return
        raise FetchError(f"download of {remote.url} failed: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", e)
        raise OfflineError(f"cannot reach {remote.url} ({type(reason).__name__}: {reason})") from None
    with response:
        resumed = offset and response.status == 206 and _range_start(response.headers.get("Content-Range")) == offset
        if not resumed:
            offset = 0
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length and length.isdigit() else None
        verb = f"resuming at {offset / (1024 * 1024):.1f} MiB" if offset else "downloading"
        stream.write(f"{remote.filename}: {verb} from {remote.url}\n")
        bar = ByteProgress(remote.filename, total, stream)
        done = offset
        try:
            with open(part, "ab" if resumed else "wb") as f:
                for chunk in iter(lambda: response.read(_CHUNK), b""):
                    f.write(chunk)
                    done += len(chunk)
                    bar.update(done)
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:  # dropped: .part kept to resume
            raise OfflineError(f"download of {remote.url} interrupted at {done} bytes ({type(e).__name__}: {e}); "
                               "run the same command again to resume") from None
        bar.update(done, final=True)


def _range_start(content_range: str | None) -> int | None:
    """The first byte of a ``Content-Range: bytes A-B/N`` header, else None."""
    if not content_range or not content_range.startswith("bytes "):
        return None
    first = content_range[len("bytes "):].split("-", 1)[0]
    return int(first) if first.isdigit() else None
