"""Train sparsekv's shipped default model (small Llama, GQA) on a synthetic RULER-style corpus.

    nice -n 10 .venv/bin/python scripts/train_default_model.py --minutes 70
    .venv/bin/python scripts/train_default_model.py --quick --out /tmp/dm-quick   # ~1 min smoke test

Length generalisation: large rope_theta, position ids stretched over up to 32K positions
(contiguous chunks with random jumps, or sorted random positions) and a curriculum on the
sequence length (short first, up to --max-len). Loss: answer tokens + 0.2 x LM loss elsewhere.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from default_corpus import CHAT_TEMPLATE, FORMATS_MD, TASKS, Corpus, build_ids, render_prompt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "sparsekv" / "assets" / "default-model"
SPECIAL = ["<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
MIX = {"passkey": 0.42, "niah_single": 0.1, "kv_dense": 0.15, "niah_multikey": 0.1, "copy": 0.1, "vt": 0.04,
       "niah_multivalue": 0.02, "niah_multiquery": 0.02, "cwe": 0.005, "fwe": 0.005, "chat": 0.02}
SIZES = {  # hidden, layers, heads, kv_heads, ffn
    "tiny": (64, 2, 4, 2, 128),
    "small": (256, 6, 4, 2, 512),
    "base": (320, 8, 4, 2, 960),
}
log = logging.getLogger("train_default_model")


def train_tokenizer(seed: int, vocab: int, n_samples: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    corpus = Corpus(seed, pool_size=4000)
    texts = []
    for i in range(n_samples):
        s = corpus.sample(TASKS[i % len(TASKS)], random.Random(seed + i).choice([256, 512, 1024]))
        texts.append(render_prompt(s, chat=i % 3 == 0) + s["target"])
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIAL, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return tok


def save_tokenizer(tok, out: Path):
    from transformers import PreTrainedTokenizerFast
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                 additional_special_tokens=SPECIAL[3:], chat_template=CHAT_TEMPLATE,
                                 model_max_length=32768, clean_up_tokenization_spaces=False)
    hf.save_pretrained(out)


def positions(n: int, max_pos: int, rng: random.Random) -> torch.Tensor:
    """Position ids for one training row: contiguous, jumpy (chunks + random gaps) or sorted random."""
    r = rng.random()
    if r < 0.4 or n * 2 >= max_pos:
        return torch.arange(n)
    span = int(math.exp(rng.uniform(math.log(n * 1.5), math.log(max_pos))))
    if r < 0.95:
        k = rng.randint(1, 8)
        cuts = torch.tensor(rng.sample(range(1, n), k))
        jumps = torch.distributions.Dirichlet(torch.ones(k)).sample() * (span - n)
        gaps = torch.ones(n)
        gaps[0] = 0
        gaps.index_add_(0, cuts, jumps.floor())
        return gaps.cumsum(0).long()
    return torch.randperm(span)[:n].sort().values


def length_for(frac: float, max_len: int, rng: random.Random) -> int:
    stages = [(0.5, 128, 512), (0.8, 256, 1536), (1.01, 768, max_len)]
    lo, hi = next((a, b) for f, a, b in stages if frac < f)
    if rng.random() < 0.15:
        lo, hi = 128, 512
    return int(min(max_len, rng.uniform(lo, hi)))


def make_batch(corpus, tok, ids_, L: int, tokens: int, max_pos: int, rng):
    rows, lab_masks, pos = [], [], []
    for _ in range(max(1, tokens // L)):
        task = rng.choices(list(MIX), weights=list(MIX.values()))[0]
        s = corpus.sample(task, L)
        chat = rng.random() < 0.3 and "segments" not in s
        ids, mask = build_ids(tok, s, chat, ids_["bos"], ids_["end"] if chat else ids_["eos"])
        ids = ids[: L + 64]
        ans = torch.tensor(mask[: len(ids)]) & (not s.get("lm_only"))
        rows.append(torch.tensor(ids))
        lab_masks.append(ans)
        pos.append(positions(len(ids), max_pos, rng))
    T = max(len(r) for r in rows)
    x = torch.full((len(rows), T), ids_["pad"])
    is_ans = torch.zeros(len(rows), T, dtype=torch.bool)
    valid = torch.zeros(len(rows), T, dtype=torch.bool)
    p = torch.zeros(len(rows), T, dtype=torch.long)
    for i, (r, a, q) in enumerate(zip(rows, lab_masks, pos)):
        x[i, : len(r)], is_ans[i, : len(r)], valid[i, : len(r)] = r, a, True
        p[i, : len(r)] = q
        p[i, len(r):] = q[-1] + 1 + torch.arange(T - len(r))
    return x, p, is_ans, valid


@torch.no_grad()
def probe(model, tok, seed: int, task: str, n_tokens: int, n: int) -> float:
    """Greedy accuracy (all reference strings present) on n fresh samples."""
    model.eval()
    corpus, ok = Corpus(seed, tokenizer=tok, pool_size=3000), 0
    for _ in range(n):
        s = corpus.sample(task, n_tokens)
        ids = [tok.token_to_id("<s>")] + tok.encode(render_prompt(s, False), add_special_tokens=False).ids
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=8 * len(s["outputs"]) + 4, do_sample=False)
        text = tok.decode(out[0, len(ids):].tolist())
        ok += all(o.lower() in text.lower() for o in s["outputs"])
    model.train()
    return ok / n


def save(model, out: Path, meta: dict):
    tmp = out / ".tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp, safe_serialization=True)
    for f in tmp.iterdir():
        os.replace(f, out / f.name)
    tmp.rmdir()
    (out / "training_meta.json").write_text(json.dumps(meta, indent=1))


def write_card(out: Path, meta: dict):
    """Model card: architecture, corpus, task formats, command, wall time; keeps an existing scores block."""
    cfg = json.loads((out / "config.json").read_text())
    mb = sum(f.stat().st_size for f in out.iterdir() if f.is_file()) / 2**20
    old = (out / "README.md").read_text() if (out / "README.md").exists() else ""
    scores = old[old.index("<!-- scores:start -->"):old.index("<!-- scores:end -->") + 19] if "<!-- scores:end -->" in old \
        else "<!-- scores:start -->\nNot measured yet: run scripts/eval_default_model.py --update-card.\n<!-- scores:end -->"
    probes = "\n".join(f"- {p}" for p in meta.get("probes", [])) or "- none"
    text = f"""# sparsekv default model

