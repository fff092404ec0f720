"""A parallel layout of the run's ranks other than Megatron's parallel state: process groups for a
model with its own tensor- and pipeline-parallel sizes over the same ranks (a pre-pass teacher
split unlike its student), as megatron-core's ``ProcessGroupCollection``.

Ranks are numbered as ``parallel_state.initialize_model_parallel`` numbers them by default (order
``tp-cp-ep-dp-pp``, context and expert parallelism 1): ``rank = tp_rank + TP·(dp_rank + DP·pp_rank)``,
so :class:`Layout` also describes the student's own layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class Layout:
    """``tp`` x ``dp`` x ``pp`` ranks (their product is the world size)."""

    tp: int
    pp: int
    dp: int

    @classmethod
    def of(cls, tp: int, pp: int, world_size: int) -> "Layout":
        if world_size % (tp * pp):
            raise ValueError(f"world size {world_size} is not divisible by TP x PP = {tp} x {pp}")
        return cls(tp, pp, world_size // (tp * pp))

    def rank(self, tp_rank: int, dp_rank: int, pp_rank: int) -> int:
        return tp_rank + self.tp * (dp_rank + self.dp * pp_rank)

    def coords(self, rank: int) -> tuple[int, int, int]:
        """``(tp_rank, dp_rank, pp_rank)`` of global ``rank``."""
        return rank % self.tp, (rank // self.tp) % self.dp, rank // (self.tp * self.dp)

    def groups(self, kind: str) -> list[list[int]]:
        """Every group of ``kind`` (tp, pp, dp, mp = tp x pp), as lists of global ranks."""
        out = []
        for a in range({"tp": self.dp * self.pp, "pp": self.tp * self.dp, "dp": self.tp * self.pp,
                        "mp": self.dp}[kind]):
            if kind == "tp":
                d, p = a % self.dp, a // self.dp
                out.append([self.rank(t, d, p) for t in range(self.tp)])
            elif kind == "pp":
                t, d = a % self.tp, a // self.tp
                out.append([self.rank(t, d, p) for p in range(self.pp)])
            elif kind == "dp":
                t, p = a % self.tp, a // self.tp
                out.append([self.rank(t, d, p) for d in range(self.dp)])
            else:
                out.append(sorted(self.rank(t, a, p) for t in range(self.tp) for p in range(self.pp)))
        return out


def process_groups(layout: Layout):
    """This rank's megatron-core ``ProcessGroupCollection`` for ``layout``: tensor-, pipeline-, data-
    and model-parallel groups, a context-parallel group of one, the embedding group (first and last
    pipeline stage: tied embeddings) and the position-embedding group (first stage). Collective:
    every rank creates every group, in the same order."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    me = dist.get_rank()
    pgs = ProcessGroupCollection()

    def mine(name: str, groups: list[list[int]]) -> None:
        for ranks in groups:
            g = dist.new_group(ranks)
            if me in ranks:
                setattr(pgs, name, g)

    mine("tp", layout.groups("tp"))
    mine("pp", layout.groups("pp"))
    mine("dp", layout.groups("dp"))
    mine("mp", layout.groups("mp"))
    singles = [[r] for r in range(dist.get_world_size())]
    mine("cp", singles)
    mine("tp_cp", layout.groups("tp"))
    mine("dp_cp", layout.groups("dp"))
    pipelines = layout.groups("pp")
    mine("embd", [sorted({ranks[0], ranks[-1]}) for ranks in pipelines])
    mine("pos_embd", [[ranks[0]] for ranks in pipelines])
    for name in ("embd", "pos_embd"):
        if not hasattr(pgs, name):
            setattr(pgs, name, None)
    return pgs
