"""The rotary position embedding table (neox style, as Llama and Qwen use it), with rope scaling."""
from __future__ import annotations

import math

import torch


class UnsupportedRopeScaling(ValueError):
    pass


def _inverse_frequencies(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    # float32 throughout, as transformers computes it, so float32 outputs match it bit for bit
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low_freq_factor = float(scaling.get("low_freq_factor", 1.0))
        high_freq_factor = float(scaling.get("high_freq_factor", 4.0))
        original = float(scaling["original_max_position_embeddings"])
        low_freq_wavelen = original / low_freq_factor
        high_freq_wavelen = original / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        smooth = (original / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        medium = (wavelen <= low_freq_wavelen) & (wavelen >= high_freq_wavelen)
        return torch.where(medium, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    raise UnsupportedRopeScaling(f"rope scaling type {kind!r} is not supported (supported: linear, llama3)")


class RotaryEmbedding:
    """Not an nn.Module: its table stays float32 when the model is cast to half precision."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None,
                 device: torch.device) -> None:
        inv_freq = _inverse_frequencies(head_dim, theta, scaling)
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq.float())
        # cos and sin side by side: one gather per step instead of two
        self.cos_sin = torch.cat([angles.cos(), angles.sin()], dim=-1).to(device)