A small Llama-architecture model trained from scratch on CPU by `scripts/train_default_model.py`
on a synthetic, offline, seeded corpus (`scripts/default_corpus.py`), so that `sparsekv serve`,
`generate` and `eval` work out of the box and dense-vs-sparse retrieval accuracy means something.
It is a retrieval toy, not a language model: its "chat" is template sentences.

## Architecture
`LlamaForCausalLM`: {cfg["num_hidden_layers"]} layers, hidden {cfg["hidden_size"]}, MLP {cfg["intermediate_size"]},
{cfg["num_attention_heads"]} query heads / {cfg["num_key_value_heads"]} KV heads (GQA), head_dim {cfg.get("head_dim")},
vocab {cfg["vocab_size"]}, tied embeddings, RoPE theta {cfg.get("rope_parameters", {}).get("rope_theta", cfg.get("rope_theta"))},
max_position_embeddings {cfg["max_position_embeddings"]}; {meta["params"] / 1e6:.2f}M parameters, float32 safetensors;
directory {mb:.1f} MB.

Tokenizer: byte-level BPE ({cfg["vocab_size"]} tokens) trained with `tokenizers` on the corpus; digits are always
single tokens; a BOS `<s>` is prepended by default; special tokens `<s>` `</s>` `<pad>` `<|system|>`
`<|user|>` `<|assistant|>` `<|end|>`. Chat template: `<s><|role|>\\n{{content}}<|end|>\\n` per message,
then `<|assistant|>\\n`. Generation stops at `</s>` or `<|end|>` (generation_config.json; greedy).

## Training
- Command: `nice -n 10 {meta["command"]}`
- Wall time: {meta.get("train_minutes", 0):.1f} min of training ({meta.get("total_minutes", meta.get("train_minutes", 0)):.1f} min with
  tokenizer and checkpoints) on 2 shared CPU cores (1 torch thread, bf16 autocast, fp32 master weights);
  {meta.get("steps", 0)} steps, {meta.get("tokens", 0) / 1e6:.1f}M tokens.
- Curriculum on length (time fractions): 0-50% 128-512 tokens, 50-80% 256-1536, 80-100% 768-{meta["max_len"]}
  (15% of batches stay at 128-512). AdamW lr 2e-3, cosine to 10%, warmup 50 steps, wd 0.1.
- Length generalisation: rope_theta 5e5 and position ids stretched over up to {meta["max_pos"]} positions: 40% of
  rows contiguous, 55% contiguous chunks separated by 1-8 random jumps, 5% sorted random positions
  (span log-uniform between 1.5x the row length and {meta["max_pos"]}). Training sequences never exceed
  {meta["max_len"]} tokens.
- Loss: cross-entropy on answer tokens + 0.2 x LM loss on all other tokens (chat rows: LM loss only).
- Mix: {", ".join(f"{k} {v:.1%}" for k, v in MIX.items())}; 30% of rows use the chat template.
- Corpus seeds {meta["seed"]}+1 (tokenizer) / +2 (training); evaluation uses seed 424242, probes 777.
- Continued from: {json.dumps({k: prev.get(k) for k in ("command", "steps", "tokens", "train_minutes")}) if (prev := meta.get("previous")) else "-"}
- Checkpoint probes (greedy, all references found, few samples):
{probes}

## Measured scores
{scores}

