"""The training loop's checkpoint component: when to save, and the restore at start."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from trainer import library_internals
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
        self.started: dict[int, float] = {}  # background saves in flight: step -> when they began
        if manager is not None and cfg.async_:
            # A background save copies the host state after its step returned: the next optimizer
            # step, the one thing that changes that state, waits for the copy.
            library_internals.guard_model_step(engine, lambda: manager.wait_copied() or True)

    def restore(self, cfg: Config, manifest, stream, layout: dict, tp_rank: int) -> int:
        """resume(): the step to continue from; 0 when manager is None or nothing is committed."""
        if self.manager is None:
            return 0
        return resume(self.manager, self.engine, cfg, manifest, stream, layout, tp_rank)

    def roll_back(self, cfg: Config, manifest, stream, layout: dict, tp_rank: int) -> int | None:
        """Collective, for a rollback: the newest commit reloaded (a background save in flight is
        committed first: it counts); its step, or None when nothing is committed."""
        if (pending := self.manager.in_flight()) is not None:
            self._guarded(self._commit_background, pending, wait=True, final=False)
        if self.manager.latest() is None:
            return None
        return self.restore(cfg, manifest, stream, layout, tp_rank)

    def due(self, step: int, *, last: bool = False, forced: bool = False) -> bool:
        """Whether a checkpoint is saved after `step` finished steps."""
        if self.manager is None:
            return False
        periodic = bool(self.cfg.every) and step % self.cfg.every == 0
        return periodic or (last and self.cfg.save_final) or forced

    def maybe_save(self, step: int, *, last: bool = False, forced: bool = False) -> dict[str, float]:
        """`step` = number of finished steps. Commits a background save (`checkpoint.async`) once
        every rank has persisted it. Saves when manager is set and (cfg.every and step % cfg.every
        == 0) or (last and cfg.save_final) or forced. Before saving calls before_save() (the loop
        flushes its metrics there), then manager.save(engine, step, {**meta, "tokens_seen": step *
        tokens_per_step, "data": data_state(step)}), then events.write("checkpoint", step=step,
        save_s=save_s) when events is given. With cfg.async_ a periodic save only copies the state
        (`manager.save_async`, the `checkpoint_started` event with stall_s) and the `checkpoint`
        event follows at its commit; the last and forced saves are always finished before this
        returns. Returns the metrics to log at `step`: {"checkpoint_save_s": ...} for a commit
        (the whole save), {"checkpoint_stall_s": ...} when a background save began, {} otherwise.

        A failed save (CheckpointSaveError, raised on every rank alike) is written as a
        `checkpoint_failed` event; with cfg.on_error "continue" it is a warning and the metric
        {"checkpoint_failures": count}, and training goes on to the next periodic save, except at
        the last or a forced save (nothing comes after it): then, as with "stop", it is raised."""
        if self.manager is None:
            return {}
        due = self.due(step, last=last, forced=forced)
        background = due and self.cfg.async_ and not (last or forced)
        # a failed background save is a periodic one: on_error applies even at the last step, whose
        # own save follows
        out = self._guarded(
            self._commit_background, step, wait=due, final=False, next_at=step if due else None
        )
        if not due:
            return out
        if self.before_save is not None:
            self.before_save()
        meta = {**self.meta, "tokens_seen": step * self.tokens_per_step, "data": self.data_state(step)}
        if background:
            return out | self._guarded(self._start_background, step, meta, final=False)
        return out | self._guarded(self._save, step, meta, final=last or forced)

    def close(self) -> dict[str, float]:
        """At the end of training: a background save still in flight is finished and committed, and
        the background writer leaves."""
        if self.manager is None:
            return {}
        try:
            if self.manager.in_flight() is None:
                return {}
            return self._guarded(self._commit_background, self.manager.in_flight(), wait=True, final=True)
        finally:
            self.manager.stop_writer()

    def _save(self, step: int, meta: dict) -> dict[str, float]:
        save_s = self.manager.save(self.engine, step, meta)
        if self.events is not None:
            self.events.write("checkpoint", step=step, save_s=save_s)
        return {"checkpoint_save_s": save_s}

    def _start_background(self, step: int, meta: dict) -> dict[str, float]:
        self.started[step] = time.perf_counter()
        stall_s = self.manager.save_async(self.engine, step, meta)
        if self.events is not None:
            self.events.write("checkpoint_started", step=step, stall_s=stall_s)
        return {"checkpoint_stall_s": stall_s}

    def _commit_background(self, step: int, wait: bool) -> dict[str, float]:
        """At `step`: the background save in flight committed, once every rank has persisted it
        (`wait`: waiting for it here)."""
        pending = self.manager.in_flight()
        if pending is None or self.manager.poll(wait=wait) is None:
            return {}
        save_s = time.perf_counter() - self.started.pop(pending, time.perf_counter())
        if self.events is not None:
            self.events.write("checkpoint", step=pending, save_s=save_s, background=True)
        return {"checkpoint_save_s": save_s}

    def _guarded(
        self, fn, step: int, *args, final: bool, next_at: int | None = None, **kwargs
    ) -> dict[str, float]:
        """fn(step, ...); a CheckpointSaveError handled per cfg.on_error (`final`: the last or a
        forced save, which nothing follows: always raised; `next_at`: the step of the next save,
        when not the next periodic one)."""
        try:
            return fn(step, *args, **kwargs)
        except CheckpointSaveError as e:
            let_go = self.cfg.on_error == "continue" and not final
            if self.events is not None:
                self.events.write("checkpoint_failed", step=e.step, error=str(e), on_error=self.cfg.on_error)
            if not let_go:
                raise
            self.failures += 1
            if self.manager.rank == 0:
                log.warning(
                    "%s; training goes on (checkpoint.on_error: continue), the next save is at step %d",
                    e,
                    next_at if next_at is not None else step + self.cfg.every - step % self.cfg.every,
                )
            return {"checkpoint_failures": float(self.failures)}
