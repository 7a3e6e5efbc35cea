"""RULER-style synthetic tasks, generated offline and seeded, fitted to exact token lengths.

The wording is RULER's with small changes; it all lives in TEMPLATES so it is easy to align.
A prompt is `intro + sep + context + question + answer_prefix` (the answer prefix keeps the
model from wandering, as in RULER) and has exactly `length` tokens as the model's tokenizer
counts them (BOS included when the tokenizer adds one).
"""
from __future__ import annotations

import random
import string
from collections import Counter
from dataclasses import dataclass
from functools import partial
from typing import Callable, Sequence

from sparsekv.eval import haystack as hs

TEMPLATES: dict[str, dict[str, str]] = {
    "passkey": {
        "intro": "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                 "I will quiz you about the important information there.\n\n",
        "needle": "The pass key is {value}. Remember it. {value} is the pass key.",
        "question": "\n\nWhat is the pass key?",
        "answer_prefix": " The pass key is",
    },
    "niah": {
        "intro": "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
                 "I will quiz you about the numbers afterwards.\n",
        "needle": "One of the special magic numbers for {key} is: {value}.",
        "question": "\nWhat are all the special magic numbers for {query} mentioned in the provided text?",
        "answer_prefix": " The special magic numbers for {query} mentioned in the provided text are",
    },
    "vt": {
        "intro": "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n",
        "first": "VAR {name} = {value}.",
        "hop": "VAR {name} = VAR {prev}.",
        "question": "\nQuestion: Find all variables that are assigned the value {value} in the text above.",
        "answer_prefix": " Answer: According to the chain(s) of variable assignment in the text above, "
                         "{count} variables are assigned the value {value}, they are: ",
    },
    "cwe": {
        "intro": "Below is a numbered list of words. In these words, some appear more often than others. "
                 "Memorize the ones that appear most often.\n",
        "entry": "{i}. {word}",
        "question": "\nQuestion: What are the {k} most common words in the above list?",
        "answer_prefix": " Answer: The top {k} words that appear most often in the list are:",
    },
    "fwe": {
        "intro": "Read the following coded text and track the frequency of each coded word. Find the three "
                 "most frequently appeared coded words. ",
        "noise": "....",
        "question": "\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are the three "
                    "most frequently appeared words in the above coded text?",
        "answer_prefix": " Answer: According to the coded text above, the three most frequently appeared words are:",
    },
}


# Marks where the question ends and the answer prefix starts while a prompt is built; `Format`
# turns the marked text into the final prompt (plain: drop the mark; chat: template around it).
ANSWER = "\x1f"
Format = Callable[[str, str], str]  # (user text, answer prefix) -> prompt text


def plain(user: str, answer_prefix: str) -> str:
    return user + answer_prefix


def chat_format(tokenizer) -> Format:
    """The question as one user turn of the tokenizer's chat template, the answer prefix opening
    the assistant's reply (as RULER appends it after the template)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("--chat needs a tokenizer with a chat template")

    def fmt(user: str, answer_prefix: str) -> str:
        head = tokenizer.apply_chat_template([{"role": "user", "content": user.strip()}], tokenize=False,
                                             add_generation_prompt=True)
        return head + answer_prefix.lstrip()
    return fmt


def render_prompt(text: str, fmt: Format) -> str:
    """A marked prompt in its final form; text without the mark (a fragment being measured) as it is."""
    if ANSWER not in text:
        return text
    user, answer = text.split(ANSWER)
    return fmt(user, answer)


@dataclass(frozen=True)
class Sample:
    task: str
    length: int
    index: int
    depth: float | None  # where the (first) queried needle sits, 0..1; None for non-needle tasks
    prompt: str
    references: tuple[str, ...]
    max_tokens: int
    metric: str  # a scoring.METRICS name
    prompt_tokens: int  # as counted while fitting (== length unless the tokenizer forbids it)


Built = tuple[hs.Fitted, list[str]]
Builder = Callable[[random.Random, "float | None", hs.Count, int], Built]


def _distinct(make: Callable[[], str], n: int) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        x = make()
        if x not in out:
            out.append(x)
    return out


def _needles_stream(rng: random.Random, used_keys: set[str], used_values: set[str]) -> hs.Stream:
    """RULER's hard haystack: every line is a distractor needle, with fresh keys and values."""
    def line(_: int) -> str:
        k, v = hs.key(rng), hs.number(rng)
        while k in used_keys or v in used_values:
            k, v = hs.key(rng), hs.number(rng)
        used_keys.add(k)
        used_values.add(v)
        return TEMPLATES["niah"]["needle"].format(key=k, value=v)
    return hs.Stream(line)


