"""Start-up cost guards: what each process of a run imports (benchmarks/startup.py has the times).

On a laptop's few cores every import is paid in series with the rest of the start-up, so these
check the outcome that matters, in a fresh interpreter: which heavy modules a process ends up
holding."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.conftest import ROOT


def run_python(code: str, tmp_path) -> str:
    p = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "DS_ACCELERATOR": "cpu"},
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


def test_the_driver_never_imports_torch(corpus, tmp_path):
    """The driver parses, checks the corpus and builds the Ray Train trainer and backend without
    torch (1.5 s); so does Ray Train's controller, which holds only the backend config."""
    out = run_python(
        f"""
        import sys
        from launch import cli
        from cluster import driver
        from cluster.backend import TorchEnvConfig
        from cluster.library_internals import ClusterSizedScalingPolicy
        from trainer.config import load_config
        cfg = driver.absolutize(load_config("configs/tiny-cpu.yaml", ["data.path={corpus}", "data.seq_len=32", "model.max_seq_len=32"]))
        driver.check_corpus(cfg)
        driver.trainer_class()
        TorchEnvConfig().backend_cls
        print(sorted(m for m in ("torch", "deepspeed", "mlflow") if m in sys.modules))
        """,
        tmp_path,
    )
    assert out.strip() == "[]"


def test_deepspeed_starts_without_mlflow_or_inductor(tmp_path):
    """A rank's DeepSpeed engine (ZeRO-3, as the quick start) comes up without importing MLflow (its
    autotuner's, 1.3 s) or inductor (torch.compile of DeepSpeed's Muon kernels, 1.5 s), and without
    starting any program (DeepSpeed's op probe compiles and links C with gcc); MLflow still imports
    normally afterwards, for the rank that logs."""
    out = run_python(
        """
        import sys
        started = []
        sys.addaudithook(lambda event, args: event in ("subprocess.Popen", "os.system", "os.posix_spawn",
                                                       "os.exec") and started.append(str(args[:2])))
        import torch
        from trainer.config import from_dict
        from trainer.engine import initialize
        from trainer.model import Transformer
        from trainer.session import Session

        cfg = from_dict({"model": {"vocab_size": 64, "d_model": 32, "n_layers": 1, "n_heads": 2,
                                   "max_seq_len": 16},
                         "data": {"seq_len": 16},
                         "parallel": {"zero_stage": 3, "micro_batch_size": 2, "global_batch_size": 2},
                         "train": {"precision": "fp32"}, "cluster": {"num_workers": 1}})
        Session().ensure_process_group("gloo")
        engine, _ = initialize(cfg, Transformer(cfg.model), 1, torch.device("cpu"))
        x = torch.randint(0, 64, (2, 16))
        engine.backward(engine(x).float().mean())
        engine.step()
        print(sorted(m for m in ("mlflow", "torch._inductor.compile_fx") if m in sys.modules))
        print(started)
        import mlflow
        print(mlflow.__name__)
        """,
        tmp_path,
    )
    assert out.split("\n")[:3] == ["[]", "[]", "mlflow"]


