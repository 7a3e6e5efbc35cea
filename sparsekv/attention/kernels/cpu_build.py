"""The CPU kernels' extension (csrc/*.cpp, one library of torch ops under torch.ops.sparsekv_cpu).

Built on first use with torch's JIT extension loader, so installing sparsekv needs no compiler;
where none works, `available()` is False and callers keep their PyTorch paths. The build is
cached under a directory named after a hash of the sources, the flags and the CPU's feature
flags, with torch's CPU capability spelled out in the name: -march=native code is only reused
on a CPU that can run it.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import subprocess
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCES = tuple(sorted((Path(__file__).parent / "csrc").glob("*.cpp"))  # the FFN's kernels join the one library
                + sorted((Path(__file__).parents[2] / "ffn" / "kernels" / "csrc").glob("*.cpp")))
HEADERS = tuple(sorted((Path(__file__).parent / "csrc").glob("*.h")))  # hashed with the sources
_FLAG_SETS = (  # tried in order: native code first, then a portable AVX2 build
    ["-O3", "-march=native", "-mprefer-vector-width=512", "-ffast-math", "-fno-finite-math-only", "-fopenmp"],
    ["-O3", "-mavx2", "-mfma", "-ffast-math", "-fno-finite-math-only", "-fopenmp"],
)


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


@functools.lru_cache(maxsize=1)
def ops():
    """Build (or load the cached build of) the extension; torch.ops.sparsekv_cpu, or None when
    no flag set compiles."""
    from torch.utils import cpp_extension

    source = b"".join(p.read_bytes() for p in SOURCES + HEADERS)
    capability = torch.backends.cpu.get_cpu_capability().lower()
    for flags in _FLAG_SETS:
        digest = hashlib.sha256(source + " ".join(flags).encode() + _cpu_flags().encode()
                                + torch.__version__.encode()).hexdigest()[:16]
        name = f"sparsekv_cpu_{capability}_{digest}"
        build_dir = _cache_root() / name
        build_dir.mkdir(parents=True, exist_ok=True)
        log.info("loading CPU kernels %s (flags %s) from %s", name, " ".join(flags), build_dir)
        try:
            cpp_extension.load(name=name, sources=[str(p) for p in SOURCES], extra_cflags=flags,
                               extra_ldflags=["-fopenmp"], build_directory=str(build_dir), is_python_module=False)
            return torch.ops.sparsekv_cpu
        except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
            log.warning("CPU kernels did not build with %s: %s", " ".join(flags), exc)
    return None


def available() -> bool:
    """True when the compiled kernels are usable here (builds them on the first call)."""
    return ops() is not None
