"""The machine's roofs, measured in the same run as the figures they bound: memory read
bandwidth (a decode step's weights and KV) and matrix-multiply throughput (a batch's FLOPs)."""
from __future__ import annotations

import statistics
import time


def read_bandwidth(device: str = "cpu", gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes/s of a sum over a float32 tensor far larger than the caches (median of repeats),
    with torch's threads: the ceiling a memory-bound decode step can reach."""
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    x = torch.ones(int(gib * 2**30) // 4, device=device)
    x.sum()
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        x.sum()
        sync()
        times.append(time.perf_counter() - t)
    return x.numel() * 4 / statistics.median(times)


def matmul_flops(dtype: str = "float32", device: str = "cpu", n: int = 1536, repeats: int = 5) -> float:
    """FLOP/s of an n x n x n matrix product with torch's threads (median of repeats): the
    ceiling of a step whose FLOPs, not its bytes, take the time (a large decode batch on a few
    CPU cores: 16 rows of fp32 FMAs per weight outrun two cores' vector units before the memory)."""
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    a = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
    b = torch.randn(n, n, device=device, dtype=a.dtype)
    a @ b
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        a @ b
        sync()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times)


def cpu_description() -> dict:
    """CPU model, vector capability and threads, recorded with every benchmark result."""
    import platform
    from pathlib import Path

    import torch

    from sparsekv.engine.model_runner import cpu_has_native_bf16

    model = platform.processor() or platform.machine()
    info = Path("/proc/cpuinfo")
    if info.exists():
        model = next((ln.split(":", 1)[1].strip() for ln in info.read_text().splitlines()
                      if ln.startswith("model name")), model)
    return {"cpu": model, "capability": torch.backends.cpu.get_cpu_capability(), "native_bf16": cpu_has_native_bf16(),
            "threads": torch.get_num_threads(), "torch": torch.__version__}
