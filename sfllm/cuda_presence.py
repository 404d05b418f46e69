"""Whether torch would find a CUDA device, asked without importing torch.

The launcher picks its default profile by it before it starts any process; importing torch for the question
took 1.6 s of every `sfllm launch` on a 2-core machine (more on a GPU host's slower cores), before anything else.
"""
from __future__ import annotations

import ctypes
import importlib.util
import runpy
from pathlib import Path

_CUDA_SUCCESS = 0


def cuda_available() -> bool:
    """`torch.cuda.is_available()`: torch's build has CUDA, and the driver counts a device (CUDA_VISIBLE_DEVICES
    applies, as for torch). Where this cannot tell (a build it cannot read, a ROCm one, a CUDA build with no
    driver library found), torch is imported and asked after all."""
    build = _torch_build()
    if build is not None and build.get("hip") is None:
        if build.get("cuda") is None:
            return False
        count = _driver_device_count()
        if count is not None:
            return count > 0
    import torch
    return torch.cuda.is_available()


def _torch_build() -> dict | None:
    """torch/version.py's variables (`cuda` is the CUDA version it was built for, None in a CPU build)."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    try:
        return runpy.run_path(str(Path(spec.submodule_search_locations[0]) / "version.py"))
    except Exception:  # any failure to read it: torch answers instead
        return None


def _driver_device_count() -> int | None:
    """cuDeviceGetCount after cuInit (no context is made, so no device memory is taken); None without the driver's
    library."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    count = ctypes.c_int(0)
    if driver.cuInit(0) != _CUDA_SUCCESS or driver.cuDeviceGetCount(ctypes.byref(count)) != _CUDA_SUCCESS:
        return 0
    return count.value
