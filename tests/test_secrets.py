"""Secrets at rest: credentials given in `tracking.uri` reach no file, log, MLflow param, shipped
job file or command line of ours; they come from the environment (MLflow's own variables).

The slow test plants a unique password in `tracking.uri` (in the user's YAML, not on a command
line), trains through a real `mlflow server` behind basic auth, runs `pretrain ui` and `pretrain
submit` against a real `ray start` head, and greps everything it can reach for the password.
"""

from __future__ import annotations

import base64
import dataclasses
import http.client
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import pytest
import yaml

from tests.conftest import ROOT
from tests.ray_head import free_port, ray_head
from tests.run_fixtures import run_pretrain, tiny_config, tiny_run
from tests.test_tracking import MlflowServer, stop_group
from trainer.config import ConfigError, save_config

CREDENTIAL_VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


@pytest.fixture()
def no_mlflow_credentials(monkeypatch):
    """This process's MLflow credential variables unset, and put back as they were afterwards
    (loading a config with credentials in tracking.uri sets them)."""
    for name in CREDENTIAL_VARS:
        monkeypatch.delenv(name, raising=False)


# ---------------------------------------------------------------------------------------- fast


def test_tracking_uri_credentials_move_to_the_environment(no_mlflow_credentials, caplog):
    secret = f"s3cr3t-{uuid.uuid4().hex}"
    host = f"h-{uuid.uuid4().hex[:8]}.example:5000"  # the warning is once per URI and process
    with caplog.at_level(logging.WARNING, logger="pretrain"):
        cfg = tiny_config(tracking={"enabled": True, "uri": f"http://alice:{secret}%40x@{host}/"})
        tiny_config(tracking={"enabled": True, "uri": f"http://alice:{secret}%40x@{host}/"})
    assert cfg.tracking.uri == f"http://{host}/"
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "alice"
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == f"{secret}@x"  # percent-decoded
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "MLFLOW_TRACKING_PASSWORD" in warnings[0], warnings
    assert secret not in warnings[0]


def test_credentials_already_in_the_environment_are_kept(no_mlflow_credentials, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "bob")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "from-env")
    cfg = tiny_config(tracking={"enabled": True, "uri": "https://alice:from-uri@mlflow.example"})
    assert cfg.tracking.uri == "https://mlflow.example"
    assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == (
        "bob",
        "from-env",
    )


def test_credentials_anywhere_else_are_refused(no_mlflow_credentials):
    secret = f"s3cr3t-{uuid.uuid4().hex}"
    for sections, field in (
        ({"tracking": {"uri": f"postgresql://alice:{secret}@db/mlflow"}}, "tracking.uri"),
        ({"tracking": {"uri": f"https://{secret}@mlflow.example"}}, "tracking.uri"),
        ({"data": {"path": f"s3://AKIAFAKE:{secret}@bucket/corpus"}}, "data.path"),
        ({"checkpoint": {"storage": f"s3://AKIAFAKE:{secret}@bucket/ckpt"}}, "checkpoint.storage"),
    ):
        with pytest.raises(ConfigError) as e:
            tiny_config(**sections)
        assert e.value.field == field and secret not in str(e.value), str(e.value)
    assert not any(os.environ.get(n) for n in CREDENTIAL_VARS)
    # A user name alone is no secret; a Config made in code (no from_dict) is refused at the file.
    assert tiny_config(tracking={"uri": "postgresql://alice@db/mlflow"}).tracking.uri.endswith(
        "alice@db/mlflow"
    )
    cfg = tiny_config()
    made = dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, uri=f"http://a:{secret}@h"))
    with pytest.raises(ConfigError, match="tracking.uri"):
        save_config(made, "/nonexistent/config.yaml")


def test_submit_refuses_credentials_in_the_uri(no_mlflow_credentials, tmp_path):
    from cluster.jobs import JobError, load_submitted_config

    secret = f"s3cr3t-{uuid.uuid4().hex}"
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"data": {"path": "/corpus"}, "tracking": {"uri": "http://h:5000"}}))
    with pytest.raises(JobError) as e:
        load_submitted_config(str(path), [f"tracking.uri=http://alice:{secret}@h:5000"])
    assert e.value.field == "tracking.uri" and secret not in str(e.value)
    assert "MLFLOW_TRACKING_PASSWORD" in str(e.value)
    assert not any(os.environ.get(n) for n in CREDENTIAL_VARS)
    assert load_submitted_config(str(path), []).tracking.uri == "http://h:5000"


# ---------------------------------------------------------------------------------------- slow


@pytest.fixture(scope="module")
def head():
    with ray_head() as h:
        yield h


HOP_BY_HOP = {"connection", "keep-alive", "te", "trailers", "transfer-encoding", "upgrade", "content-length"}


