"""``scoretune data fetch|ls`` against a local HTTP server on 127.0.0.1 serving tiny archives in the exact format
of the real ones (CIFAR python-version tar.gz, SVHN .mat). No test touches the internet."""

from __future__ import annotations

import hashlib
import http.server
import io
import pickle
import tarfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from scoretune import cli
from scoretune.data import DatasetError, load_dataset
from scoretune.data.download import ByteProgress

# --------------------------------------------------------------------------------------------------
# a local server with HTTP Range support
# --------------------------------------------------------------------------------------------------


@dataclass
class Served:
    """What the server serves (path -> bytes) and the Range headers it was sent."""

    files: dict[str, bytes] = field(default_factory=dict)
    ranges: list[str | None] = field(default_factory=list)
    honour_range: bool = True  # False: a server that ignores Range and sends the whole file (200)
    base: str = ""


def _handler(served: Served):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = served.files.get(self.path)
            rng = self.headers.get("Range")
            served.ranges.append(rng)
            if body is None:
                self.send_error(404)
                return
            start = 0
            if served.honour_range and rng and rng.startswith("bytes=") and rng.endswith("-"):
                start = int(rng[len("bytes="):-1])
                if start >= len(body):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            self.wfile.write(body[start:])

        def log_message(self, *args):
            pass

    return Handler


@pytest.fixture
def server():
    served = Served()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(served))  # port 0: a free port
    served.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield served
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


# --------------------------------------------------------------------------------------------------
# tiny archives in the real formats
# --------------------------------------------------------------------------------------------------


def _pickle(d: dict) -> bytes:
    return pickle.dumps(d, protocol=2)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def cifar10_tar(n: int = 12, seed: int = 0) -> bytes:
    """cifar-10-python.tar.gz's layout: cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        _add(tar, "cifar-10-batches-py/batches.meta", _pickle({b"label_names": [b"c%d" % i for i in range(10)]}))
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            d = {b"batch_label": name.encode(), b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, n)], b"filenames": [b"x.png"] * n}
            _add(tar, f"cifar-10-batches-py/{name}", _pickle(d))
    return buf.getvalue()


def cifar100_tar(n: int = 12) -> bytes:
    rng = np.random.default_rng(1)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name in ("train", "test"):
            d = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"fine_labels": [int(v) for v in rng.integers(0, 100, n)],
                 b"coarse_labels": [int(v) for v in rng.integers(0, 20, n)]}
            _add(tar, f"cifar-100-python/{name}", _pickle(d))
    return buf.getvalue()


def svhn_mat(n: int, seed: int) -> bytes:
    """The cropped-digits .mat: X uint8 (32, 32, 3, N), y (N, 1) in 1..10 (10 is the digit 0)."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8),
                           "y": rng.integers(1, 11, (n, 1)).astype(np.uint8)})
    return buf.getvalue()


def sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def fetch(root: Path, *argv: str) -> int:
    return cli.main(["data", "fetch", *argv, "--root", str(root)])


# --------------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------------


def test_fetch_cifar10_loads_with_the_loader_and_ls_lists_it(server, tmp_path, capsys):
    tgz = cifar10_tar()
    server.files["/m/cifar-10-python.tar.gz"] = tgz
    assert fetch(tmp_path, "cifar10", "--url", f"{server.base}/m/cifar-10-python.tar.gz", "--sha256", sha256(tgz)) == 0
    out, err = capsys.readouterr()
    assert "cifar10: ready in" in out and "100.0%" in err  # the progress bar ends at 100%, on stderr
    ds = load_dataset("cifar10", root=tmp_path, val_size=0)
    assert len(ds.train) == 60 and len(ds.test) == 12
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar-10-batches-py"]  # no archive, no staging left
    # a second fetch downloads nothing
    n = len(server.ranges)
    assert fetch(tmp_path, "cifar10", "--url", f"{server.base}/m/cifar-10-python.tar.gz", "--sha256", sha256(tgz)) == 0
    assert len(server.ranges) == n and "already in" in capsys.readouterr().out
    assert cli.main(["data", "ls", "--root", str(tmp_path)]) == 0
    ls = capsys.readouterr().out
    assert "cifar10   loads     60 train + 12 test images; not the official files" in ls
    assert "cifar100  missing" in ls and "svhn      missing" in ls
    # --force replaces it (with another copy, here 7 images per batch)
    other = cifar10_tar(n=7, seed=5)
    server.files["/m/cifar-10-python.tar.gz"] = other
    assert fetch(tmp_path, "cifar10", "--force", "--url", f"{server.base}/m/cifar-10-python.tar.gz",
                 "--sha256", sha256(other)) == 0
    assert len(load_dataset("cifar10", root=tmp_path, val_size=0).test) == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar-10-batches-py"]


