"""Triton kernels of sfllm: paged-KV attention, cache writes, fused normalisation, GEMMs and sampling.

Triton ships for Linux only; without it this package still imports, so that `sfllm.kernels.reference`
(the plain-torch versions) serves the CPU backend everywhere.
"""
from __future__ import annotations

import importlib.util

if importlib.util.find_spec("triton") is not None:
    import triton

    if triton.knobs.runtime.interpret:
        from sfllm.kernels.interpreter_compat import patch_interpreter_scalar_index

        patch_interpreter_scalar_index()

    from sfllm.kernels.decode_attention import DecodeWorkspace, choose_num_kv_splits, decode_attention
    from sfllm.kernels.draw_top_tokens import draw_top_tokens, warm_up_draw_top_tokens
    from sfllm.kernels.extend_attention import extend_attention, extend_tile_config, extend_tiles
    from sfllm.kernels.fused_norm import fused_add_rms_norm
    from sfllm.kernels.rotary_qk_norm import rotary_qk_norm_
    from sfllm.kernels.sample_tokens import sample_tokens, warm_up_sample_tokens
    from sfllm.kernels.silu_and_mul import silu_and_mul
    from sfllm.kernels.skinny_matmul import skinny_gate_up_silu, skinny_matmul
    from sfllm.kernels.store_kv_cache import store_kv_cache
    from sfllm.kernels.tma_matmul import tma_gate_up_silu, tma_matmul
    from sfllm.kernels.top_k_select import top_k_select, warm_up_top_k_select

    __all__ = [
        "DecodeWorkspace",
        "choose_num_kv_splits",
        "decode_attention",
        "draw_top_tokens",
        "extend_attention",
        "extend_tile_config",
        "extend_tiles",
        "fused_add_rms_norm",
        "rotary_qk_norm_",
        "sample_tokens",
        "silu_and_mul",
        "skinny_gate_up_silu",
        "skinny_matmul",
        "store_kv_cache",
        "tma_gate_up_silu",
        "tma_matmul",
        "top_k_select",
        "warm_up_draw_top_tokens",
        "warm_up_sample_tokens",
        "warm_up_top_k_select",
    ]
