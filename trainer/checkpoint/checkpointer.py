"""The training loop's checkpoint component: when to save, and the restore at start."""

from __future__ import annotations

import logging
from collections.abc import Callable

from trainer.checkpoint.manager import CheckpointManager, CheckpointSaveError
from trainer.checkpoint.resume import resume
from trainer.config import CheckpointConfig, Config

log = logging.getLogger("pretrain")


class Checkpointer:
    """Decides when to save, saves, and restores: the loop's checkpoint component."""

    def __init__(
        self,
        manager: CheckpointManager | None,
        cfg: CheckpointConfig,
        engine,
        *,
        meta: dict,
        tokens_per_step: int,
        data_state: Callable[[int], dict | None],
        before_save: Callable[[], None] | None = None,
        events=None,
    ):
        self.manager, self.cfg, self.engine = manager, cfg, engine
        self.meta = meta  # what every commit record says about the run (fingerprints, layout, ...)
        self.tokens_per_step = tokens_per_step
        self.data_state = data_state  # step -> the data stream's position after that many steps
        self.before_save = before_save
        self.events = events
        self.failures = 0  # saves that failed and were let go (checkpoint.on_error: continue)

    def restore(self, cfg: Config, manifest, stream, layout: dict, tp_rank: int) -> int:
        """resume(): the step to continue from; 0 when manager is None or nothing is committed."""
        if self.manager is None:
            return 0
        return resume(self.manager, self.engine, cfg, manifest, stream, layout, tp_rank)

    def due(self, step: int, *, last: bool = False, forced: bool = False) -> bool:
        """Whether a checkpoint is saved after `step` finished steps."""
        if self.manager is None:
            return False
        periodic = bool(self.cfg.every) and step % self.cfg.every == 0
        return periodic or (last and self.cfg.save_final) or forced

    def maybe_save(self, step: int, *, last: bool = False, forced: bool = False) -> dict[str, float]:
        """`step` = number of finished steps. Saves when manager is set and
        (cfg.every and step % cfg.every == 0) or (last and cfg.save_final) or forced.
        Before saving calls before_save() (the loop flushes its metrics there), then
        manager.save(engine, step, {**meta, "tokens_seen": step * tokens_per_step, "data": data_state(step)}),
        then events.write("checkpoint", step=step, save_s=save_s) when events is given.
        Returns the metrics to log at `step`: {"checkpoint_save_s": ...}, {} when no save was due.

        A failed save (CheckpointSaveError, raised on every rank alike) is written as a
        `checkpoint_failed` event; with cfg.on_error "continue" it is a warning and the metric
        {"checkpoint_failures": count}, and training goes on to the next periodic save, except at
        the last or a forced save (nothing comes after it): then, as with "stop", it is raised."""
        if not self.due(step, last=last, forced=forced):
            return {}
        if self.before_save is not None:
            self.before_save()
        meta = {**self.meta, "tokens_seen": step * self.tokens_per_step, "data": self.data_state(step)}
        try:
            save_s = self.manager.save(self.engine, step, meta)
        except CheckpointSaveError as e:
            let_go = self.cfg.on_error == "continue" and not (last or forced)
            if self.events is not None:
                self.events.write("checkpoint_failed", step=step, error=str(e), on_error=self.cfg.on_error)
            if not let_go:
                raise
            self.failures += 1
            if self.manager.rank == 0:
                log.warning(
                    "%s; training goes on (checkpoint.on_error: continue), the next save is at step %d",
                    e,
                    step + self.cfg.every - step % self.cfg.every,
                )
            return {"checkpoint_failures": float(self.failures)}
        if self.events is not None:
            self.events.write("checkpoint", step=step, save_s=save_s)
        return {"checkpoint_save_s": save_s}
