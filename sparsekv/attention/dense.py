"""Dense attention over the paged cache: the baseline every sparse method must reproduce."""
from __future__ import annotations

import torch

from sparsekv.attention.backend import AttentionBackend, AttnBatch, LayerKV, register
from sparsekv.attention.paged import decode_segments, gather_kv, kv_segments, prefill_attention


@register
class DenseBackend(AttentionBackend):
    name = "dense"
    phases = ("prefill", "decode")

    def forward(self, q: torch.Tensor, kv: LayerKV, batch: AttnBatch) -> torch.Tensor:
        if q.is_cuda:
            return _dense_cuda(q, kv, batch)
        out = torch.empty_like(q)
        for s in batch.seqs:
            rows = slice(s.q_start, s.q_start + s.q_len)
            if batch.phase == "decode":
                segs = kv_segments(kv, s.block_table, s.context_len, s.page_runs)
                out[rows] = decode_segments(q[rows][0], segs, batch.scale).unsqueeze(0)
            else:
                k, v = gather_kv(kv, s.block_table, s.context_len, s.page_runs)
                out[rows] = prefill_attention(q[rows], k, v, batch.scale)
            s.attended = s.causal_pairs * q.shape[1]
        return out


def _dense_cuda(q: torch.Tensor, kv: LayerKV, batch: AttnBatch) -> torch.Tensor:
    """Triton kernels: the block-sparse prefill and page-list decode kernels with every block."""
    from sparsekv.attention.kernels.decode import paged_decode
    from sparsekv.attention.kernels.prefill import paged_prefill

    for s in batch.seqs:
        s.attended = s.causal_pairs * q.shape[1]
    if batch.phase == "decode":
        return paged_decode(q, kv, batch, page_lists=None)
    return paged_prefill(q, kv, batch, block_lists=None)
