"""Acceptance table for the shipped default model (transformers, greedy, RULER string_match_all).

    nice -n 10 .venv/bin/python scripts/eval_default_model.py --n 50 --update-card
    nice -n 10 .venv/bin/python scripts/eval_default_model.py --cells passkey@4096 --n 10   # quick probe

Samples come from scripts/default_corpus.py with seed --seed (default 424_242; training uses
10_000-10_002, training probes 777), so they are held out. Prompts are raw (BOS + input +
answer_prefix, no chat template) unless --chat.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from default_corpus import Corpus, render_prompt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "sparsekv" / "assets" / "default-model"
DEFAULT_CELLS = ("passkey@4096,passkey@8192,passkey@16384,passkey@32768,"
                 "niah_multikey@4096,niah_multikey@16384,vt@4096,vt@16384,"
                 "niah_multivalue@4096,niah_multivalue@16384,niah_single@4096,niah_multiquery@4096")
TARGETS = {("passkey", 4096): 95, ("passkey", 8192): 95, ("passkey", 16384): 90,
           ("niah_multikey", 4096): 90, ("niah_multikey", 16384): 80}
GEN_TOKENS = 64


def make(corpus: Corpus, task: str, n: int) -> dict:
    """Fixed, RULER-like configurations per task (n = prompt budget in tokens)."""
    r = corpus.rng
    if task == "passkey":
        s = corpus._passkey(n, "noise")
    elif task == "niah_single":  # RULER niah_single_1: noise haystack, one key
        k = corpus.key()
        s = corpus._niah(n, "noise", [k], [k], 1, 0)
    elif task == "niah_multikey":  # RULER niah_multikey_1: 4 keys, 1 queried (varied-sentence haystack)
        k = corpus.key()
        s = corpus._niah(n, "varied", [k], [k], 1, 3)
    elif task == "niah_multikey_needles":  # RULER niah_multikey_2: haystack made of distractor needles
        k = corpus.key()
        s = corpus._niah(n, "noise", [k], [k], 1, 0, needle_hay=True)
    elif task == "niah_multivalue":  # 1 key, 4 values
        k = corpus.key()
        s = corpus._niah(n, "varied", [k], [k], 4, 0)
    elif task == "niah_multiquery":  # 4 keys, all queried
        keys = [corpus.key() for _ in range(4)]
        s = corpus._niah(n, "varied", keys, keys, 1, 0)
    elif task == "vt":  # 1 chain, 4 hops, noise haystack
        s = corpus._vt(n, "noise", n_chains=1, hops=4)
    else:
        s = corpus.sample(task, n, r.choice(["noise", "varied"]))
    return s | {"task": task}


def score(pred: str, outputs: list[str]) -> float:
    pred = re.sub(r"[\x00-\x1f]", "\n", pred).strip().lower()
    return sum(o.lower() in pred for o in outputs) / len(outputs)


@torch.no_grad()
def greedy(model, ids: list[int], max_new: int, stop: set[int]) -> list[int]:
    x = torch.tensor([ids])
    out = model(input_ids=x, use_cache=True, logits_to_keep=1)
    past, new = out.past_key_values, []
    nxt = int(out.logits[0, -1].argmax())
    for i in range(max_new):
        if nxt in stop:
            break
        new.append(nxt)
        out = model(input_ids=torch.tensor([[nxt]]), past_key_values=past, use_cache=True,
                    position_ids=torch.tensor([[len(ids) + i]]))
        past, nxt = out.past_key_values, int(out.logits[0, -1].argmax())
    return new


def evaluate(model_dir: Path, cells: list[tuple[str, int]], n: int, seed: int, chat: bool, cell_minutes: float,
             dtype: str, log=print) -> list[dict]:
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    raw = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    stop = {tok.eos_token_id, tok.convert_tokens_to_ids("<|end|>")}
    rows = []
    for task, length in cells:
        corpus = Corpus(seed + length, tokenizer=raw, pool_size=5000)
        t0, scores, fails = time.time(), [], []
        for i in range(n):
            if scores and time.time() - t0 > cell_minutes * 60:
                break
            s = make(corpus, task, length - GEN_TOKENS)
            ids = raw.encode(render_prompt(s, chat), add_special_tokens=False).ids
            ids = ids if chat else [tok.bos_token_id] + ids
            pred = tok.decode(greedy(model, ids, 8 * len(s["outputs"]) + 8, stop))
            scores.append(score(pred, s["outputs"]))
            if scores[-1] < 1 and len(fails) < 3:
                fails.append({"pred": pred[:80], "want": s["outputs"]})
        row = {"task": task, "length": length, "score": round(100 * sum(scores) / len(scores), 1), "n": len(scores),
               "prompt_tokens": len(ids), "seconds": round(time.time() - t0, 1), "failures": fails}
        log(json.dumps(row))
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| task | length | score (string_match_all, %) | n | target |", "|---|---|---|---|---|"]
    for r in rows:
        t = TARGETS.get((r["task"], r["length"]))
        lines.append(f"| {r['task']} | {r['length']} | {r['score']} | {r['n']} | {'>= %d' % t if t else '-'} |")
    return "\n".join(lines)


def update_card(model_dir: Path, rows: list[dict], note: str):
    card = model_dir / "README.md"
    text = card.read_text() if card.exists() else "# sparsekv default model\n"
    block = f"<!-- scores:start -->\n{note}\n\n{table(rows)}\n<!-- scores:end -->"
    if "<!-- scores:start -->" in text:
        text = re.sub(r"<!-- scores:start -->.*<!-- scores:end -->", lambda _: block, text, flags=re.S)
    else:
        text += "\n## Measured scores\n\n" + block + "\n"
    card.write_text(text)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--cells", default=DEFAULT_CELLS, help="comma list of task@length")
    ap.add_argument("--n", type=int, default=50, help="samples per cell")
    ap.add_argument("--seed", type=int, default=424_242)
    ap.add_argument("--chat", action="store_true", help="wrap prompts in the chat template")
    ap.add_argument("--cell-minutes", type=float, default=12.0, help="stop a cell after this long (n shrinks)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "eval_default_model.json")
    ap.add_argument("--update-card", action="store_true", help="write the table into the model card")
    ap.add_argument("--from-json", default="", help="comma list of earlier --out files: merge them, evaluate nothing")
    ap.add_argument("--note", default="", help="extra sentence for the model card")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cells = [(c.split("@")[0], int(c.split("@")[1])) for c in a.cells.split(",") if c]
    t0 = time.time()
    if a.from_json:
        rows = [r for f in a.from_json.split(",") for r in json.loads(Path(f).read_text())["rows"]]
    else:
        rows = evaluate(a.model, cells, a.n, a.seed, a.chat, a.cell_minutes, a.dtype)
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"model": str(a.model), "chat": a.chat, "seed": a.seed, "rows": rows}, indent=1))
    print(table(rows))
    if a.update_card:
        note = (f"Greedy decoding with transformers ({a.dtype}, {'chat template' if a.chat else 'raw prompts'}), "
                f"held-out seed {a.seed}, up to {a.n} samples per cell (fewer where the per-cell time limit of "
                f"{a.cell_minutes:g} min ran out). {a.note}").strip()
        update_card(a.model, rows, note)


if __name__ == "__main__":
    main()
