"""The `pretrain` CLI as a user meets it: help, and bad input that fails fast and cleanly."""

import pytest

COMMANDS = ["prepare", "train", "config"]


def test_top_level_help(pretrain_cli):
    p = pretrain_cli("--help")
    assert p.returncode == 0
    for c in COMMANDS:
        assert c in p.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_help(pretrain_cli, command):
    p = pretrain_cli(command, "--help")
    assert p.returncode == 0 and "usage: pretrain " + command in p.stdout


def test_missing_config_file_exits_2(pretrain_cli, tmp_path):
    p = pretrain_cli("train", str(tmp_path / "nope.yaml"), cwd=tmp_path)
    assert p.returncode == 2
    assert "nope.yaml does not exist" in p.stderr
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "runs").exists()


def test_unparsable_yaml_exits_2(pretrain_cli, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {d_model: [\n")
    p = pretrain_cli("train", str(bad), cwd=tmp_path)
    assert p.returncode == 2 and "bad.yaml is not valid YAML" in p.stderr


@pytest.mark.parametrize(
    "override, field",
    [
        ("train.steps=lots", "train.steps"),
        ("optim.lr=-0.1", "optim.lr"),
        ("cluster.num_workers=0", "cluster.num_workers"),
        ("model.d_model=100", "model.d_model"),
    ],
)
def test_bad_field_exits_2_and_writes_nothing(pretrain_cli, tmp_path, override, field):
    from tests.conftest import ROOT

    p = pretrain_cli(
        "train",
        str(ROOT / "configs/tiny-cpu.yaml"),
        "--set",
        override,
        "--set",
        f"cluster.storage_path={tmp_path}/runs",
        cwd=tmp_path,
    )
    assert p.returncode == 2, p.stderr
    assert field in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "runs").exists()
    assert not (tmp_path / "mlflow.db").exists()


def test_missing_corpus_names_it_and_writes_nothing(pretrain_cli, tmp_path):
    from tests.conftest import ROOT

    p = pretrain_cli(
        "train",
        str(ROOT / "configs/tiny-cpu.yaml"),
        "--set",
        f"data.path={tmp_path}/nodata",
        "--set",
        f"cluster.storage_path={tmp_path}/runs",
        cwd=tmp_path,
    )
    assert p.returncode == 2
    assert f"{tmp_path}/nodata" in p.stderr and "pretrain prepare" in p.stderr
    assert not (tmp_path / "runs").exists()


def test_seq_len_longer_than_stored_blocks(pretrain_cli, tmp_path, corpus):
    from tests.conftest import ROOT

    p = pretrain_cli(
        "train",
        str(ROOT / "configs/tiny-cpu.yaml"),
        "--set",
        f"data.path={corpus}",
        "--set",
        "data.seq_len=64",
        "--set",
        f"cluster.storage_path={tmp_path}/runs",
        cwd=tmp_path,
    )
    assert p.returncode == 2
    assert "data.seq_len (64)" in p.stderr and "--block-len 65" in p.stderr
    assert not (tmp_path / "runs").exists()


def test_config_prints_resolved_yaml(pretrain_cli):
    p = pretrain_cli("config", "configs/tiny-cpu.yaml", "--set", "train.steps=7")
    assert p.returncode == 0 and "steps: 7" in p.stdout


def test_config_fields_documents_every_field(pretrain_cli):
    p = pretrain_cli("config", "--fields")
    assert p.returncode == 0
    assert "parallel.zero_stage" in p.stdout and "model.n_kv_heads" in p.stdout


def test_a_tracking_store_that_cannot_be_opened_names_tracking_uri(pretrain_cli, tmp_path, corpus):
    """The MLflow run is created while the worker group starts: its failure still ends the command
    with the field to fix, and leaves no run behind."""
    from tests.conftest import ROOT

    (tmp_path / "afile").write_text("not a directory")
    uri = f"sqlite:///{tmp_path}/afile/mlflow.db"
    p = pretrain_cli(
        "train",
        str(ROOT / "configs/tiny-cpu.yaml"),
        *("--set", f"data.path={corpus}", "--set", "data.seq_len=32", "--set", "model.max_seq_len=32"),
        *("--set", f"cluster.storage_path={tmp_path}/runs", "--set", f"tracking.uri={uri}"),
        cwd=tmp_path,
    )
    assert p.returncode == 2, p.stderr
    assert f"tracking.uri {uri}: the MLflow store cannot be opened" in p.stderr
    assert "Traceback" not in p.stderr
    assert list((tmp_path / "runs").iterdir()) == []


def test_a_cluster_address_nothing_answers_at_fails_fast_and_leaves_nothing(pretrain_cli, tmp_path, corpus):
    """`ray.init` would retry for minutes; no MLflow run is left (none is made before Ray is up)."""
    import socket

    from tests.conftest import ROOT

    with socket.socket() as s:  # a port nothing listens at
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = pretrain_cli(
        "train",
        str(ROOT / "configs/tiny-cpu.yaml"),
        *("--set", f"data.path={corpus}", "--set", "data.seq_len=32", "--set", "model.max_seq_len=32"),
        *(
            "--set",
            f"cluster.storage_path={tmp_path}/runs",
            "--set",
            f"tracking.uri=sqlite:///{tmp_path}/m.db",
        ),
        *("--set", f"cluster.address=127.0.0.1:{port}"),
        cwd=tmp_path,
        timeout=120,
    )
    assert p.returncode == 2, p.stderr
    assert f"cluster.address 127.0.0.1:{port}: no Ray cluster answers there" in p.stderr
    assert "Traceback" not in p.stderr
    assert list((tmp_path / "runs").iterdir()) == []
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/m.db")
    exp = client.get_experiment_by_name("pretrain")
    runs = client.search_runs([exp.experiment_id], run_view_type=3) if exp else []  # 3: all
    assert all(r.info.lifecycle_stage == "deleted" for r in runs), runs


def test_every_expected_failure_is_one_error_type():
    """Each layer's expected failures derive from PretrainError (what the CLI reports) and keep
    their other base, so `except ValueError` / `except OSError` still catch them."""
    import pickle

    from cluster.errors import CapacityError, RunError, RunStopped
    from cluster.jobs import JobError
    from cluster.tracking import TrackingError
    from trainer.config import ConfigError
    from trainer.data.manifest import ManifestError
    from trainer.data.prepare import PrepareError
    from trainer.data.storage import StorageError
    from trainer.data.stream import DataError
    from trainer.errors import PretrainError

    bases = {
        ConfigError: ValueError,
        ManifestError: ValueError,
        PrepareError: ValueError,
        DataError: ValueError,
        StorageError: OSError,
        RunError: RuntimeError,
        RunStopped: RunError,
        CapacityError: RunError,
        JobError: RuntimeError,
        TrackingError: RuntimeError,
    }
    for cls, other in bases.items():
        assert issubclass(cls, PretrainError) and issubclass(cls, other), cls
        e = cls("the message", field="a.b", path="/some/file")
        assert (str(e), e.field, e.path, e.exit_code) == ("the message", "a.b", "/some/file", 2)
        # Ray ships a worker's or the controller's error to the driver pickled.
        back = pickle.loads(pickle.dumps(e))
        assert (type(back), str(back), back.field, back.path) == (cls, "the message", "a.b", "/some/file")
    # OSError's own constructor still works for a StorageError.
    e = StorageError(2, "No such file or directory", "shard.tar")
    assert (e.errno, e.filename, e.path) == (2, "shard.tar", "")


def test_an_expected_failure_is_one_message_printed_last_with_its_exit_code(capsys):
    from launch.errors import run_command
    from trainer.errors import PretrainError

    def command(args):
        print("some output first")
        raise PretrainError("parallel.tp=3 does not divide 4 workers", field="parallel.tp", exit_code=3)

    assert run_command(command, None) == 3
    out = capsys.readouterr()
    assert out.out == "some output first\n"
    assert out.err.splitlines()[-1] == "pretrain: error: parallel.tp=3 does not divide 4 workers"

    def bug(args):
        raise KeyError("not an expected failure")

    with pytest.raises(KeyError):  # a bug keeps its traceback
        run_command(bug, None)


def test_config_without_a_file_names_what_to_give(capsys):
    from launch import cli

    assert cli.main(["config"]) == 2
    assert "give a CONFIG file, or --fields" in capsys.readouterr().err


def test_prepare_bad_input_exits_2_naming_it(pretrain_cli, tmp_path):
    p = pretrain_cli("prepare", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    assert p.stderr.splitlines()[-1].startswith("pretrain: error: input ")
    assert "nope.txt does not exist" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "out").exists()
