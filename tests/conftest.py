"""Shared fixtures: tiny random checkpoints saved once per session."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from tiny_model import build_model  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    """Llama with GQA (4 query heads, 2 KV heads), 2 layers, float32."""
    return str(build_model(tmp_path_factory.mktemp("llama"), "llama"))


@pytest.fixture(scope="session")
def tiny_llama4(tmp_path_factory) -> str:
    """Four layers, so sparse backends see layers outside dense_layers (0, 1)."""
    return str(build_model(tmp_path_factory.mktemp("llama4"), "llama", layers=4, seed=1))
