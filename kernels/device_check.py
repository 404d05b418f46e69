"""Refuse, with a clear message, inputs the Triton kernels cannot run on."""
from __future__ import annotations

import torch
import triton

# Whether @triton.jit builds interpreted kernels is fixed when the kernel modules are imported.
KERNELS_INTERPRETED: bool = bool(triton.knobs.runtime.interpret)


def check_kernel_inputs(*tensors: torch.Tensor) -> None:
    """Require all tensors on one device, and that device to be a GPU unless the kernels are interpreted."""
    devices = {tensor.device for tensor in tensors}
    if len(devices) != 1:
        raise ValueError(f"Triton kernel inputs must share one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type == "cpu" and not KERNELS_INTERPRETED:
        raise RuntimeError(
            "Triton kernels were given CPU tensors but need a GPU: use the 'torch' attention backend on CPU, "
            "or set TRITON_INTERPRET=1 before importing triton to run them (slowly) in the Triton interpreter"
        )


def check_head_dim(head_dim: int) -> None:
    # Tiles span the whole head dimension, and Triton tiles are powers of two; tl.dot needs at least 16.
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"the Triton kernels need head_dim to be a power of two >= 16, got {head_dim}")
