"""GGUF checkpoints (llama.cpp's single-file format): config, weights and EOS ids from the file.

Weights are dequantized to the engine's dtype at load (the engine computes in float32/bf16, not
on quantized blocks), renamed to the Hugging Face names the model uses, and the Q/K rows that
llama.cpp's converter permutes (for its interleaved rope) are put back in the HF order. The
tokenizer and chat template come from the metadata through transformers (see loader.py).
"""
from __future__ import annotations

import functools
import logging
import re
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

log = logging.getLogger(__name__)

SUPPORTED_GGUF_ARCHITECTURES = ("llama",)
SUPPORTED_QUANTS = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


def find_gguf(model: str | Path) -> Path | None:
    """The GGUF file `model` names: a .gguf file, or a directory with one .gguf and no safetensors."""
    path = Path(model)
    if path.is_file():
        return path if path.suffix == ".gguf" else None
    if not path.is_dir() or any(path.glob("*.safetensors")):
        return None
    files = sorted(path.glob("*.gguf"))
    if len(files) > 1:
        raise ValueError(f"{path} holds {len(files)} .gguf files ({', '.join(f.name for f in files)}); "
                         f"pass one of them as --model")
    return files[0] if files else None


@functools.lru_cache(maxsize=2)
def _open(path: str, mtime_ns: int):
    from gguf import GGUFReader

    return GGUFReader(path)


def reader(path: Path):
    """One parse per file (parsing the vocabulary metadata takes seconds), memory-mapped."""
    return _open(str(path), path.stat().st_mtime_ns)


def metadata(path: Path) -> dict:
    """The key/value metadata, values as Python scalars, strings or lists."""
    return {name: field.contents() for name, field in reader(path).fields.items() if not name.startswith("GGUF.")}


def gguf_config(path: Path) -> dict:
    """A Hugging Face style config dict built from the `<arch>.*` metadata keys."""
    meta = metadata(path)
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ValueError(f"GGUF architecture {arch!r} in {path.name} is not supported; "
                         f"supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)}")
    names = {t.name: t for t in reader(path).tensors}
    if "rope_freqs.weight" in names:
        raise ValueError(f"{path.name} carries rope_freqs (llama3 rope scaling), which the GGUF loader does not "
                         f"support; use the Hugging Face checkpoint")

    def key(name: str, default=None):
        return meta.get(f"{arch}.{name}", default)

    hidden, heads = key("embedding_length"), key("attention.head_count")
    kv_heads = key("attention.head_count_kv", heads)
    if not isinstance(kv_heads, int):
        raise ValueError(f"{path.name} has per-layer KV head counts, which are not supported")
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": int(names["token_embd.weight"].shape[-1]),
        "hidden_size": hidden, "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"), "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "head_dim": key("attention.key_length", hidden // heads),
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon", 1e-5),
        "rope_theta": key("rope.freq_base", 10000.0),
        "max_position_embeddings": key("context_length", 4096),
        "tie_word_embeddings": "output.weight" not in names,
    }
    scaling = key("rope.scaling.type")
    if scaling and scaling != "none":
        cfg["rope_scaling"] = {"rope_type": scaling, "factor": key("rope.scaling.factor")}
        if key("rope.scaling.original_context_length"):
            cfg["rope_scaling"]["original_max_position_embeddings"] = key("rope.scaling.original_context_length")
    return cfg


def gguf_eos_ids(path: Path) -> set[int]:
    """EOS and end-of-turn ids as llama.cpp stops on them."""
    meta = metadata(path)
    return {meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if k in meta}


def hf_name(name: str) -> str | None:
    stem, _, suffix = name.rpartition(".")
    if stem in GLOBAL_NAMES:
        return f"{GLOBAL_NAMES[stem]}.{suffix}"
    m = LAYER_RE.match(name)
    if m and m.group(2) in LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    return None


def unpermute_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo convert_hf_to_gguf's `permute`: per head it interleaved the two rotary halves
    (rows reshaped (2, d/2) -> (d/2, 2)); here they go back to (2, d/2)."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_tensors(path: Path, num_heads: int, num_kv_heads: int) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, float32 tensor) for every weight, dequantized and in HF row order."""
    from gguf.quants import dequantize

    for t in reader(path).tensors:
        name = hf_name(t.name)
        if name is None:
            log.warning("ignoring unexpected tensor %s in %s", t.name, path.name)
            continue
        if t.tensor_type.name not in SUPPORTED_QUANTS:
            raise ValueError(f"tensor {t.name} in {path.name} is {t.tensor_type.name}, which is not supported; "
                             f"supported: {', '.join(SUPPORTED_QUANTS)}")
        w = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))
        if ".attn_q." in t.name:
            w = unpermute_rows(w, num_heads)
        elif ".attn_k." in t.name:
            w = unpermute_rows(w, num_kv_heads)
        yield name, w
