"""vLLM v1's scheduling rule: one token budget per step, running requests first.

Each sequence wants its computed tokens to catch up with its known tokens. Handing out the
budget this way covers chunked prefill, prefix-cache hits, decode and mixed batches at once.
When pages run out, the newest running sequence is preempted by recompute; beside running
requests a waiting one is admitted only when its whole prompt fits the free pages.
"""
from __future__ import annotations

from collections import deque
from typing import Callable

from sparsekv.cache.block_manager import BlockManager
from sparsekv.engine.sequence import Sequence, SequenceStatus


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 on_release: Callable[[Sequence], None] = lambda seq: None):
        self.bm = block_manager
        self.on_release = on_release  # frees the sequence's backend state (finish, abort, preemption)
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[tuple[Sequence, int]]:
        budget = self.max_num_batched_tokens
        scheduled: list[tuple[Sequence, int]] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget, seq.chunk_limit())
            while not self.bm.allocate(seq, n):
                victim = self.running.pop()  # the newest request goes first
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                scheduled.append((seq, n))
                budget -= n
                i += 1
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            hits = self.bm.lookup(seq, seq.prefix_hit_limit) if not seq.block_table else []
            rest = seq.num_tokens - seq.num_computed_tokens - len(hits) * self.bm.block_size
            # beside running requests, admit only a prompt whose whole rest fits: one admitted for
            # its next chunk alone is preempted as soon as they grow, and its chunks recomputed
            if self.running and not self.bm.can_allocate(seq, rest, hits):
                break
            n = min(rest, budget, seq.chunk_limit(len(hits) * self.bm.block_size))
            if not self.bm.allocate(seq, n, hits):
                break
            seq.num_cached_tokens = len(hits) * self.bm.block_size
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append((seq, n))
            budget -= n
        if not scheduled and self.waiting and not self.running:
            seq = self.waiting[0]
            raise RuntimeError(f"request {seq.request_id} needs more KV pages than the pool has "
                               f"({seq.num_tokens} tokens, {self.bm.num_free_blocks} free pages)")
        return scheduled

    def _preempt(self, seq: Sequence) -> None:
        self.bm.free_seq(seq)
        seq.num_computed_tokens = 0
        seq.num_evicted_tokens = 0
        seq.num_unread_slots = 0.0
        self.on_release(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence and free its pages at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.bm.free_seq(seq)
        self.on_release(seq)
        seq.status = SequenceStatus.FINISHED
