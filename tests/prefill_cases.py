"""Prefill batches for backend tests: requests described by (q_start, q_len, context_len, pages)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsekv.attention.backend import AttnShape
from sparsekv.attention.metadata import AttnMetadata, BatchGroup, RequestInput


@dataclass
class Seq:
    q_start: int
    q_len: int
    context_len: int
    block_table: torch.Tensor
    attended: int = 0  # filled by run_prefill

    @property
    def causal_pairs(self) -> int:
        start = self.context_len - self.q_len
        return self.q_len * start + self.q_len * (self.q_len + 1) // 2


def prefill_group(seqs: list[Seq], page_size: int) -> BatchGroup:
    """The seqs as one prefill group; their q rows must follow one another in order."""
    reqs = [RequestInput(s.q_len, s.context_len, s.block_table.tolist(), "prefill") for s in seqs]
    meta = AttnMetadata.build(reqs, page_size, torch.device("cpu"))
    assert meta.query_start_loc_cpu[:-1] == [s.q_start - seqs[0].q_start for s in seqs]
    return meta.group("prefill", 0, len(seqs))


def run_prefill(backend, q: torch.Tensor, kv, seqs: list[Seq], scale: float, layer: int = 0,
                num_layers: int = 1) -> torch.Tensor:
    """One layer of the backend over the seqs, as the engine runs it; sets each seq.attended."""
    group = prefill_group(seqs, kv.page_size)
    plan = backend.plan(group, AttnShape(num_layers, q.shape[1], kv.k.shape[1], q.shape[2], scale))
    out = backend.forward(q, kv, layer, plan)
    for s, a in zip(seqs, plan.attended.tolist()):
        s.attended = int(a)
    return out
