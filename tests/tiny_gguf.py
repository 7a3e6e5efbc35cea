"""A tiny GGUF written by the tests: a random HF Llama (tests/tiny_model.py) converted the way
llama.cpp's converter lays it out (tensor names, Q/K row permutation, metadata, a gpt2-style BPE
vocabulary in `tokenizer.ggml.*`), with its tensors in a mix of quant types."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from tiny_model import CHAT_TEMPLATE, build_model

LAYER = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
# every quant type the tests cover, spread over the layers; norms stay F32 as llama.cpp keeps them
QUANTS = ("F16", "Q8_0", "Q4_0", "F32")


def gguf_name(hf: str) -> str:
    stem, suffix = hf.rsplit(".", 1)
    if stem in TOP:
        return f"{TOP[stem]}.{suffix}"
    _, _, layer, rest = stem.split(".", 3)
    return f"blk.{layer}.{LAYER[rest]}.{suffix}"


def permute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's layout for Q/K rows: per head, the two rotary halves interleaved."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def quant_for(name: str, layer_quants: dict[int, str]) -> str:
    if name.endswith("norm.weight"):
        return "F32"
    if name.startswith("blk."):
        return layer_quants[int(name.split(".")[1])]
    return {"token_embd.weight": "Q8_0", "output.weight": "Q4_0"}[name]


def write_gguf(path: Path, hf_dir: Path, quant_override: dict[str, str] | None = None,
               arch: str = "llama") -> Path:
    """Write `hf_dir` (an HF Llama with tokenizer.json) as the GGUF `path`."""
    import gguf
    from safetensors.torch import load_file

    cfg = json.loads((hf_dir / "config.json").read_text())
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    tok_cfg = json.loads((hf_dir / "tokenizer_config.json").read_text())
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(float(cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_dimension_count(cfg["hidden_size"] // heads)

    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    specials = {t["content"]: t["id"] for t in tok["added_tokens"] if t["special"]}
    ids = {t: i for t, i in vocab}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t, _ in vocab])
    w.add_token_merges(merges)
    w.add_bos_token_id(ids[tok_cfg["bos_token"]])
    w.add_eos_token_id(ids[tok_cfg["eos_token"]])
    w.add_pad_token_id(ids[tok_cfg["pad_token"]])
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)

    layer_quants = {i: QUANTS[i % len(QUANTS)] for i in range(cfg["num_hidden_layers"])}
    for hf, t in load_file(str(hf_dir / "model.safetensors")).items():
        name = gguf_name(hf)
        data = t.to(torch.float32).numpy()
        if ".attn_q." in name:
            data = permute_rows(data, heads)
        elif ".attn_k." in name:
            data = permute_rows(data, kv_heads)
        qtype = gguf.GGMLQuantizationType[(quant_override or {}).get(name) or quant_for(name, layer_quants)]
        if qtype == gguf.GGMLQuantizationType.IQ4_NL:  # no quantizer in gguf-py: any bytes do for an error test
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            raw = np.zeros((data.shape[0], data.shape[1] // block * size), dtype=np.uint8)
            w.add_tensor(name, raw, raw_dtype=qtype)
        else:
            w.add_tensor(name, gguf.quants.quantize(np.ascontiguousarray(data), qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def build_gguf(folder: Path, layers: int = 4, quant_override: dict[str, str] | None = None,
               arch: str = "llama") -> tuple[Path, Path]:
    """(HF directory, GGUF file in its own directory) of one random model; hidden 64 keeps every
    row a whole number of 32-wide quant blocks."""
    hf_dir = build_model(folder / "hf", "llama", layers=layers, hidden=64, heads=4, kv_heads=2)
    out = folder / "gguf"
    out.mkdir()
    return hf_dir, write_gguf(out / "tiny.gguf", hf_dir, quant_override, arch)
