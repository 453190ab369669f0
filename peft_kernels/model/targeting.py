"""Which modules an adapter config targets, and each module's rank and alpha: PEFT's rules
(``check_target_module_exists``, ``_maybe_include_all_linear_layers``, ``get_pattern_key``), reimplemented."""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from peft_kernels.layers.fused_linear import FusedAdapterLinear, is_conv1d
from peft_kernels.model.config import DEFAULT_TARGET_MODULES, PeftConfig

ALL_LINEAR = "all-linear"
SEQ_CLS_HEAD_NAMES = ("score", "classifier")


def _matches_module_list(key: str, names: Any) -> bool:
    if isinstance(names, str):
        return re.fullmatch(names, key) is not None
    return key in names or any(key.endswith(f".{n}") for n in names)


def _layer_index_ok(config: PeftConfig, key: str) -> bool:
    indexes = getattr(config, "layers_to_transform", None)
    if indexes is None or (isinstance(indexes, list) and len(indexes) == 0):
        return True
    pattern = getattr(config, "layers_pattern", None)
    match = None
    if not pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for p in [pattern] if isinstance(pattern, str) else pattern:
            match = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    if match is None:
        return False
    idx = int(match.group("idx"))
    return idx == indexes if isinstance(indexes, int) else idx in indexes


def is_target(config: PeftConfig, key: str) -> bool:
    """PEFT's ``check_target_module_exists`` for module path ``key``."""
    exclude = getattr(config, "exclude_modules", None)
    if exclude and _matches_module_list(key, exclude):
        return False
    to_save = getattr(config, "modules_to_save", None)
    if to_save and any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in to_save):
        return False
    targets = config.target_modules
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    return any(key.endswith(f".{t}") for t in targets) and _layer_index_ok(config, key)


def resolve_target_modules(config: PeftConfig, model: nn.Module) -> None:
    """Fill ``target_modules`` in place: the model type's default when None, the module names for "all-linear"."""
    if config.target_modules is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        default = DEFAULT_TARGET_MODULES.get(model_type)
        if default is None:
            raise ValueError("Please specify `target_modules` or `target_parameters`in `peft_config`")
        config.target_modules = default if isinstance(default, str) else set(default)
        return
    if not (isinstance(config.target_modules, str) and config.target_modules.lower() == ALL_LINEAR):
        return
    names = {n for n, m in model.named_modules() if isinstance(m, nn.Linear | FusedAdapterLinear) or is_conv1d(m)}
    exclude: set[str] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out_emb = get_out() if callable(get_out) else None
    head = out_emb
    if head is None and config.task_type == "SEQ_CLS":
        head = next((getattr(model, n) for n in SEQ_CLS_HEAD_NAMES if getattr(model, n, None) is not None), None)
    if head is not None:
        exclude |= {n for n, m in model.named_modules() if m is head}
    for prefix, m in model.named_modules():
        if isinstance(m, FusedAdapterLinear):
            exclude |= {f"{prefix}.{s}" for s, _ in m.named_modules() if s}
    config.target_modules = names - exclude


def pattern_value(patterns: dict[str, Any], key: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the first pattern ``p`` with ``(.*\\.)?(p)$`` matching the module path wins."""
    for p in patterns:
        if re.match(rf"(.*\.)?({p})$", key):
            return patterns[p]
    return default