def _niah(rng: random.Random, depth: float | None, count: hs.Count, length: int, *, template: str = "niah",
          hay: str = "noise", queries: int = 1, values: int = 1, distractors: int = 0, digits: int = 7) -> Built:
    """Needles `key -> value` in a haystack; the first queried needle at `depth`, the rest at
    seeded random places. Distractor keys and values never equal the queried ones."""
    t = TEMPLATES[template]
    keys = _distinct(lambda: hs.key(rng), queries + distractors)
    vals = _distinct(lambda: hs.number(rng, digits), queries * values + distractors)
    pairs = [(keys[q], vals[q * values + j]) for q in range(queries) for j in range(values)]
    pairs += [(keys[queries + d], vals[queries * values + d]) for d in range(distractors)]
    places = [depth if depth is not None else rng.random()] + [rng.random() for _ in pairs[1:]]
    needles = [(f, t["needle"].format(key=k, value=v)) for f, (k, v) in zip(places, pairs)]
    query = hs.join_list(keys[:queries])
    unit_rng = random.Random(rng.random())
    stream = {"noise": hs.noise_stream, "varied": lambda: hs.varied_stream(unit_rng),
              "needles": lambda: _needles_stream(unit_rng, set(keys), set(vals))}[hay]()
    sep = "\n" if hay == "needles" else " "
    head, tail = t["intro"], t["question"].format(query=query) + ANSWER + t["answer_prefix"].format(query=query)

    def render(n: int, pad: Sequence[str]) -> str:
        return head + hs.context(stream, n, pad, needles, sep) + tail
    return hs.fit(render, count, length), [v for _, v in pairs[:queries * values]]


def _vt(rng: random.Random, depth: float | None, count: hs.Count, length: int, hops: int = 4) -> Built:
    """One chain `VAR A = 12345. VAR B = VAR A. ...` spread in order through the noise."""
    t = TEMPLATES["vt"]
    names = _distinct(lambda: "".join(rng.choice(string.ascii_uppercase) for _ in range(5)), hops + 1)
    value = hs.number(rng, 5)
    stmts = [t["first"].format(name=names[0], value=value)]
    stmts += [t["hop"].format(name=names[i + 1], prev=names[i]) for i in range(hops)]
    needles = list(zip(sorted(rng.random() for _ in stmts), stmts))
    stream = hs.noise_stream()
    head = t["intro"]
    tail = t["question"].format(value=value) + ANSWER + t["answer_prefix"].format(count=len(names), value=value)

    def render(n: int, pad: Sequence[str]) -> str:
        return head + hs.context(stream, n, pad, needles) + tail
    return hs.fit(render, count, length), names