class BasicAuthProxy:
    """HTTP basic auth in front of a real `mlflow server` on 127.0.0.1 (MLflow's own basic-auth app
    needs Flask-WTF, which the project does not install): a request without the right
    `Authorization` header gets 401, anything else is forwarded. /health is open, as in MLflow's."""

    def __init__(self, backend_port: int, user: str, password: str):
        expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self.accepted, self.rejected = 0, []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while size := int(self.rfile.readline().split(b";")[0], 16):
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    self.rfile.readline()
                    return b"".join(chunks)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _forward(self) -> None:
                body = self._body()
                if self.path != "/health" and self.headers.get("Authorization") != expected:
                    proxy.rejected.append(f"{self.command} {self.path}")
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="mlflow"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                proxy.accepted += 1
                conn = http.client.HTTPConnection("127.0.0.1", backend_port, timeout=120)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in HOP_BY_HOP:
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class CommandLineWatch(threading.Thread):
    """Samples the command line of every process on the machine until stopped; keeps those that
    hold a needle, and whether it ever saw one holding `marker` (the run's own processes)."""

    def __init__(self, needles: list[str], marker: str):
        super().__init__(daemon=True)
        self.needles, self.marker = needles, marker
        self.hits: dict[int, str] = {}
        self.saw_marker, self.sweeps = 0, 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            for p in psutil.process_iter(["pid", "cmdline"]):
                cmd = " ".join(p.info["cmdline"] or [])
                if any(n in cmd for n in self.needles):
                    self.hits[p.info["pid"]] = cmd[:300]
                if self.marker in cmd:
                    self.saw_marker += 1
            self.sweeps += 1
            self._done.wait(0.1)

    def stop(self) -> None:
        self._done.set()
        self.join(30)


def _leaks_in_files(root: Path, needles: list[bytes], label: str) -> list[str]:
    """`label:relative path` of each regular file under `root` (binary files too) holding a needle."""
    found = []
    for path in sorted(root.rglob("*")):
        try:
            if path.is_symlink() or not path.is_file():
                continue
            data = path.read_bytes()
        except OSError:
            continue
        if any(n in data for n in needles):
            found.append(f"{label}:{path.relative_to(root)}")
    return found


