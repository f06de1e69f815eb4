"""The MLflow UI as a researcher meets it after a search, checked in a real Chromium (Debian's
``chromium`` + ``chromium-driver``, driven by Selenium; never a downloaded browser).

A tiny quickstart search (3 trials x 2 epochs, one with lr 40 that diverges), promote, ``scoretune ui``
on a free 127.0.0.1 port (stopped by its PID), then the printed link: the runs table shows the searched
params and best-epoch metrics as columns with the best trial first and the diverged one marked; the
parent run's description renders its summary table; the Models page lists the promoted model with
its alias. Screenshots go to the test's tmp dir (``SCORETUNE_DOCS_SHOT=1`` also refreshes
``docs/ui_runs_table.png``).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (Path(CHROMIUM).exists() and Path(DRIVER).exists()),
                                 reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")]

TINY = ["num_samples=3", "max_concurrent=2", "base.epochs=2", "base.attack.steps=2", "base.eval.pgd_steps=3",
        "scheduler.grace_period=1", "top_k=2", "autoattack.n_ex=16", "params.lr.choice=[0.2,0.3,40.0]",
        "points_to_evaluate=[{beta: 6.0, lr: 0.2, loss: se, clip: 0.0}, {beta: 2.0, lr: 40.0, loss: kl, clip: 0.0}]"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
              "--window-size=2200,1000"):
        opts.add_argument(a)
    os.environ["SE_AVOID_STATS"] = "true"
    return webdriver.Chrome(service=Service(DRIVER), options=opts)  # explicit driver: no selenium-manager download


def wait_for(cond, timeout=60.0, every=0.5):
    end = time.time() + timeout
    last = None
    while time.time() < end:
        try:
            last = cond()
            if last:
                return last
        except Exception as e:  # the page is still rendering
            last = e
        time.sleep(every)
    raise AssertionError(f"timed out waiting ({last!r})")


def close_popups(d) -> None:
    """MLflow's assistant side panel and 'new registry UI' dialog cover the page: close them."""
    from selenium.webdriver.common.by import By

    for el in d.find_elements(By.CSS_SELECTOR, "[aria-label='Close'], button[aria-label*='lose']"):
        with contextlib.suppress(Exception):
            if el.is_displayed():
                el.click()


@pytest.fixture
def searched(ray_local, tmp_path, monkeypatch):
    from scoretune.cli import main
    from scoretune.search import load_space, run_search
    from scoretune.tracking.promote import promote

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    space = load_space(ROOT / "search_spaces/quickstart.yaml", TINY + [f"storage_path={tmp_path / 'ray'}"])
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        summary = run_search(space, name="uitest", tracking_uri=uri)
    assert summary is not None, buf.getvalue()[-3000:]
    res = promote("uitest", tracking_uri=uri)
    return summary, res, uri, buf.getvalue()


