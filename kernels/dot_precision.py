"""The tensor-core precision of the attention kernels' matrix products."""
from __future__ import annotations

import torch


def dot_input_precision(dtype: torch.dtype) -> str:
    # TF32 would cost fp32 inputs about three decimal digits; 16-bit inputs are unaffected by the choice.
    return "ieee" if dtype == torch.float32 else "tf32"
