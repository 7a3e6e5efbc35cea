"""Compiled CPU paged decode against a plain PyTorch reference (gather pages, matmul, softmax,
matmul): dense and page-list decode, GQA groups, head dims, fp32 and bf16, partial pages,
per-(sequence, KV head) row lengths."""
from __future__ import annotations

import shutil

import pytest
import torch

from sparsekv.attention.kernels import cpu_decode

if shutil.which("g++") is None and shutil.which("c++") is None:
    pytest.skip("no C++ compiler: the CPU decode kernel cannot be built", allow_module_level=True)
if not cpu_decode.available():
    pytest.skip("the CPU decode kernel did not build (see the log)", allow_module_level=True)

PS = 16
LENS = [1, 16, 300, 77, 129]  # length 1, one full page, partial last pages


def reference(q, k, v, block_table, seq_lens, scale, page_lists=None, row_lens=None):
    """Per sequence and query head: the listed (or all) readable tokens (the last row_lens[b, h]
    of them where given), softmax in fp32."""
    b_n, hq, d = q.shape
    hkv, ps = k.shape[1], k.shape[2]
    g_n = hq // hkv
    out = torch.zeros(b_n, hq, d, dtype=torch.float32)
    lse = torch.full((b_n, hq), float("-inf"))
    for b in range(b_n):
        length = int(seq_lens[b])
        for h in range(hkv):
            first = 0 if row_lens is None else length - int(row_lens[b, h])
            pages = range((length + ps - 1) // ps) if page_lists is None else \
                [int(p) for p in page_lists[b, h] if p >= 0]
            pos = torch.tensor([p * ps + t for p in pages for t in range(ps) if first <= p * ps + t < length],
                               dtype=torch.long)
            if len(pos) == 0:
                continue
            phys = block_table[b, pos // ps].long()
            keys = k[phys, h, pos % ps].float()
            vals = v[phys, h, pos % ps].float()
            logits = q[b, h * g_n:(h + 1) * g_n].float() @ keys.T * scale
            out[b, h * g_n:(h + 1) * g_n] = logits.softmax(-1) @ vals
            lse[b, h * g_n:(h + 1) * g_n] = torch.logsumexp(logits, -1)
    return out, lse


def make_case(lens, hq, hkv, d, dtype, head_major=True, seed=0):
    """A shuffled pool with spare pages, a block table padded with garbage past each length."""
    gen = torch.Generator().manual_seed(seed)
    need = [(n + PS - 1) // PS for n in lens]
    num_pages = sum(need) + 3
    shape = (hkv, num_pages, PS, d) if head_major else (num_pages, hkv, PS, d)
    k, v = (torch.randn(shape, generator=gen).to(dtype) for _ in range(2))
    if head_major:
        k, v = k.transpose(0, 1), v.transpose(0, 1)
    perm = torch.randperm(num_pages, generator=gen)
    width = max(need) + 2
    block_table = torch.full((len(lens), width), 10**6, dtype=torch.int32)  # never read
    start = 0
    for b, n in enumerate(need):
        block_table[b, :n] = perm[start:start + n].to(torch.int32)
        start += n
    q = torch.randn(len(lens), hq, d, generator=gen).to(dtype)
    return q, k, v, block_table, torch.tensor(lens, dtype=torch.int32)


def check(got, want, dtype):
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hq,hkv,d", [(9, 3, 64), (4, 4, 128), (8, 2, 64), (3, 1, 32)])
def test_dense_matches_reference(hq, hkv, d, dtype):
    q, k, v, bt, lens = make_case(LENS, hq, hkv, d, dtype)
    scale = d ** -0.5
    out, lse = cpu_decode.paged_decode_cpu(q, k, v, bt, lens, scale, return_lse=True)
    want, want_lse = reference(q, k, v, bt, lens, scale)
    check(out, want, dtype)
    torch.testing.assert_close(lse, want_lse, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("threads", [1, 2])
def test_batch_one_long_context_splits(threads):
    """One sequence over many splits (several threads share one KV head's pages)."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        q, k, v, bt, lens = make_case([4000], 9, 3, 64, torch.float32, seed=1)
        out = cpu_decode.paged_decode_cpu(q, k, v, bt, lens, 0.125)
    finally:
        torch.set_num_threads(old)
    check(out, reference(q, k, v, bt, lens, 0.125)[0], torch.float32)


def test_page_major_pool_and_strided_query():
    """Another storage order and a query that is a row view of a wider tensor."""
    q, k, v, bt, lens = make_case(LENS, 8, 2, 64, torch.float32, head_major=False)
    wide = torch.randn(len(LENS), 8, 3 * 64)
    wide[:, :, 64:128] = q
    view = wide[:, :, 64:128]
    out = cpu_decode.paged_decode_cpu(view, k, v, bt, lens, 0.1)
    check(out, reference(q, k, v, bt, lens, 0.1)[0], torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("expand", [False, True])
def test_page_lists(dtype, expand):
    """Per-head lists (or one list expanded over the heads) padded with -1, unsorted, with pages
    past the context and a partial last page; an empty list gives zeros and lse -inf."""
    hq, hkv, d = 6, 3, 64
    q, k, v, bt, lens = make_case(LENS, hq, hkv, d, dtype, seed=2)
    gen = torch.Generator().manual_seed(3)
    n = 6
    if expand:
        lists = torch.full((len(LENS), 1, n), -1, dtype=torch.int32)
    else:
        lists = torch.full((len(LENS), hkv, n), -1, dtype=torch.int32)
    for b, length in enumerate(LENS):
        pages = (length + PS - 1) // PS
        for h in range(lists.shape[1]):
            pick = torch.randperm(pages, generator=gen)[:n - 2].to(torch.int32)
            lists[b, h, :len(pick)] = pick
            lists[b, h, n - 1] = pages + h % 2  # past the context: masked, its table entry unread
    lists[0, :, 0] = -1  # sequence 0 reads nothing
    if expand:
        lists = lists.expand(-1, hkv, -1)
        assert lists.stride(1) == 0
    out, lse = cpu_decode.paged_decode_cpu(q, k, v, bt, lens, 0.125, page_lists=lists, return_lse=True)
    want, want_lse = reference(q, k, v, bt, lens, 0.125, page_lists=lists)
    check(out, want, dtype)
    torch.testing.assert_close(lse, want_lse, atol=1e-4, rtol=1e-5)
    assert torch.all(out[0] == 0) and torch.all(lse[0] == float("-inf"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("listed", [False, True])
def test_row_lens_read_each_heads_last_tokens(dtype, listed):
    """Per-(sequence, KV head) lengths: whole rows, empty rows, starts mid-page and on a page
    boundary, alone and with page lists; full lengths equal no row lengths exactly."""
    hq, hkv, d = 6, 3, 64
    q, k, v, bt, lens = make_case(LENS, hq, hkv, d, dtype, seed=4)
    rows = torch.tensor([[1, 0, 1], [16, 5, 9], [300, 100, 7], [77, 61, 32], [129, 1, 113]], dtype=torch.int32)
    lists = None
    if listed:
        lists = torch.full((len(LENS), hkv, 9), -1, dtype=torch.int32)
        for b, length in enumerate(LENS):
            pages = torch.arange((length + PS - 1) // PS, dtype=torch.int32).flip(0)[:9]
            lists[b, :, :len(pages)] = pages
    out, lse = cpu_decode.paged_decode_cpu(q, k, v, bt, lens, 0.125, page_lists=lists, return_lse=True, row_lens=rows)
    want, want_lse = reference(q, k, v, bt, lens, 0.125, page_lists=lists, row_lens=rows)
    check(out, want, dtype)
    torch.testing.assert_close(lse, want_lse, atol=1e-4, rtol=1e-5)
    full = lens.view(-1, 1).expand(-1, hkv)
    assert torch.equal(cpu_decode.paged_decode_cpu(q, k, v, bt, lens, 0.125, page_lists=lists, row_lens=full),
                       cpu_decode.paged_decode_cpu(q, k, v, bt, lens, 0.125, page_lists=lists))


def test_bad_physical_page_raises():
    q, k, v, bt, lens = make_case([40], 4, 2, 64, torch.float32)
    bt[0, 1] = k.shape[0]
    with pytest.raises(RuntimeError, match="outside the KV pool"):
        cpu_decode.paged_decode_cpu(q, k, v, bt, lens, 0.125)


def test_empty_sequence_and_dispatch_guard():
    """A zero-length sequence reads nothing (zeros, lse -inf) beside a normal one."""
    q, k, v, bt, lens = make_case([0, 5], 4, 2, 64, torch.float32)
    out, lse = cpu_decode.paged_decode_cpu(q, k, v, bt, lens, 0.125, return_lse=True)
    want, want_lse = reference(q, k, v, bt, lens, 0.125)
    check(out, want, torch.float32)
    torch.testing.assert_close(lse, want_lse)
    assert cpu_decode.supports(q) and not cpu_decode.supports(q[..., :48])


def test_matches_engine_dense_decode():
    """On the engine's own KVCache and block tables, the same output as the dense PyTorch path."""
    from decode_cases import dense_out, make_case as engine_case

    case = engine_case([300, 40, 177, 16], hq=6, hkv=3, d=32)
    bt = torch.nn.utils.rnn.pad_sequence(case.tables, batch_first=True).to(torch.int32)
    lens = torch.tensor(case.lens, dtype=torch.int32)
    out = cpu_decode.paged_decode_cpu(case.q, case.kv.k, case.kv.v, bt, lens, case.scale)
    check(out, dense_out(case).float(), torch.float32)
