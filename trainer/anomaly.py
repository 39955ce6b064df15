"""Non-finite steps and loss spikes: detected before the optimizer step, skipped, rolled back.

Before every optimizer step (at the accumulation boundary, gradients reduced) every rank adds to one
all-reduce over the whole world: whether its loss or its gradients are non-finite, and its loss.
All ranks then agree whether the step is applied:

* a non-finite loss or global gradient norm: the step is left out on every rank (no weight, optimizer
  or step-count change; the step number does not advance, so neither does the LR) and its global
  samples join the skip list; after `train.nonfinite_tolerance` in a row the group rolls back;
* a spike (`train.spike.k` > 0): a loss above the running mean by k running standard deviations over
  the last `train.spike.window` steps; the step is left out, its samples skipped, and the group rolls
  back.

A rollback reloads the newest commit into the running engines (the resume path of
trainer/checkpoint/; nothing is committed after a left-out step, so it precedes the anomaly) and
the stream goes on from there without the skipped samples. The skip list is part of the data state
(every commit's), and `<run>/skipped_samples.json` keeps it between an anomaly and the next commit.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import deque
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from trainer import library_internals
from trainer.config import TrainConfig
from trainer.data.stream import SkipList
from trainer.errors import PretrainError
from trainer.fsutil import write_json_atomic

log = logging.getLogger("pretrain")

SKIP_FILE = "skipped_samples.json"


class DivergedError(PretrainError, RuntimeError):
    """Rollbacks did not get past the anomalies: the run stops instead of skipping data forever."""

    restartable = False


def load_skips(run_dir: str, skip: SkipList) -> None:
    """Collective: add the ranges of `<run_dir>/skipped_samples.json` (read by rank 0) to `skip`."""
    got: list = [None]
    path = os.path.join(run_dir, SKIP_FILE) if run_dir else ""
    if dist.get_rank() == 0 and path and os.path.exists(path):
        try:  # written atomically by us: unreadable only if edited by hand
            got[0] = json.loads(Path(path).read_text())["skipped_samples"]
        except (ValueError, KeyError) as e:
            got[0] = e
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(got, src=0)
    if isinstance(got[0], Exception):
        raise PretrainError(f"{path} is not a skip list ({got[0]!r}); restore or delete it", path=path)
    for a, b in got[0] or ():
        skip.add(a, b, where=SKIP_FILE)


class AnomalyGuard:
    """The loop's anomaly component: the agreed check before each optimizer step (installed on the
    engine) and what follows a failed one (`settle`)."""

    def __init__(
        self,
        cfg: TrainConfig,
        engine,
        device: torch.device,
        skip: SkipList,
        *,
        events,
        run_dir: str,
        rank: int,
        pipeline: bool,
    ):
        self.cfg, self.engine, self.device, self.skip = cfg, engine, device, skip
        self.events, self.run_dir, self.rank, self.pipeline = events, run_dir, rank, pipeline
        self.losses: list[torch.Tensor] = []  # this step's loss terms, set by train_step (not under PP)
        self.verdict = ""  # "ok", "nonfinite" or "spike": the last check's, agreed by every rank
        self.loss = math.nan  # the last checked step's mean loss over the DP ranks
        self.history: deque[tuple[int, float]] = deque(maxlen=cfg.spike.window)  # (step, loss) applied
        self.nonfinite_steps = self.streak = self.rollbacks = 0
        self.lr_scaled_until = 0  # steps before this one train at rollback_lr_scale x the LR
        library_internals.guard_model_step(engine, self.check)

    # ------------------------------------------------------------------ the check
    def check(self) -> bool:
        """Collective over the world, before the optimizer step: whether to apply it."""
        one = torch.ones((), device=self.device)
        if self.pipeline:  # the last stage holds the sum of its micro batches' losses
            held = self.engine.total_loss if self.engine.is_last_stage() else None
            loss = (
                held.detach().float() / self.engine.gradient_accumulation_steps()
                if held is not None
                else None
            )
        else:
            loss = torch.stack(self.losses).sum() if self.losses else None
        grads = library_internals.local_gradients(self.engine)
        norm = torch.nn.utils.get_total_norm(grads).to(self.device) if grads else torch.zeros_like(one)
        have = one if loss is not None else torch.zeros_like(one)
        loss = loss if loss is not None else torch.zeros_like(one)
        bad = ~(torch.isfinite(loss) & torch.isfinite(norm))
        flags = torch.stack([bad.float(), torch.where(bad, torch.zeros_like(one), loss), have])
        dist.all_reduce(flags)  # the world: every stage, TP and DP rank agrees
        n_bad, total, n = flags.tolist()
        self.loss = total / n if n and not n_bad else math.nan
        self.verdict = "nonfinite" if n_bad else "spike" if self._spike(self.loss) else "ok"
        return self.verdict == "ok"

    def _spike(self, loss: float) -> bool:
        k, window = self.cfg.spike.k, self.cfg.spike.window
        if not k or len(self.history) < window:
            return False
        values = [v for _, v in self.history]
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
        return loss > mean + k * std

    def lr_factor(self, step: int) -> float:
        return self.cfg.rollback_lr_scale if step < self.lr_scaled_until else 1.0

    # ------------------------------------------------------------------ after the step
    def settle(self, step: int) -> tuple[str, dict[str, float]]:
        """After the step `step` was checked: "ok" (applied), "skipped" (left out: train the same
        step number on the next batch) or "rollback"; and the metrics to log at `step`."""
        if self.verdict == "ok":
            self.history.append((step, self.loss))
            self.streak = 0
            return "ok", {}
        start, end = self.skip.step_samples(step)
        self.skip.add(start, end, where="skipped samples")
        self._save_skips()
        metrics = {"skipped_samples": float(self.skip.samples), "skipped_from": float(start)}
        metrics["skipped_to"] = float(end)
        if self.verdict == "nonfinite":
            self.nonfinite_steps += 1
            self.streak += 1
            self.events.write("nonfinite_step", step=step, samples=[start, end], in_a_row=self.streak)
            if self.rank == 0:
                log.warning(
                    "step %d: non-finite loss or gradients; skipped, samples [%d, %d)", step, start, end
                )
            metrics["nonfinite_steps"] = float(self.nonfinite_steps)
            return ("rollback" if self.streak >= self.cfg.nonfinite_tolerance else "skipped"), metrics
        values = [v for _, v in self.history]
        self.events.write("loss_spike", step=step, loss=self.loss, running_mean=sum(values) / len(values))
        if self.rank == 0:
            log.warning("step %d: loss spike %.4f; skipped, samples [%d, %d)", step, self.loss, start, end)
        return "rollback", metrics

    def roll_back(self, step: int, restore: Callable[[], int | None]) -> int:
        """Collective: `restore()` reloads the newest commit and returns its step (None: nothing is
        committed, so the run goes on from `step` without the skipped samples). The step to go on at."""
        self.rollbacks += 1
        if self.rollbacks > self.cfg.max_rollbacks:
            raise DivergedError(
                f"step {step}: {self.rollbacks} rollbacks in this attempt did not get past the anomalies "
                f"(skipped samples {self.skip.ranges}); lower optim.lr or raise train.max_rollbacks",
                field="train.max_rollbacks",
            )
        target = restore()
        self.streak = 0
        self.events.write(
            "rollback", step=step, to_step=target, skipped_samples=self.skip.ranges, rollbacks=self.rollbacks
        )
        if target is None:
            if self.rank == 0:
                log.warning("step %d: nothing committed to roll back to; going on without the window", step)
            return step
        if self.rank == 0:
            log.warning(
                "step %d: rolled back to the commit of step %d; skipped samples %s",
                step,
                target,
                self.skip.ranges,
            )
        while self.history and self.history[-1][0] >= target:
            self.history.pop()
        self.lr_scaled_until = target + self.cfg.rollback_lr_steps
        return target

    def _save_skips(self) -> None:
        if self.rank == 0 and self.run_dir:
            write_json_atomic(os.path.join(self.run_dir, SKIP_FILE), {"skipped_samples": self.skip.ranges})
