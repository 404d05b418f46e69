"""Programmatic dependent launch (compute capability 9 and later): a kernel of this package is placed on the SMs
while the kernel before it in the stream is still running.

A small decode batch is some 250 short kernels in a row (Qwen3-0.6B at batch 1: ~4 us each for ~1 us of weight
reads), and the time from one kernel's last program to the next kernel's first is part of each. Launched with
`launch_pdl`, a kernel may start once every program of the kernel before has called `gdc_launch_dependents` or
exited; its programs then wait in `gdc_wait` until that kernel has finished and its writes are visible, before they
touch memory. The stream's order is kept; only the launch moves earlier.

Every kernel here calls `wait_then_release` first, so the rule holds whoever comes before or after: torch launches
cuBLAS's GEMMs without the attribute, so a kernel after a GEMM starts once the GEMM's programs have all exited, and
a GEMM after one of these kernels starts as it always did.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from sfllm.kernels.device_check import KERNELS_INTERPRETED

# The GPU tests and the kernel bench switch it off to compare the two launches.
ENABLED = True


@functools.cache
def _capable(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def compiled_for_hopper(device: torch.device) -> bool:
    """Whether kernels on `device` are compiled for an NVIDIA GPU of compute capability 9 or later (ROCm's torch also
    says "cuda", and an MI300 also says 9: griddepcontrol and the TMA are NVIDIA's)."""
    if KERNELS_INTERPRETED or device.type != "cuda" or torch.version.hip is not None:
        return False
    return _capable(device.index if device.index is not None else torch.cuda.current_device())


def launches_early(device: torch.device) -> bool:
    """Whether kernels on `device` launch early: compiled for compute capability 9 or later, and ENABLED."""
    return ENABLED and compiled_for_hopper(device)


def launch_options(device: torch.device) -> dict:
    """Keyword arguments for a launch: the kernel's PDL constexpr and, where it is on, Triton's launch_pdl."""
    if launches_early(device):
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}


@triton.jit
def wait_then_release(PDL: tl.constexpr):
    """First in every program: wait until the kernel before has finished, then let the kernel after be placed
    (it starts once every program of this one has got here or exited)."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
