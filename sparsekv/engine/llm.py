"""The offline API: `LLM(model).generate(prompts, sampling_params)`, as in vLLM."""
from __future__ import annotations

import itertools
from typing import Any, Sequence as Seq

from tqdm.auto import tqdm

from sparsekv.config import EngineConfig, SparsityConfig
from sparsekv.engine.llm_engine import LLMEngine
from sparsekv.engine.outputs import RequestOutput
from sparsekv.engine.prompts import render_chat
from sparsekv.engine.sampling_params import SamplingParams

Prompt = str | list[int]
Messages = list[dict[str, str]]


class LLM:
    def __init__(self, model: str | None = None, **engine_args: Any):
        """`model`: an HF directory or a .gguf file; None: the default model. `engine_args`: EngineConfig's
        fields, e.g. `dtype="float32"`, `hf_overrides={"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}`."""
        if isinstance(engine_args.get("sparsity"), dict):
            engine_args["sparsity"] = SparsityConfig.model_validate(engine_args["sparsity"])
        self.engine = LLMEngine(EngineConfig(model=model, **engine_args))
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(self, prompts: Prompt | Seq[Prompt], sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 sparsity: SparsityConfig | dict | None = None, use_tqdm: bool = True) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in the order of the prompts."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        order = []
        for prompt, p in zip(prompts, params):
            rid = str(next(self._ids))
            self.engine.add_request(rid, prompt, p, sparsity)
            order.append(rid)
        results: dict[str, RequestOutput] = {}
        with tqdm(total=len(order), desc="generate", disable=not use_tqdm, unit="req") as bar:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        results[out.request_id] = out
                        bar.update(1)
        return [results[rid] for rid in order]

    def chat(self, messages: Messages | Seq[Messages], sampling_params: SamplingParams | None = None,
             sparsity: SparsityConfig | dict | None = None, use_tqdm: bool = True) -> list[RequestOutput]:
        """Render each conversation with the tokenizer's chat template, then generate."""
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [self.render_chat(c) for c in convs]
        return self.generate(prompts, sampling_params, sparsity, use_tqdm)

    def render_chat(self, messages: Messages) -> list[int]:
        return render_chat(self.tokenizer, messages)