def test_fetch_cifar100_from_a_mirror_folder_checks_the_published_md5(server, tmp_path, capsys):
    server.files["/mirror/cifar-100-python.tar.gz"] = cifar100_tar()
    # a folder URL keeps the published MD5, which the tiny archive does not have
    assert fetch(tmp_path, "cifar100", "--url", f"{server.base}/mirror/") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("scoretune data: error: checksum mismatch for cifar-100-python.tar.gz from ")
    assert "expected md5 eb9058c3a382ffc7106e4002c42a8d85, got " in err
    assert not any(tmp_path.rglob("*.part")) and not (tmp_path / "cifar-100-python").exists()
    tgz = server.files["/mirror/cifar-100-python.tar.gz"]
    assert fetch(tmp_path, "cifar100", "--url", f"{server.base}/mirror/cifar-100-python.tar.gz",
                 "--sha256", sha256(tgz)) == 0
    assert len(load_dataset("cifar100", root=tmp_path, val_size=0).test) == 12


def test_fetch_svhn_two_files(server, tmp_path, capsys):
    train, test = svhn_mat(20, 0), svhn_mat(8, 1)
    server.files.update({"/h/train_32x32.mat": train, "/h/test_32x32.mat": test})
    assert fetch(tmp_path, "svhn", "--url", f"{server.base}/h/train_32x32.mat", "--sha256", sha256(train),
                 "--url", f"{server.base}/h/test_32x32.mat", "--sha256", sha256(test)) == 0
    ds = load_dataset("svhn", root=tmp_path, val_size=0)
    assert len(ds.train) == 20 and len(ds.test) == 8
    assert (tmp_path / "svhn" / "train_32x32.mat").read_bytes() == train
    # a URL that names none of svhn's files is refused in one line
    assert fetch(tmp_path / "b", "svhn", "--url", f"{server.base}/h/other.mat") == 2
    assert "other.mat is none of svhn's files" in capsys.readouterr().err


