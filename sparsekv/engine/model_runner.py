"""Loads the model, owns the KV pool, and runs one scheduled batch through the model."""
from __future__ import annotations

import logging

import torch

from sparsekv.attention.backend import AttnShape, BackendParams, backend_class, live_backends
from sparsekv.attention.context import ForwardContext, forward_context
from sparsekv.attention.kernels import cpu_build
from sparsekv.attention.metadata import AttnMetadata, RequestInput
from sparsekv.attention.router import LayerRoute, build_routes
from sparsekv.cache.compressed import CompressedKVCache, MustafarLayout
from sparsekv.cache.kv_cache import KVCache, WriteIndex
from sparsekv.config import EngineConfig, KVSection, SparsityConfig
from sparsekv.engine.loader import load_model
from sparsekv.engine.sequence import Sequence
from sparsekv.evict.evictor import EvictEntry, Evictor
from sparsekv.ffn import FFN_BACKENDS
from sparsekv.ffn.router import build_ffn_routes
from sparsekv.ffn.state import SparseFFNState
from sparsekv.ffn.thresholds import find_thresholds

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MUSTAFAR = ("mustafar", BackendParams())
OVER_COMPRESSED = {"quest": "mustafar_quest", "delta": "mustafar_delta"}  # selectors over a compressed pool


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
        if self.device.type == "cpu":  # build (or load) the CPU kernels now: a server is ready only once
            cpu_build.available()      # they are, and its first request does not wait for a compile
        self.model = load_model(config.model, self.dtype, self.device, config.hf_overrides)
        a = self.model.args
        self.shape = AttnShape(a.num_layers, a.num_heads, a.num_kv_heads, a.head_dim, a.head_dim ** -0.5)
        self.page_size = config.block_size
        self._routes: dict[tuple, tuple[SparsityConfig, list[LayerRoute]]] = {}
        self._free_slots: list[int] = []
        self._next_slot = 0
        specs = self._configured_specs(config.sparsity)
        per_page = KVCache.bytes_per_page(a.num_layers, self.page_size, a.num_kv_heads, a.head_dim, self.dtype, specs)
        need = max_model_len * max(1, config.max_num_seqs) // self.page_size + config.max_num_seqs + 1
        budget = config.kv_cache_memory or self._default_kv_bytes(config)
        self.layout, staging = self._mustafar_layout(config)
        if self.layout is not None:  # staging rows first, then compressed pages from what is left
            budget -= staging * per_page
            per_page = self.layout.page_bytes(a.num_layers, self.page_size, a.num_kv_heads, a.head_dim,
                                              self.dtype.itemsize)
            per_page += a.num_layers * sum(s.page_bytes(a.num_kv_heads, a.head_dim, self.dtype.itemsize) for s in specs)
        self.num_pages = min(max(budget // per_page, 1), need)
        if self.num_pages * self.page_size < max_model_len:
            raise ValueError(f"the KV cache ({self.num_pages} pages of {self.page_size} tokens) cannot hold one "
                             f"sequence of max_model_len={max_model_len}; raise --kv-cache-memory or lower "
                             f"--max-model-len")
        if self.layout is not None:
            self.kv_cache = CompressedKVCache(a.num_layers, self.num_pages, staging, self.page_size, a.num_kv_heads,
                                              a.head_dim, self.dtype, self.device, self.layout)
            for spec in specs:
                self.kv_cache.ensure(spec)
        else:
            self.kv_cache = KVCache(a.num_layers, self.num_pages, self.page_size, a.num_kv_heads, a.head_dim,
                                    self.dtype, self.device, specs)
        self.evictor = Evictor(a.num_layers, a.num_kv_heads, self.shape.scale, self.device)
        self.ffn = SparseFFNState(self.model, find_thresholds(config.model, config.ffn_thresholds, a.num_layers),
                                  self.device)
        log.info("model %s on %s (%s); KV pool %d pages x %d tokens (%.1f MiB)", config.model, self.device,
                 self.dtype, self.num_pages, self.page_size, self.num_pages * per_page / 2**20)

    def _configured_specs(self, sp: SparsityConfig) -> tuple:
        """Side tables of the server's configured methods, counted in the KV budget up front
        (a request that picks another method allocates its tables on first use)."""
        specs = {}
        for spec in (sp.prefill, sp.decode):
            for s in backend_class(spec.method, self.device.type).kv_spec:
                specs[s.name] = s
        return tuple(specs.values())

    def _kv_layout(self, kv: KVSection) -> MustafarLayout | None:
        """The compressed layout kv.prune = "mustafar" asks for; None: a dense pool."""
        keep = kv.mustafar_keep(self.model.args.head_dim)
        return None if keep is None else MustafarLayout(*keep, kv.local_window, kv.compress_chunk)

    def _mustafar_layout(self, config: EngineConfig) -> tuple[MustafarLayout | None, int]:
        """The server's compressed layout (None: dense) and the staging rows it needs."""
        layout = self._kv_layout(config.sparsity.kv)
        if layout is None:
            return None, 0
        return layout, layout.staging_rows(config.max_num_seqs, config.max_num_batched_tokens, self.page_size)

    def _default_kv_bytes(self, config: EngineConfig) -> int:
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return int(free * config.gpu_memory_utilization * 0.9)
        import os
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        return int(avail * config.cpu_kv_cache_fraction)

    def routes(self, sp: SparsityConfig, phase: str, context_len: int) -> list[LayerRoute]:
        """The (method, params) each layer uses for this request in this step; the lists are
        built once per (config, phase, below min_context) and reused."""
        dense = context_len < sp.min_context
        key = (id(sp), phase, dense)
        hit = self._routes.get(key)
        if hit is not None and hit[0] is sp:
            return hit[1]
        n = self.model.args.num_layers
        if self.layout is not None:  # the pool is compressed in every layer: Quest / DELTA select within it
            routes = [(OVER_COMPRESSED[method], params) if method in OVER_COMPRESSED else MUSTAFAR
                      for method, params in sp.layer_routes(phase, context_len, n)]
        else:
            routes = sp.layer_routes(phase, context_len, n)
        if len(self._routes) >= 256:  # per-request configs come and go: keep the cache bounded
            self._routes.clear()
        self._routes[key] = (sp, routes)
        return routes

    def check_sparsity(self, sp: SparsityConfig) -> None:
        """Raise ValueError for a config that does not fit this model or device."""
        n = self.shape.num_layers
        if self._kv_layout(sp.kv) != self.layout:
            raise ValueError("kv.prune and its parameters set the KV-cache format, a server setting: a request "
                             "cannot change them")
        bad = [x for x in sp.dense_layers if not 0 <= x < n]
        if bad:
            raise ValueError(f"dense_layers {bad} are not layers of this {n}-layer model")
        for phase, spec in (("prefill", sp.prefill), ("decode", sp.decode)):
            backend_class(OVER_COMPRESSED.get(spec.method, spec.method) if self.layout else spec.method,
                          self.device.type)
            spec.params(phase).check_model(self.shape)
        if sp.ffn.method != "none":
            ffn = FFN_BACKENDS[sp.ffn.method]
            ffn.check(sp.ffn, self.ffn)
            self.ffn.rules(ffn, sp.ffn)  # built now (Wᵀ copies, column norms), not in a step

    def slot(self, seq: Sequence) -> int:
        """The request slot of a running sequence (backend state is indexed by it)."""
        if seq.slot is None:
            if self._free_slots:
                seq.slot = self._free_slots.pop()
            else:
                seq.slot, self._next_slot = self._next_slot, self._next_slot + 1
        return seq.slot

    def release(self, seq: Sequence) -> None:
        """The sequence finished, was aborted or preempted: free its slot and backend state."""
        if seq.slot is None:
            return
        for backend in live_backends():
            backend.free([seq.slot])
        self.kv_cache.release(seq.slot)
        self.evictor.free([seq.slot])
        self._free_slots.append(seq.slot)
        seq.slot = None

    @torch.inference_mode()
    def run(self, batch: list[tuple[Sequence, int]]) -> torch.Tensor:
        """Compute the scheduled tokens; return logits [len(batch), V] at each one's last token."""
        order, phases, ctx, plans, ids, pos = self._prepare(batch)
        dev = self.device
        with forward_context(ctx):
            hidden = self.model(torch.tensor(ids, dtype=torch.long, device=dev),
                                torch.tensor(pos, dtype=torch.long, device=dev))
        last = ctx.meta.query_start_loc[1:].long() - 1
        logits = self.model.compute_logits(hidden[last]).cpu()
        self._record_stats([batch[i][0] for i in order], phases, ctx.meta, plans)
        out = torch.empty_like(logits)
        out[torch.tensor(order)] = logits
        return out

    def _prepare(self, batch: list[tuple[Sequence, int]]):
        """The step's order (decodes first, equal routes together), metadata, routes and plans."""
        phases = ["decode" if n == 1 and seq.num_computed_tokens >= seq.num_prompt_tokens else "prefill"
                  for seq, n in batch]
        routes = [self.routes(seq.sparsity, ph, seq.num_computed_tokens + n) for (seq, n), ph in zip(batch, phases)]
        groups: dict[tuple, int] = {}  # (phase, route list) -> first-seen rank
        order = sorted(range(len(batch)), key=lambda i: (phases[i] != "decode",
                                                         groups.setdefault((phases[i], id(routes[i])), len(groups))))
        reqs, ids, pos, evicting = [], [], [], []
        for i in order:
            seq, n = batch[i]
            start = seq.num_computed_tokens
            # a chunked prompt's rope sees the whole prompt, as one unchunked forward would
            rope_len = max(start + n, seq.num_prompt_tokens)
            kv_len = start - seq.num_evicted_tokens + n  # KV slots; positions stay the true ones
            slot = self.slot(seq)
            reqs.append(RequestInput(n, kv_len, seq.block_table, phases[i], slot, rope_len,
                                     self.evictor.row_lens(slot, kv_len)))
            evict = seq.sparsity.kv.eviction()
            if evict is not None:
                evicting.append(EvictEntry(seq, seq.slot, slice(len(ids), len(ids) + n), kv_len, seq.block_table,
                                           seq.num_prompt_tokens, start + n, evict,
                                           evict.capacity(seq.sparsity.kv.budget, seq.num_prompt_tokens),
                                           self.layout is None  # Mustafar's decode reads whole rows
                                           and backend_class(seq.sparsity.decode.method, self.device.type).row_lens))
            ids.extend(seq.token_ids[start:start + n])
            pos.extend(range(start, start + n))
        meta = AttnMetadata.build(reqs, self.page_size, self.device)
        phases = [phases[i] for i in order]
        attn_routes, plans = build_routes(meta, phases, [routes[i] for i in order], self.shape, self.device.type)
        for backend in {id(r.backend): r.backend for layer in attn_routes for r in layer}.values():
            for spec in backend.kv_spec:
                self.kv_cache.ensure(spec)
        write_index = WriteIndex.from_slots(meta.slot_mapping, self.page_size)
        self.kv_cache.plan_step(meta)
        self.kv_cache.begin_step(write_index)
        ffn = build_ffn_routes(meta, phases, [batch[i][0].sparsity.ffn for i in order], self.ffn)
        ctx = ForwardContext(meta, self.kv_cache, write_index, attn_routes, [ffn] * self.shape.num_layers)
        self.evictor.begin_step(evicting)
        if evicting:
            ctx.observers.append(self.evictor.observe)
        return order, phases, ctx, plans, ids, pos

    @torch.inference_mode()
    def evict(self, private, shared_tokens) -> list[tuple[Sequence, int, int | None]]:
        """After the step's run: evict where a request went over its budget; (sequence, KV slots
        kept, first page written) for the block manager to shrink it. private and shared_tokens
        are the block manager's copy-on-write and shared-prefix answers (Evictor.finish_step)."""
        out = self.evictor.finish_step(self.kv_cache, private, shared_tokens)
        for seq, _, _ in out:
            seq.num_unread_slots = self.evictor.unread_slots(seq.slot)
        return out

    def _record_stats(self, seqs: list[Sequence], phases: list[str], meta: AttnMetadata, plans: list) -> None:
        """Attended pairs from the plans' device counters: one read per plan per step."""
        attended = [0.0] * len(seqs)
        for plan in plans:
            g = plan.group
            for i, a in enumerate(plan.attended.tolist()):
                attended[g.req_start + i] += a
        pairs = meta.group("all", 0, meta.num_reqs).causal_pairs_cpu()
        total = self.shape.num_heads * self.shape.num_layers
        for seq, ph, a, p in zip(seqs, phases, attended, pairs):
            seq.stats.add(ph, int(a), p * total)
