"""sparsekv's backends behind vLLM's AttentionMetadataBuilder / AttentionImpl contract.

Mixins over one of vLLM's own backends (CPU_ATTN on CPU, TRITON_ATTN on CUDA): vLLM keeps its
KV-cache layout, block-size rules and its K/V write (do_kv_cache_update); the builder turns
each step's CommonAttentionMetadata into sparsekv's metadata and per-layer routes once, and
the impl runs the routed sparsekv backends on views of vLLM's paged cache. A layer with a
feature sparsekv's methods do not model runs the base backend's dense path instead.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from vllm.config import get_layers_from_vllm_config
from vllm.logger import init_logger
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backend import AttentionType

from sparsekv.attention.backend import AttentionBackend, AttnShape, backend_class
from sparsekv.attention.context import Route, run_routes
from sparsekv.attention.metadata import AttnMetadata
from sparsekv.attention.router import build_routes
from sparsekv.cache.kv_cache import KVSpec, LayerKV, WriteIndex
from sparsekv.config import FFNSection, KVSection, SparsityConfig
from sparsekv.vllm_plugin import config as plugin_config
from sparsekv.vllm_plugin.metadata import attn_metadata, keep_side_tables, phases
from sparsekv.vllm_plugin.stats import AttendedStats

logger = init_logger("vllm.plugins.sparsekv")


@dataclass(eq=False)
class SparseMetadata:
    """One step, shared by every layer of the KV-cache group."""

    meta: AttnMetadata
    phases: list[str]
    routes: list[list[Route]]  # per model layer
    plans: list
    write_index: WriteIndex
    specs: tuple[KVSpec, ...]
    last_layer: int  # this group's last layer: the plans are complete after it
    base: Any = None  # the base backend's metadata, for layers it runs
    stats: AttendedStats | None = None
    heads_x_layers: int = 0  # dense pairs per causal pair on this rank: its heads times its layers

    def record(self) -> None:
        if self.stats is not None:
            self.stats.record(self.meta, self.phases, self.plans, self.heads_x_layers)


def resolve_methods(sp: SparsityConfig, device: str) -> SparsityConfig:
    """A method with no implementation on this device runs dense, with one warning; so does a
    decode method that keeps per-request state across steps (it overrides `free`, as HiP's cached
    decode masks do): vLLM's metadata names no request, so the plugin's slots are the step's batch
    rows. Prefill (one step) and stateless decode (Quest, DELTA) run by name. The KV-cache and FFN
    sections are sparsekv-engine features, not attention: inside vLLM they are ignored, said once."""
    override = {}
    for phase in ("prefill", "decode"):
        spec = getattr(sp, phase)
        try:
            cls = backend_class(spec.method, device)
        except ValueError as exc:
            logger.warning_once("sparsekv: %s; %s attention runs dense", exc, phase)
            override[phase] = {"method": "dense"}
            continue
        if phase == "decode" and cls.free is not AttentionBackend.free:
            logger.warning_once("sparsekv: %s decode keeps per-request state, which the vLLM plugin cannot key; "
                                "decode attention runs dense", spec.method)
            override[phase] = {"method": "dense"}
    if sp.kv != KVSection() or sp.ffn != FFNSection():
        logger.warning_once("sparsekv: the kv and ffn sections of %s apply to sparsekv's own engine only; "
                            "inside vLLM only prefill and decode attention are sparse", plugin_config.ENV)
    return sp.merged(override)


class SparseBuilderMixin:
    """Put before vLLM's builder class in the bases."""

    def __init__(self, kv_cache_spec, layer_names: list[str], vllm_config, device: torch.device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        plugin_config.refuse_unsupported(vllm_config.parallel_config)
        self.reorder_batch_threshold = 1  # decodes first, as sparsekv's runner orders them
        self.device_type = "cuda" if torch.device(device).type == "cuda" else "cpu"
        self.sparsity = resolve_methods(plugin_config.load_sparsity(), self.device_type)
        layers = get_layers_from_vllm_config(vllm_config, Attention, layer_names)
        impls = [layer.impl for layer in layers.values()]
        scales = {impl.scale for impl in impls}
        if len(scales) != 1:
            raise ValueError(f"sparsekv: layers of one KV-cache group have different scales {sorted(scales)}")
        model = vllm_config.model_config
        self.shape = AttnShape(num_layers=model.get_total_num_hidden_layers(),
                               num_heads=impls[0].num_heads,  # this rank's heads under tensor parallelism
                               num_kv_heads=kv_cache_spec.num_kv_heads, head_dim=kv_cache_spec.head_size,
                               scale=scales.pop())
        self.page_size = kv_cache_spec.block_size
        self._check_model()
        self.layer_ids = sorted(extract_layer_index(name) for name in layer_names)
        self.needs_base = any(getattr(impl, "fallback_reason", None) for impl in impls)
        self.specs = tuple({s.name: s for spec in (self.sparsity.prefill, self.sparsity.decode)
                            for s in backend_class(spec.method, self.device_type).kv_spec}.values())
        self._routes: dict[tuple[str, bool], list] = {}
        path = plugin_config.stats_path()
        self.stats = AttendedStats(path, _rank()) if path else None

    def _check_model(self) -> None:
        sp, n = self.sparsity, self.shape.num_layers
        bad = [x for x in sp.dense_layers if not 0 <= x < n]
        if bad:
            raise ValueError(f"sparsekv: dense_layers {bad} are not layers of this {n}-layer model")
        for phase in ("prefill", "decode"):
            spec = getattr(sp, phase)
            params = spec.params(phase)
            params.check_model(self.shape)
            page = getattr(params, "page_size", None)  # Quest's and DELTA's selection page
            if page is not None and page % self.page_size:
                raise ValueError(f"sparsekv: {spec.method} page_size {page} must be a multiple of vLLM's block size "
                                 f"{self.page_size}: set page_size={self.page_size} in {plugin_config.ENV}")

    def _layer_routes(self, phase: str, context_len: int) -> list:
        key = (phase, context_len < self.sparsity.min_context)
        if key not in self._routes:
            self._routes[key] = self.sparsity.layer_routes(phase, context_len, self.shape.num_layers)
        return self._routes[key]

    def build(self, common_prefix_len: int, common_attn_metadata, fast_build: bool = False) -> SparseMetadata:
        base = super().build(common_prefix_len, common_attn_metadata, fast_build) if self.needs_base else None
        meta = attn_metadata(common_attn_metadata, self.page_size)
        ph = phases(meta)
        per_request = [self._layer_routes(p, c) for p, c in zip(ph, meta.seq_lens_cpu)]
        routes, plans = build_routes(meta, ph, per_request, self.shape, self.device_type)
        return SparseMetadata(meta, ph, routes, plans, WriteIndex.from_slots(meta.slot_mapping, self.page_size),
                              self.specs, self.layer_ids[-1], base, self.stats,
                              self.shape.num_heads * len(self.layer_ids))


def _rank() -> int:
    from vllm.distributed import get_tensor_model_parallel_rank

    try:
        return get_tensor_model_parallel_rank()
    except AssertionError:  # no distributed group (a single process)
        return 0


def unsupported_reason(impl) -> str | None:
    """What the layer needs that sparsekv's methods do not model, or None."""
    checks = ((getattr(impl, "alibi_slopes", None) is not None, "ALiBi"),
              (getattr(impl, "sliding_window", None) not in (None, -1, (-1, -1)), "a sliding window"),
              (bool(getattr(impl, "logits_soft_cap", 0)), "logit soft-capping"),
              (getattr(impl, "sinks", None) is not None, "attention sinks"),
              (getattr(impl, "attn_type", AttentionType.DECODER) != AttentionType.DECODER, "non-decoder attention"),
              (getattr(impl, "kv_cache_dtype", "auto") not in ("auto", "bfloat16", "float16", "float32"),
               "a quantized KV cache"))
    return ", ".join(name for bad, name in checks if bad) or None


class SparseImplMixin:
    """Put before vLLM's impl class in the bases; set `split` to the base layout's view."""

    split: Callable[[torch.Tensor], LayerKV]

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fallback_reason = unsupported_reason(self)
        if self.fallback_reason:
            logger.warning_once("sparsekv: a layer uses %s, which sparse attention does not model: such layers run "
                                "vLLM's dense attention", self.fallback_reason)
        self.side: dict[str, torch.Tensor] = {}  # this layer's side tables (Quest's page key bounds)
        self.allocated: set[str] = set()
        self.layer_id: int | None = None

    def do_kv_cache_update(self, layer, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                           slot_mapping: torch.Tensor) -> None:
        """Store K/V plainly, [block, head, offset, D], where sparsekv's backends read them: the
        base kernels' own write may pack keys for their ISA (CPU_ATTN stores a block's keys
        transposed, AMX in VNNI pairs). A layer the base backend runs keeps the base's write."""
        if self.fallback_reason:
            return super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        slots = slot_mapping[:key.shape[0]].long()
        if bool((slots < 0).any()):  # padded tokens
            keep = slots >= 0
            slots, key, value = slots[keep], key[:len(keep)][keep], value[:len(keep)][keep]
        kv = self.split(kv_cache)
        idx = WriteIndex.from_slots(slots, kv.page_size)
        kv.k[idx.pages, :, idx.offsets] = key[:len(slots)]
        kv.v[idx.pages, :, idx.offsets] = value[:len(slots)]

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: SparseMetadata | None, output: torch.Tensor, output_scale=None,
                output_block_scale=None) -> torch.Tensor:
        if attn_metadata is None:  # vLLM's profiling and warm-up runs
            return output
        if self.fallback_reason:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata.base, output,
                                   output_scale, output_block_scale)
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("sparsekv: fused output quantization is not supported")
        if self.layer_id is None:
            self.layer_id = extract_layer_index(layer.layer_name)
        m = attn_metadata
        t = m.meta.num_actual_tokens
        kv = self.split(kv_cache)
        kv.side = self.side
        keep_side_tables(kv, self.allocated, m.specs, key[:t], m.write_index)
        out = run_routes(m.routes[self.layer_id], query[:t],
                         lambda r, rows: r.backend.forward(rows, kv, self.layer_id, r.plan))
        output[:t].copy_(out.reshape(output[:t].shape))
        if self.layer_id == m.last_layer:
            m.record()
        return output