def test_resumes_a_truncated_part(server, tmp_path, capsys):
    tgz = cifar10_tar(n=40)
    server.files["/cifar-10-python.tar.gz"] = tgz
    downloads = tmp_path / ".downloads"
    downloads.mkdir(parents=True)
    (downloads / "cifar-10-python.tar.gz.part").write_bytes(tgz[: len(tgz) // 3])
    assert cli.main(["data", "ls", "--root", str(tmp_path)]) == 0
    assert "cifar-10-python.tar.gz  partial" in capsys.readouterr().out
    assert fetch(tmp_path, "cifar10", "--url", f"{server.base}/cifar-10-python.tar.gz", "--sha256", sha256(tgz)) == 0
    assert server.ranges == [f"bytes={len(tgz) // 3}-"]  # only the missing bytes were asked for
    assert "resuming at" in capsys.readouterr().err
    assert len(load_dataset("cifar10", root=tmp_path, val_size=0).train) == 200


@pytest.mark.parametrize("part", ["complete", "ignored-range"])
def test_a_complete_part_or_a_server_without_range_support(server, tmp_path, part):
    tgz = cifar10_tar()
    server.files["/cifar-10-python.tar.gz"] = tgz
    (tmp_path / ".downloads").mkdir()
    if part == "complete":  # the server answers 416 (nothing after the end): the digest decides
        (tmp_path / ".downloads" / "cifar-10-python.tar.gz.part").write_bytes(tgz)
    else:  # the server sends the whole file again: it is written from the start, not appended
        server.honour_range = False
        (tmp_path / ".downloads" / "cifar-10-python.tar.gz.part").write_bytes(b"stale bytes")
    assert fetch(tmp_path, "cifar10", "--url", f"{server.base}/cifar-10-python.tar.gz", "--sha256", sha256(tgz)) == 0
    assert server.ranges[0] is not None
    assert len(load_dataset("cifar10", root=tmp_path, val_size=0).test) == 12


def test_checksum_mismatch_is_refused_and_leaves_no_dataset(server, tmp_path, capsys):
    tgz = cifar10_tar()
    server.files["/cifar-10-python.tar.gz"] = tgz
    wrong = sha256(b"something else")
    assert fetch(tmp_path, "cifar10", "--url", f"{server.base}/cifar-10-python.tar.gz", "--sha256", wrong) == 2
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]
    assert last.startswith("scoretune data: error: checksum mismatch for cifar-10-python.tar.gz from ")
    assert f"expected sha256 {wrong}, got {sha256(tgz)}" in last and "cifar-10-python.tar.gz" in last
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == []
    with pytest.raises(DatasetError):
        load_dataset("cifar10", root=tmp_path, val_size=0)


def test_failed_extraction_leaves_nothing_that_loads(server, tmp_path, capsys):
    tgz = cifar10_tar(n=200)
    cut = tgz[: len(tgz) * 2 // 3]  # a truncated archive whose (custom) checksum matches: extraction fails midway
    server.files["/cifar-10-python.tar.gz"] = cut
    assert fetch(tmp_path, "cifar10", "--url", f"{server.base}/cifar-10-python.tar.gz", "--sha256", sha256(cut)) == 2
    assert "cannot extract cifar-10-python.tar.gz" in capsys.readouterr().err
    assert not (tmp_path / "cifar-10-batches-py").exists() and list(tmp_path.glob(".fetch-*")) == []
    with pytest.raises(DatasetError):
        load_dataset("cifar10", root=tmp_path, val_size=0)


def test_a_killed_fetchs_staging_folder_does_not_load_and_is_cleaned(server, tmp_path, capsys):
    # what a fetch killed during extraction leaves: a complete-looking copy in the staging folder
    stage = tmp_path / ".fetch-cifar10-abc123"
    with tarfile.open(fileobj=io.BytesIO(cifar10_tar()), mode="r:gz") as tar:
        tar.extractall(stage, filter="data")
    with pytest.raises(DatasetError):
        load_dataset("cifar10", root=tmp_path, val_size=0)
    assert cli.main(["data", "ls", "--root", str(tmp_path), "--no-verify"]) == 0
    ls = capsys.readouterr().out
    assert "cifar10" in ls and "missing" in ls and ".fetch-cifar10-abc123  partial" in ls
    tgz = cifar10_tar(seed=3)
    server.files["/cifar-10-python.tar.gz"] = tgz
    assert fetch(tmp_path, "cifar10", "--url", f"{server.base}/cifar-10-python.tar.gz", "--sha256", sha256(tgz)) == 0
    assert not stage.exists() and len(load_dataset("cifar10", root=tmp_path, val_size=0).test) == 12


def test_path_traversal_is_refused(server, tmp_path, capsys):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        _add(tar, "cifar-10-batches-py/data_batch_1", b"x")
        _add(tar, "../../escaped.txt", b"owned")
    evil = buf.getvalue()
    server.files["/cifar-10-python.tar.gz"] = evil
    root = tmp_path / "root"
    assert fetch(root, "cifar10", "--url", f"{server.base}/cifar-10-python.tar.gz", "--sha256", sha256(evil)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("scoretune data: error: refusing cifar-10-python.tar.gz:") and "outside" in err
    assert not list(tmp_path.rglob("escaped.txt")) and not (root / "cifar-10-batches-py").exists()


def test_offline_says_what_to_download_by_hand_and_where(tmp_path, capsys):
    from conftest import free_port

    port = free_port()  # nothing listens there: connection refused, as offline
    assert fetch(tmp_path, "cifar10", "--url", f"http://127.0.0.1:{port}/cifar-10-python.tar.gz") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    line = err[0]
    assert line.startswith("scoretune data: error: cannot reach http://127.0.0.1:")
    assert "c58f30108f718f92721af3b95e74349a" in line and f"extract it in {tmp_path}" in line
    assert str(tmp_path / "cifar-10-batches-py") in line


def test_any_npz_with_sha256(server, tmp_path, capsys):
    buf = io.BytesIO()
    np.savez(buf, image=np.zeros((5, 32, 32, 3), np.uint8), label=np.arange(5))
    server.files["/ddpm/1m.npz"] = buf.getvalue()
    url = f"{server.base}/ddpm/1m.npz"
    assert cli.main(["data", "fetch", "--url", url, "--root", str(tmp_path)]) == 2  # no checksum: refused
    assert "--sha256" in capsys.readouterr().err
    assert cli.main(["data", "fetch", "--url", url, "--sha256", sha256(buf.getvalue()), "--root", str(tmp_path)]) == 0
    assert (tmp_path / "1m.npz").read_bytes() == buf.getvalue()
    cifar = tmp_path / "cifar-10-batches-py"
    with tarfile.open(fileobj=io.BytesIO(cifar10_tar()), mode="r:gz") as tar:
        tar.extractall(tmp_path, filter="data")
    assert cifar.is_dir()
    ds = load_dataset("cifar10", root=tmp_path, val_size=0, ddpm_path=tmp_path / "1m.npz")
    assert len(ds.extra) == 5
    capsys.readouterr()
    assert cli.main(["data", "ls", "--root", str(tmp_path)]) == 0
    assert "1m.npz" in capsys.readouterr().out


def test_progress_bar_lines_when_not_a_terminal():
    out = io.StringIO()
    bar = ByteProgress("f.bin", 100 * 2**20, out)
    for done in range(0, 100 * 2**20 + 1, 2**20):
        bar.update(done)
    bar.update(100 * 2**20, final=True)
    lines = out.getvalue().splitlines()
    assert 10 <= len(lines) <= 12 and lines[-1].startswith("  f.bin [##############################] 100.0%")


def test_ctrl_c_mid_download_keeps_the_part_and_the_rerun_resumes(server, tmp_path, capsys, monkeypatch):
    from scoretune.data import download

    tgz = cifar10_tar(n=40)
    server.files["/cifar-10-python.tar.gz"] = tgz
    url = f"{server.base}/cifar-10-python.tar.gz"
    monkeypatch.setattr(download, "_CHUNK", 4096)
    calls = []

    def interrupt(self, done, final=False):
        calls.append(done)
        if len(calls) == 3:
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(download.ByteProgress, "update", interrupt)
        assert fetch(tmp_path, "cifar10", "--url", url, "--sha256", sha256(tgz)) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "scoretune data: interrupted; the partial download is kept (ROOT/.downloads/*.part): run the same command "
        "again to resume")
    part = tmp_path / ".downloads" / "cifar-10-python.tar.gz.part"
    assert part.stat().st_size == 3 * 4096 and not (tmp_path / "cifar-10-batches-py").exists()
    assert fetch(tmp_path, "cifar10", "--url", url, "--sha256", sha256(tgz)) == 0
    assert server.ranges[-1] == f"bytes={3 * 4096}-"
    assert len(load_dataset("cifar10", root=tmp_path, val_size=0).train) == 200


def test_progress_bar_redraws_in_place_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    bar = ByteProgress("f.bin", 2**20, out, interval_s=0.0)
    bar.update(2**19)
    bar.update(2**20, final=True)
    text = out.getvalue()
    assert text.startswith("\r  f.bin [###############") and text.count("\r") == 2 and text.endswith("\n")
    assert "100.0%" in text.split("\r")[-1]
