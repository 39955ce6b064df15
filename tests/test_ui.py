"""`pretrain ui RUN` in a real browser: the URL it prints opens the run's metric charts in MLflow's
model-training view (not its GenAI view), with the loss chart; `pretrain train` against that
server prints its run's link at start."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.ray_head import free_port
from tests.run_fixtures import run_pretrain, tiny_run
from tests.test_tracking import stop_group, wait_for_health


def _sets(overrides):
    return [a for o in overrides for a in ("--set", o)]


@pytest.mark.slow
def test_ui_run_opens_the_loss_chart_in_the_model_training_view(corpus, tmp_path):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright missing: run .ci/browser-deps (installs it and Debian's chromium)")
    assert Path("/usr/bin/chromium").exists(), "chromium missing: run .ci/browser-deps"
    trained = run_pretrain(
        "train", "configs/tiny-cpu.yaml", *_sets(tiny_run(corpus, tmp_path, "ui1", 3, tracking=True))
    )
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    run_id = json.loads((tmp_path / "runs" / "ui1" / "run.json").read_text())["mlflow_run_id"]

    port = free_port()
    server = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "ui.log"
    with open(log_path, "w") as log_file:
        ui = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "launch.cli",
                "ui",
                "ui1",
                "--storage-path",
                str(tmp_path / "runs"),
                "--port",
                str(port),
            ],
            cwd=ROOT,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for_health(server, ui, log_path)
        from mlflow.tracking import MlflowClient

        client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
        exp_id = client.get_run(run_id).info.experiment_id
        assert client.get_experiment(exp_id).tags["mlflow.experimentKind"] == "custom_model_development"
        url = re.search(r"run ui1's charts: (\S+)", log_path.read_text()).group(1)
        assert (
            url
            == f"{server}/#/experiments/{exp_id}/runs/{run_id}/model-metrics?workflowType=machine_learning"
        )

        # `pretrain train` with that server as tracking.uri prints its run's link when it starts
        served = tiny_run(corpus, tmp_path, "ui2", 1, f"tracking.uri={server}")
        second = run_pretrain(
            "train", "configs/tiny-cpu.yaml", *_sets([o for o in served if o != "tracking.enabled=false"])
        )
        assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
        run2 = json.loads((tmp_path / "runs" / "ui2" / "run.json").read_text())["mlflow_run_id"]
        link = (
            f"mlflow: {server}/#/experiments/{exp_id}/runs/{run2}/model-metrics?workflowType=machine_learning"
        )
        assert link in second.stdout + second.stderr, second.stdout[-3000:] + second.stderr[-3000:]

        args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
        args += ["--disable-component-update", "--disable-sync", "--no-first-run"]
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=args)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1400})
                page.goto(url, timeout=120_000)
                # the model-training view: its side bar lists runs and models, not GenAI's evaluations
                page.get_by_text("Model metrics").first.wait_for(timeout=120_000)
                page.get_by_text("ui1 (loss)", exact=True).wait_for(
                    timeout=120_000
                )  # the loss chart's legend
                page.screenshot(path="/tmp/pretrain-ui-run.png")  # to look at when it fails
                side = page.locator("aside").inner_text()
                assert "Runs" in side and "Models" in side, side
                assert "Evaluation runs" not in side and "Prompts" not in side, side
            finally:
                browser.close()
    finally:
        stop_group(ui)
