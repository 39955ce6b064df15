"""The whole path: `pretrain train` -> local Ray -> 2 Ray Train workers -> DeepSpeed ZeRO-3 (gloo),
on a real prepared corpus, against the same loop run as one plain process."""

import json
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.run_fixtures import tiny_run
from trainer.config import load_config
from trainer.loop import train

pytestmark = pytest.mark.slow

STEPS = 8


def _overrides(corpus, tmp_path):
    return tiny_run(corpus, tmp_path, "e2e", STEPS, "optim.lr=3e-3", tracking=True)


def test_train_on_ray_zero3_matches_single_process(corpus, tmp_path, pretrain_cli):
    overrides = _overrides(corpus, tmp_path)
    proc = pretrain_cli("train", "configs/tiny-cpu.yaml", *[a for o in overrides for a in ("--set", o)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"done: {STEPS} steps" in proc.stdout and "run files:" in proc.stdout

    run_dir = Path(tmp_path) / "runs" / "e2e"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (run_dir / "config.yaml").is_file()
    ray_losses = {int(k): v for k, v in summary["losses"].items()}
    assert sorted(ray_losses) == list(range(1, STEPS + 1))

    # The same data, model and global batch in one plain process (dp=1, accumulation 2).
    cfg = load_config(
        ROOT / "configs/tiny-cpu.yaml", overrides + ["cluster.num_workers=1", "data.prefetch=0"]
    )
    single = train(cfg)
    for step, loss in single.losses.items():
        assert ray_losses[step] == pytest.approx(loss, abs=1e-5), (step, ray_losses, single.losses)
    assert ray_losses[STEPS] < ray_losses[1]

    # The MLflow run holds the same losses, one per step.
    from mlflow.tracking import MlflowClient

    record = json.loads((run_dir / "run.json").read_text())
    assert record["state"] == "succeeded"
    history = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_metric_history(
        record["mlflow_run_id"], "loss"
    )
    assert {m.step: m.value for m in history} == pytest.approx(ray_losses, abs=1e-6)
