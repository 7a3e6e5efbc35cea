"""sparsekv against transformers: the engine's logits step by step, and transformers' logits and
greedy tokens on a fresh model per reference sequence."""
from __future__ import annotations

from pathlib import Path

import torch
import transformers

from sparsekv import LLM, SamplingParams


def hf_model(path: str | Path, **kwargs) -> transformers.PreTrainedModel:
    """A fresh transformers model (an HF directory, or a .gguf file through `gguf_file`): its
    dynamic rope keeps state across calls (the longest length seen), so each reference sequence
    gets its own."""
    path = Path(path)
    if path.suffix == ".gguf":
        path, kwargs = path.parent, {**kwargs, "gguf_file": path.name}
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **kwargs).eval()


def hf_logits(model, ids: list[int], forced: list[int]) -> torch.Tensor:
    """Logits at every position, prefill then one forced token per step (dynamic rope depends on
    the length of each step, so one full forward would differ)."""
    with torch.no_grad():
        res = model(torch.tensor([ids]), use_cache=True)
        rows, past = [res.logits[0]], res.past_key_values
        for tok in forced:
            res = model(torch.tensor([[tok]]), past_key_values=past, use_cache=True)
            rows.append(res.logits[0])
            past = res.past_key_values
    return torch.cat(rows)


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """Plain argmax decoding with transformers' forward and its KV cache (EOS not special)."""
    out, past, inp = [], None, torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            res = model(inp, past_key_values=past, use_cache=True)
            past = res.past_key_values
            out.append(int(res.logits[0, -1].argmax()))
            inp = torch.tensor([[out[-1]]])
    return out


def engine_logits(llm: LLM, ids: list[int], forced: list[int]) -> torch.Tensor:
    """The engine's logits at the prompt's last token (one prefill step), then after each forced
    token (one decode step each); the request's pages are freed at the end."""
    engine, bm = llm.engine, llm.engine.block_manager
    engine.add_request("parity", ids, SamplingParams(temperature=0, max_tokens=len(forced) + 1, ignore_eos=True))
    seq = engine.requests["parity"][0]
    rows = [engine.runner.run(engine.scheduler.schedule())[0]]
    seq.num_computed_tokens = len(ids)
    for tok in forced:
        seq.token_ids.append(tok)
        assert bm.allocate(seq, 1)
        rows.append(engine.runner.run([(seq, 1)])[0])
        seq.num_computed_tokens += 1
    engine.abort_request("parity")
    assert bm.num_free_blocks == len(bm.blocks)
    return torch.stack(rows)
