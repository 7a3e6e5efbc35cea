"""Mustafar (kv.prune = "mustafar"): attention over a magnitude-pruned, compressed KV cache.

The cache (cache/compressed.py) holds a request's oldest tokens as fixed-size compressed records
and its recent ones dense. Decode scores the query against both in one softmax, as the paper
does: [SpMV(K_c, q) || q K_local^T], then out = SpMV(V_c^T, p_c) + p_local V_local. The PyTorch
path (the reference, and the fallback where no kernel applies) expands a request's records into
dense rows from their channel bitmaps and attends them with the window in one softmax; the
compiled CPU kernel expands them block by block in L1 and the Triton one in registers
(kernels/compressed_decode.py, merged with the dense window from the paged-decode kernel).

Prefill runs dense attention (SDPA) over the context materialised per layer, under the rule
decode follows: a query at position p reads tokens [0, compressed_len(p)) pruned and the rest
as written. So a prompt within window + chunk tokens is attended fully dense, as in the paper,
and past that a prompt's output does not depend on how the scheduler chunks it (the paper
prefills unchunked, densely; keeping every in-flight prompt dense would need staging for whole
prompts, which is what the compressed pool exists to avoid).

The engine routes every layer of a request to this backend when the server's cache is
compressed: the storage is pruned in all layers, so dense_layers and min_context do not apply.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsekv.attention.backend import AttentionBackend, Plan, register
from sparsekv.attention.kernels import cpu_compressed, cpu_decode
from sparsekv.attention.metadata import BatchGroup
from sparsekv.attention.paged import decode_segments, prefill_attention
from sparsekv.cache.compressed import CompressedLayerKV, MustafarLayout
from sparsekv.cache.kv_prune import decompress, prune


@dataclass
class RequestKV:
    """One request's cache, split as attention reads it: compressed records, values [Hkv, Tc, keep]
    (kc, vc) and bitmaps uint8 [Hkv, Tc, D // 8] (kb, vb), and the dense window [Hkv, Lw, D] (k, v)."""

    kc: torch.Tensor
    kb: torch.Tensor
    vc: torch.Tensor
    vb: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor


def request_kv(kv: CompressedLayerKV, table: torch.Tensor, seq_len: int, num_compressed: int,
               pages: torch.Tensor | None = None) -> RequestKV:
    """Views of one request's tokens [0, seq_len) whose first num_compressed are compressed
    (a multiple of the page size): only compressed bytes are gathered for those, and with
    `pages` ([Hkv, n] logical compressed pages per KV head, -1 padded at the end) only theirs."""
    ps = kv.page_size
    cut = num_compressed // ps
    rows = kv.rows[table[cut:]]

    def take(x: torch.Tensor, ids: torch.Tensor, length: int) -> torch.Tensor:
        xh = x.transpose(0, 1)  # [Hkv, num, ps, width]
        return xh[:, ids].reshape(xh.shape[0], -1, xh.shape[-1])[:, :length]

    if pages is None:
        comp = [take(x, table[:cut], num_compressed) for x in (kv.kc, kv.kb, kv.vc, kv.vb)]
    else:
        phys = table[pages[:, :int((pages[0] >= 0).sum())]]  # [Hkv, n] physical pages
        heads = torch.arange(phys.shape[0]).view(-1, 1)
        comp = [x[phys, heads].flatten(1, 2) for x in (kv.kc, kv.kb, kv.vc, kv.vb)]
    return RequestKV(*comp, take(kv.k, rows, seq_len - num_compressed), take(kv.v, rows, seq_len - num_compressed))


def compressed_decode_torch(q: torch.Tensor, r: RequestKV, scale: float) -> torch.Tensor:
    """One query [Hq, D] over a request's compressed records and dense window -> [Hq, D]."""
    d = r.k.shape[-1]
    pruned = decompress(r.kc, r.kb, d), decompress(r.vc, r.vb, d)
    return decode_segments(q, [pruned, (r.k, r.v)], scale)


def materialise(r: RequestKV) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense [Hkv, L, D] keys and values of a request: its pruned prefix, then its window."""
    d = r.k.shape[-1]
    return (torch.cat([decompress(r.kc, r.kb, d), r.k], 1), torch.cat([decompress(r.vc, r.vb, d), r.v], 1))


def prefill_pruned(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: MustafarLayout,
                   stored: int, scale: float) -> torch.Tensor:
    """Causal attention of the last Lq positions (q [Lq, Hq, D]) over k, v [Hkv, L, D] whose
    first `stored` tokens are already pruned, each query reading [0, compressed_len(p)) pruned:
    tokens pruned for some queries only are appended once more in pruned form, and a mask picks
    each query's copy."""
    lq, lk = q.shape[0], k.shape[1]
    last = layout.compressed_len(lk - 1)
    if last == stored:  # every query reads the cache as stored
        return prefill_attention(q, k, v, scale)
    pos = torch.arange(lk - lq, lk, device=q.device).unsqueeze(1)
    cut = (pos - layout.local_window).clamp(min=0) // layout.compress_chunk * layout.compress_chunk
    t = torch.arange(lk, device=q.device).unsqueeze(0)
    ext = torch.arange(stored, last, device=q.device).unsqueeze(0)
    mask = torch.cat([(t <= pos) & ((t < stored) | (t >= cut)), ext < cut], 1)
    keys = torch.cat([k, prune(k[:, stored:last], layout.k_keep)], 1).unsqueeze(0)
    values = torch.cat([v, prune(v[:, stored:last], layout.v_keep)], 1).unsqueeze(0)
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0), keys, values, attn_mask=mask, scale=scale,
        enable_gqa=q.shape[1] != k.shape[0])
    return out[0].transpose(0, 1)


