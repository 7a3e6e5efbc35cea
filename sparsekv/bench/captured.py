"""Real attention inputs for `bench attention`: one layer's roped q/k/v, captured while the engine
runs a RULER-style prompt through its dense prefill and one decode step.

Synthetic inputs only imitate the structure that sparse methods exploit; a needle task through a
real model shows what that structure is. A forward pre-hook on the layer's `Attention` seam sees
exactly what the backends see. The long prefill is the slow part, so each length is cached.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

DEFAULT_TASK = "niah_single"
DEPTH = 0.5  # the needle mid-context: away from both the sink and the local band


class Capture:
    """Captured q [L+1, Hq, D] and k, v [Hkv, L+1, D] (the last token is the first decode step)
    per length, from `model`'s layer `layer` (default: the middle one), cached under `cache_dir`."""

    def __init__(self, model: str, layer: int | None, task: str, seed: int, cache_dir: Path, max_len: int):
        from sparsekv.engine.loader import read_config

        num_layers = read_config(model)["num_hidden_layers"]
        self.layer = num_layers // 2 if layer is None else layer
        if not 0 <= self.layer < num_layers:
            raise ValueError(f"--capture-layer {self.layer}: {model} has layers 0..{num_layers - 1}")
        self.model, self.task, self.seed, self.num_layers = model, task, seed, num_layers
        self.cache_dir, self.max_len = cache_dir, max_len
        self._llm = None

    @property
    def inputs(self) -> dict:
        return {"model": self.model, "layer": self.layer, "task": self.task, "depth": DEPTH, "seed": self.seed}

    def qkv(self, length: int, dtype: torch.dtype, device: torch.device):
        """(q, k, v) for one prompt of `length` tokens, from the cache when it was made the same way."""
        path = self.cache_dir / f"qkv_{length}.pt"
        saved = torch.load(path) if path.exists() else None
        if saved is None or saved["inputs"] != self.inputs:
            start = time.perf_counter()
            saved = {"inputs": self.inputs, **self.capture(length)}
            torch.save(saved, path)
            logger.info("captured layer %d at %d tokens in %.0f s (prefill + 1 decode step) -> %s",
                        self.layer, length, time.perf_counter() - start, path)
        return tuple(saved[n].to(dtype=dtype, device=device) for n in ("q", "k", "v"))

    @property
    def llm(self):
        if self._llm is None:  # float32: the inputs are cast to the bench's dtype afterwards
            from sparsekv import LLM

            self._llm = LLM(self.model, dtype="float32", max_model_len=self.max_len + 2, max_num_seqs=1,
                            enable_prefix_caching=False)
        return self._llm

    def capture(self, length: int) -> dict[str, torch.Tensor]:
        from sparsekv.eval.tasks import generate

        tok = self.llm.tokenizer
        sample = generate(self.task, length, 0, lambda text: len(tok.encode(text)), seed=self.seed, depths=(DEPTH,))
        ids = tok.encode(sample.prompt)  # as the engine encodes a text prompt (BOS included)
        if len(ids) != length:
            raise ValueError(f"{self.task} at {length} tokens came out at {len(ids)} with this tokenizer")
        q, k, v = record_qkv(self.llm, ids, [self.layer])[self.layer]
        return {"q": q, "k": k, "v": v}


def record_qkv(llm, ids: list[int], layers: list[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Each listed layer's roped q [L+1, Hq, D] and k, v [Hkv, L+1, D] (float32, contiguous) while
    `llm` prefills `ids` densely and runs one decode step (the last row), seen by forward
    pre-hooks on the layers' `Attention` seams, exactly what the backends see."""
    from sparsekv import SamplingParams
    from sparsekv.attention.context import Attention

    calls: dict[int, list[list[torch.Tensor]]] = {layer: [] for layer in layers}
    hooks = [m.register_forward_pre_hook(
                 lambda mod, args: calls[mod.layer].append([x.detach().to("cpu", torch.float32, copy=True)
                                                            for x in args[:3]]))
             for m in llm.engine.runner.model.modules() if isinstance(m, Attention) and m.layer in calls]
    try:  # max_tokens=2: the prefill samples token 1, one decode step computes token 1's q/k/v
        llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True), use_tqdm=False)
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for layer, parts in calls.items():
        sizes = [c[0].shape[0] for c in parts]
        if sum(sizes[:-1]) != len(ids) or sizes[-1] != 1:
            raise RuntimeError(f"captured {sizes} tokens for a {len(ids)}-token prompt and one decode step")
        q, k, v = (torch.cat(x) for x in zip(*parts))
        out[layer] = q.contiguous(), k.transpose(0, 1).contiguous(), v.transpose(0, 1).contiguous()
    return out
