"""Where this rank sits in the world = pp x dp x tp, and the process groups of each dimension.

Rank layout, innermost first: TP, then DP, then PP (outermost):

    rank = (pp_rank * dp + dp_rank) * tp + tp_rank

TP peers are consecutive ranks, so a TP group shares a node (its all-reduces run every layer);
DP all-reduces once per step and can cross nodes; pipeline stages exchange one activation per
micro batch with their neighbours, so stages may sit on different nodes. Example, world 8 with
tp=2, dp=4:

    tp groups [0,1] [2,3] [4,5] [6,7]      dp groups [0,2,4,6] [1,3,5,7]

and world 8 with tp=2, dp=2, pp=2: stage 0 is ranks 0-3, stage 1 ranks 4-7, pipelines [0,4] [1,5]
[2,6] [3,7]. Under PP the loss exists on the last stage, so metrics are logged by `logging_rank`,
the first rank of the last stage (rank 0 without PP). DeepSpeed's `PipelineModule` gets the same
layout as a `PipeModelDataParallelTopology` (`deepspeed_topology()`).

`Topology` itself is pure arithmetic (so `pretrain plan` can describe a layout without a process
group); `init_groups()` creates the torch process groups, and `mpu` is the object DeepSpeed asks
for them (ZeRO then partitions and averages over the DP group only).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist


@dataclass
class Topology:
    world_size: int
    rank: int
    tp: int = 1
    pp: int = 1
    # Set by init_groups(); None means "not created yet".
    tp_group: dist.ProcessGroup | None = field(default=None, repr=False, compare=False)
    dp_group: dist.ProcessGroup | None = field(default=None, repr=False, compare=False)
    mp_group: dist.ProcessGroup | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.tp < 1 or self.pp < 1 or self.world_size % (self.tp * self.pp):
            raise ValueError(
                f"world size {self.world_size} must be divisible by parallel.tp*parallel.pp "
                f"({self.tp}*{self.pp})"
            )
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside a world of {self.world_size}")

    # ------------------------------------------------------------------ pure layout
    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp)

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(pp_rank, dp_rank, tp_rank) of a global rank."""
        return rank // (self.dp * self.tp), (rank // self.tp) % self.dp, rank % self.tp

    def rank_of(self, pp_rank: int, dp_rank: int, tp_rank: int) -> int:
        return (pp_rank * self.dp + dp_rank) * self.tp + tp_rank

    @property
    def pp_rank(self) -> int:
        return self.coords(self.rank)[0]

    @property
    def dp_rank(self) -> int:
        return self.coords(self.rank)[1]

    @property
    def tp_rank(self) -> int:
        return self.coords(self.rank)[2]

    def tp_groups(self) -> list[list[int]]:
        """Ranks that shard one layer between them (same pp_rank, dp_rank)."""
        return [
            [self.rank_of(p, d, t) for t in range(self.tp)] for p in range(self.pp) for d in range(self.dp)
        ]

    def dp_groups(self) -> list[list[int]]:
        """Ranks that hold the same shard and see different batches (same pp_rank, tp_rank)."""
        return [
            [self.rank_of(p, d, t) for d in range(self.dp)] for p in range(self.pp) for t in range(self.tp)
        ]

    def mp_groups(self) -> list[list[int]]:
        """Ranks that together hold one model replica (same dp_rank): Megatron's model-parallel group."""
        return [
            [self.rank_of(p, d, t) for p in range(self.pp) for t in range(self.tp)] for d in range(self.dp)
        ]

    def pp_groups(self) -> list[list[int]]:
        """Ranks that hold the stages of one pipeline, first to last (same dp_rank, tp_rank)."""
        return [
            [self.rank_of(p, d, t) for p in range(self.pp)] for d in range(self.dp) for t in range(self.tp)
        ]

    @property
    def logging_rank(self) -> int:
        """The rank that logs metrics: the first rank of the last stage, where the loss is computed."""
        return self.rank_of(self.pp - 1, 0, 0)

    def describe(self) -> dict:
        d = {
            "world": self.world_size,
            "tp": self.tp,
            "dp": self.dp,
            "pp": self.pp,
            "order": "tp innermost (consecutive ranks), then dp, then pp",
            "tp_groups": self.tp_groups(),
            "dp_groups": self.dp_groups(),
            "model_parallel_groups": self.mp_groups(),
        }
        if self.pp > 1:
            d.update({"pipelines": self.pp_groups(), "logging_rank": self.logging_rank})
        return d

    def deepspeed_topology(self):
        """This layout as DeepSpeed's `PipeModelDataParallelTopology` (axes pipe, data, model with
        model = TP innermost): the same rank formula, so DeepSpeed's stage, DP and TP ("slice")
        groups hold the same ranks as ours."""
        from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

        topo = PipeModelDataParallelTopology(num_pp=self.pp, num_mp=self.tp, num_dp=self.dp)
        for rank in range(self.world_size):
            c = topo.get_coord(rank)
            assert (c.pipe, c.data, c.model) == self.coords(rank), "DeepSpeed's rank layout changed"
        return topo

    # ------------------------------------------------------------------ process groups
    def init_groups(self) -> Topology:
        """Create every group of every dimension. torch requires all ranks to call `new_group` for
        every group, in the same order, even for groups they are not in."""
        if not dist.is_initialized():
            raise RuntimeError("Topology.init_groups needs an initialised default process group")
        if dist.get_world_size() != self.world_size or dist.get_rank() != self.rank:
            raise RuntimeError(
                f"topology says rank {self.rank} of {self.world_size}, the process group says "
                f"{dist.get_rank()} of {dist.get_world_size()}"
            )
        self.tp_group = self._own_group(self.tp_groups())
        self.dp_group = self._own_group(self.dp_groups())
        self.mp_group = self.tp_group if self.pp == 1 else self._own_group(self.mp_groups())
        return self

    def _own_group(self, groups: list[list[int]]) -> dist.ProcessGroup:
        if len(groups) == 1 and len(groups[0]) == self.world_size:
            return dist.group.WORLD  # the whole world: no new group needed
        mine = None
        for ranks in groups:
            g = dist.new_group(ranks)
            if self.rank in ranks:
                mine = g
        return mine

    @property
    def mpu(self) -> ModelParallelUnit:
        if self.tp_group is None:
            raise RuntimeError("call Topology.init_groups() before asking for the mpu")
        return ModelParallelUnit(self)


