import os
import subprocess
from pathlib import Path

import pytest

# Before anything imports deepspeed: CPU accelerator, gloo.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> str:
    """A real corpus: a few stdlib modules (`data_fixtures.stdlib_corpus`)."""
    from tests.data_fixtures import stdlib_corpus

    out = tmp_path_factory.mktemp("corpus") / "pystd"
    stdlib_corpus(out)
    return str(out)


@pytest.fixture()
def pretrain_cli():
    """Run the `pretrain` CLI as a user would, in a subprocess."""
    from tests.run_fixtures import run_pretrain

    def run(*args, cwd=None, timeout=600, env=None):
        return run_pretrain(*args, extra_env=env, cwd=cwd, timeout=timeout)

    return run


@pytest.fixture(scope="session")
def undisturbed(corpus, tmp_path_factory) -> dict[int, float]:
    """The losses of the chaos tests' run (`test_chaos.train_args`) saved synchronously and without
    any fault: the reference of every fault test that resumes (one run for the whole session)."""
    from tests.test_chaos import losses, pretrain, train_args

    tmp = tmp_path_factory.mktemp("undisturbed")
    p = pretrain(*train_args(corpus, tmp, "ref"))
    assert p.returncode == 0, p.stderr[-3000:]
    return losses(tmp / "runs" / "ref")


@pytest.fixture()
def small_disk(tmp_path):
    """A 5 MB tmpfs: two committed checkpoints of the tiny model (2 MB each) fit, a third does not.
    Yields (path, remount): remount(size) makes it bigger, as freeing space would."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(disk)], capture_output=True
    ).returncode:
        pytest.skip("mounting a tmpfs needs root")

    def remount(size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(disk)], check=True)

    try:
        yield disk, remount
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
