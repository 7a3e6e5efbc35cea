"""dtype auto by device, and the warning for bf16 on a CPU that would emulate it."""
from __future__ import annotations

import logging

import pytest
import torch

from sparsekv.engine import model_runner
from sparsekv.engine.model_runner import resolve_dtype

CPU = torch.device("cpu")


def test_auto_is_float32_on_cpu_and_bf16_on_cuda():
    assert resolve_dtype("auto", CPU) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16


@pytest.mark.parametrize("native", [True, False])
def test_bf16_on_cpu_warns_only_without_native_bf16(monkeypatch, caplog, native):
    monkeypatch.setattr(model_runner, "cpu_has_native_bf16", lambda: native)
    with caplog.at_level(logging.WARNING):
        assert resolve_dtype("bfloat16", CPU) == torch.bfloat16
    assert ("no native bfloat16" in caplog.text) is not native


def test_float16_on_cpu_is_refused():
    with pytest.raises(ValueError, match="float16 is unusably slow on CPU"):
        resolve_dtype("float16", CPU)
