"""Every place trainer/ reaches into a private part of torch or DeepSpeed, and why.

Each one is kept because it saves start-up seconds on every rank of the quick start, takes
per-parameter kernel launches out of the GPU optimizer step, or is needed for correctness (the
measurement of each is in docs/benchmarks.md, "Library internals"). Each names the version it
was checked on, and tests/test_library_internals.py fails loudly when the
library changes the thing touched (a run would otherwise only get slower, or silently wrong).
Start-up savings below are what a rank would otherwise spend importing code it never runs.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib
import io
import math
import sys
import types

import torch
import torch._compile

# ------------------------------------------------------------------ torch._dynamo stays unimported
# torch 2.13.0. A rank that compiles nothing imports dynamo only to mark functions "never compile
# this": torch's optimizers wrap `add_param_group`, `zero_grad` and `state_dict` in
# `torch._disable_dynamo`, which imports dynamo at the first call to resolve the marker; DeepSpeed
# marks its ZeRO-3 hooks and collectives with `torch.compiler.disable`, which imports dynamo when
# it decorates. While dynamo is not imported nothing can be compiling, so such a function may
# simply run: after `defer_dynamo()` each marker calls the function directly until dynamo is
# imported (by anyone), then resolves to dynamo's real disabled function, as torch would have at
# the first call. The three pieces (this, `AdamW`, `import_deferring_compile`) only pay off
# together: any one missing imports dynamo anyway.

_ATTR = "__dynamo_disable"  # where torch's `_disable_dynamo` wrapper caches its resolved function
_installed = False


class _Deferred:
    """Seeded into `fn.__dynamo_disable`: torch's wrapper calls it instead of importing dynamo."""

    __slots__ = ("fn", "recursive")

    def __init__(self, fn, recursive: bool):
        self.fn, self.recursive = fn, recursive

    def __call__(self, *args, **kwargs):
        if "torch._dynamo" not in sys.modules:
            return self.fn(*args, **kwargs)
        import torch._dynamo

        real = torch._dynamo.disable(self.fn, self.recursive, wrapping=False)
        setattr(self.fn, _ATTR, real)  # what torch's wrapper would have cached
        return real(*args, **kwargs)


def _seed(fn, recursive: bool) -> None:
    if getattr(fn, _ATTR, None) is None:
        try:
            setattr(fn, _ATTR, _Deferred(fn, recursive))
        except (AttributeError, TypeError):  # a builtin or a slotted callable: torch's way
            pass


def defer_dynamo() -> int:
    """Install the deferral for this process (idempotent); the number of existing markers seeded.
    A no-op once dynamo is imported, or on a torch whose `_disable_dynamo` looks different (its
    closure is `fn`, `recursive` on torch 2.13.0)."""
    global _installed
    if "torch._dynamo" in sys.modules or _installed:
        return 0
    real_lazy = torch._compile._disable_dynamo
    code = real_lazy(lambda: None).__code__
    if code.co_freevars != ("fn", "recursive"):
        return 0

    seeded = 0  # the markers made when torch (and anything else) was imported
    for obj in gc.get_objects():
        if type(obj) is types.FunctionType and obj.__code__ is code:
            fn, recursive = (cell.cell_contents for cell in obj.__closure__)
            _seed(fn, recursive)
            seeded += 1

    def lazy_disable(fn=None, recursive=True):
        if fn is None:
            return functools.partial(lazy_disable, recursive=recursive)
        wrapped = real_lazy(fn, recursive)
        if "torch._dynamo" not in sys.modules:
            _seed(fn, recursive)
        return wrapped

    real_disable = torch.compiler.disable

    @functools.wraps(real_disable)
    def disable(fn=None, recursive=True, *, reason=None):
        if "torch._dynamo" in sys.modules:
            return real_disable(fn, recursive, reason=reason)
        return lazy_disable(fn, recursive)

    torch._compile._disable_dynamo = lazy_disable
    torch._disable_dynamo = lazy_disable
    torch.compiler.disable = disable
    _installed = True
    return seeded


# torch 2.13.0: `Adam.step` as written, without `_use_grad_for_differentiable` (None on a torch that
# changed it): that wrapper sets grad mode and imports `torch._dynamo` for a `graph_break()` that
# only matters when the step is compiled, and ours never is.
_ADAM_STEP = getattr(torch.optim.AdamW.step, "__wrapped__", None)


class AdamW(torch.optim.AdamW):
    """torch's AdamW, whose first step does not import `torch._dynamo`. Same update, same hooks:
    only the grad mode is set here instead of in torch's wrapper."""

    if _ADAM_STEP is not None:

        @torch.no_grad()
        def step(self, closure=None):
            return _ADAM_STEP(self, closure)


