"""Resume: the newest verified commit, checked against this run's config and corpus, then loaded
into the engine as DeepSpeed wrote it (same layout) or through its layout-free form (`reshard.py`)."""

from __future__ import annotations

import logging

from trainer.checkpoint import reshard
from trainer.checkpoint.manager import CheckpointError, CheckpointManager, Committed
from trainer.config import Config
from trainer.data.manifest import Manifest

log = logging.getLogger("pretrain")

# Config sections whose change would make a resumed run a different run.
RESUME_INVARIANT = ("model",)


def resume(
    ckpt: CheckpointManager,
    engine,
    cfg: Config,
    manifest: Manifest | None,
    stream=None,
    layout: dict | None = None,
    tp_rank: int = 0,
) -> int:
    """Collective: load the newest committed checkpoint that checks out; the step to continue from
    (0 = none)."""
    found = ckpt.latest()
    if found is None:
        return 0
    rec = found.record
    if rec.get("config_fingerprint") != cfg.fingerprint(RESUME_INVARIANT):
        raise CheckpointError(
            f"{found.path}: the model section of the config differs from the one this "
            "checkpoint was trained with; resume with the run's own config.yaml"
        )
    force = cfg.checkpoint.ignore_data_mismatch
    if (
        not force
        and manifest is not None
        and rec.get("manifest_fingerprint") not in ("", manifest.fingerprint)
    ):
        raise CheckpointError(
            f"{found.path}: the corpus at {cfg.data.path} (manifest {manifest.fingerprint}) is "
            f"not the one this run was trained on ({rec.get('manifest_fingerprint')}); set "
            "checkpoint.ignore_data_mismatch: true to resume on it anyway"
        )
    if stream is not None and rec.get("data"):
        try:
            stream.check_resume(rec["data"], force=force)  # same corpus, seed, streams, global batch
        except ValueError as e:
            raise CheckpointError(f"{found.path}: {e}") from None
    theirs = rec.get("layout") or {}
    if layout is None or reshard.layout_key(theirs) == reshard.layout_key(layout):
        ckpt.load(engine, found)
    else:
        _load_other_layout(ckpt, engine, cfg, found, theirs, layout, tp_rank)
    if ckpt.rank == 0:
        log.info("resumed from committed checkpoint step %d (%s)", found.step, found.path)
    return found.step


def _load_other_layout(
    ckpt: CheckpointManager, engine, cfg: Config, found: Committed, theirs: dict, mine: dict, tp_rank: int
) -> None:
    """Collective: convert the checkpoint to its layout-free form, then every rank loads its share.
    The first of the ranks that share a copy of the step converts it (rank 0; where every node
    holds its own copy, the first rank of each node). A failed conversion fails every rank alike."""
    if ckpt.rank == 0:
        log.info(
            "checkpoint step %d was written by %s; converting it for %s",
            found.step,
            reshard.describe(theirs),
            reshard.describe(mine),
        )
    converter = ckpt.copy_peers()[0] == ckpt.rank
    ckpt.on_all_ranks(lambda: reshard.convert(found, cfg.model) if converter else None)
    adam_step = reshard.load(
        engine, found.path / reshard.DIR, cfg.model, cfg.parallel.tp, tp_rank, cfg.parallel.pp
    )
    engine.global_steps = found.step
    engine.global_samples = found.step * cfg.parallel.global_batch_size
    if ckpt.rank == 0:
        log.info("resumed on a new layout: Adam step %d, weights and moments from %s", adam_step, found.path)
