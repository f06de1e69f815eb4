"""The MLflow UI as a researcher meets it after a search, checked in a real Chromium (Debian's
``chromium`` + ``chromium-driver``, driven by Selenium; never a downloaded browser).

A tiny quickstart search (3 trials x 2 epochs: one with lr 40 that diverges, and the same point twice,
which ties), promote, ``scoretune ui`` on a free 127.0.0.1 port (stopped by its PID), then every printed
link, each in MLflow's model-training view: the runs table shows the searched params and best-epoch
metrics as columns in the summary's order (the tie broken as the summary breaks it) with the diverged
trial marked; the parent run's description renders its summary table with the tie marked; the compare
link opens the Chart view with the parallel coordinates of every searched param and the objective first,
then the per-epoch curves; the logged models are listed best first with the rank as the first
metric column; a trial's Model metrics tab charts its metrics in MLflow's alphabetical order; the
registered model's page shows its alias. Screenshots go to the test's tmp dir (``SCORETUNE_DOCS_SHOT=1``
also refreshes ``docs/ui_runs_table.png``).
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
        "scheduler.grace_period=2", "top_k=2", "autoattack.n_ex=16", "params.lr.choice=[0.2,0.3,40.0]",
        ("points_to_evaluate=[{beta: 6.0, lr: 0.2, loss: se, clip: 0.0}, {beta: 2.0, lr: 40.0, loss: kl, clip: 0.0}, "
         "{beta: 6.0, lr: 0.2, loss: se, clip: 0.0}]")]
# the first point twice: same seed, same result, a tie; ASHA's one rung is the last epoch, so the order in
# which the trials reach it cannot stop one twin early
PARAMS = ("beta", "lr", "loss", "clip")
CURVES = ["val_pgd_acc", "val_clean_acc", "train_loss", "train_r_madry"]


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


def body_text(d) -> str:
    from selenium.webdriver.common.by import By

    return d.find_element(By.TAG_NAME, "body").text


def in_training_view(d) -> bool:
    """MLflow's sidebar offers the Model registry only in the model-training view (not in GenAI's)."""
    from selenium.webdriver.common.by import By

    return any("Model registry" in n.text for n in d.find_elements(By.TAG_NAME, "nav"))


def rows_in_order(d, pattern: str) -> list[str]:
    """The first match of ``pattern`` in each grid row (ag-grid), in the order the rows are shown."""
    rows = d.execute_script("return Array.from(document.querySelectorAll('[role=row][row-index]'))"
                            ".map(r => [Number(r.getAttribute('row-index')), r.textContent])")
    found = {}
    for i, text in rows:
        m = re.search(pattern, text)
        if m:
            found.setdefault(i, m.group(1))
    return [found[i] for i in sorted(found)]


@pytest.fixture
def searched(ray_local, tmp_path, monkeypatch):
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
    from scoretune.search.report import format_table, tied
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
    for m in models.values():  # rank (MLflow links it), the objective, clean accuracy, AutoAttack: no epoch row
        keys = [x.key for x in m.metrics]
        assert keys == ["rank", "model_val_pgd_acc", "model_val_clean_acc", "aa_acc", "aa_acc_se"], keys
    ties = tied(summary.trials, "val_pgd_acc")  # the point run twice
    table = format_table(summary, list(PARAMS))
    assert len(ties) == 2 and all(f"{tid}=" in table for tid in ties), (ties, table)
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
        while not any("summary (parent run):" in ln for ln in lines) or not any("registered model" in ln for ln in lines):
            lines.append(proc.stdout.readline())
        parent_link = next(ln.split()[-1] for ln in lines if "summary (parent run):" in ln)
        compare_link = next((ln.split()[-1] for ln in lines if "compare the top" in ln), None)
        logged_link = next(ln.split()[-1] for ln in lines if "logged models:" in ln)
        models_link = next(ln.split()[-1] for ln in lines if "registered model:" in ln)  # the promoted model's page
        printed = [ln.split()[-1] for ln in lines if "http://" in ln and "MLflow UI for" not in ln]
        assert len(printed) == 5, lines
        wait_for(lambda: socket.create_connection(("127.0.0.1", port), timeout=1).close() or True, timeout=120)

        d = browser()
        # -- the runs table: model-training view, sorted by the best objective, params + metrics as columns
        d.get(link)
        wait_for(lambda: best.trial_id in body_text(d), timeout=90)
        close_popups(d)
        time.sleep(1.0)
        d.save_screenshot(str(tmp_path / "runs_table.png"))
        headers = {h.text.strip() for h in d.find_elements(By.CSS_SELECTOR, "[role='columnheader']") if h.text.strip()}
        for col in ("beta", "lr", "loss", "clip", "best_val_pgd_acc", "best_epoch", "epochs_run", "aa_acc"):
            assert any(h.startswith(col) for h in headers), (col, sorted(headers))
        assert in_training_view(d)
        names = [a.text for a in d.find_elements(By.CSS_SELECTOR, "a[href*='/runs/']") if a.text.startswith("[")]
        assert len(names) == len(summary.trials), names
        assert best.trial_id in names[0] and names[0].startswith("["), names
        assert any(n.startswith(f"[diverged] {diverged[0].trial_id}") for n in names), names
        # the summary's order, the tie included (MLflow sorts by the logged rank)
        assert rows_in_order(d, r"\[[^\]]*\] (\w+) ") == [t.trial_id for t in summary.trials]
        if os.environ.get("SCORETUNE_DOCS_SHOT"):
            d.set_window_size(1500, 560)
            time.sleep(2.0)
            shot(d, ROOT / "docs" / "ui_runs_table.png")
            d.set_window_size(2200, 1000)

        # -- the parent run: its markdown description renders the summary table
        d.get(parent_link)
        wait_for(lambda: "Search uitest" in body_text(d), timeout=60)
        close_popups(d)
        tables = wait_for(lambda: [t for t in d.find_elements(By.TAG_NAME, "table")
                                   if "best_ep" in t.get_attribute("textContent")], timeout=30)
        text = tables[0].get_attribute("textContent")
        assert best.trial_id in text and "aa_acc" in text and "diverged" in text
        assert all(f"{tid}=" in text for tid in ties), text  # the tie, marked on the linked ids
        assert in_training_view(d)
        d.save_screenshot(str(tmp_path / "parent_run.png"))

        # -- compare: the Chart view of the top-k, parallel coordinates of every param and the objective first
        assert compare_link is not None
        d.get(compare_link)
        chart_area = "[data-testid='experiment-view-compare-runs-chart-area']"
        area = wait_for(lambda: d.find_element(By.CSS_SELECTOR, chart_area), timeout=60)
        wait_for(lambda: "Parallel Coordinates" in area.text and "train_r_madry" in area.text, timeout=60)
        close_popups(d)
        titles = [ln for ln in area.text.splitlines() if ln in ["Parallel Coordinates", *CURVES, "epoch"]]
        assert titles[:5] == ["Parallel Coordinates", *CURVES], titles
        axes = set(d.execute_script("return Array.from(document.querySelectorAll('svg text')).map(t => t.textContent)"))
        assert {*PARAMS, "best_val_pgd_acc"} <= axes, sorted(axes)
        assert in_training_view(d)
        d.save_screenshot(str(tmp_path / "compare.png"))

        # -- the logged models: best first (the newest), the objective the first metric column
        d.get(logged_link)
        wait_for(lambda: len(rows_in_order(d, r"trial-(\w+)")) == len(models), timeout=60)
        close_popups(d)
        assert rows_in_order(d, r"trial-(\w+)") == [t.trial_id for t in summary.trials if t.model_uri]
        headers = [h.text.strip() for h in d.find_elements(By.CSS_SELECTOR, "[role='columnheader']") if h.text.strip()]
        assert headers[headers.index("Dataset") + 1] == "rank", headers
        assert in_training_view(d)
        d.save_screenshot(str(tmp_path / "logged_models.png"))

        # -- a trial's Model metrics tab: one chart per metric, in MLflow's alphabetical order (README)
        run = cl.get_run(best.run_id)
        d.get(f"{link.split('#')[0]}#/experiments/{summary.experiment_id}/runs/{best.run_id}/model-metrics"
              "?workflowType=machine_learning")
        count = wait_for(lambda: re.search(r"Model metrics\s*\((\d+)\)", body_text(d)), timeout=60)
        assert int(count.group(1)) == len(run.data.metrics), count.group(0)
        shown = wait_for(lambda: [ln for ln in body_text(d).splitlines() if ln in run.data.metrics], timeout=30)
        assert shown == sorted(run.data.metrics)[:len(shown)], shown  # the charts on screen: the first names
        assert in_training_view(d)

        # -- the registered model's page: its versions and the alias, no pop-up, the training view kept
        d.get(models_link)
        wait_for(lambda: promoted.alias in body_text(d), timeout=60)
        body = body_text(d)
        assert promoted.model_name in body and "new Model Registry UI" not in body, body[:2000]
        assert in_training_view(d)
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