def import_deferring_compile(name: str) -> None:
    """Import module `name` with each `torch.compile` it applies as it loads deferred to the
    compiled function's first call. DeepSpeed 0.19.8 imports its Muon optimizer module in every
    optimizer set-up, only for an `isinstance` check, and that module wraps three kernels in
    `torch.compile` at import, which imports all of inductor. Compilation itself already waits for
    the first call; this moves only the wrapping."""
    if name in sys.modules:
        return
    real = torch.compile

    def deferred(model=None, **kwargs):
        if model is None:  # @torch.compile(mode=...) form
            return lambda fn: deferred(fn, **kwargs)
        compiled = None

        @functools.wraps(model)
        def call(*args, **kw):
            nonlocal compiled
            if compiled is None:
                compiled = real(model, **kwargs)
            return compiled(*args, **kw)

        return call

    torch.compile = deferred
    try:
        importlib.import_module(name)
    except ImportError:  # a DeepSpeed without it: nothing to import early
        pass
    finally:
        torch.compile = real


# ------------------------------------------------------------------ DeepSpeed 0.19.8
@contextlib.contextmanager
def without_mlflow():
    """`import deepspeed` imports MLflow for its autotuner (which we never run) to log trials to;
    every rank pays, though only rank 0 logs, through our own tracking. Within this block MLflow
    cannot be imported (the autotuner sees it as not installed); after it, MLflow imports as usual.
    A no-op once MLflow is imported."""
    if "mlflow" in sys.modules:
        yield
        return
    sys.modules["mlflow"] = None  # type: ignore[assignment]  # Python's "import blocked" marker
    try:
        yield
    finally:
        if sys.modules.get("mlflow", 0) is None:
            del sys.modules["mlflow"]


def skip_shm_comm_build(deepspeed) -> None:
    """DeepSpeed's CPU comm backend JIT-compiles its shared-memory all-reduce when it starts (a C++
    build on every rank, repeated whenever another DeepSpeed install rebuilt the shared torch
    extensions cache). Only its inference all-reduce uses that op; training collectives go through
    torch.distributed (gloo) either way. The op table is set, not read: reading it first probes
    every op DeepSpeed has, which compiles and links a C program (its async-io check)."""
    vars(deepspeed.ops).setdefault("__compatible_ops__", {})["deepspeed_shm_comm"] = False


def reset_stale_mpu(deepspeed, mpu) -> None:
    """DeepSpeed keeps the last engine's mpu in a module global and never clears it: an engine
    built later in the same process without one must not inherit stale process groups."""
    deepspeed.utils.groups.mpu = mpu


def keep_fp32_grad_norm(engine, mpu) -> None:
    """DeepSpeed's fp32 ZeRO-0 and pipeline paths clip in `clip_fp32_gradients` without keeping the
    norm, so `get_global_grad_norm()` returns nothing there: clip with DeepSpeed's own
    `clip_grad_norm_` over `mpu` and keep the norm it returns."""
    from deepspeed.runtime.utils import clip_grad_norm_

    def clip_fp32_gradients() -> None:
        engine._global_grad_norm = float(
            clip_grad_norm_(engine.module.parameters(), max_norm=engine.gradient_clipping(), mpu=mpu)
        )

    engine.clip_fp32_gradients = clip_fp32_gradients


