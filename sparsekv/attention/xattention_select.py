"""XAttention's block selection: strided antidiagonal scoring and threshold selection (PyTorch).

Query blocks are aligned to absolute positions (block I covers [I*B, (I+1)*B)), so a chunk of a
chunked prefill that starts on a block boundary scores and selects exactly what the unchunked
prefill does for the same block; a chunk starting mid-block scores that block from its own
queries only.
The scoring here is the CPU path and the reference for kernels/xattn_score.py; the selection
runs on whichever device the scores live on.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache, partial

import torch

from sparsekv.attention.streams import run_streams


@dataclass(frozen=True)
class BlockGeometry:
    """Where one sequence's queries sit in the absolute block grid."""

    block_size: int
    q_len: int
    context_len: int

    @property
    def q_first(self) -> int:
        """Absolute position of the first query."""
        return self.context_len - self.q_len

    @property
    def first_block(self) -> int:
        return self.q_first // self.block_size

    @property
    def num_kblocks(self) -> int:
        return -(-self.context_len // self.block_size)

    @property
    def num_qblocks(self) -> int:
        return self.num_kblocks - self.first_block

    @property
    def pad_front(self) -> int:
        """Padded query slots before the first query in the first query block."""
        return self.q_first - self.first_block * self.block_size

    def queries_per_block(self) -> torch.Tensor:
        """Real queries in each query block: [num_qblocks]."""
        starts = (self.first_block + torch.arange(self.num_qblocks)) * self.block_size
        lo = starts.clamp(min=self.q_first)
        hi = (starts + self.block_size).clamp(max=self.context_len)
        return hi - lo

    def diagonal_pairs(self) -> torch.Tensor:
        """Causal (query, key) pairs inside each query block's diagonal block: [num_qblocks]."""
        starts = (self.first_block + torch.arange(self.num_qblocks)) * self.block_size
        lo = starts.clamp(min=self.q_first) - starts + 1  # keys seen by the first real query
        hi = (starts + self.block_size).clamp(max=self.context_len) - starts  # ... by the last
        return (lo + hi) * (hi - lo + 1) // 2


@lru_cache(maxsize=8)
def load_threshold_table(path: str) -> tuple[tuple[float, ...], ...]:
    with open(path) as f:
        return tuple(tuple(float(x) for x in row) for row in json.load(f))


def head_thresholds(threshold: float | str | tuple[tuple[float, ...], ...], layer: int,
                    num_heads: int) -> torch.Tensor:
    """The threshold of each query head at `layer`: a scalar, or a [layer][head] table (or its JSON path)."""
    if isinstance(threshold, (int, float)):
        return torch.full((num_heads,), float(threshold))
    table = load_threshold_table(threshold) if isinstance(threshold, str) else threshold
    if layer >= len(table) or len(table[layer]) != num_heads:
        raise ValueError(f"xattention threshold table has no row of {num_heads} heads for layer {layer}")
    return torch.tensor(table[layer], dtype=torch.float32)


def strided_keys(k: torch.Tensor, stride: int, antidiagonal: bool, scale: float = 1.0) -> torch.Tensor:
    """[H, L, D] -> [H, L/S, S*D] (times scale), each group of S keys reversed when antidiagonal:
    then row i of the plain query reshape times row j sums Q[iS+t].K[jS+S-1-t], the antidiagonal
    of the S x S tile (i, j) of QK^T (its main diagonal if not reversed). Reversing the keys
    rather than the queries copies Hkv heads instead of Hq."""
    h, n, d = k.shape
    g = k.reshape(h, n // stride, stride, d)
    return ((g.flip(2) if antidiagonal else g) * scale).reshape(h, n // stride, stride * d)


def block_scores(q: torch.Tensor, k: torch.Tensor, geom: BlockGeometry, stride: int, norm: float,
                 antidiagonal: bool = True, chunk_elems: int = 1 << 20) -> torch.Tensor:
    """XAttention block scores of one sequence.

    q: [Hq, num_qblocks * B, D], the queries laid out on the absolute block grid (zero padding);
    k: [Hkv, >= num_kblocks * B, D], zero beyond context_len. Returns fp32 [Hq, num_qblocks,
    num_kblocks]: per query block, the row-softmaxed strided scores summed per key block (each row
    of a full query block sums to B / S; rows holding no real query are zero).
    """
    hq, _, d = q.shape
    hkv = k.shape[0]
    bs, nqb, i0 = geom.block_size, geom.num_qblocks, geom.first_block
    rows = bs // stride  # reshaped rows (and key rows) per block
    qr = q.reshape(hkv, hq // hkv, nqb * rows, stride * d)
    kr = strided_keys(k[:, :geom.num_kblocks * bs], stride, antidiagonal, 1.0 / (math.sqrt(d) * stride * norm))
    kr = kr.transpose(1, 2).contiguous()  # [Hkv, S*D, rows]: its column slices feed bmm without a copy
    # a reshaped query row counts if it holds at least one real query
    pos = (i0 * rows + torch.arange(nqb * rows)) * stride
    row_ok = (pos + stride > geom.q_first) & (pos < geom.context_len)
    out = torch.zeros(hq, nqb, geom.num_kblocks, dtype=torch.float32, device=q.device)

    group = hq // hkv

    def chunk(h: int, a: int, b: int) -> None:  # KV head h's query heads, query blocks [a, b)
        kend = (i0 + b) * rows
        qc = qr[h, :, a * rows:b * rows].reshape(-1, stride * d)
        s = torch.mm(qc, kr[h, :, :kend]).view(group, (b - a) * rows, kend)
        tri = torch.ones((b - a) * rows, (b - a) * rows, dtype=torch.bool, device=q.device).triu_(1)
        s[:, :, (i0 + a) * rows:].masked_fill_(tri, float("-inf"))  # causal in the strided domain
        p = torch.softmax(s, dim=-1, dtype=torch.float32)
        empty = ~row_ok[a * rows:b * rows]
        if bool(empty.any()):  # only in a partial first or last block
            p[:, empty.to(p.device)] = 0.0
        p = p.view(group, b - a, rows, kend).sum(2).view(group, b - a, i0 + b, rows).sum(-1)
        out[h * group:(h + 1) * group, a:b, :i0 + b] = p

    step = max(1, chunk_elems // (group * rows * geom.num_kblocks * rows))
    starts = reversed(range(0, nqb, step))  # the biggest chunks first
    run_streams([partial(chunk, h, a, min(nqb, a + step)) for a in starts for h in range(hkv)])
    return out


def select_blocks(scores: torch.Tensor, thresholds: torch.Tensor, first_block: int) -> torch.Tensor:
    """Threshold selection per (head, query block): bool [H, nqb, nkb].

    Key block 0 and the diagonal block are always kept; the others are taken by descending score
    while the mass gathered before adding the next one is below threshold * row total (the
    minimal prefix reaching the threshold, crossing block included). Nothing right of the
    diagonal; heads with threshold >= 1 keep every causal block.
    """
    h, nqb, nkb = scores.shape
    dev = scores.device
    qb = first_block + torch.arange(nqb, device=dev).view(nqb, 1)
    kb = torch.arange(nkb, device=dev).view(1, nkb)
    causal = kb <= qb
    forced = (kb == 0) | (kb == qb)
    total = scores.sum(-1, keepdim=True)
    forced_mass = (scores * forced).sum(-1, keepdim=True)
    cand = scores.masked_fill(~causal | forced, -1.0)
    vals, order = cand.sort(dim=-1, descending=True)
    mass = vals.clamp(min=0.0)
    before = forced_mass + mass.cumsum(-1) - mass
    tau = thresholds.to(dev).view(h, 1, 1)
    take = (before < tau * total) & (vals >= 0)
    sel = torch.zeros_like(causal.expand(h, nqb, nkb)).scatter_(-1, order, take)
    sel |= forced
    return torch.where(tau >= 1.0, causal, sel)


def causal_blocks(geom: BlockGeometry, num_heads: int, device: torch.device | None = None) -> torch.Tensor:
    """Every causal block (the dense selection): bool [H, nqb, nkb]."""
    qb = geom.first_block + torch.arange(geom.num_qblocks, device=device).view(-1, 1)
    kb = torch.arange(geom.num_kblocks, device=device).view(1, -1)
    return (kb <= qb).expand(num_heads, -1, -1)
