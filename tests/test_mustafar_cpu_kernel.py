"""The compiled Mustafar CPU decode (csrc/compressed_decode.cpp) against the PyTorch reference
(compressed_decode_torch over the same records and window): head dims 32, 64 and 128, fp32 and
bf16, GQA groups, lengths that end mid-page, several splits per sequence, the dense window
merged in the same call, and the engine's decode steps going through it."""
from __future__ import annotations

import shutil

import pytest
import torch
from tiny_model import build_model

from sparsekv.attention.kernels import cpu_compressed
from sparsekv.attention.mustafar import RequestKV, compressed_decode_torch
from sparsekv.cache.kv_prune import compress

if shutil.which("g++") is None and shutil.which("c++") is None:
    pytest.skip("no C++ compiler: the CPU kernels cannot be built", allow_module_level=True)
if not cpu_compressed.available():
    pytest.skip("the CPU kernels did not build (see the log)", allow_module_level=True)

PS = 16
LENS = [600, 37, 0, 1, 256]  # several splits, a partial last page, nothing compressed, one token, whole pages
WINDOW = [5, 0, 9, 0, 3]  # dense window tokens per sequence (0: none)


def pool(lens: list[int], hkv: int, d: int, keep: int, dtype, gen) -> tuple:
    """Records (values [num_pages, Hkv, ps, keep], bitmaps [num_pages, Hkv, ps, D // 8]) of
    random tokens in shuffled pages (head-major underneath, as the cache holds them) and each
    sequence's block table."""
    pages = [-(-n // PS) for n in lens]
    total = sum(pages) + 3
    vals, bits = compress(torch.randn(hkv, total, PS, d, generator=gen), keep)
    perm = torch.randperm(total, generator=gen)
    bt = torch.zeros(len(lens), max(max(pages), 1), dtype=torch.int32)
    at = 0
    for b, n in enumerate(pages):
        bt[b, :n] = perm[at:at + n].to(torch.int32)
        at += n
    return vals.to(dtype).transpose(0, 1), bits.transpose(0, 1), bt


def gathered(x: torch.Tensor, table: torch.Tensor, n: int) -> torch.Tensor:
    """One sequence's first n records [Hkv, n, width] of a pool [num_pages, Hkv, ps, width]."""
    xh = x.transpose(0, 1)[:, table.long()]
    return xh.reshape(xh.shape[0], -1, xh.shape[-1])[:, :n]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d,hq,hkv,k_keep,v_keep", [(32, 4, 2, 10, 3), (64, 9, 3, 19, 19), (64, 4, 1, 32, 7),
                                                    (128, 4, 2, 38, 40), (128, 2, 2, 1, 128)])
def test_kernel_equals_reference(d, hq, hkv, k_keep, v_keep, dtype):
    gen = torch.Generator().manual_seed(d + hq + k_keep)
    kc, kb, bt = pool(LENS, hkv, d, k_keep, dtype, gen)
    vc, vb, _ = pool(LENS, hkv, d, v_keep, dtype, torch.Generator().manual_seed(7))
    vc, vb = vc[:kc.shape[0]], vb[:kc.shape[0]]
    q = torch.randn(len(LENS), hq, d, generator=gen).to(dtype)
    wk, wv = (torch.randn(len(LENS), hkv, max(WINDOW), d, generator=gen).to(dtype) for _ in range(2))
    scale = d ** -0.5
    refs = []
    for b, (n, w) in enumerate(zip(LENS, WINDOW)):
        r = RequestKV(*(gathered(x, bt[b], n) for x in (kc, kb, vc, vb)), wk[b, :, :w], wv[b, :, :w])
        refs.append(compressed_decode_torch(q[b].float(), RequestKV(
            r.kc.float(), r.kb, r.vc.float(), r.vb, r.k.float(), r.v.float()), scale))
    # the window as another attention's normalised result: out and lse over its keys
    w_logits = torch.einsum("bhgd,bhtd->bhgt", q.float().view(len(LENS), hkv, hq // hkv, d), wk.float()) * scale
    w_logits = w_logits.masked_fill(torch.arange(max(WINDOW)) >= torch.tensor(WINDOW).view(-1, 1, 1, 1), float("-inf"))
    w_lse = torch.logsumexp(w_logits, -1).reshape(len(LENS), hq)
    w_out = torch.einsum("bhgt,bhtd->bhgd", torch.softmax(w_logits, -1).nan_to_num(0.0), wv.float())
    nc = torch.tensor(LENS, dtype=torch.int32)
    out, lse = cpu_compressed.compressed_decode_cpu(q, kc, kb, vc, vb, bt, nc, scale,
                                                    (w_out.reshape(len(LENS), hq, d).to(dtype), w_lse))
    assert out.dtype == dtype and lse.dtype == torch.float32
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out.float(), torch.stack(refs), **tol)
    alone, lse_c = cpu_compressed.compressed_decode_cpu(q, kc, kb, vc, vb, bt, nc, scale)  # no window
    assert bool(torch.isinf(lse_c[2]).all()) and bool((alone[2] == 0).all())  # nothing compressed: weighs 0
    total = torch.logaddexp(lse_c, w_lse)
    torch.testing.assert_close(lse, total, rtol=1e-4, atol=1e-4)


def test_bad_page_id_is_rejected():
    kc, kb, bt = pool([40], 1, 64, 19, torch.float32, torch.Generator().manual_seed(0))
    bt[0, 1] = 10 ** 6
    with pytest.raises(RuntimeError, match="outside the KV pool"):
        cpu_compressed.compressed_decode_cpu(torch.randn(1, 2, 64), kc, kb, kc, kb, bt,
                                             torch.tensor([40], dtype=torch.int32), 0.125)


def test_bitmaps_of_another_head_dim_are_rejected():
    kc, kb, bt = pool([40], 1, 64, 19, torch.float32, torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="bitmaps"):
        cpu_compressed.compressed_decode_cpu(torch.randn(1, 2, 64), kc, kb[..., :4], kc, kb, bt,
                                             torch.tensor([40], dtype=torch.int32), 0.125)


@pytest.fixture(scope="module")
def llama_d64(tmp_path_factory) -> str:
    """The default model's head dim (64), which the kernel is compiled for (tiny_llama's is 16)."""
    return str(build_model(tmp_path_factory.mktemp("llama_d64"), "llama", hidden=128, heads=2, kv_heads=1))


def test_engine_decode_runs_the_kernel(llama_d64, monkeypatch):
    """The engine's Mustafar decode steps call the compiled kernel, and greedy tokens match the
    PyTorch path's."""
    from sparsekv import LLM, SamplingParams

    calls = []
    kernel = cpu_compressed.compressed_decode_cpu
    monkeypatch.setattr(cpu_compressed, "compressed_decode_cpu", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    args = dict(max_model_len=512, max_num_seqs=2, kv_cache_memory=8 << 20, dtype="float32",
                sparsity={"kv": {"prune": "mustafar", "local_window": 16, "compress_chunk": 32}})
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = ["the sky is blue and the grass is green " * 10, "one two three four five six " * 12]
    fast = [o.outputs[0].token_ids for o in LLM(llama_d64, **args).generate(prompts, greedy, use_tqdm=False)]
    assert calls
    monkeypatch.setattr(cpu_compressed, "available", lambda: False)
    slow = [o.outputs[0].token_ids for o in LLM(llama_d64, **args).generate(prompts, greedy, use_tqdm=False)]
    assert fast == slow