def _cwe(rng: random.Random, depth: float | None, count: hs.Count, length: int, k: int = 10) -> Built:
    """A numbered word list: k common words repeated `hi` times, rare ones `lo` times each (the
    frequencies grow with the length, as the model was trained); answer the k common words."""
    t = TEMPLATES["cwe"]
    pool = rng.sample(hs.words("noun"), len(hs.words("noun")))
    common, rare = pool[:k], pool[k:]
    per_entry = max(1.0, count(" ".join(t["entry"].format(i=500 + i, word=w) for i, w in enumerate(rare[:50]))) / 50)
    hi = max(3, min(30, int(length / per_entry) // (2 * k)))
    lo = max(1, hi // 5)
    order_seed = rng.random()
    head = t["intro"]
    tail = t["question"].format(k=k) + ANSWER + t["answer_prefix"].format(k=k)

    def render(n: int, pad: Sequence[str]) -> str:
        if n > len(rare):
            raise ValueError(f"cwe at length {length} needs more than {len(rare)} distinct words")
        entries = [w for w in common for _ in range(hi)] + [w for w in rare[:n] for _ in range(lo)]
        random.Random(order_seed).shuffle(entries)
        listed = " ".join(t["entry"].format(i=i + 1, word=w) for i, w in enumerate(entries))
        return head + listed + (" " + " ".join(pad) if pad else "") + tail
    return hs.fit(render, count, length), common


def _fwe(rng: random.Random, depth: float | None, count: hs.Count, length: int, vocab: int = 60,
         alpha: float = 2.0) -> Built:
    """Coded words drawn from a Zipf law; the most frequent one is shown as '....' (noise, as in
    RULER); answer the next three."""
    t = TEMPLATES["fwe"]
    codes = _distinct(lambda: "".join(rng.choice(string.ascii_lowercase) for _ in range(6)), vocab)
    weights = [1 / (i + 1) ** alpha for i in range(vocab)]
    draw_rng = random.Random(rng.random())
    stream = hs.Stream(lambda i: draw_rng.choices(codes, weights=weights)[0])
    head = t["intro"]
    tail = t["question"] + ANSWER + t["answer_prefix"]

    def ranked(n: int) -> list[str]:
        counts = Counter(stream.take(n))
        return sorted(counts, key=lambda w: (-counts[w], codes.index(w)))

    def render(n: int, pad: Sequence[str]) -> str:
        noise = ranked(n)[:1]
        return head + " ".join(t["noise"] if w in noise else w for w in stream.take(n) + list(pad)) + tail
    fitted = hs.fit(render, count, length, pad_words=[t["noise"], ".", *hs.NOISE_WORDS])
    answer = ranked(fitted.n)[1:4]
    if len(answer) < 3:
        raise ValueError(f"fwe needs more than {length} tokens with this tokenizer")
    return fitted, answer


@dataclass(frozen=True)
class TaskSpec:
    build: Builder
    max_tokens: int  # RULER's generation budget for the task
    uses_depth: bool
    metric: str = "all"


TASKS: dict[str, TaskSpec] = {
    "passkey": TaskSpec(partial(_niah, template="passkey", digits=5), 32, True),
    "niah_single": TaskSpec(_niah, 128, True),
    "niah_single_varied": TaskSpec(partial(_niah, hay="varied"), 128, True),
    "niah_multikey": TaskSpec(partial(_niah, hay="varied", distractors=3), 128, True),
    "niah_multikey_kv": TaskSpec(partial(_niah, hay="needles"), 128, True),
    "niah_multivalue": TaskSpec(partial(_niah, hay="varied", values=4), 128, True),
    "niah_multiquery": TaskSpec(partial(_niah, hay="varied", queries=4), 128, True),
    "vt": TaskSpec(_vt, 30, False),
    "cwe": TaskSpec(_cwe, 120, False),
    "fwe": TaskSpec(_fwe, 50, False),
}


def depth_for(task: str, index: int, depths: Sequence[float]) -> float | None:
    """Needle tasks cycle through the depths (sample i at depths[i % len]), so N samples fill a
    length x depth grid evenly; other tasks have no depth."""
    return depths[index % len(depths)] if TASKS[task].uses_depth and depths else None


def generate(task: str, length: int, index: int, count: hs.Count, seed: int = 0,
             depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0), fmt: Format = plain) -> Sample:
    """Sample `index` of `task` at `length` tokens in the prompt format `fmt` (the length counts
    the template's tokens too); the same arguments give the same sample."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    spec, depth = TASKS[task], depth_for(task, index, depths)
    rng = random.Random(f"{seed}:{task}:{length}:{index}")
    fitted, refs = spec.build(rng, depth, lambda text: count(render_prompt(text, fmt)), length)
    return Sample(task, length, index, depth, render_prompt(fitted.text, fmt), tuple(refs), spec.max_tokens,
                  spec.metric, fitted.tokens)
