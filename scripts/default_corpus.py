"""Synthetic, offline, seeded corpus for the sparsekv default model.

Every sample is RULER-style: ``input`` (instructions + context + question), ``answer_prefix``
(appended right after the input, or after the chat template's assistant header), ``target``
(the text the model should produce next) and ``outputs`` (reference strings for
string-match scoring). ``build_ids`` turns a sample into token ids the way an eval harness
does: the prompt is tokenized on its own and the target is tokenized on its own.

Word lists come from the ``wonderwords`` package assets; templates are our own.
"""
from __future__ import annotations

import random
import string
from importlib import resources

from sparsekv.eval.haystack import SENTENCES

NOISE = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
         "There and back again.")
NOISE_SENTS = [s.strip() + "." for s in NOISE.split(".") if s.strip()]

TEMPLATES = SENTENCES  # the eval harness's varied-haystack sentences: one list for both

PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
                 "memorize it. I will quiz you about the important information there.")
NIAH_INTRO = ("Some special magic numbers are hidden within the following text. Make sure to "
              "memorize it. I will quiz you about the numbers afterwards.")
VT_INTRO = "Memorize and track the chain(s) of variable assignment hidden in the following text."
CWE_INTRO = ("Below is a numbered list of words. In these words, some appear more often than "
             "others. Memorize the ones that appear most often.")
FWE_INTRO = ("Read the following coded text and track the frequency of each coded word. Find the "
             "three most frequently appeared coded words.")
TASKS = ["passkey", "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery",
         "vt", "cwe", "fwe", "chat", "kv_dense", "copy"]


def _words(name: str) -> list[str]:
    text = resources.files("wonderwords").joinpath("assets", name).read_text()
    out = [w.strip() for w in text.splitlines()]
    return sorted({w for w in out if w.isalpha() and w.islower() and 3 <= len(w) <= 10})


