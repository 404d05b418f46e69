"""The launcher's CUDA check on a GPU host: it must see the device torch sees, or `sfllm launch` there would start on
the CPU profile (configs/cpu.yaml)."""
from __future__ import annotations

import argparse

import pytest
import torch

from sfllm import cli
from sfllm.cuda_presence import cuda_available

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_the_launcher_sees_the_gpu_torch_sees_and_takes_no_cpu_profile() -> None:
    assert cuda_available()
    args = argparse.Namespace(config=None)
    cli._default_profile(args)
    assert args.config is None
