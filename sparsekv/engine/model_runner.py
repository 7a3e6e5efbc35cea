"""Loads the model, owns the KV pool, and runs one scheduled batch through the model."""
from __future__ import annotations

import logging

import torch

from sparsekv.attention.backend import BackendParams
from sparsekv.attention.paged import page_runs
from sparsekv.cache.kv_cache import KVCache
from sparsekv.config import EngineConfig, SparsityConfig
from sparsekv.engine.loader import load_model
from sparsekv.engine.models.llama import ForwardContext, SeqContext
from sparsekv.engine.sequence import Sequence

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DENSE = ("dense", BackendParams())


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is available")
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX, from the cpuinfo flags: torch's capability says "AVX512" with or without them."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return False
    try:
        flags = open("/proc/cpuinfo").read().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bfloat16 on CUDA, float32 on CPU. Even with AMX, bf16 decode on CPU measured slower
    (SmolLM2-135M, 2 threads: 1.5 vs 2.8 tok/s at batch 1, 5.1 vs 9.3 at batch 16); without native
    bf16 (AVX512-BF16 or AMX) it is emulated and many times slower, so asking for it there warns."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cpu" and name == "float16":
        raise ValueError("float16 is unusably slow on CPU; use float32 or bfloat16")
    if device.type == "cpu" and name == "bfloat16" and not cpu_has_native_bf16():
        log.warning("this CPU has no native bfloat16 (AVX512-BF16 or AMX): bf16 matmuls are emulated and "
                    "much slower than float32")
    return DTYPES[name]


class ModelRunner:
    def __init__(self, config: EngineConfig, max_model_len: int):
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.model = load_model(config.model, self.dtype, self.device, config.hf_overrides)
        a = self.model.args
        self.page_size = config.block_size
        per_page = KVCache.bytes_per_page(a.num_layers, self.page_size, a.num_kv_heads, a.head_dim, self.dtype)
        need = max_model_len * max(1, config.max_num_seqs) // self.page_size + config.max_num_seqs + 1
        budget = config.kv_cache_memory or self._default_kv_bytes(config)
        self.num_pages = min(max(budget // per_page, 1), need)
        if self.num_pages * self.page_size < max_model_len:
            raise ValueError(f"the KV cache ({self.num_pages} pages of {self.page_size} tokens) cannot hold one "
                             f"sequence of max_model_len={max_model_len}; raise --kv-cache-memory or lower "
                             f"--max-model-len")
        self.kv_cache = KVCache(a.num_layers, self.num_pages, self.page_size, a.num_kv_heads, a.head_dim,
                                self.dtype, self.device)
        log.info("model %s on %s (%s); KV pool %d pages x %d tokens (%.1f MiB)", config.model, self.device,
                 self.dtype, self.num_pages, self.page_size, self.num_pages * per_page / 2**20)

    def _default_kv_bytes(self, config: EngineConfig) -> int:
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return int(free * config.gpu_memory_utilization * 0.9)
        import os
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        return int(avail * config.cpu_kv_cache_fraction)

    def routes(self, sp: SparsityConfig, phase: str, context_len: int) -> list[tuple[str, BackendParams]]:
        """The backend each layer uses for this sequence in this step."""
        spec = sp.prefill if phase == "prefill" else sp.decode
        n = self.model.args.num_layers
        if spec.method == "dense" or context_len < sp.min_context:
            return [DENSE] * n
        chosen = (spec.method, spec.params(phase))
        return [DENSE if i in sp.dense_layers else chosen for i in range(n)]

    @torch.inference_mode()
    def run(self, batch: list[tuple[Sequence, int]]) -> torch.Tensor:
        """Compute the scheduled tokens; return logits [len(batch), V] at each one's last token."""
        ids, pos, slots, seqs, last = [], [], [], [], []
        ps = self.page_size
        for seq, n in batch:
            start = seq.num_computed_tokens
            ids.extend(seq.token_ids[start:start + n])
            p = range(start, start + n)
            pos.extend(p)
            slots.extend(seq.block_table[i // ps] * ps + i % ps for i in p)
            phase = "decode" if n == 1 and start >= seq.num_prompt_tokens else "prefill"
            seqs.append(SeqContext(
                q_start=len(ids) - n, q_len=n, context_len=start + n,
                block_table=torch.tensor(seq.block_table, dtype=torch.long, device=self.device),
                page_runs=page_runs(seq.block_table[:-(-(start + n) // ps)]),
                phase=phase, routes=self.routes(seq.sparsity, phase, start + n), state=seq.state,
                stats=seq.stats))
            last.append(len(ids) - 1)
        dev = self.device
        ctx = ForwardContext(kv_cache=self.kv_cache, slots=torch.tensor(slots, dtype=torch.long, device=dev),
                             cos=torch.empty(0), sin=torch.empty(0), seqs=seqs)
        hidden = self.model(torch.tensor(ids, dtype=torch.long, device=dev),
                            torch.tensor(pos, dtype=torch.long, device=dev), ctx)
        return self.model.compute_logits(hidden[torch.tensor(last, device=dev)]).cpu()
