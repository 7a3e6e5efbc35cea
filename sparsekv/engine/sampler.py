"""Turning logits into tokens: penalties, temperature, top-k, top-p, min-p, seeds, logprobs."""
from __future__ import annotations

import torch

from sparsekv.engine.sequence import Sequence


def apply_penalties(logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
    """OpenAI presence/frequency penalties on output tokens; vLLM's repetition penalty on
    prompt and output tokens."""
    p = seq.params
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.long)
        vals = logits[seen]
        logits[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and seq.output_token_ids:
        out = torch.tensor(seq.output_token_ids, dtype=torch.long)
        counts = torch.bincount(out, minlength=logits.shape[0]).to(logits.dtype)
        logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def sample_one(logits: torch.Tensor, seq: Sequence, default_gen: torch.Generator) -> int:
    p = seq.params
    if p.greedy:
        return int(torch.argmax(logits))
    logits = torch.nan_to_num(logits / p.temperature, nan=float("-inf"))
    if p.top_k > 0:
        kth = torch.topk(logits, min(p.top_k, logits.shape[0])).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.min_p > 0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    if p.top_p < 1.0:
        sorted_p, idx = torch.sort(probs, descending=True)
        drop = sorted_p.cumsum(0) - sorted_p > p.top_p  # keep the smallest prefix reaching top_p
        probs = probs.scatter(0, idx, sorted_p.masked_fill(drop, 0.0))
    if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
        return int(torch.argmax(logits))  # extreme temperatures or penalties: the limit is greedy
    return int(torch.multinomial(probs, 1, generator=seq.generator or default_gen))


def sample(logits: torch.Tensor, seqs: list[Sequence], default_gen: torch.Generator,
           eos_ids: set[int]) -> list[int]:
    """logits: [len(seqs), V] float32 -> one token per sequence (logprobs recorded on seq)."""
    tokens = []
    for row, seq in zip(logits, seqs):
        raw = row
        row = apply_penalties(row.clone(), seq) if _has_penalties(seq) else row
        if len(seq.output_token_ids) < seq.params.min_tokens:  # no stopping before min_tokens
            banned = [t for t in (*eos_ids, *seq.params.stop_token_ids) if t < row.shape[0]]
            row = row.index_fill(0, torch.tensor(banned, dtype=torch.long), float("-inf"))
        tok = sample_one(row, seq, default_gen)
        if seq.logprobs is not None:
            lp = torch.log_softmax(raw, dim=-1)
            entry = {tok: float(lp[tok])}
            if seq.params.logprobs:
                top = torch.topk(lp, seq.params.logprobs)
                entry.update({int(i): float(v) for i, v in zip(top.indices, top.values)})
            seq.logprobs.append(entry)
            seq.cumulative_logprob += entry[tok]
        tokens.append(tok)
    return tokens


def _has_penalties(seq: Sequence) -> bool:
    p = seq.params
    return p.repetition_penalty != 1.0 or bool(p.presence_penalty) or bool(p.frequency_penalty)