@dataclass(eq=False)
class MustafarStep:
    """Per group and step: what each request reads compressed (a function of its length)."""

    num_compressed: list[int]


def step_of(kv: CompressedLayerKV, group: BatchGroup) -> MustafarStep:
    """Tokens read compressed: those compressed before this step (this step's own are
    compressed during the next one), built once per step."""
    layout = kv.layout
    return group.memo("mustafar", lambda: MustafarStep(
        [layout.compressed_len(n - q) for n, q in zip(group.seq_lens_cpu, group.q_lens_cpu)]))


@register
class MustafarBackend(AttentionBackend):
    name = "mustafar"
    phases = ("prefill", "decode")

    def forward(self, q: torch.Tensor, kv: CompressedLayerKV, layer: int, plan: Plan) -> torch.Tensor:
        g = plan.group
        step = step_of(kv, g)
        tables, lens = g.block_tables_cpu, g.seq_lens_cpu
        if g.phase == "decode":
            return self.decode(q, kv, g, step, plan.scale, self.select(q, kv, plan, step))
        plan.attended += plan.dense_pairs  # every key is attended, pruned or not
        out = torch.empty_like(q)
        for i, (start, n) in enumerate(zip(g.query_start_cpu, g.q_lens_cpu)):
            k, v = materialise(request_kv(kv, tables[i], lens[i], step.num_compressed[i]))
            out[start:start + n] = prefill_pruned(q[start:start + n], k, v, kv.layout, step.num_compressed[i],
                                                  plan.scale)
        return out

    def select(self, q: torch.Tensor, kv: CompressedLayerKV, plan: Plan, step: MustafarStep) -> torch.Tensor | None:
        """Compressed pages each KV head reads, int32 [B, Hkv, n] (-1 padded), or None for all;
        adds the attended pairs to the plan. Here: all (a selector overrides this)."""
        plan.attended += plan.dense_pairs
        return None

    def decode(self, q: torch.Tensor, kv: CompressedLayerKV, g: BatchGroup, step: MustafarStep,
               scale: float, page_lists: torch.Tensor | None = None) -> torch.Tensor:
        """The compiled kernels where they build (the window through the paged-decode kernel
        over the staging rows, then the compressed tokens, merged with it in the same call),
        else the PyTorch path; with page_lists only the listed compressed pages are read."""
        if cpu_compressed.supports(q) and cpu_compressed.available():
            nc, win = window_tables(kv, g, step)
            window = cpu_decode.paged_decode_cpu(q, kv.k, kv.v, win.block_table, win.seq_lens, scale, return_lse=True)
            return cpu_compressed.compressed_decode_cpu(q, kv.kc, kv.kb, kv.vc, kv.vb, g.block_table, nc, scale,
                                                        window, page_lists)[0]
        out = torch.empty_like(q)
        for i in range(g.num_reqs):
            r = request_kv(kv, g.block_tables_cpu[i], g.seq_lens_cpu[i], step.num_compressed[i],
                           None if page_lists is None else page_lists[i])
            out[i] = compressed_decode_torch(q[i], r, scale)
        return out


