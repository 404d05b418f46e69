"""GGUF tensors turned back into HuggingFace-named, dequantized torch tensors."""
from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType, ReaderTensor, dequantize

from sfllm.model_source.gguf_metadata import GGUFMetadata, UnsupportedGGUF

MODEL_TENSOR_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
LAYER_TENSOR_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Read into config.json (Llama 3 RoPE scaling) rather than kept as a weight.
CONFIG_TENSORS = ("rope_freqs.weight",)


def hf_tensor_name(gguf_name: str) -> str:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`."""
    stem, _, suffix = gguf_name.rpartition(".")
    parts = stem.split(".")
    if stem in MODEL_TENSOR_NAMES:
        return f"{MODEL_TENSOR_NAMES[stem]}.{suffix}"
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in LAYER_TENSOR_NAMES:
        return f"model.layers.{parts[1]}.{LAYER_TENSOR_NAMES[parts[2]]}.{suffix}"
    raise UnsupportedGGUF(f"GGUF tensor {gguf_name!r} has no counterpart in a HuggingFace model")


def weight_tensors(metadata: GGUFMetadata) -> list[ReaderTensor]:
    return [tensor for tensor in metadata.tensors if tensor.name not in CONFIG_TENSORS]


def converted_dtype(tensor: ReaderTensor) -> torch.dtype:
    """bfloat16 for bfloat16 tensors, float32 for the rest: both hold every stored value exactly."""
    return torch.bfloat16 if tensor.tensor_type == GGMLQuantizationType.BF16 else torch.float32


def hf_tensor(tensor: ReaderTensor, metadata: GGUFMetadata) -> torch.Tensor:
    try:
        values = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as error:
        raise UnsupportedGGUF(
            f"GGUF tensor {tensor.name} is stored as {tensor.tensor_type.name}, which the gguf package cannot "
            f"dequantize"
        ) from error
    # GGUF lists dimensions innermost first; torch lists them outermost first.
    values = values.reshape([int(size) for size in reversed(tensor.shape)])
    if metadata.architecture.permutes_qk_rows:
        if ".attn_q." in tensor.name:
            values = undo_rope_row_permutation(values, metadata.get_model("attention.head_count"))
        elif ".attn_k." in tensor.name:
            values = undo_rope_row_permutation(values, metadata.get_model("attention.head_count_kv"))
    return torch.from_numpy(np.array(values, dtype=np.float32)).to(converted_dtype(tensor))


def undo_rope_row_permutation(rows: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute` of q_proj/k_proj rows (weight or bias).

    HF Llama rotates the two halves of each head (`rotate_half`); llama.cpp rotates adjacent
    pairs, so its converter interleaves each head's halves: row order (h, half, i) becomes
    (h, i, half). Swapping those two axes back restores HF's order.
    """
    half_head_dim = rows.shape[0] // num_heads // 2
    heads = rows.reshape(num_heads, half_head_dim, 2, *rows.shape[1:])
    return heads.swapaxes(1, 2).reshape(rows.shape)