class ModelParallelUnit:
    """The `mpu` interface DeepSpeed 0.19 calls (Megatron's names): `deepspeed.initialize(mpu=...)`
    then partitions ZeRO state and averages gradients over the DP group, and counts replicated
    parameters once (on TP rank 0) in the gradient norm."""

    def __init__(self, topo: Topology):
        self.topo = topo

    # data parallel
    def get_data_parallel_group(self):
        return self.topo.dp_group

    def get_data_parallel_rank(self) -> int:
        return self.topo.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.topo.dp

    def get_data_parallel_group_ranks(self) -> list[int]:
        return next(g for g in self.topo.dp_groups() if self.topo.rank in g)

    # model parallel (= tp x pp)
    def get_model_parallel_group(self):
        return self.topo.mp_group

    def get_model_parallel_rank(self) -> int:
        t = self.topo
        return t.pp_rank * t.tp + t.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.topo.tp * self.topo.pp

    # tensor parallel
    def get_tensor_model_parallel_group(self):
        return self.topo.tp_group

    def get_tensor_model_parallel_rank(self) -> int:
        return self.topo.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.topo.tp

    def get_tensor_model_parallel_src_rank(self) -> int:
        t = self.topo
        return t.rank_of(t.pp_rank, t.dp_rank, 0)

    # pipeline parallel
    def get_pipeline_model_parallel_rank(self) -> int:
        return self.topo.pp_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.topo.pp