@dataclass
class WindowGroup:
    """The dense windows as the paged-decode kernels read a group: row tables over the staging
    pool, window lengths and each request's q row."""

    block_table: torch.Tensor
    seq_lens: torch.Tensor
    query_start: torch.Tensor

    @property
    def num_reqs(self) -> int:
        return self.block_table.shape[0]


def window_tables(kv: CompressedLayerKV, g: BatchGroup, step: MustafarStep) -> tuple[torch.Tensor, WindowGroup]:
    """int32 compressed counts [n] and the windows' row tables, built once per step."""
    def build() -> tuple[torch.Tensor, WindowGroup]:
        ps, dev = kv.page_size, g.block_table.device
        tables = [kv.rows[t[c // ps:].to(dev)] for t, c in zip(g.block_tables_cpu, step.num_compressed)]
        bt = torch.zeros(len(tables), max(len(t) for t in tables), dtype=torch.int32, device=dev)
        for i, t in enumerate(tables):
            bt[i, :len(t)] = t.to(torch.int32)
        nc = torch.tensor(step.num_compressed, dtype=torch.int32, device=dev)
        return nc, WindowGroup(bt, g.seq_lens - nc, g.query_start)
    return g.memo("mustafar_window", build)


def merge_window(q: torch.Tensor, o_c: torch.Tensor, lse_c: torch.Tensor, o_w: torch.Tensor, lse_w: torch.Tensor,
                 query_start: torch.Tensor) -> torch.Tensor:
    """Rows of q's shape from the compressed partials o_c [n, Hq, S, D], lse_c [n, Hq, S] and
    the window's o_w [rows, Hq, D] (at each request's q row), lse_w [n, Hq], by log-sum-exp."""
    rows = query_start.long()
    o = torch.cat([o_c, o_w[rows].float().unsqueeze(2)], 2)
    lse = torch.cat([lse_c, lse_w.unsqueeze(2)], 2)
    m = lse.amax(-1, keepdim=True)
    w = torch.exp(lse - torch.where(torch.isinf(m), 0.0, m))  # empty partials weigh 0
    out = torch.empty_like(q)
    out[rows] = ((o * w.unsqueeze(-1)).sum(-2) / w.sum(-1, keepdim=True)).to(q.dtype)
    return out


@register
class MustafarTriton(MustafarBackend):
    """Compressed tokens (all, or each KV head's listed pages) through the register-decompressing
    kernel, the window through the paged-decode kernel over the staging rows, merged by log-sum-exp."""

    device = "cuda"

    def decode(self, q: torch.Tensor, kv: CompressedLayerKV, g: BatchGroup, step: MustafarStep,
               scale: float, page_lists: torch.Tensor | None = None) -> torch.Tensor:
        from sparsekv.attention.kernels.compressed_decode import compressed_decode
        from sparsekv.attention.kernels.decode import paged_decode

        nc, win = window_tables(kv, g, step)
        o_c, lse_c = compressed_decode(q, kv.kc, kv.kb, kv.vc, kv.vb, g.block_table, nc, g.query_start, scale,
                                       max(step.num_compressed), page_lists)
        o_w, lse_w = paged_decode(q, kv, win, scale, return_lse=True)
        return merge_window(q, o_c, lse_c, o_w, lse_w, g.query_start)
