"""The step loop: schedule -> run the model -> sample -> update sequences -> outputs."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sparsekv.cache.block_manager import BlockManager
from sparsekv.config import EngineConfig, SparsityConfig
from sparsekv.engine.detokenizer import update_text
from sparsekv.engine.loader import load_eos_ids, load_tokenizer, read_config
from sparsekv.engine.models.llama import ModelArgs
from sparsekv.engine.models.rope import rope_max_len
from sparsekv.engine.model_runner import ModelRunner
from sparsekv.engine.outputs import CompletionOutput, RequestOutput, SparsityStats
from sparsekv.engine.prompts import encode_prompt
from sparsekv.engine.sampler import sample
from sparsekv.engine.sampling_params import SamplingParams
from sparsekv.engine.scheduler import Scheduler
from sparsekv.engine.sequence import Sequence

log = logging.getLogger(__name__)


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    num_free_pages: int
    num_total_pages: int


class LLMEngine:
    def __init__(self, config: EngineConfig):
        args = ModelArgs.from_hf(read_config(config.model, config.hf_overrides))
        max_len = config.max_model_len or rope_max_len(args)
        self.config = config.model_copy(update={"max_model_len": max_len})
        self.model_name = config.served_model_name or Path(config.model).name
        self.tokenizer = load_tokenizer(config.model)
        self.eos_ids = load_eos_ids(config.model, self.tokenizer)
        self.runner = ModelRunner(self.config, max_len)
        self.runner.check_sparsity(self.config.sparsity)
        self.vocab_size = self.runner.model.args.vocab_size
        # a compressed pool's pages are leased per request (cache/compressed.py): no prefix sharing
        prefix = config.enable_prefix_caching and self.runner.layout is None
        self.block_manager = BlockManager(self.runner.num_pages, config.block_size, prefix)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   on_release=self.runner.release)
        self.requests: dict[str, list[Sequence]] = {}
        self.generator = torch.Generator().manual_seed(config.seed)

    # -- requests -------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    sparsity: SparsityConfig | dict[str, Any] | None = None) -> None:
        """Queue a request; raises ValueError (and queues nothing) for invalid input."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        ids = encode_prompt(self.tokenizer, prompt)
        limit = self.config.max_model_len
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) > limit:
            raise ValueError(f"this model's maximum context length is {limit} tokens, but the prompt has "
                             f"{len(ids)} tokens")
        if any(not 0 <= t < self.vocab_size for t in ids):
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size})")
        if isinstance(sparsity, SparsityConfig):
            sp = sparsity
        else:
            try:
                sp = self.config.sparsity.merged(sparsity)
            except Exception as e:  # pydantic's ValidationError: reworded for the user
                raise ValueError(f"invalid sparsity config: {e}") from None
        self.runner.check_sparsity(sp)
        text = prompt if isinstance(prompt, str) else None
        seqs = [Sequence(request_id, i, list(ids), params, sp, prompt=text) for i in range(params.n)]
        self.requests[request_id] = seqs
        for seq in seqs:
            self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> None:
        for seq in self.requests.pop(request_id, []):
            if not seq.is_finished:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(len(self.scheduler.running), len(self.scheduler.waiting), bm.usage,
                           bm.prefix_queries, bm.prefix_hits, self.scheduler.num_preemptions,
                           bm.num_free_blocks, len(bm.blocks))

    # -- the loop -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if not batch:
            return []
        now = time.time()
        for seq, _ in batch:
            seq.metrics.first_scheduled_time = seq.metrics.first_scheduled_time or now
        logits = self.runner.run(batch)
        done = []
        for (seq, n), row in zip(batch, logits):
            seq.num_computed_tokens += n
            self.block_manager.cache_full_blocks(seq)
            if seq.num_computed_tokens == seq.num_tokens:
                done.append((seq, row))
        bm = self.block_manager
        for seq, kept, first_written in self.runner.evict(bm.make_private, bm.shared_prefix_tokens):
            self.block_manager.shrink(seq, kept, first_written)
        if not done:
            return []
        tokens = sample(torch.stack([r for _, r in done]), [s for s, _ in done], self.generator, self.eos_ids)
        now = time.time()
        touched: dict[str, None] = {}
        for (seq, _), tok in zip(done, tokens):
            seq.token_ids.append(tok)
            seq.metrics.first_token_time = seq.metrics.first_token_time or now
            self._check_finish(seq, tok)
            if seq.finish_reason:
                seq.metrics.finished_time = now
                self.scheduler.finish(seq)
            touched[seq.request_id] = None
        return [self._output(rid) for rid in touched if rid in self.requests]

    def _check_finish(self, seq: Sequence, tok: int) -> None:
        p = seq.params
        n_out = len(seq.output_token_ids)
        if n_out >= p.min_tokens:
            if tok in p.stop_token_ids:
                seq.finish_reason, seq.stop_reason = "stop", tok
            elif tok in self.eos_ids and not p.ignore_eos:
                seq.finish_reason = "stop"
        if seq.finish_reason is None and ((p.max_tokens is not None and n_out >= p.max_tokens)
                                          or seq.num_tokens >= self.config.max_model_len):
            seq.finish_reason = "length"
        update_text(seq, self.tokenizer)

    def _output(self, request_id: str) -> RequestOutput:
        seqs = self.requests[request_id]
        finished = all(s.finish_reason is not None for s in seqs)
        if finished:
            del self.requests[request_id]
        first = seqs[0]
        stats = SparsityStats()
        for s in seqs:
            for f in ("prefill_attended", "prefill_total", "decode_attended", "decode_total"):
                setattr(stats, f, getattr(stats, f) + getattr(s.stats, f))
        stats.kv_bytes_fraction = sum(1 - (s.num_evicted_tokens + s.num_unread_slots) / max(1, s.num_computed_tokens)
                                      for s in seqs) / len(seqs)
        outs = [CompletionOutput(index=s.index, text=s.text, token_ids=list(s.output_token_ids),
                                 cumulative_logprob=s.cumulative_logprob if s.logprobs is not None else None,
                                 logprobs=list(s.logprobs) if s.logprobs is not None else None,
                                 finish_reason=s.finish_reason, stop_reason=s.stop_reason) for s in seqs]
        return RequestOutput(request_id=request_id, prompt=first.prompt,
                             prompt_token_ids=first.token_ids[:first.num_prompt_tokens], outputs=outs,
                             finished=finished, metrics=first.metrics, sparsity=stats,
                             num_cached_tokens=first.num_cached_tokens)
