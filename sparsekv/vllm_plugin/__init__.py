"""sparsekv's attention methods inside vLLM, as a `vllm.general_plugins` entry point.

`pip install sparsekv[vllm]` brings vLLM; the entry point is inert until
$SPARSEKV_SPARSITY_CONFIG names a SparsityConfig (a preset such as `quest`, a JSON file, or
inline JSON), so vLLM with sparsekv merely installed beside it runs as before. Importing this
package needs no vLLM: register() imports it only when vLLM calls it.
"""
from __future__ import annotations

from sparsekv.vllm_plugin.config import ENV, enabled, load_sparsity

CPU_BACKEND = "sparsekv.vllm_plugin.backend_cpu.SparseCPUBackend"
CUDA_BACKEND = "sparsekv.vllm_plugin.backend_cuda.SparseTritonBackend"
MLA_REFUSAL = "sparsekv.vllm_plugin.refuse_mla.Refused"
LOGGER = "vllm.plugins.sparsekv"  # under "vllm", the logger tree vLLM configures


def register() -> None:
    """vLLM calls this in every process it starts; registering twice is harmless. On CPU the
    platform always takes CPU_ATTN, so the plugin replaces it; on CUDA it fills CUSTOM, chosen
    with `--attention-backend CUSTOM`, leaving vLLM's own backends selectable."""
    if not enabled():
        return
    config = load_sparsity()  # a bad config fails here, at start-up, with pydantic's reasons
    from vllm.logger import init_logger
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if current_platform.is_cpu():
        register_backend(AttentionBackendEnum.CPU_ATTN, CPU_BACKEND)
        for name in ("CPU_MLA", "AMX_MLA"):
            if hasattr(AttentionBackendEnum, name):
                register_backend(getattr(AttentionBackendEnum, name), MLA_REFUSAL)
    else:
        register_backend(AttentionBackendEnum.CUSTOM, CUDA_BACKEND)
    init_logger(LOGGER).info("sparsekv: attention from %s=%s", ENV, config.model_dump_json(exclude_defaults=True))


__all__ = ["register", "ENV"]
