"""The plugin's backend on CUDA: vLLM's CUSTOM slot (`--attention-backend CUSTOM`), over
TRITON_ATTN's layout and K/V write; sparsekv's Triton kernels run the methods.

CUDA graphs: selections have data-dependent sizes, so the builder declares NEVER and vLLM's
runner runs attention eagerly (the rest of the model may still be captured piecewise).
"""
from __future__ import annotations

from typing import ClassVar

from vllm.v1.attention.backend import AttentionCGSupport
from vllm.v1.attention.backends.triton_attn import (TritonAttentionBackend, TritonAttentionImpl,
                                                    TritonAttentionMetadataBuilder)

from sparsekv.vllm_plugin.metadata import split_token_interior
from sparsekv.vllm_plugin.sparse_attn import SparseBuilderMixin, SparseImplMixin


class SparseTritonBuilder(SparseBuilderMixin, TritonAttentionMetadataBuilder):
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER


class SparseTritonImpl(SparseImplMixin, TritonAttentionImpl):
    split = staticmethod(split_token_interior)


class SparseTritonBackend(TritonAttentionBackend):
    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type[SparseTritonImpl]:
        return SparseTritonImpl

    @staticmethod
    def get_builder_cls() -> type[SparseTritonBuilder]:
        return SparseTritonBuilder
