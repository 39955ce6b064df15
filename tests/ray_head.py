"""A `ray start` head of a test's own (token auth on, every socket on 127.0.0.1, its job agent on
a free port) and its processes, never another cluster's on the machine. A plain module: tests
import it; it sets nothing at import."""

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

VENV_BIN = str(Path(sys.executable).parent)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def own_ray_pids(temp_dir: str) -> list[int]:
    """Processes of the cluster whose temp dir is `temp_dir` (never another engineer's cluster)."""
    pids = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(temp_dir in a for a in p.info["cmdline"] or []):
                pids.append(p.info["pid"])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return pids


@contextlib.contextmanager
def ray_head():
    """{address (the job API), env (for the job commands), temp_dir} of a new head; stopped after.
    The job agent gets a free port: where another head holds Ray's default agent port (52365), a
    head starts without a job agent and refuses every submission."""
    temp_dir = tempfile.mkdtemp(prefix="rayj", dir="/tmp")
    token_file = Path(temp_dir) / "token"
    token_file.write_text(secrets.token_hex(32))
    env = {
        **os.environ,
        "PATH": VENV_BIN + os.pathsep + os.environ["PATH"],
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_file),
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # a one-machine head: every socket on 127.0.0.1
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    }
    env.pop("RAY_ADDRESS", None)
    dash = free_port()
    ports = [
        f"--port={free_port()}",
        f"--dashboard-port={dash}",
        f"--dashboard-agent-listen-port={free_port()}",
    ]
    cmd = [os.path.join(VENV_BIN, "ray"), "start", "--head", *ports, "--node-ip-address=127.0.0.1"]
    cmd += ["--dashboard-host=127.0.0.1", "--num-cpus=2", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    try:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        yield {"address": f"http://127.0.0.1:{dash}", "env": env, "temp_dir": temp_dir}
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in own_ray_pids(temp_dir):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            time.sleep(2)
        shutil.rmtree(temp_dir, ignore_errors=True)
