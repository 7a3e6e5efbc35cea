"""Loading a model: a Hugging Face directory (config.json + safetensors) or a GGUF file, its
config (with vLLM-style `hf_overrides` laid over it), weights, tokenizer and EOS ids."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

from sparsekv.engine.gguf_loader import find_gguf, gguf_config, gguf_eos_ids, gguf_tensors
from sparsekv.engine.models.llama import SUPPORTED_ARCHITECTURES, LlamaForCausalLM, ModelArgs
from sparsekv.engine.models.rope import rope_inv_freq

log = logging.getLogger(__name__)


def read_config(model: str | Path, hf_overrides: dict | None = None) -> dict:
    """The model's config dict; `hf_overrides` replaces top-level keys, as vLLM's flag does."""
    path = Path(model)
    gguf = find_gguf(path)
    if gguf:
        cfg = gguf_config(gguf)
    else:
        if not path.exists():
            raise FileNotFoundError(f"model {str(path)!r} does not exist")
        if not path.is_dir():
            raise FileNotFoundError(f"model {str(path)!r} is neither a directory nor a .gguf file")
        cfg_path = path / "config.json"
        if not cfg_path.exists():
            raise FileNotFoundError(f"{path} has no config.json or .gguf file: is it a Hugging Face model directory?")
        cfg = json.loads(cfg_path.read_text())
    cfg = {**cfg, **(hf_overrides or {})}
    archs = cfg.get("architectures") or []
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise ValueError(f"architecture {', '.join(archs) or cfg.get('model_type', '?')} is not supported; "
                         f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    return cfg


def _safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {path}")
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():
                yield name, sf.get_tensor(name)


def load_model(model: str | Path, dtype: torch.dtype, device: torch.device,
               hf_overrides: dict | None = None) -> LlamaForCausalLM:
    """Build the model from its config and fill it from safetensors (sharded or not) or a GGUF."""
    path = Path(model)
    args = ModelArgs.from_hf(read_config(path, hf_overrides))
    gguf = find_gguf(path)
    tensors = gguf_tensors(gguf, args.num_heads, args.num_kv_heads) if gguf else _safetensors(path)
    with torch.device("meta"):
        model = LlamaForCausalLM(args)
    params = dict(model.named_parameters())
    raw = {name: t.to(device=device, dtype=dtype) for name, t in tensors if "rotary_emb" not in name}
    loaded: dict[str, torch.Tensor] = {}
    for name, t in LlamaForCausalLM.fuse_checkpoint(raw).items():
        if name not in params:
            log.warning("ignoring unexpected tensor %s in %s", name, path.name)
        elif tuple(t.shape) != tuple(params[name].shape):
            raise ValueError(f"tensor {name} in {path.name} has shape {tuple(t.shape)} but the config "
                             f"implies {tuple(params[name].shape)}")
        else:
            loaded[name] = t
    if args.tie_word_embeddings:
        loaded.setdefault("lm_head.weight", loaded.get("model.embed_tokens.weight"))
    missing = [n for n in params if n not in loaded or loaded[n] is None]
    if missing:
        raise ValueError(f"checkpoint in {path} lacks {len(missing)} tensors, e.g. {missing[:3]}")
    model.load_state_dict(loaded, strict=False, assign=True)
    if args.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(args).to(device)  # built on the meta device above
    return model.eval()


def transformers_source(model: str | Path) -> tuple[str, dict]:
    """(directory, kwargs) for transformers' `from_pretrained`: a GGUF goes by `gguf_file`."""
    gguf = find_gguf(model)
    return (str(gguf.parent), {"gguf_file": gguf.name}) if gguf else (str(model), {})


def load_tokenizer(model: str | Path):
    """The tokenizer and chat template: tokenizer.json etc., or a GGUF's `tokenizer.*` metadata."""
    from transformers import AutoTokenizer

    source, kwargs = transformers_source(model)
    return AutoTokenizer.from_pretrained(source, **kwargs)


def load_eos_ids(model: str | Path, tokenizer) -> set[int]:
    """EOS ids from generation_config.json (may be a list) or the GGUF metadata, and the tokenizer."""
    ids: set[int] = set()
    gguf = find_gguf(model)
    gen = Path(model) / "generation_config.json"
    if gguf:
        ids.update(gguf_eos_ids(gguf))
    elif gen.exists():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
