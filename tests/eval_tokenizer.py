"""A small BPE tokenizer trained on eval-task text, shaped like the default model's (byte-level,
single digits, BOS added by the post-processor), and a tiny random Llama that uses it."""
from __future__ import annotations

from pathlib import Path

SPECIAL = ["<s>", "</s>", "<pad>"]


def build_tokenizer(path: Path, vocab_size: int = 1500):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from sparsekv.eval import haystack, tasks

    def rough(text: str) -> int:
        return len(text) // 4

    texts = [tasks.generate(t, 1024, i, rough, seed=123).prompt for t in tasks.TASKS for i in range(3)]
    texts += [" ".join(haystack.words(k)) for k in ("noun", "adjective", "verb")]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(path)
    return fast


def build_model(path: Path, layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2) -> Path:
    """A random LlamaForCausalLM in Hugging Face layout (safetensors) with the tokenizer above."""
    import torch
    import transformers

    path.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(path)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                                   max_position_embeddings=4096, bos_token_id=tok.bos_token_id,
                                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger weights, so greedy choices are not near-ties
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(4.0)
    model.save_pretrained(path, safe_serialization=True)
    return path
