"""MLflow tracking against real stores: a SQLite file, an `mlflow server` over HTTP (also one
that dies mid-run and comes back), secrets kept out of the run, and the UI in a real browser."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import requests

from cluster.tracking import (
    TrackingError,
    config_params,
    create_mlflow_run,
    flatten,
    is_secret_name,
    log_run_artifacts,
    redact,
    reopen_mlflow_run,
)
from tests.conftest import ROOT
from tests.ray_head import free_port
from tests.run_fixtures import tiny_config
from tests.test_loop import affine_stream
from tests.test_startup import run_python
from trainer.loop import train
from trainer.metrics import MlflowLogger, process_memory_gb, start_system_metrics, stop_system_metrics
from trainer.model import flops_per_token
from trainer.session import Session

V = 64
STEPS = 5
EVERY_STEP = ("loss", "lr", "grad_norm", "tokens_per_s", "tokens_seen", "step_time_s")


def wait_for_health(url: str, proc: subprocess.Popen, log_path: Path, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if requests.get(url + "/health", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"server at {url} did not come up in {timeout} s:\n{log_path.read_text()[-3000:]}")


def stop_group(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Stop a process started with start_new_session=True, and its children."""
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


class MlflowServer:
    """`mlflow server` on 127.0.0.1 with its own SQLite store; can be killed and started again."""

    def __init__(self, root: Path):
        self.root, self.port, self.proc = root, free_port(), None
        root.mkdir(parents=True, exist_ok=True)

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        log_path = self.root / "server.log"
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--backend-store-uri", f"sqlite:///{self.root}/server.db", "--workers", "1"]
        cmd += ["--artifacts-destination", str(self.root / "artifacts")]
        with open(log_path, "a") as log_file:
            self.proc = subprocess.Popen(
                cmd, cwd=self.root, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
            )
        wait_for_health(self.uri, self.proc, log_path)

    def kill(self) -> None:
        stop_group(self.proc, signal.SIGKILL)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    srv.start()
    yield srv
    srv.kill()


def _cfg(uri: str, name: str, steps: int = STEPS, **sections):
    return tiny_config(
        model={"vocab_size": V},
        train={"steps": steps, "peak_tflops": 1.0},
        tracking={"enabled": True, "uri": uri},
        cluster={"run_name": name},
        **sections,
    )


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def check_run(cfg, run_id: str, steps: int = STEPS) -> None:
    """Params are the config, every loop metric has each step exactly once, MFU is consistent."""
    client = _client(cfg.tracking.uri)
    run = client.get_run(run_id)
    assert run.data.params == flatten(cfg.to_dict())
    assert run.data.tags["run_name"] == cfg.cluster.run_name
    assert run.data.tags["layout"] == "dp1-tp1-pp1-zero3" and run.data.tags["attempt"] == "1"
    assert "config.yaml" in [a.path for a in client.list_artifacts(run_id)]
    history = {k: client.get_metric_history(run_id, k) for k in run.data.metrics}
    assert set(EVERY_STEP) | {"mfu"} <= set(history)
    for key, points in history.items():
        if key.startswith("system/"):  # sampled on its own clock, not per training step
            continue
        assert sorted(m.step for m in points) == list(range(1, steps + 1)), key
    tps = {m.step: m.value for m in history["tokens_per_s"]}
    fpt = flops_per_token(cfg.model, cfg.data.seq_len)
    for m in history["mfu"]:
        assert m.value == pytest.approx(tps[m.step] * fpt / (cfg.train.peak_tflops * 1e12), rel=1e-6)


# ---------------------------------------------------------------------------------------- fast


def test_secret_names_and_uris():
    for name in (
        "access_key",
        "api_key",
        "secret_access_key",
        "hf_token",
        "db.password",
        "AWSSecretAccessKey",
    ):
        assert is_secret_name(name), name
    for name in ("n_kv_heads", "tokens_per_s", "keep", "tokenizer", "monkey"):
        assert not is_secret_name(name), name
    out = redact({"path": "s3://AKIA:hunter2@bucket/x", "nested": {"api_key": "abc", "n_kv_heads": 2}})
    assert out == {"path": "s3://AKIA:***@bucket/x", "nested": {"api_key": "***", "n_kv_heads": 2}}


