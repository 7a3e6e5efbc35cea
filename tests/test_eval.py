"""The eval harness without the engine: task generators, scoring, resume logic and the report."""
from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from sparsekv.config import SparsityConfig, preset
from sparsekv.eval import haystack, report, runner, scoring, tasks
from sparsekv.eval.tasks import TEMPLATES

NIAH = [t for t, spec in tasks.TASKS.items() if spec.uses_depth]


@pytest.fixture(scope="module", params=["bpe", "default"])
def count(request, tmp_path_factory):
    """Token counter of a small BPE trained on task text, or of the default model when installed."""
    if request.param == "default":
        from sparsekv.config import default_model
        from sparsekv.engine.loader import load_tokenizer

        try:
            tok = load_tokenizer(default_model())
        except FileNotFoundError as e:
            pytest.skip(str(e))
    else:
        from eval_tokenizer import build_tokenizer

        tok = build_tokenizer(tmp_path_factory.mktemp("tok"))
    return lambda text: len(tok.encode(text))


def _context(sample: tasks.Sample) -> tuple[int, int]:
    """Character span of the context: after the intro, before the question."""
    t = TEMPLATES["passkey" if sample.task == "passkey" else "niah"]
    return len(t["intro"]), sample.prompt.rindex(t["question"].split("{")[0])


# -- generators ------------------------------------------------------------------------------
@pytest.mark.parametrize("task", list(tasks.TASKS))
@pytest.mark.parametrize("length", [512, 1500])
def test_exact_length(count, task, length):
    s = tasks.generate(task, length, 3, count)
    assert s.prompt_tokens == count(s.prompt) == length
    assert s.references and s.depth == (0.75 if task in NIAH else None)


@pytest.mark.parametrize("task", ["passkey", "niah_single", "niah_single_varied", "niah_multikey_kv"])
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_needle_at_depth(count, task, depth):
    s = tasks.generate(task, 2048, 0, count, depths=[depth])
    value = s.references[0]
    needle = TEMPLATES["passkey" if task == "passkey" else "niah"]["needle"]
    first_word = needle.split(" ")[0] + " "
    at = s.prompt.rindex(first_word, 0, s.prompt.index(value))
    start, end = _context(s)
    where = (at - start) / (end - start)
    assert abs(where - depth) < 0.03, (task, depth, where)
    if depth == 0.0:
        assert at == start


@pytest.mark.parametrize("task", NIAH)
def test_niah_answers_once_and_distractors_differ(count, task):
    for index in range(3):
        s = tasks.generate(task, 1024, index, count, seed=7)
        if task == "passkey":  # its needle says the value twice
            needle = TEMPLATES["passkey"]["needle"].format(value=s.references[0])
            assert s.prompt.count(needle) == 1 and s.prompt.count(s.references[0]) == 2
            continue
        for value in s.references:
            assert s.prompt.count(value) == 1
        lines = re.findall(r"magic numbers for ([a-z]+-[a-z]+) is: (\d+)\.", s.prompt)
        query = re.search(r"magic numbers for (.*?) mentioned in the provided text\?", s.prompt)
        queried = re.split(r", and |, ", query.group(1))
        keys = [k for k, _ in lines]
        values = [v for _, v in lines]
        assert len(values) == len(set(values)), "every needle has its own value"
        per_key = 4 if task == "niah_multivalue" else 1
        for k in queried:
            assert keys.count(k) == per_key
        answers = sorted(v for k, v in lines if k in queried)
        assert answers == sorted(s.references)
        expected_lines = {"niah_multikey": 4, "niah_multivalue": 4, "niah_multiquery": 4}.get(task, 1)
        if task == "niah_multikey_kv":
            assert len(lines) > 10 and len(keys) == len(set(keys))
        else:
            assert len(lines) == expected_lines


def test_vt_chain_in_order(count):
    s = tasks.generate("vt", 2048, 1, count)
    names = list(s.references)
    value = re.search(r"VAR " + names[0] + r" = (\d+)\.", s.prompt).group(1)
    stmts = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
    at = [s.prompt.index(x) for x in stmts]
    assert at == sorted(at) and all(s.prompt.count(x) == 1 for x in stmts)
    assert f"assigned the value {value}" in s.prompt and len(set(names)) == 5