## Task formats
{FORMATS_MD}"""
    (out / "README.md").write_text(text)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=70.0, help="training time budget (wall clock)")
    ap.add_argument("--size", choices=list(SIZES), default="small")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=10_000, help="corpus seed (eval uses other seeds)")
    ap.add_argument("--max-len", type=int, default=4096, help="longest training sequence")
    ap.add_argument("--max-pos", type=int, default=32768, help="largest position id seen in training")
    ap.add_argument("--tokens-per-step", type=int, default=2048)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--save-every", type=float, default=10.0, help="minutes between checkpoints")
    ap.add_argument("--threads", type=int, default=1, help="1 is faster on a shared, oversubscribed CPU")
    ap.add_argument("--quick", action="store_true", help="tiny model, ~1 minute, for smoke tests")
    ap.add_argument("--init", type=Path, help="continue from this model dir (weights + tokenizer)")
    ap.add_argument("--card-only", action="store_true", help="only (re)write README.md from training_meta.json")
    a = ap.parse_args()
    if a.quick:
        a.minutes, a.size, a.max_len, a.tokens_per_step, a.vocab, a.save_every = 1.0, "tiny", 512, 2048, 1024, 0.5
    if a.card_only:
        return write_card(a.out, json.loads((a.out / "training_meta.json").read_text()))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    rng = random.Random(a.seed)
    a.out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
    if a.init:
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(str(a.init / "tokenizer.json"))
        prev = json.loads((a.init / "training_meta.json").read_text())
    else:
        tok, prev = train_tokenizer(a.seed + 1, a.vocab, 300 if a.quick else 3000), None
    save_tokenizer(tok, a.out)
    ids_ = {k: tok.token_to_id(t) for k, t in [("bos", "<s>"), ("eos", "</s>"), ("pad", "<pad>"), ("end", "<|end|>")]}
    log.info("tokenizer: %d tokens (%.0fs)", tok.get_vocab_size(), time.time() - t_start)

    h, nl, nh, nkv, ffn = SIZES[a.size]
    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=h, intermediate_size=ffn, num_hidden_layers=nl,
                      num_attention_heads=nh, num_key_value_heads=nkv, head_dim=h // nh,
                      max_position_embeddings=max(32768, a.max_pos), rope_theta=500000.0, rms_norm_eps=1e-5,
                      tie_word_embeddings=True, bos_token_id=ids_["bos"], eos_token_id=ids_["eos"],
                      pad_token_id=ids_["pad"], attn_implementation="sdpa")
    model = LlamaForCausalLM.from_pretrained(a.init, dtype=torch.float32) if a.init else LlamaForCausalLM(cfg)
    model.generation_config = GenerationConfig(bos_token_id=ids_["bos"], eos_token_id=[ids_["eos"], ids_["end"]],
                                               pad_token_id=ids_["pad"], do_sample=False, max_new_tokens=64)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %s, %.2fM params", SIZES[a.size], n_params / 1e6)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95), eps=1e-8)
    corpus = Corpus(a.seed + 2, tokenizer=tok)
    budget = a.minutes * 60
    t0 = last_save = time.time()
    step, seen, hist, probes = 0, 0, [], []
    warm = 50 if not a.quick else 10
    meta = {"size": a.size, "params": n_params, "seed": a.seed, "max_len": a.max_len, "max_pos": a.max_pos,
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv), "previous": prev}
    model.train()
    while True:
        frac = (time.time() - t0) / budget
        if frac >= 1.0:
            break
        lr = a.lr * min(1.0, (step + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))
        for g in opt.param_groups:
            g["lr"] = lr
        L = length_for(frac, a.max_len, rng)
        x, p, is_ans, valid = make_batch(corpus, tok, ids_, L, a.tokens_per_step, a.max_pos, rng)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=x, position_ids=p, attention_mask=torch.ones_like(x)).logits
        ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), x[:, 1:], reduction="none")
        ans, other = is_ans[:, 1:], valid[:, 1:] & ~is_ans[:, 1:]
        l_ans = (ce * ans).sum() / ans.sum().clamp(min=1)
        l_lm = (ce * other).sum() / other.sum().clamp(min=1)
        loss = l_ans + 0.2 * l_lm
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        seen += int(valid.sum())
        hist.append((l_ans.item(), l_lm.item()))
        if step % 20 == 0:
            el = time.time() - t0
            la, ll = (sum(v[i] for v in hist) / len(hist) for i in (0, 1))
            hist = []
            log.info("step %d  %.1f min  len %d  lr %.2e  ans_loss %.3f  lm_loss %.3f  %.0f tok/s",
                     step, el / 60, L, lr, la, ll, seen / el)
        if time.time() - last_save > a.save_every * 60:
            last_save = time.time()
            meta.update(steps=step, tokens=seen, train_minutes=(time.time() - t0) / 60)
            save(model, a.out, meta)
            pr = {f"{t}@{ln}": probe(model, tok, 777, t, ln, 2 if a.quick else n) for t, ln, n in
                  [("passkey", 1024, 8), ("niah_multikey", 1024, 8), ("passkey", 4096, 4)]}
            probes.append({"minutes": round((time.time() - t0) / 60, 1), **pr})
            meta["probes"] = probes
            log.info("checkpoint saved; probes %s", pr)
    meta.update(steps=step, tokens=seen, train_minutes=(time.time() - t0) / 60,
                total_minutes=(time.time() - t_start) / 60)
    save(model, a.out, meta)
    write_card(a.out, meta)
    log.info("done: %d steps, %d tokens, %.1f min", step, seen, meta["train_minutes"])


if __name__ == "__main__":
    main()
