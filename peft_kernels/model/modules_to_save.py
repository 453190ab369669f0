"""PEFT's ``ModulesToSaveWrapper``: a full trainable copy of a module per adapter (e.g. a classification head)."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from peft_kernels.layers.fused_linear import BASE_ONLY


class ModulesToSaveWrapper(nn.Module):
    """Holds ``original_module`` and ``modules_to_save[adapter]`` copies; forwards through the active copy.

    In-memory names match PEFT (``<path>.modules_to_save.<adapter>.weight``); checkpoints store ``<path>.weight``.
    """

    def __init__(self, module_to_save: nn.Module, adapter_name: str) -> None:
        super().__init__()
        self.original_module = module_to_save
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disable_adapters = False
        self.update(adapter_name)
        self.set_adapter(adapter_name)

    def update(self, adapter_name: str) -> None:
        if adapter_name not in self.modules_to_save:
            self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module)
            self.modules_to_save[adapter_name].requires_grad_(False)

    def set_adapter(self, adapter_names: str | Sequence[str], inference_mode: bool = False) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        names = [n for n in names if n in self.modules_to_save]
        if len(names) > 1:
            raise ValueError(
                f"Attempted to set multiple ({names}) adapters at once for modules_to_save, which is not allowed."
            )
        self.original_module.requires_grad_(False)
        for n, m in self.modules_to_save.items():
            m.requires_grad_(bool(names) and n == names[0] and not inference_mode)
        self.active_adapter = names[0] if names else None

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.modules_to_save:
            del self.modules_to_save[adapter_name]
        if self.active_adapter == adapter_name:
            self.active_adapter = None

    def active_module(self) -> nn.Module:
        if self.disable_adapters or self.active_adapter is None:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, x: torch.Tensor, *args, adapter_names: Sequence[str] | None = None, **kwargs):
        if adapter_names is None or self.disable_adapters:
            return self.active_module()(x, *args, **kwargs)
        if len(x) != len(adapter_names):
            raise ValueError(
                "Length of `adapter_names` should be the same as the number of inputs, but got "
                f"{len(adapter_names)} and {len(x)} respectively."
            )
        out = None
        for name in dict.fromkeys(adapter_names):
            rows = [i for i, n in enumerate(adapter_names) if n == name]
            module = (
                self.modules_to_save[name]
                if name != BASE_ONLY and name in self.modules_to_save
                else self.original_module
            )
            part = module(x[rows], *args, **kwargs)
            if out is None:
                out = part.new_empty((len(x), *part.shape[1:]))
            out[rows] = part
        return out

    def get_base_layer(self) -> nn.Module:
        return self.original_module
