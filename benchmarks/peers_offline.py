"""The peers without an OpenAI server (transformers, OpenVINO GenAI), timed as `sparsekv bench serve`
times a server: per request TTFT (admission to first token), every later gap (ITL) and latency.

Runs inside the peer's own venv, so it imports nothing from sparsekv:
    python peers_offline.py JOB.json OUT_DIR
JOB holds the engine, the model, the engine options and the cells (key, prompt texts, concurrency,
output length); each cell is written to OUT_DIR/KEY.json as soon as it ends. transformers runs a
cell as static batches of `concurrency` prompts (equal lengths, no padding); OpenVINO GenAI's
ContinuousBatchingPipeline keeps up to `concurrency` requests in flight, admitting one as one ends.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def request(ok: bool, prompt_len: int, start: float, times: list[float], error: str = "") -> dict:
    return {"ok": ok and bool(times), "prompt_len": prompt_len, "output_len": len(times),
            "ttft": times[0] - start if times else 0.0, "latency": times[-1] - start if times else 0.0,
            "itl": [b - a for a, b in zip(times, times[1:])], "error": error}


class Transformers:
    def __init__(self, model: str, threads: int, options: dict):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(threads)
        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(model)
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, options.get("dtype", "float32")),
                                                          **options.get("config", {})).eval()

    def run(self, prompts: list[str], concurrency: int, output_len: int) -> list[dict]:
        from transformers.generation.streamers import BaseStreamer

        class Clock(BaseStreamer):  # generate() puts the prompt first, then one step of the batch per put
            def __init__(self):
                self.times: list[float] = []

            def put(self, value):
                self.times.append(time.perf_counter())

            def end(self):
                pass

        out = []
        for i in range(0, len(prompts), concurrency):
            ids = self.tok(prompts[i:i + concurrency], return_tensors="pt").input_ids
            clock, start = Clock(), time.perf_counter()
            with self.torch.inference_mode():
                self.model.generate(ids, attention_mask=self.torch.ones_like(ids), max_new_tokens=output_len,
                                    min_new_tokens=output_len, do_sample=False, streamer=clock)
            out += [request(True, ids.shape[1], start, clock.times[1:]) for _ in range(ids.shape[0])]
        return out


class OpenVINO:
    def __init__(self, model: str, threads: int, options: dict):
        import openvino_genai as ov

        self.ov = ov
        sc = ov.SchedulerConfig()
        sc.cache_size = options.get("cache_size_gb", 4)
        sc.max_num_batched_tokens = options.get("max_num_batched_tokens", 2048)
        sc.enable_prefix_caching = False
        if "xattention" in options:
            x = options["xattention"]
            sc.use_sparse_attention = True
            sc.sparse_attention_config = ov.SparseAttentionConfig(
                mode=ov.SparseAttentionMode.XATTENTION, xattention_threshold=x["threshold"],
                xattention_block_size=x["block_size"], xattention_stride=x["stride"])
        if "eviction" in options:
            e = options["eviction"]
            sc.use_cache_eviction = True
            sc.cache_eviction_config = ov.CacheEvictionConfig(e["start_size"], e["recent_size"], e["max_cache_size"],
                                                              ov.AggregationMode.NORM_SUM)
        self.pipe = ov.ContinuousBatchingPipeline(model, sc, "CPU", {"INFERENCE_NUM_THREADS": threads})
        self.tok = self.pipe.get_tokenizer()

    def run(self, prompts: list[str], concurrency: int, output_len: int) -> list[dict]:
        ov = self.ov
        gc = ov.GenerationConfig()
        gc.max_new_tokens = gc.min_new_tokens = output_len
        gc.ignore_eos = True
        out: list[dict | None] = [None] * len(prompts)
        waiting, active = list(range(len(prompts))), {}
        while waiting or active:
            while waiting and len(active) < concurrency:
                i = waiting.pop(0)
                active[i] = (self.pipe.add_request(i, prompts[i], gc), time.perf_counter(), [])
            self.pipe.step()
            now = time.perf_counter()
            for i, (handle, start, times) in list(active.items()):
                if handle.can_read():
                    for res in handle.read().values():
                        times += [now] * len(res.generated_ids)
                status = handle.get_status()
                if status != ov.GenerationStatus.RUNNING:
                    prompt_len = int(self.tok.encode(prompts[i]).input_ids.get_shape()[-1])
                    ok = status == ov.GenerationStatus.FINISHED
                    out[i] = request(ok, prompt_len, start, times, "" if ok else str(status))
                    del active[i]
        return out


ENGINES = {"transformers": Transformers, "openvino": OpenVINO}


def main() -> None:
    job, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    engine = ENGINES[job["engine"]](job["model"], job["threads"], job.get("options", {}))
    engine.run(job["cells"][0]["prompts"][:1], 1, 2)  # warm-up: compile and allocate outside the timings
    for cell in job["cells"]:
        start = time.perf_counter()
        try:
            reqs = engine.run(cell["prompts"], cell["concurrency"], cell["output_len"])
        except Exception as e:  # a failed cell is recorded, the next still runs
            reqs = [request(False, 0, 0.0, [], f"{type(e).__name__}: {e}")] * len(cell["prompts"])
        body = {"duration": time.perf_counter() - start, "requests": reqs}
        (out / f"{cell['key']}.json.tmp").write_text(json.dumps(body))
        (out / f"{cell['key']}.json.tmp").replace(out / f"{cell['key']}.json")


if __name__ == "__main__":
    main()
