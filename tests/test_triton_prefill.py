"""Triton prefill and XAttention scoring kernels vs the PyTorch paths, under TRITON_INTERPRET=1.

fp32 and small shapes only (the interpreter is slow and mishandles 16-bit tl.dot); the bf16 test
checks that the kernels upcast before tl.dot.
"""
import importlib
import math
import os
import sys

import pytest
import torch

os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from prefill_cases import Seq, prefill_group, run_prefill  # noqa: E402

from sparsekv.attention.paged import gather_kv  # noqa: E402
from sparsekv.cache.kv_cache import LayerKV  # noqa: E402
from sparsekv.attention.xattention_select import BlockGeometry, block_scores  # noqa: E402


def _interpreted_kernels():
    """The kernel modules, re-imported if an earlier test imported them without the interpreter."""
    names = ["sparsekv.attention.kernels.prefill", "sparsekv.attention.kernels.xattn_score"]
    mods = [importlib.import_module(n) for n in names]
    if type(mods[0]._prefill_kernel).__name__ != "InterpretedFunction":
        mods = [importlib.reload(sys.modules[n]) for n in names]
    return mods


prefill, xscore = _interpreted_kernels()

HQ, HKV, D, PAGE, BLOCK = 4, 2, 16, 8, 16
SCALE = 1 / math.sqrt(D)


def _setup(dtype=torch.float32):
    """A pool with shuffled pages and a varlen batch of 2 sequences, both chunked (Lq < Lk)."""
    g = torch.Generator().manual_seed(0)
    kv = LayerKV(torch.randn(40, HKV, PAGE, D, generator=g).to(dtype),
                 torch.randn(40, HKV, PAGE, D, generator=g).to(dtype))
    perm = torch.randperm(40, generator=g)
    seqs = [Seq(0, 50, 100, perm[:13]), Seq(50, 30, 61, perm[13:21])]
    q = torch.randn(80, HQ, D, generator=g).to(dtype)
    return q, kv, seqs


def _reference(q, kv, seqs, masks=None):
    """Dense attention with an explicit token mask: causal, and inside the selected blocks."""
    out = torch.empty_like(q, dtype=torch.float32)
    for i, s in enumerate(seqs):
        k, v = (x.float().repeat_interleave(HQ // HKV, 0) for x in gather_kv(kv, s.block_table, s.context_len))
        qs = q[s.q_start:s.q_start + s.q_len].float().transpose(0, 1)
        pos = torch.arange(s.context_len - s.q_len, s.context_len)
        keys = torch.arange(s.context_len)
        allowed = (keys.view(1, -1) <= pos.view(-1, 1)).expand(HQ, -1, -1)
        if masks is not None:
            qb = pos // BLOCK - (s.context_len - s.q_len) // BLOCK
            allowed = allowed & masks[i][:, qb][:, :, keys // BLOCK]
        logits = (qs @ k.transpose(1, 2) * SCALE).masked_fill(~allowed, float("-inf"))
        out[s.q_start:s.q_start + s.q_len] = (logits.softmax(-1) @ v).transpose(0, 1)
    return out


def _random_masks(seqs, p=0.4):
    g = torch.Generator().manual_seed(1)
    masks = []
    for s in seqs:
        geom = BlockGeometry(BLOCK, s.q_len, s.context_len)
        m = torch.rand(HQ, geom.num_qblocks, geom.num_kblocks, generator=g) < p
        qb = geom.first_block + torch.arange(geom.num_qblocks).view(-1, 1)
        kb = torch.arange(geom.num_kblocks).view(1, -1)
        masks.append((m & (kb <= qb)) | (kb == qb))
    return masks


def test_dense_prefill_matches_reference():
    q, kv, seqs = _setup()
    out = prefill.paged_prefill(q, kv, prefill_group(seqs, PAGE), SCALE)
    torch.testing.assert_close(out, _reference(q, kv, seqs), atol=1e-5, rtol=1e-5)


def test_block_sparse_prefill_matches_masked_reference():
    q, kv, seqs = _setup()
    masks = _random_masks(seqs)
    out = prefill.paged_prefill(q, kv, prefill_group(seqs, PAGE), SCALE, prefill.BlockLists.from_masks(masks, BLOCK))
    torch.testing.assert_close(out, _reference(q, kv, seqs, masks), atol=1e-5, rtol=1e-5)


def test_bf16_inputs_are_upcast_before_dot():
    q, kv, seqs = _setup(torch.bfloat16)
    out = prefill.paged_prefill(q, kv, prefill_group(seqs, PAGE), SCALE)
    torch.testing.assert_close(out.float(), _reference(q, kv, seqs), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("antidiagonal", [True, False])
def test_score_kernel_matches_torch_scoring(antidiagonal):
    q, kv, seqs = _setup()
    stride = 4
    got = xscore.xattn_block_scores(q, kv, prefill_group(seqs, PAGE), BLOCK, stride, 1.0, antidiagonal)
    for s, scores in zip(seqs, got):
        geom = BlockGeometry(BLOCK, s.q_len, s.context_len)
        k, _ = gather_kv(kv, s.block_table, s.context_len)
        qp = torch.zeros(HQ, geom.num_qblocks * BLOCK, D)
        qp[:, geom.pad_front:geom.pad_front + s.q_len] = q[s.q_start:s.q_start + s.q_len].transpose(0, 1)
        kp = torch.zeros(HKV, geom.num_kblocks * BLOCK, D)
        kp[:, :s.context_len] = k
        torch.testing.assert_close(scores, block_scores(qp, kp, geom, stride, 1.0, antidiagonal),
                                   atol=1e-5, rtol=1e-4)


def test_xattention_cuda_pipeline_matches_cpu_path():
    """The backend's Triton route (scoring kernel -> selection -> sparse kernel) on CPU tensors."""
    from sparsekv.attention.xattention import XAttentionBackend, XAttentionParams, XAttentionTriton

    q, kv, seqs = _setup()
    q = 3 * q
    params = XAttentionParams(block_size=BLOCK, stride=4, threshold=0.7)
    want = run_prefill(XAttentionBackend(params), q, kv, seqs, SCALE)
    attended = [s.attended for s in seqs]
    got = run_prefill(XAttentionTriton(params), q, kv, seqs, SCALE)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert [s.attended for s in seqs] == attended
    assert sum(attended) < sum(s.causal_pairs for s in seqs) * HQ
