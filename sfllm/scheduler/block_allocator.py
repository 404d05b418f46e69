"""KV block accounting: reference counts, the free list, and the prefix cache over it.

Invariants:
- a block is in `_free` exactly when its reference count is zero;
- a free block may still be cached (its hash in `_cached`); allocating it evicts it,
  least recently freed first;
- a cached block's tokens are those of its hash: a chained hash of every token before
  and in it, so one hash names a whole prefix. Hits compare the tokens too.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass


class OutOfBlocks(RuntimeError):
    pass


@dataclass
class CachedBlock:
    block_id: int
    parent_hash: int | None
    token_ids: tuple[int, ...]


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_cache: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_cache = enable_prefix_cache
        self._ref_counts = [0] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self._cached: dict[int, CachedBlock] = {}
        self._hash_of_block: dict[int, int] = {}
        self.num_frees = 0  # blocks given back so far, a running count: a change says some block was released

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise OutOfBlocks(f"{count} KV blocks asked for, {len(self._free)} free")
        blocks = []
        for _ in range(count):
            block, _ = self._free.popitem(last=False)
            self._evict(block)
            self._ref_counts[block] = 1
            blocks.append(block)
        return blocks

    def free(self, blocks: list[int]) -> None:
        # the last block of a sequence goes first, so a shared prefix's head survives longest
        self.num_frees += len(blocks)
        for block in reversed(blocks):
            self._ref_counts[block] -= 1
            if self._ref_counts[block] < 0:
                raise AssertionError(f"KV block {block} freed more often than allocated")
            if self._ref_counts[block] == 0:
                self._free[block] = None

    def _evict(self, block: int) -> None:
        block_hash = self._hash_of_block.pop(block, None)
        if block_hash is not None:
            del self._cached[block_hash]

    @staticmethod
    def chain_hash(parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
        return hash((parent_hash, token_ids))

    @staticmethod
    def salted_root(cache_salt: str | None) -> int | None:
        """The parent hash of a prompt's first block: None, or one of the salt's own, so that no block of one
        salt's prompts matches another's."""
        return None if cache_salt is None else hash(("cache_salt", cache_salt))

    def match_prefix(self, token_ids: list[int], max_blocks: int, stop_at: Collection[int] = (),
                     root: int | None = None) -> tuple[list[int], list[int]]:
        """Cached blocks holding the longest prefix of `token_ids` after `root` (see salted_root), at most
        `max_blocks` of them, and none from the first block in `stop_at` on.

        Returns (block ids, their hashes); the blocks are referenced for the caller."""
        blocks, hashes = self.cached_prefix(token_ids, max_blocks, stop_at, root)
        for block in blocks:
            if self._ref_counts[block] == 0:
                del self._free[block]
            self._ref_counts[block] += 1
        return blocks, hashes

    def cached_prefix(self, token_ids: list[int], max_blocks: int, stop_at: Collection[int] = (),
                      root: int | None = None) -> tuple[list[int], list[int]]:
        """What match_prefix would return, without referencing the blocks."""
        if not self.enable_prefix_cache:
            return [], []
        blocks: list[int] = []
        hashes: list[int] = []
        parent = root
        size = self.block_size
        for i in range(min(len(token_ids) // size, max_blocks)):
            chunk = tuple(token_ids[i * size:(i + 1) * size])
            block_hash = self.chain_hash(parent, chunk)
            cached = self._cached.get(block_hash)
            if (cached is None or cached.token_ids != chunk or cached.parent_hash != parent
                    or cached.block_id in stop_at):
                break
            blocks.append(cached.block_id)
            hashes.append(block_hash)
            parent = block_hash
        return blocks, hashes

    def is_free(self, block: int) -> bool:
        """Whether no request holds the block (a cached one among them: the next allocation may take it)."""
        return self._ref_counts[block] == 0

    def register(self, block: int, parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
        """Record that a full block holds `token_ids` after the prefix named by `parent_hash`."""
        block_hash = self.chain_hash(parent_hash, token_ids)
        if self.enable_prefix_cache and block_hash not in self._cached and block not in self._hash_of_block:
            self._cached[block_hash] = CachedBlock(block, parent_hash, token_ids)
            self._hash_of_block[block] = block_hash
        return block_hash

    def forget_cached(self) -> int:
        """Drops every prefix from the cache (blocks in use stay with their requests, free ones stay free);
        returns how many blocks were cached."""
        forgotten = len(self._cached)
        self._cached.clear()
        self._hash_of_block.clear()
        return forgotten

    def ref_count(self, block: int) -> int:
        return self._ref_counts[block]


class SwapSpace:
    """CPU blocks for swapped-out requests: a plain free list."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise OutOfBlocks(f"{count} CPU swap blocks asked for, {len(self._free)} free")
        return [self._free.pop() for _ in range(count)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(blocks)
