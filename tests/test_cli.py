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
    """The MLflow run is created while Ray starts: its failure still ends the command with the
    field to fix, and leaves no run behind."""
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
    """`ray.init` would retry for minutes; the MLflow run, created while Ray starts, is deleted."""
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
    assert runs and all(r.info.lifecycle_stage == "deleted" for r in runs)