def test_cwe_common_words_dominate(count):
    s = tasks.generate("cwe", 4096, 0, count)
    body = s.prompt[len(TEMPLATES["cwe"]["intro"]):s.prompt.index("\nQuestion:")]
    counts = Counter(re.findall(r"\d+\. ([a-z]+)", body))
    rare = max(c for w, c in counts.items() if w not in s.references)
    assert len(s.references) == 10 and min(counts[w] for w in s.references) > rare


def test_fwe_answer_is_next_three(count):
    s = tasks.generate("fwe", 2048, 2, count)
    body = s.prompt[len(TEMPLATES["fwe"]["intro"]):s.prompt.index("\nQuestion:")]
    counts = Counter(body.split())
    ranked = [w for w, _ in counts.most_common()]
    assert ranked[0] == "...."
    assert min(counts[w] for w in s.references) >= max(counts[w] for w in ranked[4:])


def test_deterministic_with_seed(count):
    a = tasks.generate("niah_multikey", 1024, 5, count, seed=1)
    assert a == tasks.generate("niah_multikey", 1024, 5, count, seed=1)
    assert a.prompt != tasks.generate("niah_multikey", 1024, 5, count, seed=2).prompt
    assert a.prompt != tasks.generate("niah_multikey", 1024, 6, count, seed=1).prompt


def test_too_short_and_unknown_task(count):
    with pytest.raises(ValueError, match="shorter"):
        tasks.generate("niah_multiquery", 40, 0, count)
    with pytest.raises(ValueError, match="unknown task"):
        tasks.generate("qa_1", 1024, 0, count)


def test_insert_keeps_order_and_ends():
    units = ["a", "b", "c", "d"]
    assert haystack.insert(units, [(0.0, "X"), (1.0, "Y"), (0.5, "P"), (0.5, "Q")]) == \
        ["X", "a", "b", "P", "Q", "c", "d", "Y"]


def test_fit_exact_with_word_counter():
    def render(n, pad):
        return "head " + " ".join(["one two three"] * n + list(pad)) + " tail"
    fitted = haystack.fit(render, lambda t: len(t.split()), 101)
    assert fitted.tokens == 101 and len(fitted.text.split()) == 101 and fitted.n == 33


# -- scoring ---------------------------------------------------------------------------------
def test_scoring_rules():
    assert scoring.score("all", " 1234567.", ["1234567"]) == 100.0
    assert scoring.score("all", "The numbers are 1111111 and 2222222", ["1111111", "2222222"]) == 100.0
    assert scoring.score("all", "1111111 only", ["1111111", "2222222"]) == 50.0
    assert scoring.score("all", "ABCDE fghij", ["abcde", "FGHIJ"]) == 100.0  # case-insensitive
    assert scoring.score("all", "none here", ["1234567"]) == 0.0
    assert scoring.score("part", "x 2222222", ["1111111", "2222222"]) == 100.0
    assert scoring.clean("\x00 abc\x07 ") == "abc"


# -- cache, resume, failures -----------------------------------------------------------------
class FakeRunner:
    """Answers right for even indices, wrong for odd ones, raises for the indices in `fail`."""

    model_name = "fake"

    def __init__(self, fail=(), stop_after=None):
        self.fail, self.stop_after, self.calls = set(fail), stop_after, []

    def run(self, samples, method, sparsity, done):
        for s in samples:
            if self.stop_after is not None and len(self.calls) == self.stop_after:
                raise KeyboardInterrupt
            self.calls.append((method, s.index))
            if s.index in self.fail:
                done(s, runner.Result(error="RuntimeError: boom"))
            else:
                text = " ".join(s.references) if s.index % 2 == 0 else "no idea"
                done(s, runner.Result(text=text, prefill_attended_fraction=0.5, decode_attended_fraction=1.0,
                                      kv_bytes_fraction=1.0, prefill_seconds=0.1, decode_seconds=0.2))


def _samples(count):
    return [tasks.generate("niah_single", 512, i, count) for i in range(4)]


