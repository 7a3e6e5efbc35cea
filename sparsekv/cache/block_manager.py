"""Paged KV allocation with prefix caching (vLLM v1's rules, nano-vllm's size).

A full page's hash covers its parent page's hash and its tokens, so a hit on page i implies
pages 0..i-1 match too. Only prompt pages are cached, and their chain starts from the
sequence's cache salt (its prefill-side sparsity): K/V computed under another prefill config,
or by sparse decode, differ from a dense prefill's and must not be shared. Freed pages keep
their hash and sit in an LRU queue until reused; a lookup that hits such a page revives it.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Protocol


GROWTH = 16  # pages kept free after a live sequence's last page, for its decode to grow into


class PagedSequence(Protocol):
    token_ids: list[int]
    num_prompt_tokens: int
    block_table: list[int]
    num_computed_tokens: int
    num_hashed_blocks: int
    cache_salt: int
    num_evicted_tokens: int  # computed tokens eviction dropped: KV slots = computed - evicted


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] = field(default=())


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # hash -> block id
        self.enable_prefix_caching = enable_prefix_caching
        self.reserved: dict[int, int] = {}  # page after a live sequence's last page -> that last page
        self.prefix_queries = 0  # tokens looked up, as vLLM counts them
        self.prefix_hits = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self.free) / len(self.blocks)

    @staticmethod
    def _hash(parent: int, tokens: tuple[int, ...]) -> int:
        return hash((parent, tokens))

    def lookup(self, seq: PagedSequence, limit: int | None = None) -> list[int]:
        """Cached pages of seq's longest cached prefix within its first `limit` tokens, never
        covering its last token (whose logits must be computed)."""
        if not self.enable_prefix_caching:
            return []
        hits, parent = [], seq.cache_salt
        bs = self.block_size
        usable = len(seq.token_ids) - 1 if limit is None else min(len(seq.token_ids) - 1, limit)
        for i in range(max(usable, 0) // bs):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            parent = self._hash(parent, tokens)
            bid = self.cached.get(parent)
            if bid is None or self.blocks[bid].token_ids != tokens:
                break
            hits.append(bid)
        self.prefix_queries += len(seq.token_ids)
        self.prefix_hits += len(hits) * bs
        return hits

    def blocks_needed(self, seq: PagedSequence, num_new_tokens: int, num_hits: int = 0) -> int:
        total = seq.num_computed_tokens - seq.num_evicted_tokens + num_hits * self.block_size + num_new_tokens
        return max(0, -(-total // self.block_size) - len(seq.block_table) - num_hits)

    def can_allocate(self, seq: PagedSequence, num_new_tokens: int, hits: list[int] = ()) -> bool:
        """Whether the pool can give seq the pages for num_new_tokens more (after the prefix hits)."""
        revived = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        return self.blocks_needed(seq, num_new_tokens, len(hits)) + revived <= len(self.free)

    def allocate(self, seq: PagedSequence, num_new_tokens: int, hits: list[int] = ()) -> bool:
        """Give seq the pages for its next num_new_tokens (after taking the prefix hits).
        Returns False, changing nothing, when the pool cannot provide them."""
        if not self.can_allocate(seq, num_new_tokens, hits):
            return False
        need = self.blocks_needed(seq, num_new_tokens, len(hits))
        for b in hits:
            block = self.blocks[b]
            if block.ref_count == 0:
                del self.free[b]
            block.ref_count += 1
        old_tail = seq.block_table[-1] if seq.block_table else None
        seq.block_table.extend(hits)
        seq.num_computed_tokens += len(hits) * self.block_size
        seq.num_hashed_blocks = len(seq.block_table)
        for _ in range(need):
            bid = self._next_page(seq.block_table[-1] if seq.block_table else None)
            block = self.blocks[bid]
            if block.hash is not None and self.cached.get(block.hash) == bid:
                del self.cached[block.hash]
            block.hash, block.token_ids, block.ref_count = None, (), 1
            seq.block_table.append(bid)
        self._move_tail(old_tail, seq.block_table[-1] if seq.block_table else None)
        return True

    def _next_page(self, last: int | None, scan: int = 64) -> int:
        """The page after `last` if it is free and holds no cached prefix; else the least
        recently freed page that is not reserved for another sequence's growth."""
        nxt = None if last is None else last + 1
        if nxt is not None and nxt in self.free and self.blocks[nxt].hash is None:
            del self.free[nxt]
            return nxt
        for i, bid in enumerate(self.free):
            if bid not in self.reserved or i >= scan:
                del self.free[bid]
                return bid
        return self.free.popitem(last=False)[0]

    def _move_tail(self, old: int | None, new: int | None) -> None:
        """A sequence's last page went from `old` to `new`: move its growth reservation (the
        GROWTH pages after its tail, which fresh sequences skip)."""
        for tail, keep in ((old, False), (new, True)):
            if tail is None:
                continue
            for p in range(tail + 1, tail + 1 + GROWTH):
                if keep:
                    self.reserved.setdefault(p, tail)
                elif self.reserved.get(p) == tail:
                    del self.reserved[p]

    def cache_full_blocks(self, seq: PagedSequence) -> None:
        """Register seq's prompt pages that became full of computed tokens in the prefix cache."""
        if not self.enable_prefix_caching or seq.num_evicted_tokens:
            return  # an evicting sequence's pages no longer hold its prompt in order
        bs = self.block_size
        full = min(seq.num_computed_tokens, seq.num_prompt_tokens) // bs
        parent = self.blocks[seq.block_table[seq.num_hashed_blocks - 1]].hash if seq.num_hashed_blocks else seq.cache_salt
        for i in range(seq.num_hashed_blocks, full):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            parent = self._hash(parent, tokens)
            block = self.blocks[seq.block_table[i]]
            block.hash, block.token_ids = parent, tokens
            self.cached.setdefault(parent, block.block_id)
        seq.num_hashed_blocks = max(seq.num_hashed_blocks, full)

    def shared_prefix_tokens(self, seq: PagedSequence) -> int:
        """Leading tokens of seq on pages another sequence holds too."""
        n = 0
        while n < len(seq.block_table) and self.blocks[seq.block_table[n]].ref_count > 1:
            n += 1
        return n * self.block_size

    def make_private(self, seq: PagedSequence, pages: list[int]) -> list[tuple[int, int]] | None:
        """Copy-on-write before eviction writes seq's logical `pages`: each one another sequence
        holds too is swapped for a fresh page in seq's table. Returns the (old, new) page ids
        whose contents the caller copies, or None, changing nothing, when the pool is short."""
        table = seq.block_table
        shared = [i for i in pages if self.blocks[table[i]].ref_count > 1]
        if len(shared) > len(self.free):
            return None
        old_tail, swaps = table[-1], []
        for i in shared:
            new = self._next_page(None)
            block = self.blocks[new]
            if block.hash is not None and self.cached.get(block.hash) == new:
                del self.cached[block.hash]
            block.hash, block.token_ids, block.ref_count = None, (), 1
            self.blocks[table[i]].ref_count -= 1
            swaps.append((table[i], new))
            table[i] = new
        self._move_tail(old_tail, table[-1])
        return swaps

    def shrink(self, seq: PagedSequence, kept: int, first_written: int | None) -> None:
        """Eviction compacted seq's KV into its first `kept` slots, writing its pages from
        `first_written` on: pages written, or about to be (the next token's), leave the prefix
        cache; the pages past the next token's go back to the pool, first in line for reuse."""
        bs, table = self.block_size, seq.block_table
        seq.num_evicted_tokens = seq.num_computed_tokens - kept
        start = kept // bs if first_written is None else min(first_written, kept // bs)
        for bid in table[start:kept // bs + 1]:
            block = self.blocks[bid]
            if block.ref_count > 1:
                continue  # another sequence's page, unwritten (written ones were copied first)
            if block.hash is not None and self.cached.get(block.hash) == bid:
                del self.cached[block.hash]
            block.hash, block.token_ids = None, ()
        keep_pages = kept // bs + 1
        old_tail = table[-1]
        for bid in reversed(table[keep_pages:]):
            block = self.blocks[bid]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[bid] = None
                self.free.move_to_end(bid, last=False)
        del table[keep_pages:]
        self._move_tail(old_tail, table[-1])

    def free_seq(self, seq: PagedSequence) -> None:
        """Release seq's pages; the tail goes to the queue first, so it is evicted first."""
        for bid in reversed(seq.block_table):
            block = self.blocks[bid]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[bid] = None
        self._move_tail(seq.block_table[-1] if seq.block_table else None, None)
        seq.block_table.clear()
        seq.num_hashed_blocks = 0
