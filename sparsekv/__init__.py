"""sparsekv: a serving engine for long-context LLMs with sparse attention, FFN and KV cache."""
from sparsekv.config import EngineConfig, SparsityConfig
from sparsekv.engine.llm import LLM
from sparsekv.engine.outputs import CompletionOutput, RequestOutput
from sparsekv.engine.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "SparsityConfig", "EngineConfig", "RequestOutput", "CompletionOutput"]