def test_mlflow_ui_shows_best_trial_params_and_stop_reasons_on_the_first_page(searched, tmp_path):
    from selenium.webdriver.common.by import By

    summary, promoted, uri, log = searched
    best = summary.best
    diverged = [t for t in summary.trials if t.point["lr"] == 40.0]
    assert best is not None and diverged and diverged[0].status == "diverged", log[-3000:]
    assert re.search(r"\[\d\d:\d\d:\d\d\] AutoAttack \(fast, val split, n_ex=16\) of 2 models in parallel: trial \w+ "
                     r"\(epoch \d\)", log)

    # the store behind the pages: models named trial-<id> carry their metrics; checkpoint tags name files
    from scoretune.tracking import client

    cl = client(uri)
    models = {m.name: m for m in cl.search_logged_models([summary.experiment_id])}
    assert set(models) == {f"trial-{t.trial_id}" for t in summary.trials if t.model_uri}
    assert all({"aa_acc", "model_val_pgd_acc"} <= {x.key for x in m.metrics} for m in models.values())
    for t in summary.trials:
        run = cl.get_run(t.run_id)
        path = run.data.tags.get("scoretune.best_checkpoint")
        assert path is None or (Path(path) / "state.pt").is_file(), path
        if t.model_uri:
            assert run.data.tags["scoretune.model_epoch"] == str(t.best_epoch)
    mv = cl.get_model_version(promoted.model_name, promoted.version)
    assert "by **val_pgd_acc** (max)" in mv.description and "AutoAttack fast (split val, n_ex 16" in mv.description

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "scoretune.cli", "ui", "--tracking-uri", uri, "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    d = None
    try:
        lines: list[str] = []
        while not any("viewStateShareKey" in ln for ln in lines):
            ln = proc.stdout.readline()
            assert ln, "scoretune ui exited: " + "".join(lines)
            lines.append(ln)
        link = next(ln.strip() for ln in lines if "viewStateShareKey" in ln)
        assert link.startswith(f"http://127.0.0.1:{port}/#/experiments/") and "workflowType=machine_learning" in link
        while not any("summary (parent run):" in ln for ln in lines) or not any("registered models:" in ln for ln in lines):
            lines.append(proc.stdout.readline())
        parent_link = next(ln.split()[-1] for ln in lines if "summary (parent run):" in ln)
        compare_link = next((ln.split()[-1] for ln in lines if "compare the top" in ln), None)
        models_link = next(ln.split()[-1] for ln in lines if "registered models:" in ln)
        wait_for(lambda: socket.create_connection(("127.0.0.1", port), timeout=1).close() or True, timeout=120)

        d = browser()
        # -- the runs table: model-training view, sorted by the best objective, params + metrics as columns
        d.get(link)
        wait_for(lambda: best.trial_id in d.find_element(By.TAG_NAME, "body").text, timeout=90)
        close_popups(d)
        time.sleep(1.0)
        d.save_screenshot(str(tmp_path / "runs_table.png"))
        headers = {h.text.strip() for h in d.find_elements(By.CSS_SELECTOR, "[role='columnheader']") if h.text.strip()}
        for col in ("beta", "lr", "loss", "clip", "best_val_pgd_acc", "best_epoch", "epochs_run", "aa_acc"):
            assert any(h.startswith(col) for h in headers), (col, sorted(headers))
        assert "Model training" in d.find_element(By.TAG_NAME, "body").text
        names = [a.text for a in d.find_elements(By.CSS_SELECTOR, "a[href*='/runs/']") if a.text.startswith("[")]
        assert len(names) == len(summary.trials), names
        assert best.trial_id in names[0] and names[0].startswith("["), names
        assert any(n.startswith(f"[diverged] {diverged[0].trial_id}") for n in names), names
        if os.environ.get("SCORETUNE_DOCS_SHOT"):
            d.set_window_size(1500, 560)
            time.sleep(2.0)
            shot(d, ROOT / "docs" / "ui_runs_table.png")
            d.set_window_size(2200, 1000)

        # -- the parent run: its markdown description renders the summary table
        d.get(parent_link)
        wait_for(lambda: "Search uitest" in d.find_element(By.TAG_NAME, "body").text, timeout=60)
        close_popups(d)
        tables = wait_for(lambda: [t for t in d.find_elements(By.TAG_NAME, "table")
                                   if "best_ep" in t.get_attribute("textContent")], timeout=30)
        text = tables[0].get_attribute("textContent")
        assert best.trial_id in text and "aa_acc" in text and "diverged" in text
        d.save_screenshot(str(tmp_path / "parent_run.png"))

        # -- the compare page of the top-k (the diverged trial has no model and is left out)
        ranked = [t for t in summary.trials if t.status != "diverged" and t.value("val_pgd_acc") is not None]
        if len(ranked) >= 2:
            assert compare_link is not None
            d.get(compare_link)
            wait_for(lambda: all(t.trial_id in d.find_element(By.TAG_NAME, "body").text for t in ranked[:2]), timeout=60)
            d.save_screenshot(str(tmp_path / "compare.png"))

        # -- the Models page: the promoted model and its alias
        d.get(models_link)
        wait_for(lambda: promoted.model_name in d.find_element(By.TAG_NAME, "body").text, timeout=60)
        close_popups(d)
        time.sleep(0.5)
        body = d.find_element(By.TAG_NAME, "body").text
        assert promoted.model_name in body and promoted.alias in body, body[:2000]
        d.save_screenshot(str(tmp_path / "models.png"))
    finally:
        if d is not None:
            d.quit()
        proc.send_signal(signal.SIGTERM)  # scoretune ui exec'd into mlflow ui: this PID is the server
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def shot(d, path: Path, width: int = 1100) -> None:
    """A small PNG of the page for the README (downscaled, palette)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    raw = path.with_suffix(".raw.png")
    d.save_screenshot(str(raw))
    im = Image.open(raw).convert("RGB")
    im = im.resize((width, round(im.height * width / im.width)), Image.LANCZOS)
    im.convert("P", palette=Image.ADAPTIVE, colors=128).save(path, optimize=True)
    raw.unlink()