def test_a_module_imported_with_compile_deferred_compiles_on_first_call(tmp_path, monkeypatch):
    from trainer.library_internals import import_deferring_compile

    (tmp_path / "kernels_for_test.py").write_text(
        "import torch\n\n@torch.compile(backend='eager')\ndef double(x):\n    return x * 2\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    real = torch.compile
    import_deferring_compile("kernels_for_test")
    assert torch.compile is real
    import kernels_for_test

    assert torch.equal(kernels_for_test.double(torch.arange(3)), torch.tensor([0, 2, 4]))
    assert kernels_for_test.double.__name__ == "double"


def test_a_run_that_compiles_nothing_never_imports_dynamo(corpus, tmp_path):
    """A rank with `train.compile` off trains ZeRO-3, evaluates, checkpoints and resumes without
    importing `torch._dynamo` (1.5-2.5 s per rank): torch's and DeepSpeed's "never compile this"
    markers no longer import it (trainer/library_internals.py), nor does the optimizer's step."""
    (tmp_path / "run").mkdir()
    out = run_python(
        f"""
        import sys
        from tests.run_fixtures import tiny_config
        from trainer.loop import train
        from trainer.session import Session

        def cfg(steps):
            return tiny_config(data={{"path": {corpus!r}}}, checkpoint={{"every": 2}},
                               train={{"steps": steps, "eval_batches": 1}})
        first = train(cfg(2), Session(run_dir={str(tmp_path / "run")!r}))
        second = train(cfg(4), Session(run_dir={str(tmp_path / "run")!r}))  # resumes from step 2
        print(first.steps, second.steps, sorted(second.val_losses), "torch._dynamo" in sys.modules)
        """,
        tmp_path,
    )
    assert out.split("\n")[-2] == "2 4 [4] False"


def test_deferred_markers_still_keep_compile_out_once_dynamo_is_imported(tmp_path):
    """After `library_internals.defer_dynamo()`, a function marked with `torch.compiler.disable` or torch's own
    `_disable_dynamo` runs plainly while dynamo is not imported; once something imports it and
    compiles a caller, the marked function is still left out of the graph (only the caller's own
    `+ 1` is compiled), whether or not it ran before."""
    out = run_python(
        """
        import sys
        import torch
        from trainer import library_internals

        print(library_internals.defer_dynamo() > 100)  # torch's own markers (optimizers, ...) seeded
        marked = [torch.compiler.disable(lambda x: x.sin().cos().exp()),
                  torch._disable_dynamo(lambda x: x.sin().cos().exp()),
                  torch.compiler.disable(lambda x: x.sin().cos().exp())]
        x = torch.randn(8)
        marked[0](x), marked[1](x)  # the third first runs under compile
        print("torch._dynamo" in sys.modules)

        import torch._dynamo
        from torch._dynamo.testing import CompileCounter

        for f in marked:
            counter = CompileCounter()
            caller = torch.compile(lambda x: f(x) + 1, backend=counter)
            assert torch.allclose(caller(x), x.sin().cos().exp() + 1)
            print(counter.op_count, end=" ")
        """,
        tmp_path,
    )
    assert out.split("\n")[:2] == ["True", "False"]
    assert out.split("\n")[2].split() == ["1", "1", "1"]


def test_the_program_leaves_its_heap_to_the_os_at_exit(tmp_path):
    """`pretrain` (and `python -m launch.cli`) freeze the GC once the command is done: the
    interpreter's shutdown collections would otherwise walk every module a run imported (2 s of
    CPU after a training run's last line). atexit handlers still run, and the exit code stays."""
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["pretrain"] == "launch.cli:run"
    out = run_python(
        """
        import atexit, gc, runpy, sys
        atexit.register(lambda: print("frozen at exit:", gc.get_freeze_count() > 0))
        sys.argv = ["pretrain", "config", "configs/tiny-cpu.yaml", "--set", "train.steps=7"]
        try:
            runpy.run_module("launch.cli", run_name="__main__")
        except SystemExit as e:
            print("exit code:", e.code)
            raise
        """,
        tmp_path,
    )
    assert "steps: 7" in out  # the command itself ran
    assert "exit code: 0" in out
    assert "frozen at exit: True" in out


def test_ray_train_polls_its_workers_every_half_second(monkeypatch):
    """A dead worker is seen (and a finished group ended) within Ray Train's poll interval: the
    driver sets Ray Train's own switch, under the name Ray Train reads and passes to its controller."""
    from ray.train.v2._internal.constants import ENV_VARS_TO_PROPAGATE, HEALTH_CHECK_INTERVAL_S_ENV_VAR

    from cluster import driver

    monkeypatch.delenv(HEALTH_CHECK_INTERVAL_S_ENV_VAR, raising=False)
    driver.ray_train_environment()
    assert HEALTH_CHECK_INTERVAL_S_ENV_VAR in ENV_VARS_TO_PROPAGATE
    assert float(os.environ[HEALTH_CHECK_INTERVAL_S_ENV_VAR]) == 0.5
    monkeypatch.setenv(HEALTH_CHECK_INTERVAL_S_ENV_VAR, "3")  # a person's own setting stands
    driver.ray_train_environment()
    assert os.environ[HEALTH_CHECK_INTERVAL_S_ENV_VAR] == "3"


def _late_mlflow_run(pretrain_cli, corpus, tmp_path, outcome: str):
    """The tiny run, its MLflow run created only after the driver has asked for the worker group."""
    from tests.run_fixtures import hooked_env, tiny_run

    sets = tiny_run(corpus, tmp_path, "late", 3, tracking=True)
    p = pretrain_cli(
        "train",
        str(ROOT / "configs/tiny-cpu.yaml"),
        *[a for s in sets for a in ("--set", s)],
        cwd=tmp_path,
        env=hooked_env(PRETRAIN_TEST_MLFLOW_AFTER_WORKERS=outcome),
    )
    return p, tmp_path / "runs" / "late"


@pytest.mark.slow
def test_workers_start_while_the_mlflow_run_is_created(pretrain_cli, corpus, tmp_path):
    """The driver asks for the worker group without waiting for the MLflow run (MLflow's import and
    store take seconds); the ranks find the run's id in run.json and log into that run."""
    from mlflow.tracking import MlflowClient

    p, run_dir = _late_mlflow_run(pretrain_cli, corpus, tmp_path, "ok")
    assert p.returncode == 0, p.stderr[-3000:]
    run_id = json.loads((run_dir / "run.json").read_text())["mlflow_run_id"]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2, 3]
    assert client.get_run(run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_an_mlflow_run_that_fails_after_the_workers_started_leaves_no_run(pretrain_cli, corpus, tmp_path):
    """Its error is the command's one message (exit 2), as when it fails before any worker starts; the ranks
    stop before training and no run directory is left."""
    p, run_dir = _late_mlflow_run(pretrain_cli, corpus, tmp_path, "fail")
    assert p.returncode == 2, p.stderr[-3000:]
    assert p.stderr.strip().splitlines()[-1] == (
        f"pretrain: error: tracking.uri sqlite:///{tmp_path}/mlflow.db: injected failure"
    )
    assert "Traceback" not in p.stderr
    assert not run_dir.exists()


_RANK = """
import json, os, sys, time
import torch, torch.distributed as dist
from trainer.session import Session
os.environ.update(json.loads(sys.argv[1]))
time.sleep(float(sys.argv[2]))
try:
    Session().ensure_process_group("gloo", timeout_s=float(sys.argv[3]))
except dist.DistStoreError as e:
    print("ERROR", e, flush=True)
    sys.exit(3)
t = torch.ones(1)
dist.all_reduce(t)
print("SUM", t.item(), flush=True)
dist.destroy_process_group()
"""


def _rank_env(rank: int, port: int) -> str:
    from cluster.backend import loopback_interface

    return json.dumps(
        {
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "PRETRAIN_STORE_BIND": "127.0.0.1",
            "GLOO_SOCKET_IFNAME": loopback_interface(),
        }
    )


def test_a_rank_that_comes_before_rank_0s_store_joins_it_and_names_it_when_it_never_comes():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Rank 1 first, rank 0 a second later: rank 1 waits for the store, then both meet.
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", _RANK, _rank_env(rank, port), delay, "60"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank, delay in ((1, "0"), (0, "1"))
    ]
    outs = [r.communicate(timeout=120)[0] for r in ranks]
    assert [r.returncode for r in ranks] == [0, 0], outs
    assert all("SUM 2.0" in out for out in outs), outs
    # Rank 0 never comes: rank 1 says which store it waited for, after its timeout.
    alone = subprocess.run(
        [sys.executable, "-c", _RANK, _rank_env(1, port), "0", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert alone.returncode == 3, alone.stdout + alone.stderr
    assert (
        f"rank 0's rendezvous store at 127.0.0.1:{port} (MASTER_ADDR:MASTER_PORT) accepted no connection within 2 s"
        in alone.stdout
    )


def test_the_embedded_cluster_retries_local_connects_every_tenth_of_a_second(tmp_path):
    # Ray's default retries a refused local connect (the raylet's to its object store, which often
    # comes first) only after 1 s; an unknown key would stop Ray's start altogether.
    out = run_python(
        """
        import ray._raylet
        from cluster.driver import start_ray
        from trainer.config import from_dict, load_yaml

        start_ray(from_dict(load_yaml("configs/tiny-cpu.yaml")))
        config = ray._raylet.Config
        print(config.raylet_client_connect_timeout_milliseconds(), config.raylet_client_num_connect_attempts())
        """,
        tmp_path,
    )
    assert out.split()[-2:] == ["100", "100"], out


def test_ray_starts_alone_before_ray_train_and_mlflow_are_imported(corpus, tmp_path):
    # Imports beside Ray's start slow its agents; the raylet then registers after the driver's first
    # look, which Ray repeats only a second later.
    from tests.run_fixtures import tiny_run

    sets = tiny_run(corpus, tmp_path, "alone", 1, tracking=True)
    out = run_python(
        f"""
        import sys
        import cluster.driver as driver
        from trainer.config import load_config

        real = driver.start_ray

        def start_ray(cfg):
            real(cfg)
            print("after:", sorted(m for m in ("ray.train", "mlflow") if m in sys.modules), flush=True)
            raise RuntimeError("stop here")

        driver.start_ray = start_ray
        cfg = load_config("configs/tiny-cpu.yaml", {sets!r})
        try:
            driver.run_training(cfg)
        except RuntimeError as e:
            print("stopped:", e)
        """,
        tmp_path,
    )
    assert "after: []" in out, out
    assert "stopped: stop here" in out, out
