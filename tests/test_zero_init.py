"""ZeRO-3 builds the model partitioned (`deepspeed.zero.Init`): right after construction each rank
holds only its partition of every parameter, and the partitions gather to exactly the weights of the
whole build with the same seed (dp2; tp2 x dp2 with the TP swap; gpt2 with tied embeddings; bf16).
Training parity of these layouts is tests/test_parity_matrix.py and tests/test_tensor_parallel.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.run_fixtures import tiny_config
from tests.test_tensor_parallel import run_world
from trainer.parallel.topology import Topology

LLAMA = {"vocab_size": 64, "arch": "llama", "n_heads": 4, "n_kv_heads": 2}
GPT2_TIED = {"vocab_size": 64, "arch": "gpt2", "n_heads": 4, "n_kv_heads": 0, "tie_embeddings": True}

# name -> (model, tp, precision)
CASES = {
    "llama": (LLAMA, 1, "fp32"),
    "gpt2-tied": (GPT2_TIED, 1, "fp32"),
    "llama-bf16": (LLAMA, 1, "bf16"),
    "llama-tp2": (LLAMA, 2, "fp32"),
    "gpt2-tied-tp2": (GPT2_TIED, 2, "fp32"),
}


def _cfg(model: dict, tp: int, precision: str, world: int, zero_init: bool = True):
    return tiny_config(
        model=model,
        parallel={"zero_stage": 3, "tp": tp, "zero_init": zero_init},
        train={"precision": precision},
        cluster={"num_workers": world},
    )


def _build(rank: int, world: int, names: list[str]) -> dict:
    """Per case: this rank's partition sizes right after construction, and the largest difference
    between the gathered weights and the whole build's (TP-sliced the same way)."""
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    from trainer.engine import param_groups
    from trainer.model import Transformer
    from trainer.parallel.plan import apply_plan
    from trainer.parallel.zero_init import build_model

    out = {}
    for name in names:
        model_cfg, tp, precision = CASES[name]
        cfg = _cfg(model_cfg, tp, precision, world)
        topo = Topology(world, rank, tp).init_groups()
        torch.manual_seed(cfg.train.seed)
        whole = apply_plan(Transformer(cfg.model), cfg, topo)
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg, topo, torch.device("cpu"))

        params = dict(model.named_parameters())
        repr(model)  # DeepSpeed prints the model: layers must describe themselves while partitioned
        got = {
            "names": sorted(params) == sorted(dict(whole.named_parameters())),
            "unavailable": all(p.ds_status == ZeroParamStatus.NOT_AVAILABLE for p in params.values()),
            "held": sum(p.numel() for p in params.values()),  # 0: nothing whole
            "partition": sum(p.ds_tensor.numel() for p in params.values()),
            "local": sum(p.ds_numel for p in params.values()),  # this TP rank's model
            "partition_sizes_ok": all(
                p.ds_tensor.numel() == math.ceil(p.ds_numel / topo.dp) for p in params.values()
            ),
            "dp_group": all(p.ds_process_group is topo.dp_group for p in params.values()),
            "tied": model_cfg.get("tie_embeddings", False)
            and model.head.out.weight is model.embed.tok.weight,
            "dtypes": {str(p.ds_tensor.dtype) for p in params.values()},
            "decayed": _decayed(model, param_groups) == _decayed(whole, param_groups),
        }
        diff = 0.0
        for n, p in params.items():
            want = dict(whole.named_parameters())[n].detach()
            if precision == "bf16":
                want = want.to(torch.bfloat16)  # what deepspeed.initialize makes of the whole build
            with deepspeed.zero.GatheredParameters(p):
                same_shape = p.shape == want.shape
                diff = max(diff, (p.detach() - want).abs().max().item() if same_shape else math.inf)
        got["max_diff"] = diff
        out[name] = got
    return out


def _decayed(model, param_groups) -> list[str]:
    """Names of the parameters the optimizer decays (the matrices, by their full shape)."""
    ids = {id(p) for p in param_groups(model, 0.1)[0]["params"]}
    return sorted(n for n, p in model.named_parameters() if id(p) in ids)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, list[dict]]:
    """name -> per-rank results: the dp-only cases in a world of 2, the TP cases in a world of 4."""
    got: dict = {}
    for world, tp in ((2, 1), (4, 2)):
        names = [n for n, case in CASES.items() if case[1] == tp]
        per_rank = run_world(world, tmp_path_factory.mktemp(f"world{world}"), _build, names)
        got.update({n: [r[n] for r in per_rank] for n in names})
    return got


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_built_partitioned_and_equal_to_the_whole_build(name, built):
    from trainer.parallel.estimate import stage_params

    model_cfg, tp, precision = CASES[name]
    whole = stage_params(_cfg(model_cfg, tp, precision, 2 * tp).model, tp=tp)[0].total  # one TP rank
    for r, got in enumerate(built[name]):
        assert got["names"], f"rank {r}: parameter names differ from the whole build"
        # Nothing whole on the rank: every parameter released, only its 1/dp partition kept.
        assert got["unavailable"] and got["held"] == 0, f"rank {r}: {got}"
        assert got["local"] == whole and got["partition_sizes_ok"] and got["dp_group"], f"rank {r}: {got}"
        assert got["partition"] <= whole / 2 + 64, f"rank {r}: holds {got['partition']} of {whole}"
        assert got["tied"] == model_cfg.get("tie_embeddings", False)
        assert got["decayed"], f"rank {r}: the optimizer would decay other parameters than the whole build's"
        assert got["dtypes"] == {"torch.bfloat16" if precision == "bf16" else "torch.float32"}
        assert got["max_diff"] == 0.0, f"rank {r}: initial weights differ from the whole build"


def test_partitioned_build_only_under_zero3():
    def partitioned(parallel: dict, world: int = 1) -> bool:
        return tiny_config(parallel=parallel, cluster={"num_workers": world}).parallel.partitioned_build

    assert partitioned({"zero_stage": 3})
    assert not partitioned({"zero_stage": 3, "zero_init": False})
    assert not partitioned({"zero_stage": 2})
    assert not partitioned({"zero_stage": 1, "pp": 2}, world=2)


def test_plan_counts_the_partitioned_build():
    from trainer.parallel.estimate import build_memory, stage_params

    model = {**LLAMA, "vocab_size": 32000, "d_model": 2048, "n_layers": 22, "n_heads": 32, "n_kv_heads": 4}
    layout = {"tp": 2, "micro_batch_size": 1}
    cfg = tiny_config(model=model, parallel={"zero_stage": 3, **layout}, cluster={"num_workers": 16})
    n = sum(s.total for s in stage_params(cfg.model))
    largest = 4 * 32000 * 2048  # the embedding, fp32
    built = build_memory(cfg)
    assert built.partitioned and built.host == largest
    assert built.device == 2 * 4 * n / 16 + largest  # the whole model's 1/16, then the TP layers'
    whole = build_memory(
        tiny_config(model=model, parallel={"zero_stage": 1, **layout}, cluster={"num_workers": 16})
    )
    assert not whole.partitioned and whole.host == 4 * n
