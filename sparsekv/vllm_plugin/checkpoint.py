"""A GGUF model as a Hugging Face directory vLLM's CPU build can load.

vLLM's GGUF support dequantizes through CUDA-only ops (the CPU wheel has no ggml_dequantize),
so the default model's GGUF is written out once, dequantized, with sparsekv's own reader.
Usage: python -m sparsekv.vllm_plugin.checkpoint MODEL.gguf OUT_DIR [--dtype bfloat16]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from sparsekv.engine.gguf_loader import find_gguf, gguf_tensors
from sparsekv.engine.loader import read_config, load_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export_hf(model: str | Path, out: str | Path, dtype: str = "float32") -> Path:
    """Write config.json, model.safetensors and the tokenizer of `model` (a GGUF) into `out`;
    a directory that already holds them is returned as it is."""
    from safetensors.torch import save_file

    out = Path(out)
    if (out / "model.safetensors").exists():
        return out
    gguf = find_gguf(model)
    if gguf is None:
        raise ValueError(f"{model} is not a GGUF model: vLLM loads a Hugging Face directory directly")
    cfg = read_config(gguf)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {name: w.to(DTYPES[dtype]).contiguous()
               for name, w in gguf_tensors(gguf, cfg["num_attention_heads"], cfg["num_key_value_heads"])}
    if cfg.get("tie_word_embeddings"):
        tensors.pop("lm_head.weight", None)
    load_tokenizer(gguf).save_pretrained(out)
    (out / "config.json").write_text(json.dumps({**cfg, "torch_dtype": dtype}, indent=1))
    tmp = out / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(out / "model.safetensors")  # last: its presence means the export is complete
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    a = ap.parse_args()
    print(export_hf(a.model, a.out, a.dtype))


if __name__ == "__main__":
    main()
