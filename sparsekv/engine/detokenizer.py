"""Incremental output text with stop strings: the visible text never shows a partial stop."""
from __future__ import annotations

from sparsekv.engine.sequence import Sequence


def update_text(seq: Sequence, tokenizer) -> None:
    """Re-decode the output and apply stop strings; finish seq when one matches. Call it after
    the EOS and length checks: a finished sequence shows its held-back tail."""
    p = seq.params
    full = tokenizer.decode(seq.output_token_ids, skip_special_tokens=p.skip_special_tokens)
    if full.endswith("\ufffd") and seq.finish_reason is None:  # wait for the rest of a UTF-8 char
        full = full.rstrip("\ufffd")
    if p.stops and len(seq.output_token_ids) >= p.min_tokens:
        hit = min(((full.find(s), s) for s in p.stops if s and s in full), default=None)
        if hit is not None:
            at, s = hit
            seq.text = full[:at + len(s)] if p.include_stop_str_in_output else full[:at]
            seq.finish_reason, seq.stop_reason = "stop", s
            return
        if seq.finish_reason is None:
            full = full[:len(full) - _partial_stop_len(full, p.stops)]
    seq.text = full


def _partial_stop_len(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
