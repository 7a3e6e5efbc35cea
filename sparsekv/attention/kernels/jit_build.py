"""JIT builds of the C++ CPU kernels (csrc/*.cpp), shared by every kernel that has one.

Built on first use with torch's extension loader, so installing sparsekv needs no compiler;
where none works the build returns False and callers keep their PyTorch path. Each build is
cached under a directory named after a hash of the source, the flags and the CPU's feature
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

FLAG_SETS = (  # tried in order: native code first, then a portable AVX2 build
    ("-O3", "-march=native", "-mprefer-vector-width=512", "-ffast-math", "-fno-finite-math-only", "-fopenmp"),
    ("-O3", "-mavx2", "-mfma", "-ffast-math", "-fno-finite-math-only", "-fopenmp"),
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


@functools.lru_cache(maxsize=None)
def build_extension(source: Path, prefix: str) -> bool:
    """Build (or load the cached build of) `source`, whose TORCH_LIBRARY registers its ops
    under torch.ops; False when no flag set compiles."""
    from torch.utils import cpp_extension

    text = source.read_bytes()
    capability = torch.backends.cpu.get_cpu_capability().lower()
    for flags in FLAG_SETS:
        digest = hashlib.sha256(text + " ".join(flags).encode() + _cpu_flags().encode()
                                + torch.__version__.encode()).hexdigest()[:16]
        name = f"{prefix}_{capability}_{digest}"
        build_dir = _cache_root() / name
        build_dir.mkdir(parents=True, exist_ok=True)
        log.info("loading CPU kernel %s (flags %s) from %s", name, " ".join(flags), build_dir)
        try:
            cpp_extension.load(name=name, sources=[str(source)], extra_cflags=list(flags), extra_ldflags=["-fopenmp"],
                               build_directory=str(build_dir), is_python_module=False)
            return True
        except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
            log.warning("CPU kernel %s did not build with %s: %s", source.name, " ".join(flags), exc)
    return False