def test_short_run_in_sqlite_store(tmp_path):
    cfg = _cfg(f"sqlite:///{tmp_path}/mlflow.db", "sqlite-run")
    run_id = create_mlflow_run(cfg, tmp_path / "run")
    result = train(cfg, Session(mlflow_run_id=run_id), batches=affine_stream(0))
    assert sorted(result.losses) == list(range(1, STEPS + 1))
    check_run(cfg, run_id)
    loss = {m.step: m.value for m in _client(cfg.tracking.uri).get_metric_history(run_id, "loss")}
    assert loss == pytest.approx(result.losses, abs=1e-6)

    # Tokenizer, manifest and quality report of a local corpus; a resumed attempt continues, never
    # repeats a step.
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("tokenizer.json", "manifest.json", "report.json", "report.png"):
        (corpus / name).write_text("{}")
    cfg_data = tiny_config(data={"path": str(corpus)}, tracking={"uri": cfg.tracking.uri})
    assert len(log_run_artifacts(cfg_data, run_id)) == 4
    assert {a.path for a in _client(cfg.tracking.uri).list_artifacts(run_id, "data")} == {
        "data/tokenizer.json",
        "data/manifest.json",
        "data/report.json",
        "data/report.png",
    }
    # A mixture: the other sources' quality reports under data/sources/<name>/.
    web = tmp_path / "web"
    web.mkdir()
    (web / "report.json").write_text("{}")
    mixed = tiny_config(
        data={"path": str(corpus), "sources": [{"path": str(corpus)}, {"path": str(web), "name": "webtext"}]},
        tracking={"uri": cfg.tracking.uri},
    )
    assert log_run_artifacts(mixed, run_id)[-1] == str(web / "report.json")
    assert [a.path for a in _client(cfg.tracking.uri).list_artifacts(run_id, "data/sources/webtext")] == [
        "data/sources/webtext/report.json"
    ]
    _client(cfg.tracking.uri).set_terminated(run_id, "FAILED")
    assert reopen_mlflow_run(cfg, run_id) == 2
    logger = MlflowLogger(cfg.tracking.uri, run_id)
    logger.log({"loss": 99.0}, STEPS)  # already in the run: dropped
    logger.log({"loss": 1.5, "memory_gb": process_memory_gb()}, STEPS + 1)
    logger.close()
    run = _client(cfg.tracking.uri).get_run(run_id)
    assert run.info.status == "RUNNING" and run.data.tags["attempt"] == "2"
    steps = [m.step for m in _client(cfg.tracking.uri).get_metric_history(run_id, "loss")]
    assert sorted(steps) == list(range(1, STEPS + 2))