def test_resume_skips_finished_and_retries_failed(count, tmp_path):
    samples, methods = _samples(count), {"dense": preset("dense"), "alt": SparsityConfig(dense_layers=(0,))}
    path = tmp_path / "samples.jsonl"
    first = FakeRunner(fail={1}, stop_after=5)
    with pytest.raises(KeyboardInterrupt):
        runner.evaluate(first, samples, methods, runner.Store(path), progress=False)
    assert len(path.read_text().splitlines()) == 5
    with path.open("a") as f:
        f.write('{"task": "niah_sin')  # a line torn by the kill
    second = FakeRunner()
    records = runner.evaluate(second, samples, methods, runner.Store(path), progress=False)
    assert second.calls == [("dense", 1), ("alt", 1), ("alt", 2), ("alt", 3)]  # 5 done, one of them failed
    assert [r["score"] for r in records] == [100.0, 0.0, 100.0, 0.0] * 2
    third = FakeRunner()
    runner.evaluate(third, samples, methods, runner.Store(path), progress=False)
    assert third.calls == []
    changed = {"dense": SparsityConfig(dense_layers=(1,))}  # another config under the same name reruns
    fourth = FakeRunner()
    runner.evaluate(fourth, samples, changed, runner.Store(path), progress=False)
    assert len(fourth.calls) == 4


def test_chunks_go_through_every_method_in_turn(count, tmp_path):
    """Each chunk of samples runs under every method before the next (so a decode-side method
    finds the chunk's prompts in dense's prefix cache)."""
    fake = FakeRunner()
    runner.evaluate(fake, _samples(count), {"dense": preset("dense"), "alt": SparsityConfig(dense_layers=(0,))},
                    runner.Store(tmp_path / "samples.jsonl"), progress=False, chunk=2)
    assert fake.calls == [("dense", 0), ("dense", 1), ("alt", 0), ("alt", 1),
                          ("dense", 2), ("dense", 3), ("alt", 2), ("alt", 3)]


def test_methods_that_prefill_alike_run_next_to_each_other(count, tmp_path):
    """A sparse prefill between dense and a decode-only method would push dense's prompt pages
    out of the prefix cache: decode-only methods run right after dense; records keep the order asked."""
    fake = FakeRunner()
    methods = {m: preset(m) for m in ("dense", "xattention", "quest")}
    records = runner.evaluate(fake, _samples(count), methods, runner.Store(tmp_path / "samples.jsonl"),
                              progress=False, chunk=4)
    assert [m for m, _ in fake.calls] == ["dense"] * 4 + ["quest"] * 4 + ["xattention"] * 4
    assert [r["method"] for r in records] == ["dense"] * 4 + ["xattention"] * 4 + ["quest"] * 4


def test_failures_count_as_zero_and_are_reported(count, tmp_path):
    records = runner.evaluate(FakeRunner(fail={0, 2}), _samples(count), {"dense": preset("dense")},
                              runner.Store(tmp_path / "samples.jsonl"), progress=False)
    rows = report.build_rows(records)
    assert len(rows) == 1
    row = rows[0]
    assert row["n"] == 4 and row["n_failed"] == 2 and row["score"] == 0.0
    assert row["attended_fraction"] == 0.5 and row["decode_attended_fraction"] == 1.0
    assert row["by_depth"] == {"0.0": 0.0, "0.25": 0.0, "0.5": 0.0, "0.75": 0.0}
    assert all(r["error"] == "RuntimeError: boom" for r in records if r["index"] in (0, 2))


def test_report_files(tmp_path):
    recs = []
    for method, frac in (("dense", 1.0), ("quest", 0.3)):
        for task, depth in (("niah_single", 0.0), ("niah_single", 1.0), ("vt", None)):
            for length in (1024, 2048):
                good = method == "dense" or length == 1024
                recs.append({"task": task, "length": length, "method": method, "index": 0, "depth": depth,
                             "score": 100.0 if good else 0.0, "error": None, "prefill_attended_fraction": 1.0,
                             "decode_attended_fraction": frac, "kv_bytes_fraction": 1.0,
                             "prefill_seconds": 0.5, "decode_seconds": 0.1})
    rows = report.build_rows(recs)
    paths = report.write(tmp_path, "m", rows, {"seed": 0})
    names = {p.name for p in paths}
    assert {"results.json", "report.md", "score_vs_length.png", "score_vs_attended.png",
            "needle_heatmap_dense.png", "needle_heatmap_quest.png"} <= names
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["model"] == "m" and len(data["rows"]) == 8
    for key in ("task", "length", "method", "score", "n", "attended_fraction", "kv_bytes_fraction",
                "prefill_seconds", "decode_seconds"):
        assert key in data["rows"][0]
    md = (tmp_path / "report.md").read_text()
    assert "## quest minus dense" in md and "| **mean** | +0.0 | -100.0 |" in md