def join_list(items: list[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + ", and " + items[-1]


class Corpus:
    """Seeded generator of samples. ``count`` maps text -> token count (approximate is fine)."""

    def __init__(self, seed: int, count=None, tokenizer=None, pool_size: int = 20000):
        self.rng = random.Random(seed)
        self.nouns, self.adjs, self.verbs = _words("nounlist.txt"), _words("adjectivelist.txt"), _words("verblist.txt")
        self.tok = tokenizer
        if count is None and tokenizer is not None:
            count = lambda t: len(tokenizer.encode(t, add_special_tokens=False).ids)  # noqa: E731
        self.count = count or (lambda t: max(1, len(t) // 4))
        pool = [self.sentence() for _ in range(pool_size)]
        self.pool = list(zip(pool, self._counts(pool)))
        self.noise = list(zip(NOISE_SENTS, self._counts(NOISE_SENTS)))

    def _counts(self, sents):
        if self.tok is not None:
            return [len(e.ids) for e in self.tok.encode_batch([" " + s for s in sents])]
        return [self.count(" " + s) for s in sents]

    # ---- pieces -------------------------------------------------------------------------
    def sentence(self) -> str:
        r = self.rng
        return r.choice(TEMPLATES).format(a=r.choice(self.adjs), a2=r.choice(self.adjs), n=r.choice(self.nouns),
                                          n2=r.choice(self.nouns), v=r.choice(self.verbs), v2=r.choice(self.verbs))

    def key(self) -> str:
        return f"{self.rng.choice(self.adjs)}-{self.rng.choice(self.nouns)}"

    def number(self, digits: int = 7) -> str:
        return str(self.rng.randint(10 ** (digits - 1), 10 ** digits - 1))

    def haystack(self, budget: int, kind: str) -> list[str]:
        """Sentences totalling about ``budget`` tokens. kind: noise | varied | mixed."""
        out, used, i = [], 0, 0
        src = self.noise if kind == "noise" else self.pool
        while used < budget:
            if kind == "noise":
                s, c = src[i % len(src)]
                i += 1
            elif kind == "mixed" and self.rng.random() < 0.5:
                s, c = self.noise[self.rng.randrange(len(self.noise))]
            else:
                s, c = src[self.rng.randrange(len(src))]
            out.append(s)
            used += c
        return out

    def insert(self, hay: list[str], needles: list[str], ordered: bool = True) -> str:
        pos = sorted(self.rng.randint(0, len(hay)) for _ in needles)
        if not ordered:
            self.rng.shuffle(pos)
        for offset, (p, nd) in enumerate(sorted(zip(pos, range(len(needles))))):
            hay.insert(p + offset, needles[nd])
        return " ".join(hay)

    # ---- tasks -------------------------------------------------------------------------
    def sample(self, task: str, n_tokens: int, hay_kind: str | None = None) -> dict:
        hay_kind = hay_kind or self.rng.choice(["noise", "varied", "mixed"])
        return getattr(self, "_" + task)(n_tokens, hay_kind) | {"task": task}

    def _fit(self, n_tokens: int, fixed: str, needles: list[str], hay_kind: str, ordered=True) -> str:
        budget = n_tokens - self.count(fixed) - sum(self.count(" " + nd) for nd in needles) - 16
        return self.insert(self.haystack(max(budget, 0), hay_kind), needles, ordered)

    def _passkey(self, n, hay_kind):
        v = self.number(self.rng.choice([5, 5, 6, 7]))
        needle = f"The pass key is {v}. Remember it. {v} is the pass key."
        q = "\n\nWhat is the pass key?"
        ctx = self._fit(n, PASSKEY_INTRO + q, [needle], hay_kind)
        return dict(input=f"{PASSKEY_INTRO}\n\n{ctx}{q}", answer_prefix=" The pass key is",
                    target=f" {v}.", outputs=[v])

    def _niah(self, n, hay_kind, keys, queried, values_per_key, distractors, needle_hay=False):
        needles, answers = [], []
        for k in keys:
            vals = [self.number() for _ in range(values_per_key if k in queried else 1)]
            needles += [f"One of the special magic numbers for {k} is: {v}." for v in vals]
            if k in queried:
                answers.append(vals)
        outputs = [v for q in queried for v in answers[[k for k in keys if k in queried].index(q)]]
        for _ in range(distractors):
            needles.append(f"One of the special magic numbers for {self.key()} is: {self.number()}.")
        query = join_list(queried)
        q = f"\nWhat are all the special magic numbers for {query} mentioned in the provided text?"
        fixed = NIAH_INTRO + q
        if needle_hay:  # RULER multikey_2: the whole haystack is distractor needles
            per = self.count(" One of the special magic numbers for big-dog is: 1234567.")
            extra = max(0, (n - self.count(fixed) - 16) // per - len(needles))
            needles += [f"One of the special magic numbers for {self.key()} is: {self.number()}." for _ in range(extra)]
            order = list(range(len(needles)))
            self.rng.shuffle(order)
            ctx = "\n".join(needles[i] for i in order)
        else:
            ctx = self._fit(n, fixed, needles, hay_kind)
        # the target lists values in the order they are queried / appear in the text
        if len(outputs) > 1 and not needle_hay:
            outputs.sort(key=lambda v: ctx.index(v) if len(queried) == 1 else 0)
        return dict(input=f"{NIAH_INTRO}\n{ctx}{q}",
                    answer_prefix=f" The special magic numbers for {query} mentioned in the provided text are",
                    target=" " + join_list(outputs) + ".", outputs=outputs)

    def _niah_single(self, n, hay_kind):
        k = self.key()
        return self._niah(n, hay_kind, [k], [k], 1, 0)

    def _niah_multikey(self, n, hay_kind):
        k = self.key()
        if self.rng.random() < 0.3:
            return self._niah(n, hay_kind, [k], [k], 1, 0, needle_hay=True)
        d = self.rng.randint(1, max(3, min(40, n // 150)))
        return self._niah(n, hay_kind, [k], [k], 1, d)

    def _niah_multivalue(self, n, hay_kind):
        k = self.key()
        return self._niah(n, hay_kind, [k], [k], self.rng.choice([2, 3, 4, 4]), self.rng.randint(0, 3))

    def _niah_multiquery(self, n, hay_kind):
        keys = [self.key() for _ in range(self.rng.choice([2, 3, 4, 4]))]
        return self._niah(n, hay_kind, keys, keys, 1, self.rng.randint(0, 3))

    def _var(self) -> str:
        return "".join(self.rng.choice(string.ascii_uppercase) for _ in range(5))

    def _vt(self, n, hay_kind, n_chains=None, hops=None):
        n_chains, hops = n_chains or self.rng.choice([1, 1, 2]), hops or self.rng.choice([2, 3, 4, 4])
        chains = []
        for _ in range(n_chains):
            names = [self._var() for _ in range(hops + 1)]
            val = self.number(5)
            chains.append((names, val, [f"VAR {names[0]} = {val}."] +
                           [f"VAR {names[i + 1]} = VAR {names[i]}." for i in range(hops)]))
        hay = self.haystack(n - self.count(VT_INTRO) - 60 - 12 * (hops + 1) * n_chains, "noise" if hay_kind == "noise" else hay_kind)
        # insert every chain in order, chains interleaved at random sentence positions
        for names, val, stmts in chains:
            pos = sorted(self.rng.randint(0, len(hay)) for _ in stmts)
            for off, (p, s) in enumerate(zip(pos, stmts)):
                hay.insert(p + off, s)
        names, val, _ = chains[0]
        q = f"\nQuestion: Find all variables that are assigned the value {val} in the text above."
        return dict(input=f"{VT_INTRO}\n\n{' '.join(hay)}{q}",
                    answer_prefix=(" Answer: According to the chain(s) of variable assignment in the text above, "
                                   f"{len(names)} variables are assigned the value {val}, they are: "),
                    target=" ".join(names) + ".", outputs=names)

    def _cwe(self, n, hay_kind):
        k = self.rng.choice([3, 5, 10])
        words = self.rng.sample(self.nouns, k + 200)
        common, rare = words[:k], words[k:]
        per_word = self.count(" 100. " + "apple")
        total = max(k * 4, n // per_word - 40)
        hi = max(3, min(30, total // (2 * k)))
        lo = max(1, hi // 5)
        lst = [w for w in common for _ in range(hi)]
        i = 0
        while len(lst) < total:
            lst += [rare[i % len(rare)]] * lo
            i += 1
        self.rng.shuffle(lst)
        ctx = " ".join(f"{i + 1}. {w}" for i, w in enumerate(lst))
        return dict(input=f"{CWE_INTRO}\n{ctx}\nQuestion: What are the {k} most common words in the above list?",
                    answer_prefix=f" Answer: The top {k} words that appear most often in the list are:",
                    target=" " + ", ".join(common) + ".", outputs=common)

    def _fwe(self, n, hay_kind):
        vocab = ["".join(self.rng.choice(string.ascii_lowercase) for _ in range(6)) for _ in range(60)]
        weights = [1 / (i + 1) ** 2 for i in range(len(vocab))]
        m = max(30, (n - 120) // 4)
        toks = self.rng.choices(vocab, weights=weights, k=m)
        counts = {w: toks.count(w) for w in set(toks)}
        top = sorted(counts, key=lambda w: -counts[w])
        ctx = " ".join("...." if t == top[0] else t for t in toks)  # rank-1 word is noise, as in RULER
        ans = top[1:4]
        return dict(input=f"{FWE_INTRO} {ctx}\nQuestion: Do not provide any explanation. Please ignore the dots "
                          "'....'. What are the three most frequently appeared words in the above coded text?",
                    answer_prefix=" Answer: According to the coded text above, the three most frequently appeared words are:",
                    target=" " + ", ".join(ans) + ".", outputs=ans)

    def _kv_dense(self, n, hay_kind):
        """Several niah questions in a row, every answer supervised (dense retrieval signal)."""
        m = self.rng.randint(2, max(2, min(12, n // 50)))
        keys, vals = [self.key() for _ in range(m)], [self.number() for _ in range(m)]
        needles = [f"One of the special magic numbers for {k} is: {v}." for k, v in zip(keys, vals)]
        asked = self.rng.sample(range(m), self.rng.randint(1, max(1, min(m, 8, n // 100))))
        ctx = self._fit(n - 45 * len(asked), NIAH_INTRO, needles, hay_kind)
        segs = [(f"{NIAH_INTRO}\n{ctx}", False)]
        for i in asked:
            segs += [(f"\nWhat are all the special magic numbers for {keys[i]} mentioned in the provided text?"
                      f" The special magic numbers for {keys[i]} mentioned in the provided text are", False),
                     (f" {vals[i]}.", True)]
        return dict(input="".join(t for t, _ in segs), answer_prefix="", target="", outputs=[], segments=segs)

    def _copy(self, n, hay_kind):
        """Repeat a list of random words and numbers: dense signal for induction/copy heads."""
        items, used = [], 0
        while used < max(8, n // 2 - 20):
            w = self.rng.choice(self.nouns) if self.rng.random() < 0.6 else self.number(self.rng.randint(3, 7))
            items.append(w)
            used += self.count(" " + w)
        seq = " ".join(items)
        segs = [("Repeat the following text exactly.\n" + seq + "\nRepeat:", False), (" " + seq, True)]
        return dict(input="".join(t for t, _ in segs), answer_prefix="", target="", outputs=[], segments=segs)

    def _chat(self, n, hay_kind):
        r = self.rng
        topic = f"the {r.choice(self.adjs)} {r.choice(self.nouns)}"
        ask = r.choice([f"Tell me about {topic}.", f"What do you think of {topic}?",
                        f"Write a few sentences about {topic}.", "Hello! How are you?"])
        reply = " ".join(s for s in self.haystack(max(n - 30, 8), r.choice(["varied", "varied", "mixed"])))
        return dict(input=ask, answer_prefix="", target=" " + reply, outputs=[], lm_only=True)


CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def render_prompt(sample: dict, chat: bool) -> str:
    """Text the model sees before it answers (without BOS for raw prompts)."""
    if chat:
        return f"<s><|user|>\n{sample['input']}<|end|>\n<|assistant|>\n{sample['answer_prefix']}"
    return sample["input"] + sample["answer_prefix"]


def build_ids(tok, sample: dict, chat: bool, bos_id: int, stop_id: int):
    """Return (ids, answer_mask): prompt and target tokenized separately (like an eval harness)."""
    if "segments" in sample:  # raw only; supervised segments marked
        ids, mask = [bos_id], [False]
        for text, sup in sample["segments"]:
            e = tok.encode(text, add_special_tokens=False).ids
            ids, mask = ids + e, mask + [sup] * len(e)
        return ids + [stop_id], mask + [True]
    p = tok.encode(render_prompt(sample, chat), add_special_tokens=False).ids
    if not chat:
        p = [bos_id] + p
    t = tok.encode(sample["target"], add_special_tokens=False).ids + [stop_id]
    return p + t, [False] * len(p) + [True] * len(t)


FORMATS_MD = """\
Every prompt is `<s>` + `input` + `answer_prefix` (raw), or the chat template applied to one user
message `input` followed by `answer_prefix` (RULER's convention: the prefix goes right after
`<|assistant|>\\n`). The model then writes the answer and `</s>` (raw) or `<|end|>` (chat).
Score with RULER's string_match_all (each reference string present, case-insensitive).
Keys are `adjective-noun` pairs from the wonderwords lists; magic numbers have 7 digits;
passkeys 5-7 digits; vt values 5 digits; variable names 5 random capital letters.
Haystack sentences are joined with single spaces; `noise` = RULER's "The grass is green. The sky
is blue. The sun is yellow. Here we go. There and back again." repeated, `varied` = template
sentences from word lists (an essay substitute), `mixed` = both.

**passkey**
- input: `There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz you about the important information there.\\n\\n{haystack with needle}\\n\\nWhat is the pass key?`
- needle: `The pass key is {v}. Remember it. {v} is the pass key.`
- answer_prefix: ` The pass key is` -> answer ` {v}.`

**niah_single / niah_multikey / niah_multivalue / niah_multiquery** (RULER niah)
- input: `Some special magic numbers are hidden within the following text. Make sure to memorize it. I will quiz you about the numbers afterwards.\\n{haystack with needles}\\nWhat are all the special magic numbers for {query} mentioned in the provided text?`
- needle: `One of the special magic numbers for {key} is: {value}.`
- answer_prefix: ` The special magic numbers for {query} mentioned in the provided text are` -> answer ` {v1}, {v2}, and {v3}.` (one value: ` {v}.`)
- `{query}` is one key, or for multiquery `k1, k2, and k3` (values answered in query order; multivalue answers in text order).
- multikey: distractor needles with other keys in the haystack; RULER multikey_2 style = haystack made only of needles joined by `\\n`.

**vt** (variable tracking)
- input: `Memorize and track the chain(s) of variable assignment hidden in the following text.\\n\\n{noise haystack with statements}\\nQuestion: Find all variables that are assigned the value {v} in the text above.`
- statements: `VAR ABCDE = {v}.` then `VAR FGHIJ = VAR ABCDE.` ... (in chain order, spread through the text)
- answer_prefix: ` Answer: According to the chain(s) of variable assignment in the text above, {n} variables are assigned the value {v}, they are: ` (note the trailing space) -> answer `ABCDE FGHIJ ....`

**cwe** (common words)
- input: `Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones that appear most often.\\n1. w 2. w ...\\nQuestion: What are the {k} most common words in the above list?`
- answer_prefix: ` Answer: The top {k} words that appear most often in the list are:` -> ` w1, w2, ....`

**fwe** (frequent words)
- input: `Read the following coded text and track the frequency of each coded word. Find the three most frequently appeared coded words. {coded words; the most frequent one replaced by ....}\\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are the three most frequently appeared words in the above coded text?`
- answer_prefix: ` Answer: According to the coded text above, the three most frequently appeared words are:` -> ` w1, w2, w3.`

**kv_dense** (training only): several niah questions with answers in a row after one context.
**copy** (training only): `Repeat the following text exactly.\\n{words and numbers}\\nRepeat:` -> the same text.
**chat**: a user request ("Tell me about the {adj} {noun}.") answered with template sentences.
"""
