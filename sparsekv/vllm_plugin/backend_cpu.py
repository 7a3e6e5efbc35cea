"""The plugin's backend on CPU: registered over CPU_ATTN, the only backend vLLM's CPU platform
selects (it ignores --attention-backend), keeping that backend's name, layout and K/V write."""
from __future__ import annotations

from vllm.v1.attention.backends.cpu_attn import (CPUAttentionBackend, CPUAttentionBackendImpl,
                                                 CPUAttentionMetadataBuilder)

from sparsekv.vllm_plugin.metadata import split_block_interior
from sparsekv.vllm_plugin.sparse_attn import SparseBuilderMixin, SparseImplMixin


class SparseCPUBuilder(SparseBuilderMixin, CPUAttentionMetadataBuilder):
    pass


class SparseCPUImpl(SparseImplMixin, CPUAttentionBackendImpl):
    split = staticmethod(split_block_interior)


class SparseCPUBackend(CPUAttentionBackend):
    @staticmethod
    def get_impl_cls() -> type[SparseCPUImpl]:
        return SparseCPUImpl

    @staticmethod
    def get_builder_cls() -> type[SparseCPUBuilder]:
        return SparseCPUBuilder