def test_system_metrics_per_node(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = create_mlflow_run(_cfg(uri, "sys"), tmp_path / "run")
    handle = start_system_metrics(uri, run_id, "node0", interval_s=0.3)
    time.sleep(2.0)
    stop_system_metrics(handle)
    metrics = _client(uri).get_run(run_id).data.metrics
    assert "system/node0/cpu_utilization_percentage" in metrics
    assert "system/node0/system_memory_usage_megabytes" in metrics


def test_server_down_at_start_is_a_clear_error(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(TrackingError, match=r"does not answer.*tracking\.enabled: false") as e:
        create_mlflow_run(_cfg(uri, "down"), tmp_path / "run")
    assert time.monotonic() - t0 < 10
    assert uri in str(e.value)


def test_metrics_and_system_metrics_start_together_in_a_fresh_process(tmp_path):
    """Rank 0 starts its metrics logger and its system-metrics sampler at once, each importing
    MLflow on its own thread: both must reach the run (a concurrent first import of MLflow left one
    thread with a half-imported module and lost every metric of the run)."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = create_mlflow_run(_cfg(uri, "fresh"), tmp_path / "run")
    out = run_python(
        f"""
        import time
        from trainer.metrics import MlflowLogger, start_system_metrics, stop_system_metrics

        sampler = start_system_metrics({uri!r}, {run_id!r}, "node0", interval_s=0.2)
        logger = MlflowLogger({uri!r}, {run_id!r}, flush_every_s=0.1)
        for step in range(1, 4):
            logger.log({{"loss": 1.0 / step}}, step)
        deadline = time.monotonic() + 60
        while sampler.step < 2 and time.monotonic() < deadline:  # two samples taken
            time.sleep(0.1)
        logger.close()
        stop_system_metrics(sampler)
        print("sent", logger.sent)
        """,
        tmp_path,
    )
    assert "sent 3" in out
    client = _client(uri)
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2, 3]
    assert "system/node0/cpu_utilization_percentage" in client.get_run(run_id).data.metrics


def test_logger_never_blocks_or_raises_without_a_server(caplog):
    logger = MlflowLogger(
        f"http://127.0.0.1:{free_port()}", "no-such-run", flush_every_s=0.1, max_buffered=50
    )
    t0 = time.perf_counter()
    for step in range(1, 101):
        logger.log({"loss": 1.0, "lr": 0.1}, step)
    assert time.perf_counter() - t0 < 0.5
    time.sleep(1.0)
    logger.close_timeout_s = 1.0
    with caplog.at_level(logging.WARNING, logger="pretrain"):
        logger.close()
    messages = [r.getMessage() for r in caplog.records]
    assert sum("dropped the 150 oldest" in m for m in messages) == 1, messages
    assert any("50 metrics could not be sent" in m for m in messages), messages


def test_closing_without_a_server_retries_calmly(caplog):
    """While `close()` waits for a store that refuses connections it retries every 0.5 s, not in a
    busy loop (which hammered the store and, past a thousand tries, overflowed the backoff and
    logged an error per try)."""
    logger = MlflowLogger(f"http://127.0.0.1:{free_port()}", "no-such-run", flush_every_s=0.1)
    logger.log({"loss": 1.0}, 1)
    logger.close_timeout_s = 3.0
    with caplog.at_level(logging.WARNING, logger="pretrain"):
        logger.close()
    messages = [r.getMessage() for r in caplog.records]
    assert not any("unexpected error" in m for m in messages), messages[:3]
    assert any("1 metrics could not be sent within 3 s" in m for m in messages), messages
    assert logger._failures <= 10  # one try at close, then one per 0.5 s


# ---------------------------------------------------------------------------------------- slow


@pytest.mark.slow
def test_short_run_over_http(server, tmp_path):
    cfg = _cfg(server.uri, "http-run")
    run_id = create_mlflow_run(cfg, tmp_path / "run")
    train(cfg, Session(mlflow_run_id=run_id), batches=affine_stream(1))
    check_run(cfg, run_id)


@pytest.mark.slow
def test_secrets_never_reach_the_run(server, tmp_path, monkeypatch):
    """Credentials leave tracking.uri when the config loads (tests/test_secrets.py); a Config made in
    code that still holds a password gets it masked in MLflow's params, tags and config.yaml."""
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)  # put back as they were after the load sets them
    password, aws_secret = "s3cretPassw0rd", "wJalrXUtnFEMIK7MDENGbPxRfiCYFAKEKEY"
    cfg = _cfg(server.uri.replace("http://", f"http://alice:{password}@"), "secret-run")
    assert cfg.tracking.uri == server.uri
    cfg = replace(cfg, data=replace(cfg.data, path=f"s3://AKIAFAKE:{aws_secret}@bucket/corpus"))
    run_id = create_mlflow_run(cfg, tmp_path / "run")
    client = _client(server.uri)
    run = client.get_run(run_id)
    assert run.data.params == config_params(cfg)
    assert run.data.params["data.path"] == "s3://AKIAFAKE:***@bucket/corpus"
    assert run.data.params["tracking.uri"] == server.uri
    everything = str(run.data.params) + str(run.data.tags)
    config_yaml = Path(client.download_artifacts(run_id, "config.yaml", str(tmp_path))).read_text()
    for secret in (password, aws_secret):
        assert secret not in everything and secret not in config_yaml


@pytest.mark.slow
def test_server_dies_mid_run_and_comes_back(tmp_path, caplog):
    """Kill the server after step 2, train on, start it again (same port and store) at step 6:
    training never stops, and every metric of every step ends up in the store exactly once."""
    srv = MlflowServer(tmp_path / "server")
    srv.start()
    steps, kill_at, back_at = 8, 3, 6
    cfg = _cfg(srv.uri, "outage", steps=steps)
    accum = cfg.grad_accum(1)

    def batches():
        for i, batch in enumerate(affine_stream(2)):
            if i == (kill_at - 1) * accum:  # the first micro batch of step `kill_at`
                srv.kill()
                time.sleep(2.5)  # the logger's next flush fails
            if i == (back_at - 1) * accum:
                srv.start()
            yield batch

    try:
        run_id = create_mlflow_run(cfg, tmp_path / "run")
        with caplog.at_level(logging.WARNING, logger="pretrain"):
            result = train(cfg, Session(mlflow_run_id=run_id), batches=batches())
        assert sorted(result.losses) == list(range(1, steps + 1))
        warnings = [r.getMessage() for r in caplog.records if "does not answer" in r.getMessage()]
        assert len(warnings) == 1, warnings
        assert any("answers again" in r.getMessage() for r in caplog.records)
        check_run(cfg, run_id, steps)
    finally:
        srv.kill()


@pytest.mark.slow
def test_mlflow_ui_in_a_browser(tmp_path):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright missing: run .ci/browser-deps (installs it and Debian's chromium)")
    assert Path("/usr/bin/chromium").exists(), "chromium missing: run .ci/browser-deps"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = _cfg(uri, "ui-run")
    run_id = create_mlflow_run(cfg, tmp_path / "run")
    logger = MlflowLogger(uri, run_id)
    for step in range(1, 4):
        logger.log({"loss": 4.0 / step}, step)
    logger.close()
    exp_id = _client(uri).get_run(run_id).info.experiment_id

    port = free_port()
    log_path = tmp_path / "ui.log"
    with open(log_path, "w") as log_file:
        ui = subprocess.Popen(
            [sys.executable, "-m", "launch.ui", "--set", f"tracking.uri={uri}", "--port", str(port)],
            cwd=ROOT,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for_health(f"http://127.0.0.1:{port}", ui, log_path)
        assert f"at http://127.0.0.1:{port}" in log_path.read_text()
        args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
        args += ["--disable-component-update", "--disable-sync", "--no-first-run"]
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=args)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 2000})
                page.goto(f"http://127.0.0.1:{port}/#/experiments/{exp_id}/runs/{run_id}", timeout=60_000)
                page.get_by_text("ui-run").first.wait_for(timeout=60_000)
                page.get_by_text("loss", exact=True).first.wait_for(timeout=60_000)
                page.screenshot(path="/tmp/pretrain-mlflow-ui.png")  # to look at when it fails
            finally:
                browser.close()
    finally:
        stop_group(ui)
