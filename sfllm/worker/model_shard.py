"""Which part of a model one tensor-parallel rank holds (Megatron-style), and where a checkpoint tensor's
part goes in it.

Column-parallel: the fused QKV projection (each rank its query heads and their KV heads) and the fused
gate-up projection (a slice of the MLP width). Row-parallel, summed across ranks by an all-reduce: the
output and down projections (the matching input columns). Vocabulary-parallel: the embedding and the LM
head (a range of token ids, the last range padded when the vocabulary does not divide). Norms whole.
With fewer KV heads than ranks, each KV head is replicated on the ranks whose query heads use it.
"""
from __future__ import annotations

from dataclasses import dataclass

from sfllm.model_source import ModelConfig


class IndivisibleModel(ValueError):
    pass


@dataclass(frozen=True)
class TensorSlice:
    """A rank's part of a full (unfused) checkpoint tensor of `full` rows or columns: [start, end) of them,
    written into rows `destination` of the rank's parameter (None: the whole parameter)."""
    dim: int | None  # 0: rows, 1: columns, None: the whole tensor
    start: int = 0
    end: int = 0
    full: int = 0
    destination: tuple[int, int] | None = None

    def of(self, tensor):
        """This part of `tensor` (a torch tensor or a safetensors slice)."""
        if self.dim is None:
            return tensor[:]
        return tensor[self.start:self.end] if self.dim == 0 else tensor[:, self.start:self.end]

    def full_shape(self, part_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of the whole checkpoint tensor whose part has `part_shape`."""
        if self.dim is None:
            return part_shape
        return tuple(self.full if d == self.dim else n for d, n in enumerate(part_shape))


@dataclass(frozen=True)
class ModelShard:
    rank: int
    size: int
    num_heads: int           # query heads of this rank
    num_kv_heads: int        # KV heads of this rank (replicas when the model has fewer KV heads than ranks)
    head_dim: int
    first_head: int          # of the model's query heads
    first_kv_head: int
    model_kv_heads: int
    intermediate_size: int   # MLP width of this rank
    vocab_rows: int          # embedding / LM head rows of every rank, padding included
    vocab_size: int          # the model's

    @classmethod
    def of(cls, config: ModelConfig, rank: int = 0, size: int = 1) -> ModelShard:
        """Rank `rank` of `size`; raises IndivisibleModel naming the model's counts when `size` does not split it."""
        heads, kv_heads = config.num_heads, config.num_kv_heads
        if heads % size or (kv_heads % size and size % kv_heads) or config.intermediate_size % size:
            fitting = [n for n in range(1, heads + 1) if heads % n == 0 and (kv_heads % n == 0 or n % kv_heads == 0)
                       and config.intermediate_size % n == 0]
            raise IndivisibleModel(
                f"tensor_parallel_size {size} does not split this model: it has {heads} attention heads, "
                f"{kv_heads} KV heads and an MLP width of {config.intermediate_size}; the size must divide the "
                f"attention heads and the MLP width, and divide the KV heads or be a multiple of them. "
                f"Sizes that fit: {', '.join(map(str, fitting))}")
        num_heads = heads // size
        return cls(rank=rank, size=size, num_heads=num_heads, num_kv_heads=max(kv_heads // size, 1),
                   head_dim=config.head_dim, first_head=rank * num_heads,
                   # the KV head of this rank's first query head (query heads share KV heads in groups)
                   first_kv_head=rank * num_heads * kv_heads // heads, model_kv_heads=kv_heads,
                   intermediate_size=config.intermediate_size // size, vocab_rows=-(-config.vocab_size // size),
                   vocab_size=config.vocab_size)

    @property
    def first_token(self) -> int:
        return self.rank * self.vocab_rows

    @property
    def real_vocab_rows(self) -> int:
        """Rows of this rank that hold a token (the rest, on the last ranks, are padding)."""
        return min(max(self.vocab_size - self.first_token, 0), self.vocab_rows)

    @property
    def padded_vocab_size(self) -> int:
        return self.vocab_rows * self.size

    def slice_for(self, parameter: str, piece: int | None) -> TensorSlice:
        """The part of a checkpoint tensor for our `parameter`; `piece`: which tensor of a fused one it is
        (q, k, v = 0, 1, 2 of qkv_proj; gate, up = 0, 1 of gate_up_proj)."""
        d = self.head_dim
        q, kv = self.num_heads * d, self.num_kv_heads * d
        all_q, all_kv = q * self.size, self.model_kv_heads * d
        if ".qkv_proj." in parameter:
            first, rows, full, offset = [(self.first_head * d, q, all_q, 0), (self.first_kv_head * d, kv, all_kv, q),
                                         (self.first_kv_head * d, kv, all_kv, q + kv)][piece]
            return TensorSlice(0, first, first + rows, full, (offset, offset + rows))
        width = self.intermediate_size
        if ".gate_up_proj." in parameter:
            return TensorSlice(0, self.rank * width, (self.rank + 1) * width, width * self.size,
                               (piece * width, (piece + 1) * width))
        if ".o_proj." in parameter:
            return TensorSlice(1, self.first_head * d, self.first_head * d + q, all_q)
        if ".down_proj." in parameter:
            return TensorSlice(1, self.rank * width, (self.rank + 1) * width, width * self.size)
        if parameter.startswith(("embed_tokens.", "lm_head.")):
            rows = self.real_vocab_rows
            return TensorSlice(0, self.first_token, self.first_token + rows, self.vocab_size, (0, rows))
        return TensorSlice(None)
