"""Loading a Hugging Face model directory: config, safetensors weights, tokenizer."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open

from sparsekv.engine.models.llama import SUPPORTED_ARCHITECTURES, LlamaForCausalLM, ModelArgs, rope_inv_freq

log = logging.getLogger(__name__)


def read_config(model_dir: str | Path) -> dict:
    path = Path(model_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {str(path)!r} does not exist")
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{path} has no config.json: is it a Hugging Face model directory?")
    cfg = json.loads(cfg_path.read_text())
    archs = cfg.get("architectures") or []
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise ValueError(f"architecture {', '.join(archs) or cfg.get('model_type', '?')} is not supported; "
                         f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    return cfg


def load_model(model_dir: str | Path, dtype: torch.dtype, device: torch.device) -> LlamaForCausalLM:
    """Build the model from config.json and fill it from *.safetensors (sharded or not)."""
    path = Path(model_dir)
    args = ModelArgs.from_hf(read_config(path))
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {path}")
    with torch.device("meta"):
        model = LlamaForCausalLM(args)
    params = dict(model.named_parameters())
    raw: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():
                if "rotary_emb" not in name:
                    raw[name] = sf.get_tensor(name).to(device=device, dtype=dtype)
    loaded: dict[str, torch.Tensor] = {}
    for name, t in LlamaForCausalLM.fuse_checkpoint(raw).items():
        if name not in params:
            log.warning("ignoring unexpected tensor %s in %s", name, path)
        elif tuple(t.shape) != tuple(params[name].shape):
            raise ValueError(f"tensor {name} in {path} has shape {tuple(t.shape)} but the config "
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


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def load_eos_ids(model_dir: str | Path, tokenizer) -> set[int]:
    """EOS ids from generation_config.json (may be a list) and the tokenizer."""
    ids: set[int] = set()
    gen = Path(model_dir) / "generation_config.json"
    if gen.exists():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
