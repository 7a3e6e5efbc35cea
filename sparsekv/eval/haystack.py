"""Filler text, word lists and exact-length fitting for the eval prompts.

The filler is RULER's "noise" sentences, and "varied" sentences made from templates filled with
`wonderwords` words. A prompt is fitted to an exact token count with the model's own tokenizer: binary search over
the number of filler units, then a few short pad words to close the last gap.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Callable, Sequence

NOISE = ["The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again."]
NOISE_WORDS = " ".join(NOISE).split()
SENTENCES = [
    "The {a} {n} {v}s near the {n2}.",
    "A {n} is {a} when the {n2} is {a2}.",
    "Every {n} can {v} a {a} {n2}.",
    "She said the {n} was {a}, so we had to {v} it.",
    "In the morning, the {a} {n} and the {n2} {v} together.",
    "There is no {n} without a {a} {n2}.",
    "We often {v} the {n} because it is {a}.",
    "Nobody knows why the {n} is so {a}.",
    "The {n} of the {n2} was {a} and {a2}.",
    "If you {v} the {n}, the {n2} will {v2}.",
    "My friend wanted to {v} a {a} {n} yesterday.",
    "It is hard to {v} a {n} in a {a} {n2}.",
    "They found a {a} {n} behind the old {n2}.",
    "Why would anyone {v} the {a} {n}?",
    "The {n2} looked {a}, but the {n} felt {a2}.",
    "After the {n} left, the {a} {n2} began to {v}.",
    "Our {n} is more {a} than your {n2}.",
    "Please {v} the {n} before the {n2} gets {a}.",
]

Count = Callable[[str], int]
Render = Callable[[int, Sequence[str]], str]


@lru_cache(maxsize=None)
def words(kind: str) -> tuple[str, ...]:
    """Lower-case alphabetic words (3-10 letters) from the `wonderwords` assets: noun | adjective | verb."""
    text = resources.files("wonderwords").joinpath("assets", f"{kind}list.txt").read_text()
    return tuple(sorted({w.strip() for w in text.splitlines()
                         if w.strip().isalpha() and w.strip().islower() and 3 <= len(w.strip()) <= 10}))


def sentence(rng: random.Random) -> str:
    nouns, adjs, verbs = words("noun"), words("adjective"), words("verb")
    return rng.choice(SENTENCES).format(a=rng.choice(adjs), a2=rng.choice(adjs), n=rng.choice(nouns),
                                        n2=rng.choice(nouns), v=rng.choice(verbs), v2=rng.choice(verbs))


def key(rng: random.Random) -> str:
    """A needle key: an adjective-noun pair, as in RULER."""
    return f"{rng.choice(words('adjective'))}-{rng.choice(words('noun'))}"


def number(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))


def join_list(items: Sequence[str]) -> str:
    """An English list as the model saw it: "a", "a, and b", "a, b, and c"."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + ", and " + items[-1]


class Stream:
    """A lazily grown list of filler units, so fitting only builds as many as can fit."""

    def __init__(self, make: Callable[[int], str]):
        self.make, self.items = make, []

    def take(self, n: int) -> list[str]:
        while len(self.items) < n:
            self.items.append(self.make(len(self.items)))
        return self.items[:n]


def noise_stream() -> Stream:
    return Stream(lambda i: NOISE[i % len(NOISE)])


def varied_stream(rng: random.Random) -> Stream:
    return Stream(lambda i: sentence(rng))


def insert(units: Sequence[str], needles: Sequence[tuple[float, str]]) -> list[str]:
    """Needles at fractions of the filler (0 = before the first unit, 1 = after the last); needles
    at the same place keep their given order, so a chain of statements stays in order."""
    out, at = list(units), [round(f * len(units)) for f, _ in needles]
    for i in sorted(range(len(needles)), key=lambda i: (at[i], i), reverse=True):
        out.insert(at[i], needles[i][1])
    return out


def context(stream: Stream, n: int, pad: Sequence[str], needles: Sequence[tuple[float, str]], sep: str = " ") -> str:
    """n filler units, then the pad words as one more unit, with the needles inserted."""
    return sep.join(insert(stream.take(n) + ([" ".join(pad)] if pad else []), needles))


@dataclass
class Fitted:
    text: str
    n: int  # filler units used
    tokens: int


def _largest(tokens: Callable[[int], int], target: int, base: int) -> int:
    """The largest n with tokens(n) <= target (tokens grows with n, tokens(0) = base <= target):
    a guess from the tokens per unit, refined once, then a gallop and a bisection around it."""
    probe = tokens(32)
    guess = max(0, int((target - base) * 32 / max(probe - base, 1)))
    at_guess = tokens(guess)
    if at_guess > base:
        guess = max(0, int(guess * (target - base) / (at_guess - base)))
        at_guess = tokens(guess)
    step = max(1, guess // 256)
    if at_guess <= target:
        lo, hi = guess, guess + step
        while tokens(hi) <= target:
            lo, step = hi, step * 2
            hi = lo + step
    else:
        lo, hi = max(0, guess - step), guess
        while lo > 0 and tokens(lo) > target:
            hi, step = lo, step * 2
            lo = max(0, hi - step)
    while hi - lo > 1:  # tokens(lo) <= target < tokens(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if tokens(mid) <= target else (lo, mid)
    return lo


def _pad(render: Render, count: Count, target: int, n: int, pad_words: Sequence[str]) -> Fitted:
    """render(n, pad) grown word by word towards `target`; a word that overshoots is skipped."""
    pad: list[str] = []
    tokens, misses = count(render(n, pad)), 0
    for i in range(len(pad_words) + 4 * (target - tokens)):
        if tokens == target or misses == len(pad_words):
            break
        tokens_with = count(render(n, pad + [pad_words[i % len(pad_words)]]))
        if tokens_with <= target:
            pad.append(pad_words[i % len(pad_words)])
            tokens, misses = tokens_with, 0
        else:
            misses += 1
    return Fitted(render(n, pad), n, tokens)


def fit(render: Render, count: Count, target: int, pad_words: Sequence[str] = NOISE_WORDS) -> Fitted:
    """The longest prompt render(n, pad) with at most `target` tokens, padded to exactly `target`
    when the tokenizer allows: if the gap after n units cannot be closed (say the pad's first
    word costs two tokens and one is left), one or two units fewer leave a gap that can."""
    base = count(render(0, ()))
    if base > target:
        raise ValueError(f"target length {target} is shorter than the task's fixed text ({base} tokens)")
    n = _largest(lambda k: count(render(k, ())), target, base)
    best = _pad(render, count, target, n, pad_words)
    for fewer in range(max(0, n - 2), n)[::-1]:
        if best.tokens == target:
            break
        tried = _pad(render, count, target, fewer, pad_words)
        best = tried if tried.tokens > best.tokens else best
    return best