def link_hp_optimizer_state(optimizer) -> None:
    """ZeRO-1/2 link each parameter's view of the optimizer state lazily, at its first step; after
    the state is created by hand (a layout conversion) the views must be linked again now."""
    link = getattr(optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        optimizer._hp_optimizer_states_linked = False
        link()


def fp32_state_dict_from_zero(z, stage: int, world: int, flat: list, states: list, paddings) -> dict:
    """zero_to_fp32's per-file reconstruction of the fp32 master weights (or any state partitioned
    like them) from one model-parallel rank's ZeRO partitions. Its public entry point reads a whole
    checkpoint directory and the weights only; these helpers take the partitions we pass."""
    if stage <= 2:
        return z._get_fp32_state_dict_from_zero2_checkpoint(world, flat, states, False, paddings)
    return z._get_fp32_state_dict_from_zero3_checkpoint(world, flat, states, False)


@contextlib.contextmanager
def quiet():
    """Silence a library call that prints and draws progress bars (zero_to_fp32 on every load)."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


# DeepSpeed 0.19.8: every write `save_checkpoint` makes goes through `engine.checkpoint_engine`
# (`save`: every state file, a pipeline stage's layer files too; `makedirs`) and rank 0's private
# `engine._copy_recovery_script`.
_SAVE_WRITERS = ("checkpoint_engine", "_copy_recovery_script")


def check_checkpoint_writers(engine) -> None:
    """RuntimeError naming the DeepSpeed version when its save no longer writes where we look."""
    ce = getattr(engine, "checkpoint_engine", None)
    missing = [n for n in _SAVE_WRITERS if not hasattr(engine, n)]
    missing += [
        f"checkpoint_engine.{m}" for m in ("save", "makedirs") if ce is not None and not hasattr(ce, m)
    ]
    if missing:
        import deepspeed

        raise RuntimeError(
            f"DeepSpeed {deepspeed.__version__}: the engine has no {', '.join(missing)}; "
            "trainer/library_internals.py routes its checkpoint writes there (checked on 0.19.8)"
        )


class _RoutedCheckpointEngine:
    """`engine.checkpoint_engine` as DeepSpeed sees it during a save: each file write through
    `file_run(write, path, state)` (`write(state)` writes it), each directory through `run`."""

    def __init__(self, inner, run, file_run):
        self._inner, self._run, self._file_run = inner, run, file_run

    def save(self, state_dict, path, *args, **kwargs):
        return self._file_run(
            lambda state: self._inner.save(state, path, *args, **kwargs), str(path), state_dict
        )

    def makedirs(self, path, *args, **kwargs):
        return self._run(lambda: self._inner.makedirs(path, *args, **kwargs), str(path))

    def __getattr__(self, name):
        return getattr(self._inner, name)


@contextlib.contextmanager
def checkpoint_writes_through(engine, run, file_run=None):
    """Within: each write of `engine.save_checkpoint` is `run(write, path)` (which may hold a
    failure back until DeepSpeed's own barriers are done on every rank). With `file_run`, each file
    write is `file_run(write, path, state)` instead, `write(state)` writing `state` (None for the
    recovery script) to `path`: it may copy the state now and write it later."""
    check_checkpoint_writers(engine)
    if file_run is None:

        def file_run(write, path, state):
            return run(lambda: write(state), path)

    inner, copy_scripts = engine.checkpoint_engine, engine._copy_recovery_script
    engine.checkpoint_engine = _RoutedCheckpointEngine(inner, run, file_run)
    engine._copy_recovery_script = lambda save_path: file_run(
        lambda _: copy_scripts(save_path), save_path, None
    )
    try:
        yield
    finally:
        engine.checkpoint_engine = inner
        del engine._copy_recovery_script  # the class's method again


# ------------------------------------------------------------------ the optimizer step, multi-tensor
# torch 2.13.0: `torch._foreach_norm(tensors, ord, dtype=)` takes every tensor's norm in one
# multi-tensor kernel on a GPU (one call here on a CPU), where a Python loop launches one per tensor.
def foreach_norms(tensors: list[torch.Tensor], dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """Each tensor's L2 norm (as `dtype`): one `_foreach_norm` per device and dtype present."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    return [n for group in groups.values() for n in torch._foreach_norm(group, 2, dtype=dtype)]


def multi_tensor_zero_step(optimizer) -> bool:
    """DeepSpeed 0.19.8 ZeRO-1/2 (`DeepSpeedZeroOptimizer`): its step takes the gradient norm one
    parameter at a time (a cast and a norm kernel each) and checks the clip norm's finiteness with a
    host sync per parameter group. Replaced on this optimizer by the same arithmetic (fp64 norms,
    the same all-reduces, the same -1 sentinel) over one `_foreach_norm`, and a clip factor that
    stays on the device. Whether it was installed (False for another optimizer)."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if not isinstance(optimizer, DeepSpeedZeroOptimizer) or optimizer.cpu_offload:
        return False
    from deepspeed import comm
    from deepspeed.runtime.constants import PIPE_REPLICATED
    from deepspeed.runtime.utils import is_model_parallel_parameter, mask_nan_or_inf_with_val_inplace
    from deepspeed.runtime.zero.utils import get_norm_dtype

    opt, real_norm = optimizer, optimizer.get_grad_norm_direct

    def get_grad_norm_direct(gradients, params, norm_type=2):
        if float(norm_type) != 2.0:
            return real_norm(gradients, params, norm_type)
        grads = (g for g in gradients if not getattr(g, "_zero_padding", False))
        kept = [
            g.detach()
            for g, p in zip(grads, params, strict=False)  # as DeepSpeed pairs them
            if not (hasattr(p, PIPE_REPLICATED) and p.ds_pipe_replicated)  # counted by one stage
            and (is_model_parallel_parameter(p) or opt.model_parallel_rank == 0)
        ]
        if kept:
            norms = foreach_norms(kept, get_norm_dtype())
            total = torch.stack([n.to(opt.device) for n in norms]).pow(2).sum().float()
        else:
            total = torch.tensor(0.0, dtype=torch.float32).to(opt.device)
        comm.all_reduce(total, op=comm.ReduceOp.SUM, group=opt.dp_process_group)
        opt._model_parallel_all_reduce(tensor=total, op=comm.ReduceOp.SUM)
        total = total.pow(0.5)
        mask_nan_or_inf_with_val_inplace(total, device=opt.device)
        return total

    def unscale_and_clip_grads(grad_groups_flat, total_norm):
        if opt.clip_grad == 0.0 and opt.loss_scale == 1.0:
            return
        combined_scale = opt.loss_scale
        if opt.clip_grad > 0.0:
            # an invalid norm (the -1 sentinel, inf, NaN) clips as an infinite one, decided on the device
            norm = torch.as_tensor(total_norm, dtype=torch.float, device=opt.device)
            norm = torch.where(torch.isfinite(norm) & (norm >= 0), norm, torch.full_like(norm, math.inf))
            clip = torch.clamp(((norm / opt.loss_scale) + 1e-6) / opt.clip_grad, min=1.0)
            combined_scale = clip * opt.loss_scale
        for grad in grad_groups_flat:
            for g in grad if isinstance(grad, list) else [grad]:
                g.data.mul_(1.0 / combined_scale)

    optimizer.get_grad_norm_direct = get_grad_norm_direct
    optimizer.unscale_and_clip_grads = unscale_and_clip_grads
    return True


# ------------------------------------------------------------------ collective timeout after creation
# torch 2.13.0. A process group's timeout is given when it is created; torch's private
# `_set_pg_timeout` changes it afterwards (torchtitan does the same after its first step), and
# `distributed_c10d._world.pg_map` holds every group of this process: the world, the layout's and
# DeepSpeed's. Needed for correctness, not speed: a hang fails in minutes instead of half an hour.
def set_collective_timeout(seconds: float) -> None:
    """Every process group of this process now times a collective out after `seconds`."""
    from datetime import timedelta

    from torch.distributed import distributed_c10d as c10d

    for group in list(c10d._world.pg_map):
        c10d._set_pg_timeout(timedelta(seconds=seconds), group)


# ------------------------------------------------------------------ the finite check before each step
# DeepSpeed 0.19.8. Every engine (plain, ZeRO-1/2/3, PipelineEngine) applies an optimizer step in
# `_take_model_step`, called at the accumulation boundary after the gradients were reduced (by
# `step()`, or by `train_batch`'s OptimizerStep under PP). Guarding it is the one place where all
# layouts can decide, on reduced gradients and before anything changes, to leave the step out.


def guard_model_step(engine, apply_step) -> None:
    """Before each optimizer step call `apply_step()` (collective); when it returns False the step
    is left out: no weight, optimizer, step-count or sample-count change, gradients discarded."""
    take = engine._take_model_step

    def guarded(lr_kwargs=None) -> None:
        if apply_step():
            take(lr_kwargs)
        else:
            discard_gradients(engine)

    engine._take_model_step = guarded


def local_gradients(engine) -> list[torch.Tensor]:
    """The reduced gradients this rank holds at the accumulation boundary: the parameters' own
    (ZeRO-0, ZeRO-1) and ZeRO's partitions (`averaged_gradients`, ZeRO-2/3)."""
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    held = getattr(engine.optimizer, "averaged_gradients", None) or {}
    for group in held.values() if isinstance(held, dict) else held:
        if isinstance(group, torch.Tensor):  # a flat partition
            grads.append(group)
        elif group is not None:
            grads += [g for g in group if g is not None]
    return grads


def discard_gradients(engine) -> None:
    """Drop the accumulated gradients as DeepSpeed's own overflow path does when it skips a step
    (stage3 `_overflow_clean_up`, stage_1_and_2 `step`), so the next step starts from zero."""
    opt = engine.optimizer
    if not engine.zero_optimization():
        engine.zero_grad()
        return
    opt.zero_grad(set_to_none=True)
    if engine.zero_optimization_stage() == 3:
        opt.averaged_gradients = {}
        return
    release = getattr(opt, "_release_preflattened_grad_buffers", None)
    if release is not None:
        release()
    for k in list(opt.averaged_gradients.keys()):
        opt.averaged_gradients[k] = None
        opt.all_grad_tensors[k] = None
