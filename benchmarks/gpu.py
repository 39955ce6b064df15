"""One short, prepared single-GPU benchmark of the real training path (loader, loop, logging).

For each recipe (configs/gpt2-124m.yaml, configs/llama-1b.yaml) on one device, in bf16 and ZeRO-1:
streams a random-token corpus in the real shard format through `trainer.loop.train` (DeepSpeed
engine, our loader, our metrics) for a fixed number of steps and prints steady-state tokens/s,
MFU (PaLM formula against the device's dense bf16 peak, printed with the device's name), peak
memory, the step-time breakdown and whether flash attention takes the recipe's attention shapes;
then the same model in a plain PyTorch loop (autocast bf16, fused AdamW, same batch, same compile
setting) for the ratio. Goals (issue #25): gpt2-124m >= 0.95 of plain, llama-1b >= 55% MFU.
Each recipe runs in its own process (a failure in one, e.g. out of memory, still reports the
other). Needs nothing from the network.

    python benchmarks/gpu.py                      # on a GPU machine, < 5 minutes
    python benchmarks/gpu.py --device cpu --quick # the CPU smoke run the tests use
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RECIPES = {
    # name: (config file, micro batch on GPU)
    "gpt2-124m": ("configs/gpt2-124m.yaml", 16),
    "llama-1b": ("configs/llama-1b.yaml", 8),
}
GOALS = {"gpt2-124m": ("ours/plain", 0.95), "llama-1b": ("MFU", 0.55)}  # issue #25


def attention_backend(cfg, seq_len: int, device: str) -> str:
    """Whether torch's flash attention kernel takes this model's attention (bf16, causal, its
    query and key/value head counts, forward and backward); else why not."""
    if device != "cuda":
        return "n/a (cpu)"
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def qkv(heads):
        shape = (1, heads, seq_len, cfg.head_dim)
        return torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    q, k, v = qkv(cfg.n_heads), qkv(cfg.kv_heads), qkv(cfg.kv_heads)
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            F.scaled_dot_product_attention(
                q, k, v, is_causal=True, enable_gqa=cfg.n_heads != cfg.kv_heads
            ).sum().backward()
        return "flash"
    except RuntimeError as e:
        return f"not flash: {str(e).splitlines()[0][:160]}"


class StepOps:
    """Counts what one optimizer step dispatches (DeepSpeed's step after the finite check): every
    non-view operation (on a GPU, about one kernel launch each) and every host sync (`.item()`,
    `bool(tensor)`), in the `at`-th step only, so the counting costs the timed steps nothing."""

    def __init__(self, at: int = 3):
        self.at, self.calls, self.ops, self.syncs = at, 0, 0, 0

    def install(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        from trainer import library_internals

        counter, real_guard = self, library_internals.guard_model_step

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                counter.ops += not func.is_view
                counter.syncs += str(func) == "aten._local_scalar_dense.default"
                return func(*args, **(kwargs or {}))

        def counting_guard(engine, apply_step):
            real_guard(engine, apply_step)
            guarded = engine._take_model_step

            def take(lr_kwargs=None):
                counter.calls += 1
                if counter.calls != counter.at:
                    return guarded(lr_kwargs)
                with Mode():
                    return guarded(lr_kwargs)

            engine._take_model_step = take

        library_internals.guard_model_step = counting_guard


class Capture:
    """A logger that keeps every logged metrics dict (and prints a line per log)."""

    def __init__(self):
        self.rows: list[tuple[int, dict]] = []

    def log(self, metrics: dict, step: int) -> None:
        self.rows.append((step, dict(metrics)))
        print(f"  step {step}: {metrics['tokens_per_s']:,.0f} tok/s, loss {metrics['loss']:.3f}", flush=True)

    def close(self) -> None:
        pass


def run_one(
    name: str,
    device: str,
    steps: int,
    quick: bool,
    compile_blocks: bool,
    baseline: bool,
    accum: int = 1,
    extra: list[str] | None = None,
) -> dict:
    import torch

    from benchmarks.common import plain_pytorch_tokens_per_s, write_random_corpus
    from trainer.config import load_config
    from trainer.loop import train
    from trainer.metrics import detect_peak_tflops
    from trainer.model import flops_per_token, param_count
    from trainer.parallel.plan import sdpa_context
    from trainer.session import Session

    path, mb = RECIPES[name]
    sets = [
        "cluster.num_workers=1",
        "tracking.enabled=false",
        f"train.device={device}",
        f"train.steps={steps}",
        "train.log_every=5",
        "checkpoint.every=0",
        # One device: ZeRO-1 (gpt2-124m's own stage) keeps one flat fp32 partition per param group,
        # so torch's fused AdamW is one kernel per group, and its norm and clip are multi-tensor
        # (trainer/library_internals.py multi_tensor_zero_step). ZeRO-0 in bf16 is DeepSpeed's
        # per-parameter fp16-style optimizer; ZeRO-3 on one device only adds gathers. `--set
        # parallel.zero_stage=0` measures the former.
        "parallel.zero_stage=1",
        f"train.compile={'true' if compile_blocks else 'false'}",
        "data.prefetch=4",
    ]
    if device == "cpu":
        sets += [
            "train.precision=fp32",
            "train.attention=auto",  # the recipes' flash kernel is CUDA's
            "optim.fused=false",
            "model.n_layers=2",
            "model.d_model=128",
            "model.n_heads=4",
            "model.n_kv_heads=0",
            "model.d_ff=0",
            "model.vocab_size=512",
            "data.seq_len=64",
            "model.max_seq_len=64",
        ]
        mb = 2
    else:
        sets += ["train.precision=bf16", "optim.fused=true"]
    sets += [f"parallel.micro_batch_size={mb}", f"parallel.global_batch_size={mb * accum}", *(extra or [])]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(ROOT / path, sets + [f"data.path={tmp}/corpus", f"cluster.storage_path={tmp}/runs"])
        write_random_corpus(
            f"{tmp}/corpus",
            cfg.model.vocab_size,
            cfg.data.seq_len + 1,
            n_train=max(256, (steps + 8) * mb * accum),
            samples_per_shard=64,
        )
        cap, step_ops = Capture(), StepOps()
        step_ops.install()
        t0 = time.perf_counter()
        train(cfg, Session(), logger=cap)
        wall = time.perf_counter() - t0
    # Steady state: drop the first logged window (compile, allocator warm-up).
    steady = [m for s, m in cap.rows if s > 5] or [m for _, m in cap.rows]
    tps = sum(m["tokens_per_s"] for m in steady) / len(steady)
    fpt = flops_per_token(cfg.model, cfg.data.seq_len)
    peak = detect_peak_tflops(device)
    out = {
        "recipe": name,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "zero_stage": cfg.parallel.zero_stage,
        "compiled": cfg.train.compile,
        "attention": attention_backend(cfg.model, cfg.data.seq_len, device),
        "params": param_count(cfg.model),
        "micro_batch": mb,
        "grad_accum": accum,
        "overrides": extra or [],
        "seq_len": cfg.data.seq_len,
        "tokens_per_s": tps,
        "mfu": tps * fpt / (peak * 1e12) if peak else None,
        "peak_tflops": peak,
        "peak_memory_gb": max(m["memory_gb"] for _, m in cap.rows),
        "step_time_s": sum(m["step_time_s"] for m in steady) / len(steady),
        "breakdown_s": {k: cap.rows[-1][1].get(f"{k}_s") for k in ("forward", "backward", "optimizer")},
        "data_wait_frac": sum(m["data_wait_frac"] for m in steady) / len(steady),
        "wall_s_incl_startup_and_compile": wall,
        # the finite check's one read of its flags (a `tolist`) is not among these syncs
        "optimizer_step_ops": step_ops.ops,
        "optimizer_step_host_syncs": step_ops.syncs,
    }
    if baseline:
        if device == "cuda":
            torch.cuda.empty_cache()
        with sdpa_context(cfg):  # the recipe's attention kernel in the plain loop too
            out["plain_pytorch_tokens_per_s"] = plain_pytorch_tokens_per_s(
                cfg.model,
                batch=mb,
                seq_len=cfg.data.seq_len,
                steps=max(5, steps // 2),
                warmup=3,
                device=device,
                bf16=device == "cuda",
                compile_blocks=compile_blocks,
                accum=accum,
            )
        out["ours_over_plain"] = tps / out["plain_pytorch_tokens_per_s"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--recipes", default="gpt2-124m,llama-1b", help="comma-separated: " + ", ".join(RECIPES))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--no-compile", action="store_true", help="eager blocks instead of torch.compile")
    ap.add_argument("--no-baseline", action="store_true", help="skip the plain PyTorch loop")
    ap.add_argument(
        "--accum", type=int, default=4, help="micro batches per optimizer step (the recipes' 4 per GPU)"
    )
    ap.add_argument("--set", action="append", default=[], help="extra config override for every recipe")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke test)")
    ap.add_argument("--json", help="also append one JSON line per recipe to this file")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    compile_blocks = args.device == "cuda" and not args.no_compile

    if args.one:  # child: one recipe, result as the last stdout line
        res = run_one(
            args.one,
            args.device,
            args.steps,
            args.quick,
            compile_blocks,
            not args.no_baseline,
            args.accum,
            args.set,
        )
        print("RESULT " + json.dumps(res), flush=True)
        return 0

    results = []
    for name in args.recipes.split(","):
        print(
            f"== {name} ({args.device}, {'compiled' if compile_blocks else 'eager'}, accum {args.accum}, "
            f"{' '.join(args.set) or 'recipe settings'})",
            flush=True,
        )
        cmd = [sys.executable, __file__, "--one", name, "--device", args.device, "--steps", str(args.steps)]
        cmd += ["--accum", str(args.accum)] + [a for x in args.set for a in ("--set", x)]
        cmd += (
            ["--no-compile"] * args.no_compile
            + ["--no-baseline"] * args.no_baseline
            + ["--quick"] * args.quick
        )
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = proc.stdout.splitlines()
        res = next((json.loads(x[7:]) for x in reversed(lines) if x.startswith("RESULT ")), None)
        if res is None:
            print("\n".join(lines[-40:]))
            res = {"recipe": name, "error": f"exit {proc.returncode}"}
        results.append(res)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(res) + "\n")
        print(json.dumps(res, indent=2), flush=True)

    done = [r for r in results if "error" not in r]
    if done:
        peak = done[0]["peak_tflops"]
        print(
            f"\ndevice: {done[0]['device']}; dense bf16 peak used for MFU: "
            + (f"{peak:.1f} TFLOPS" if peak else "none (MFU not computed)")
        )
    print(
        "\nrecipe      params   tokens/s    MFU    peak GB  step s  fwd/bwd/opt s        data wait  ours/plain  goal"
    )
    for r in results:
        if "error" in r:
            print(f"{r['recipe']:11s} FAILED ({r['error']})")
            continue
        b = r["breakdown_s"]
        bd = "/".join(
            f"{b[k]:.3f}" if b[k] is not None else "-" for k in ("forward", "backward", "optimizer")
        )
        mfu = f"{r['mfu']:.1%}" if r["mfu"] else "n/a"
        ratio = f"{r['ours_over_plain']:.3f}" if "ours_over_plain" in r else "-"
        what, goal = GOALS[r["recipe"]]
        got = r.get("ours_over_plain") if what == "ours/plain" else r["mfu"]
        verdict = "-" if got is None else ("met" if got >= goal else "short")
        print(
            f"{r['recipe']:11s} {r['params'] / 1e6:6.0f}M {r['tokens_per_s']:10,.0f} {mfu:>6s} "
            f"{r['peak_memory_gb']:8.1f} {r['step_time_s']:7.3f}  {bd:20s} {r['data_wait_frac']:8.1%}  "
            f"{ratio:>10s}  {what} >= {goal:g}: {verdict}"
        )
        print(
            f"{'':11s} ZeRO-{r['zero_stage']}, {'compiled' if r['compiled'] else 'eager'}, attention "
            f"{r['attention']}; optimizer step: {r['optimizer_step_ops']} ops, "
            f"{r['optimizer_step_host_syncs']} host syncs"
        )
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
