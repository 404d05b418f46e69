"""Builds the model on its device and fills it from safetensors files or with dummy weights."""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from sfllm.model_source import ModelSource
from sfllm.worker.model import CausalLM

logger = logging.getLogger(__name__)


class WeightLoadError(RuntimeError):
    pass


# checkpoint name -> (our parameter, index of the shard in a fused parameter)
_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)\.(weight|bias)$")


def _shard_bounds(model: CausalLM, target: str, shard: int) -> tuple[int, int]:
    c = model.config
    if ".qkv_proj." in target:
        q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        return [(0, q), (q, q + kv), (q + kv, q + 2 * kv)][shard]
    size = c.intermediate_size
    return shard * size, (shard + 1) * size


def _target(model: CausalLM, name: str) -> tuple[str, tuple[int, int] | None] | None:
    """Our parameter (and row range in a fused one) for a checkpoint tensor; None to skip."""
    name = name.removeprefix("model.")
    if name == "lm_head.weight" and model.lm_head is None:
        return None
    if "rotary_emb.inv_freq" in name:
        return None
    match = _LAYER.match(name)
    if match:
        layer, module, kind = match.groups()
        if module in _FUSED:
            fused, shard = _FUSED[module]
            target = f"layers.{layer}.{fused}.{kind}"
            return target, _shard_bounds(model, target, shard)
    return name, None


def _checkpoint_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / f for f in sorted(set(weight_map.values()))]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise WeightLoadError(f"no *.safetensors files in {folder}")
    return files


def load_model(source: ModelSource, dtype: torch.dtype, device: torch.device, max_positions: int,
               seed: int = 0) -> CausalLM:
    previous_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = CausalLM(source.config)
    finally:
        torch.set_default_dtype(previous_dtype)
    model = model.to_empty(device=device)
    model.init_rope(max_positions, device)
    if source.load_format == "dummy":
        _fill_dummy(model, seed)
    else:
        _fill_from_checkpoint(model, source.folder)
    return model.eval().requires_grad_(False)


def _fill_from_checkpoint(model: CausalLM, folder: Path) -> None:
    params = dict(model.named_parameters())
    rows_loaded = {name: 0 for name in params}
    files = _checkpoint_files(folder)
    with tqdm(total=len(files), desc="loading weights", unit="file", leave=False) as progress:
        for path in files:
            with safe_open(str(path), framework="pt") as checkpoint:
                for name in checkpoint.keys():
                    target = _target(model, name)
                    if target is None:
                        continue
                    param_name, bounds = target
                    if param_name not in params:
                        raise WeightLoadError(f"checkpoint tensor {name} in {path.name} has no place in the model")
                    tensor = checkpoint.get_tensor(name)
                    destination = params[param_name].data
                    if bounds is not None:
                        destination = destination[bounds[0]:bounds[1]]
                    if destination.shape != tensor.shape:
                        raise WeightLoadError(f"{name}: checkpoint shape {tuple(tensor.shape)} but the model "
                                              f"expects {tuple(destination.shape)}")
                    destination.copy_(tensor)
                    rows_loaded[param_name] += tensor.shape[0]
            progress.update(1)
    missing = [n for n, p in params.items() if rows_loaded[n] != p.shape[0]]
    if missing:
        raise WeightLoadError(f"{len(missing)} parameters missing from the checkpoint in {folder}, "
                              f"for example {missing[:3]}")


def _fill_dummy(model: CausalLM, seed: int) -> None:
    """Random weights with realistic scales: norms at one, matrices small, so activations stay finite."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, param in model.named_parameters():
        if "norm" in name:
            param.data.fill_(1.0)
        elif name.endswith("bias"):
            param.data.zero_()
        else:
            param.data.uniform_(-0.02, 0.02, generator=generator)
