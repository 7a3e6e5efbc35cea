"""Compiled CPU paged decode: the whole batch's decode attention for one layer in one call.

The C++ kernel (csrc/paged_decode.cpp) is built on first use with torch's JIT extension
loader, so installing sparsekv needs no compiler; where none works, `available()` is False
and callers keep the PyTorch path. The build is cached under a directory named after a hash
of the source, the flags and the CPU's feature flags, with torch's CPU capability spelled out
in the name: -march=native code is only reused on a CPU that can run it.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import subprocess
from pathlib import Path
from typing import Callable

import torch

log = logging.getLogger(__name__)

_CSRC = Path(__file__).parent / "csrc"
_FLAG_SETS = (  # tried in order: native code first, then a portable AVX2 build
    ["-O3", "-march=native", "-mprefer-vector-width=512", "-ffast-math", "-fno-finite-math-only", "-fopenmp"],
    ["-O3", "-mavx2", "-mfma", "-ffast-math", "-fno-finite-math-only", "-fopenmp"],
)
HEAD_DIMS = (32, 64, 128)  # head dims the kernel is compiled for
DTYPES = (torch.float32, torch.bfloat16)


def _cpu_flags() -> str:
    """The CPU's feature flags (first core), so a cached native build is not reused elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    return next((line for line in text.splitlines() if line.startswith("flags")), "")


def _cache_root() -> Path:
    base = os.environ.get("SPARSEKV_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "sparsekv")
    return Path(base) / "torch_extensions"


@functools.lru_cache(maxsize=None)
def build_op(source: str, op: str) -> Callable | None:
    """Build (or load the cached build of) csrc/<source>.cpp; its op torch.ops.<op> ("ns.name"),
    None when no flag set compiles. Shared by every compiled CPU kernel."""
    from torch.utils import cpp_extension

    path = _CSRC / f"{source}.cpp"
    text = path.read_bytes()
    capability = torch.backends.cpu.get_cpu_capability().lower()
    for flags in _FLAG_SETS:
        digest = hashlib.sha256(text + " ".join(flags).encode() + _cpu_flags().encode()
                                + torch.__version__.encode()).hexdigest()[:16]
        name = f"sparsekv_{source}_{capability}_{digest}"
        build_dir = _cache_root() / name
        build_dir.mkdir(parents=True, exist_ok=True)
        log.info("loading CPU kernel %s (flags %s) from %s", name, " ".join(flags), build_dir)
        try:
            cpp_extension.load(name=name, sources=[str(path)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                               build_directory=str(build_dir), is_python_module=False)
            namespace, fn = op.split(".")
            return getattr(getattr(torch.ops, namespace), fn)
        except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
            log.warning("CPU kernel %s did not build with %s: %s", source, " ".join(flags), exc)
    return None


def _extension() -> Callable | None:
    return build_op("paged_decode", "sparsekv_cpu.paged_decode")


def available() -> bool:
    """True when the compiled kernel is usable here (builds it on the first call)."""
    return _extension() is not None


def supports(q: torch.Tensor) -> bool:
    """Whether the kernel covers q's device, dtype and head dim (callers check before calling)."""
    return q.device.type == "cpu" and q.dtype in DTYPES and q.shape[-1] in HEAD_DIMS


def paged_decode_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_table: torch.Tensor,
                     seq_lens: torch.Tensor, scale: float, page_lists: torch.Tensor | None = None,
                     return_lse: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of one query per sequence over its pages: out [B, Hq, D] in q's dtype.

    q [B, Hq, D] (any strides); k, v [num_pages, Hkv, page_size, D] read in place through
    their strides (head-major is the fast case). block_table int32 [B, max_pages] maps logical
    to physical pages; seq_lens int32 [B] bounds the readable positions. page_lists int32
    [B, Hkv, n] of logical pages padded with -1 (may be expanded over Hkv) restricts each KV
    head to its listed pages. With return_lse also the float32 [B, Hq] log-sum-exp of the
    scaled logits (-inf for a sequence with nothing to read, whose output is zero).
    """
    op = _extension()
    if op is None:
        raise RuntimeError("the CPU decode kernel is not built here; check available() first")
    if q.stride(-1) != 1:
        q = q.contiguous()
    block_table = block_table.to(torch.int32)
    if block_table.stride(-1) != 1:
        block_table = block_table.contiguous()
    seq_lens = seq_lens.to(torch.int32).contiguous()
    if page_lists is not None:
        page_lists = page_lists.to(torch.int32)
    out, lse = op(q, k, v, block_table, seq_lens, page_lists, float(scale), return_lse)
    return (out, lse) if return_lse else out
