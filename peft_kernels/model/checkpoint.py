"""PEFT's on-disk adapter format: ``adapter_model.safetensors`` keys, the expected shapes of an adapter, and reading
and writing the files. Keys are ``base_model.model.<module path>.<param>`` with the adapter name removed."""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file, save_file

from peft_kernels.layers import factors
from peft_kernels.model.config import LoHaConfig, LoKrConfig, LoraConfig, PeftConfig
from peft_kernels.model.targeting import pattern_value

SAFETENSORS_NAME = "adapter_model.safetensors"
WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
# in-memory attribute -> checkpoint suffix (LoRA's are nn.Linear modules, so their tensor is ".weight")
CHECKPOINT_SUFFIX = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}


def checkpoint_suffix(attr: str) -> str:
    return CHECKPOINT_SUFFIX.get(attr, attr)


def module_rank_alpha(config: PeftConfig, key: str) -> tuple[int, float]:
    """The rank and alpha of module ``key`` under ``rank_pattern`` / ``alpha_pattern``."""
    r = pattern_value(config.rank_pattern, key, config.r)
    default_alpha = config.lora_alpha if isinstance(config, LoraConfig) else config.alpha
    return r, pattern_value(config.alpha_pattern, key, default_alpha)


def expected_shapes(config: PeftConfig, key: str, in_features: int, out_features: int) -> dict[str, tuple[int, ...]]:
    """In-memory attribute -> shape of the adapter ``config`` makes on module ``key``."""
    r, _ = module_rank_alpha(config, key)
    if isinstance(config, LoraConfig):
        return {"lora_A": (r, in_features), "lora_B": (out_features, r)}
    if isinstance(config, LoHaConfig):
        return {
            "hada_w1_a": (out_features, r),
            "hada_w1_b": (r, in_features),
            "hada_w2_a": (out_features, r),
            "hada_w2_b": (r, in_features),
        }
    if isinstance(config, LoKrConfig):
        return factors.lokr_shapes(out_features, in_features, r, config.decompose_both, config.decompose_factor)
    raise NotImplementedError(f"peft_type {config.peft_type!r} is not supported by peft_kernels")


def weights_file(path: str) -> str:
    for name in (SAFETENSORS_NAME, WEIGHTS_NAME):
        candidate = os.path.join(path, name)
        if os.path.isfile(candidate):
            return candidate
    raise ValueError(f"Can't find '{SAFETENSORS_NAME}' or '{WEIGHTS_NAME}' at '{path}'")


def load_weights(file: str) -> dict[str, torch.Tensor]:
    """Read a checkpoint; keys are normalised to carry the ``base_model.model.`` prefix, as PEFT accepts both."""
    try:
        if file.endswith(".safetensors"):
            raw = load_file(file)
        else:
            raw = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{file}: cannot read adapter weights ({type(exc).__name__}: {exc})") from exc
    return {k if k.startswith(PREFIX) else PREFIX + k: v for k, v in raw.items()}


def save_weights(state: dict[str, torch.Tensor], directory: str, safe_serialization: bool = True) -> None:
    os.makedirs(directory, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in state.items()}
    if safe_serialization:
        save_file(state, os.path.join(directory, SAFETENSORS_NAME), metadata={"format": "pt"})
    else:
        torch.save(state, os.path.join(directory, WEIGHTS_NAME))


def check_weights(
    file: str, weights: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], adapter_name: str
) -> None:
    """Every expected key present with its shape, nothing unexpected; else a ValueError naming file and keys."""
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
    for k in sorted(set(expected) & set(weights)):
        if tuple(weights[k].shape) != tuple(expected[k]):
            problems.append(f"{k} has shape {tuple(weights[k].shape)}, the model expects {tuple(expected[k])}")
    if problems:
        raise ValueError(f"adapter {adapter_name!r} from {file} does not fit the model: " + "; ".join(problems))
