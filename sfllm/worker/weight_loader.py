"""Builds the model (or a tensor-parallel rank's part of it) on its device and fills it from safetensors
files or with dummy weights."""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from sfllm.model_source import ModelConfig, ModelSource
from sfllm.worker.model import CausalLM
from sfllm.worker.model_shard import ModelShard
from sfllm.worker.tensor_parallel import TensorParallelGroup

logger = logging.getLogger(__name__)


class WeightLoadError(RuntimeError):
    pass


# checkpoint name -> (our parameter, index of the tensor in a fused parameter)
_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)\.(weight|bias)$")


def _target(model: CausalLM, name: str) -> tuple[str, int | None] | None:
    """Our parameter (and the tensor's index in a fused one) for a checkpoint tensor; None to skip."""
    name = name.removeprefix("model.")
    if name == "lm_head.weight" and model.lm_head is None:
        return None
    if "rotary_emb.inv_freq" in name:
        return None
    match = _LAYER.match(name)
    if match:
        layer, module, kind = match.groups()
        if module in _FUSED:
            fused, piece = _FUSED[module]
            return f"layers.{layer}.{fused}.{kind}", piece
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


def load_model(source: ModelSource, dtype: torch.dtype, device: torch.device, max_positions: int, seed: int = 0,
               shard: ModelShard | None = None, group: TensorParallelGroup | None = None) -> CausalLM:
    """The model, or with `shard` one tensor-parallel rank's part of it (which reads only that part of the
    checkpoint; dummy weights are the whole model's, cut alike)."""
    shard = shard or ModelShard.of(source.config)
    group = group or TensorParallelGroup(0, 1, device)
    previous_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = CausalLM(source.config, shard, group)
    finally:
        torch.set_default_dtype(previous_dtype)
    model = model.to_empty(device=device)
    model.init_rope(max_positions, device)
    with torch.no_grad():
        filled = _Filling(model)
        if source.load_format == "dummy":
            _fill_dummy(filled, dtype, device, seed)
        else:
            _fill_from_checkpoint(filled, source.folder)
    return model.eval().requires_grad_(False)


class _Filling:
    """The model's parameters as they are filled, part by part, and what of each is still unwritten."""

    def __init__(self, model: CausalLM) -> None:
        self.model = model
        self.params = dict(model.named_parameters())
        self.unwritten = {name: p.numel() for name, p in self.params.items()}
        # the rows of the last ranks' vocabulary past the model's last token: zero, never read
        for name in ("embed_tokens.weight", "lm_head.weight"):
            if name in self.params:
                padding = self.params[name].data[model.shard.real_vocab_rows:]
                padding.zero_()
                self.unwritten[name] -= padding.numel()

    def write(self, param_name: str, piece: int | None, tensor, source_name: str) -> None:
        """Writes this rank's part of `tensor` (a full checkpoint tensor, or a safetensors slice of one)."""
        part = self.model.shard.slice_for(param_name, piece)
        destination = self.params[param_name].data
        if part.destination is not None:
            destination = destination[part.destination[0]:part.destination[1]]
        full_shape = tuple(tensor.get_shape()) if hasattr(tensor, "get_shape") else tuple(tensor.shape)
        expected = part.full_shape(tuple(destination.shape))
        if full_shape != expected:
            raise WeightLoadError(f"{source_name}: checkpoint shape {full_shape} but the model expects {expected}")
        destination.copy_(part.of(tensor))
        self.unwritten[param_name] -= destination.numel()

    def missing(self) -> list[str]:
        return [name for name, count in self.unwritten.items() if count > 0]


def _fill_from_checkpoint(filled: _Filling, folder: Path) -> None:
    files = _checkpoint_files(folder)
    with tqdm(total=len(files), desc="loading weights", unit="file", leave=False, disable=None) as progress:
        for path in files:
            with safe_open(str(path), framework="pt") as checkpoint:
                for name in checkpoint.keys():
                    target = _target(filled.model, name)
                    if target is None:
                        continue
                    param_name, piece = target
                    if param_name not in filled.params:
                        raise WeightLoadError(f"checkpoint tensor {name} in {path.name} has no place in the model")
                    filled.write(param_name, piece, checkpoint.get_slice(name), name)
            progress.update(1)
    missing = filled.missing()
    if missing:
        raise WeightLoadError(f"{len(missing)} parameters missing from the checkpoint in {folder}, "
                              f"for example {missing[:3]}")


def _fill_dummy(filled: _Filling, dtype: torch.dtype, device: torch.device, seed: int) -> None:
    """Random weights with realistic scales: norms at one, matrices small, so activations stay finite. Each
    parameter is drawn whole, as the single-device model's, and cut to this rank's part: every
    tensor-parallel size runs the same model."""
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.device("meta"):
        whole = CausalLM(filled.model.config, ModelShard.of(filled.model.config), filled.model.group)
    for name, param in whole.named_parameters():
        values = torch.empty(param.shape, dtype=dtype, device=device)
        if "norm" in name:
            values.fill_(1.0)
        elif name.endswith("bias"):
            values.zero_()
        else:
            values.uniform_(-0.02, 0.02, generator=generator)
        for piece, tensor in enumerate(_unfused(filled.model.config, name, values)):
            filled.write(name, piece if ".qkv_proj." in name or ".gate_up_proj." in name else None, tensor, name)


def _unfused(config: ModelConfig, name: str, values: torch.Tensor) -> list[torch.Tensor]:
    """The checkpoint tensors a whole parameter fuses (q, k, v; gate, up), or the parameter itself."""
    if ".qkv_proj." in name:
        q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        return list(values.split([q, kv, kv]))
    if ".gate_up_proj." in name:
        return list(values.chunk(2))
    return [values]
