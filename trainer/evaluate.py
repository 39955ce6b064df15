"""Validation loss over a fixed slice of the corpus's val split, the same in every layout.

`train.eval_batches` counts GLOBAL batches: each evaluation reads the first
eval_batches x global_batch_size validation sequences, sample g going to DP rank g % dp (as in
training), so dp=1, dp=2, tp=2 and pp=2 all average the same sequences.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


class Evaluator:
    """The loop's evaluation component: validation loss every `train.eval_every` steps and at the
    last step; disabled without a corpus or with `train.eval_batches: 0`."""

    def __init__(self, cfg, manifest, dp_rank: int, dp_size: int, accum: int, dp_group=None, *, run=None):
        self.every = cfg.train.eval_every
        self.enabled = bool(cfg.train.eval_batches) and manifest is not None
        self.run = run  # (engine, loss_fn, device, pipeline): what maybe_run evaluates
        self.val_losses: dict[int, float] = {}  # evaluated step -> validation loss
        if not self.enabled:
            return
        from trainer.data.stream import ValStream

        self.stream = ValStream(
            cfg.data.path,
            manifest,
            seq_len=cfg.data.seq_len,
            micro_batch=cfg.parallel.micro_batch_size,
            dp_rank=dp_rank,
            dp_size=dp_size,
        )
        self.n = cfg.train.eval_batches * accum  # this rank's micro batches per evaluation
        self.accum, self.dp_size, self.dp_group = accum, dp_size, dp_group
        self._batches = None  # read once, reused at every evaluation

    def due(self, step: int, *, last: bool) -> bool:
        """Whether an evaluation runs after `step` finished steps."""
        return self.enabled and bool((self.every and step % self.every == 0) or last)

    def maybe_run(self, step: int, *, last: bool) -> dict[str, float]:
        """Collective when due (the same steps on every rank): validation metrics after `step`
        finished steps, else {}."""
        if not self.due(step, last=last):
            return {}
        metrics = self(*self.run)
        self.val_losses[step] = metrics["val_loss"]
        return metrics

    def __call__(self, engine, loss_fn, device: torch.device, pipeline: bool = False) -> dict[str, float]:
        if self._batches is None:
            self._batches = self.stream.batches(self.n)
        engine.eval()
        total = torch.zeros((), device=device, dtype=torch.float64)
        with torch.no_grad():
            if pipeline:  # the pipeline engine runs `accum` micro batches per call, loss on every stage
                for i in range(0, self.n, self.accum):
                    chunk = [(x.to(device), y.to(device)) for x, y in self._batches[i : i + self.accum]]
                    # a scalar on the last stage, a 1-element tensor on the others
                    total += engine.eval_batch(iter(chunk)).double().reshape(()) * len(chunk)
            else:
                for x, y in self._batches:
                    total += loss_fn(engine(x.to(device)), y.to(device)).double()
        engine.train()
        dist.all_reduce(total, group=self.dp_group)  # TP/PP peers hold the same value
        loss = total.item() / (self.n * self.dp_size)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}