def _sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def _wait_until_ended(jobs, name: str, timeout_s: float = 300.0) -> None:
    """Until the head's job `name` has ended (or there is none)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = [j for j in jobs.list_jobs() if j.submission_id == name]
        if not found or str(found[0].status.value) in ("SUCCEEDED", "FAILED", "STOPPED"):
            return
        time.sleep(2)
    raise AssertionError(f"job {name} did not end in {timeout_s:.0f} s")


def _pretrain(*args, env, timeout=300, **kw):
    return run_pretrain(*args, env=env, timeout=timeout, **kw)


def _ui_until_it_ends(
    args: list[str], env: dict, out: Path, wait_s: float = 20.0
) -> subprocess.CompletedProcess:
    """`pretrain ui ...`, stopped with SIGTERM (as Ctrl-C) if it still serves after `wait_s`."""
    with open(out, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "launch.cli", "ui", *args],
            cwd=ROOT,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGTERM)  # the ui stops its server itself
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                stop_group(proc, signal.SIGKILL)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out.read_text(), "")


@pytest.mark.slow
def test_a_planted_password_reaches_nothing_of_ours(corpus, tmp_path, head, no_mlflow_credentials):
    secret = f"s3cr3t-{uuid.uuid4().hex}"
    needles = [secret, base64.b64encode(f"alice:{secret}".encode()).decode()]  # as given, as a header
    byte_needles = [n.encode() for n in needles]
    backend = MlflowServer(tmp_path / "mlflow-server")
    backend.start()
    proxy = BasicAuthProxy(backend.port, "alice", secret)
    clean_uri = f"http://127.0.0.1:{proxy.port}"
    ray_tmp = tempfile.mkdtemp(prefix="rays", dir="/tmp")  # the embedded run's Ray files, short for sockets
    watch = CommandLineWatch(needles, marker=ray_tmp)
    watch.start()
    leaks: list[str] = []

    def check_output(label: str, text: str) -> None:
        if any(n in text for n in needles):
            leaks.append(f"output of {label}")

    # The user's YAML holds the credentials (a command line of the user's own would show them).
    raw = yaml.safe_load((ROOT / "configs/tiny-cpu.yaml").read_text())
    raw["tracking"] = {"uri": f"http://alice:{secret}@127.0.0.1:{proxy.port}", "experiment": "secrets"}
    user_yaml = tmp_path / "user.yaml"
    user_yaml.write_text(yaml.safe_dump(raw))
    env = {k: v for k, v in os.environ.items() if k not in CREDENTIAL_VARS and k != "RAY_ADDRESS"}
    try:
        # 1. a real run: driver, 2 Ray workers, MLflow through basic auth
        sets = _sets(tiny_run(corpus, tmp_path, "secret-run", 2, "tracking.enabled=true"))
        train = _pretrain("train", str(user_yaml), *sets, env={**env, "RAY_TMPDIR": ray_tmp}, timeout=600)
        assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
        check_output("pretrain train", train.stdout + train.stderr)
        run_dir = tmp_path / "runs" / "secret-run"
        leaks += _leaks_in_files(run_dir, byte_needles, "run dir")
        leaks += _leaks_in_files(Path(ray_tmp), byte_needles, "embedded Ray's files")

        from mlflow.tracking import MlflowClient

        client = MlflowClient(backend.uri)  # the backend itself, without auth
        exp = client.get_experiment_by_name("secrets")
        (run,) = client.search_runs([exp.experiment_id])
        if any(n in json.dumps([run.data.params, run.data.tags]) for n in needles):
            leaks.append("MLflow params/tags")
        artifacts = tmp_path / "artifacts"
        artifacts.mkdir()
        client.download_artifacts(run.info.run_id, "", str(artifacts))
        leaks += _leaks_in_files(artifacts, byte_needles, "MLflow artifacts")
        rejected_during_run = list(proxy.rejected)
        losses = client.get_metric_history(run.info.run_id, "loss")

        # 2. `pretrain ui` of the run; and of a database store with a password in its URI
        ui = _ui_until_it_ends([str(run_dir), "--port", str(free_port())], env, tmp_path / "ui.out")
        check_output("pretrain ui RUN_DIR", ui.stdout)
        db = dict(raw, data={**raw["data"], "path": corpus})
        db["tracking"] = {"uri": f"postgresql://alice:{secret}@127.0.0.1:{free_port()}/mlflow"}
        (tmp_path / "db.yaml").write_text(yaml.safe_dump(db))
        ui_db = _ui_until_it_ends(
            [str(tmp_path / "db.yaml"), "--port", str(free_port())], env, tmp_path / "ui-db.out"
        )
        check_output("pretrain ui (database store)", ui_db.stdout)

        # 3. `pretrain submit` to a real head: with the credentials in the URI, and the way the
        # refusal says (the URI without them, the variables in the submitting shell's environment)
        from ray.job_submission import JobSubmissionClient

        address = head["address"]
        token = Path(head["env"]["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
        jobs = JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"})
        submit_env = {k: v for k, v in head["env"].items() if k not in CREDENTIAL_VARS}
        run_sets = _sets(tiny_run(corpus, tmp_path, "sub-uri", 2, "tracking.enabled=true"))
        sub_uri = _pretrain("submit", str(user_yaml), *run_sets, "--address", address, env=submit_env)
        check_output("pretrain submit (credentials in the URI)", sub_uri.stdout + sub_uri.stderr)
        _wait_until_ended(jobs, "sub-uri")
        run_sets = _sets(
            tiny_run(corpus, tmp_path, "sub-env", 2, "tracking.enabled=true", f"tracking.uri={clean_uri}")
        )
        given = {"MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": secret}
        sub_env = _pretrain(
            "submit", str(user_yaml), *run_sets, "--address", address, env={**submit_env, **given}
        )
        assert sub_env.returncode == 0, sub_env.stdout + sub_env.stderr
        check_output("pretrain submit (credentials in the environment)", sub_env.stdout + sub_env.stderr)
        _wait_until_ended(jobs, "sub-env")
        ours = [j for j in jobs.list_jobs() if j.submission_id in ("sub-uri", "sub-env")]
        for j in ours:
            if any(n in json.dumps(vars(j), default=str) for n in needles):
                leaks.append(f"Ray's job record of {j.submission_id}")
            check_output(f"job {j.submission_id}'s log", jobs.get_job_logs(j.submission_id))
        leaks += _leaks_in_files(Path(head["temp_dir"]), byte_needles, "the head's files")
        leaks += _leaks_in_files(tmp_path / "runs", byte_needles, "runs")
        job_log = jobs.get_job_logs("sub-env")
    finally:
        watch.stop()
        proxy.close()
        backend.kill()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    leaks += [f"command line of pid {pid}: {cmd}" for pid, cmd in sorted(watch.hits.items())]
    assert not leaks, "the planted password leaked to:\n" + "\n".join(leaks)

    # What the user is told, and what works.
    assert watch.saw_marker, "the process sampler never saw the run's Ray processes"
    assert "MLFLOW_TRACKING_PASSWORD" in train.stderr  # the one warning: use the variables
    assert json.loads((run_dir / "run.json").read_text())["tracking_uri"] == clean_uri
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["tracking"]["uri"] == clean_uri
    assert run.data.params["tracking.uri"] == clean_uri
    assert sorted(m.step for m in losses) == [1, 2]  # logged by a worker, so the workers had them
    assert rejected_during_run == [], rejected_during_run[:5]  # every process of the run had them
    assert ui.returncode == 0 and clean_uri in ui.stdout, ui.stdout
    assert ui_db.returncode == 2 and "PGPASSWORD" in ui_db.stdout, ui_db.stdout
    assert sub_uri.returncode == 2 and "MLFLOW_TRACKING_PASSWORD" in sub_uri.stderr, sub_uri.stderr
    assert [j.submission_id for j in ours] == ["sub-env"]  # nothing was submitted with them
    assert "take them from their nodes' environment" in sub_env.stderr
    # This head's nodes were started without them: the job stops at the start, saying what to set.
    assert str(ours[0].status.value) == "FAILED" and "MLFLOW_TRACKING_USERNAME" in job_log, job_log[-2000:]
