"""Attention backends; importing this registers the built-in ones."""
from sparsekv.attention import dense  # noqa: F401
from sparsekv.attention import delta, quest  # noqa: F401
from sparsekv.attention import mustafar, mustafar_delta, mustafar_quest  # noqa: F401
from sparsekv.attention import hip  # noqa: F401
from sparsekv.attention import xattention  # noqa: F401
from sparsekv.attention.backend import AttentionBackend, Plan, get_backend, register

__all__ = ["AttentionBackend", "Plan", "get_backend", "register"]
