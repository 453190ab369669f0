"""``PeftModel``: PEFT's ``PeftModel`` API and file format over fused adapter layers.

Differences from PEFT, all where PEFT is wrong or silent: ``adapter_names=`` works for LoHa and LoKr too (PEFT ignores
it outside LoRA); LoHa/LoKr forwards never build the dense delta.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from peft_kernels.model import checkpoint
from peft_kernels.model.config import PEFT_FORMAT_VERSION, PeftConfig
from peft_kernels.model.tuner import AdapterModel

# PEFT's task models add their heads to modules_to_save (PeftModelForSequenceClassification & co).
_TASK_HEADS = {"SEQ_CLS": ["classifier", "score"], "TOKEN_CLS": ["classifier", "score"], "QUESTION_ANS": ["qa_outputs"]}


def _prepare_config(config: PeftConfig, model: nn.Module) -> PeftConfig:
    heads = _TASK_HEADS.get(config.task_type or "")
    if heads is not None and hasattr(config, "modules_to_save"):
        config.modules_to_save = heads[:] if config.modules_to_save is None else [*config.modules_to_save, *heads]
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = model.__dict__.get("name_or_path", None) or None
    return config


class PeftModel(nn.Module):
    """A transformers (or any torch) model with adapters in fused layers. Mirrors ``peft.PeftModel``."""

    _mixed = False

    def __init__(
        self,
        model: nn.Module,
        peft_config: PeftConfig,
        adapter_name: str = "default",
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
    ) -> None:
        super().__init__()
        self._init(model, peft_config, adapter_name, autocast_adapter_dtype)

    def _init(
        self,
        model: nn.Module,
        peft_config: PeftConfig,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        weights: dict[str, torch.Tensor] | None = None,
        source: str = "",
    ) -> None:
        peft_config = _prepare_config(peft_config, model)
        self.peft_type = peft_config.peft_type
        self.special_peft_forward_args = {"adapter_names"}
        configs = {adapter_name: peft_config}
        base = AdapterModel.__new__(AdapterModel)
        nn.Module.__init__(base)
        base.model, base.peft_config, base.mixed = model, configs, self._mixed
        base.active_adapter, base._disabled = adapter_name, False
        base.inject_adapter(adapter_name, peft_config, weights, source, autocast_adapter_dtype)
        model.peft_config = configs
        self.base_model = base
        self.config = getattr(model, "config", {"model_type": "custom"})

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # ---------------------------------------------------------------------------------------------- properties
    @property
    def peft_config(self) -> dict[str, PeftConfig]:
        return self.base_model.peft_config

    @property
    def active_adapter(self) -> str | list[str]:
        return self.base_model.active_adapter

    @property
    def active_adapters(self) -> list[str]:
        return self.base_model.active_adapters

    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    # ------------------------------------------------------------------------------------------------ adapters
    def _check_type(self, config: PeftConfig) -> None:
        if not self._mixed and config.peft_type != self.peft_type:
            raise ValueError(
                f"Cannot combine adapters with different peft types. Found {self.peft_type} and {config.peft_type}."
            )

    def add_adapter(
        self,
        adapter_name: str,
        peft_config: PeftConfig,
        low_cpu_mem_usage: bool = False,
        autocast_adapter_dtype: bool = True,
    ) -> None:
        """Add a new, inactive adapter made from ``peft_config`` (PEFT's init)."""
        self._add(adapter_name, peft_config, None, "", autocast_adapter_dtype)

    def _add(
        self,
        adapter_name: str,
        config: PeftConfig,
        weights: dict[str, torch.Tensor] | None,
        source: str,
        autocast_adapter_dtype: bool = True,
    ) -> None:
        if adapter_name in self.peft_config:
            raise ValueError(f"Adapter with name {adapter_name} already exists.")
        self._check_type(config)
        config = _prepare_config(config, self.get_base_model())
        self.base_model.inject_adapter(adapter_name, config, weights, source, autocast_adapter_dtype)
        self.peft_config[adapter_name] = config

    def set_adapter(self, adapter_name: str, inference_mode: bool = False) -> None:
        if not isinstance(adapter_name, str):
            raise TypeError(
                f"PeftModel.set_adapter takes one adapter name, got {adapter_name!r}; to activate several, use "
                "PeftMixedModel or model.base_model.set_adapter([...])"
            )
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} not found.")
        self.base_model.set_adapter(adapter_name, inference_mode=inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        self.base_model.delete_adapter(adapter_name)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the block the model is the base model; adapters come back after it."""
        self.base_model.disable_adapter_layers()
        try:
            yield
        finally:
            self.base_model.enable_adapter_layers()

    # -------------------------------------------------------------------------------------------------- counts
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable, total = 0, 0
        for _, p in self.named_parameters():
            n = p.numel()
            total += n
            if p.requires_grad:
                trainable += n
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    # ------------------------------------------------------------------------------------------------- forward
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        adapter_names = kwargs.pop("adapter_names", None)
        with self.base_model.enable_adapter_names(adapter_names):
            return self.get_base_model()(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        adapter_names = kwargs.pop("adapter_names", None)
        num_beams = kwargs.get("num_beams") or 1
        if adapter_names is not None and getattr(self.get_base_model(), "generation_config", None) is not None:
            num_beams = kwargs.get("num_beams") or self.get_base_model().generation_config.num_beams or 1
        with self.base_model.enable_adapter_names(adapter_names, num_beams=num_beams):
            return self.get_base_model().generate(*args, **kwargs)

    # --------------------------------------------------------------------------------------------------- files
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        selected_adapters: Sequence[str] | None = None,
        save_embedding_layers: str | bool = "auto",
        is_main_process: bool = True,
        **kwargs: Any,
    ) -> None:
        """PEFT's layout: ``default`` at the root, any other adapter in ``<dir>/<name>/``; a README model card."""
        save_directory = str(save_directory)
        if os.path.isfile(save_directory):
            raise ValueError(f"Provided path ({save_directory}) should be a directory, not a file")
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(
                f"You passed an invalid `selected_adapters` arguments, current supported adapter names are {list(self.peft_config)} - got {unknown}."
            )
        if not is_main_process:
            return
        os.makedirs(save_directory, exist_ok=True)
        self._write_model_card(save_directory)
        for name in names:
            out = save_directory if name == "default" else os.path.join(save_directory, name)
            checkpoint.save_weights(self.base_model.adapter_state_dict(name), out, safe_serialization)
            config = self.peft_config[name]
            base_cls = type(self.get_base_model())
            auto_mapping = None
            if config.task_type is None:  # PEFT records the model class so AutoPeftModel can rebuild it
                auto_mapping = {"base_model_class": base_cls.__name__, "parent_library": base_cls.__module__}
            config.save_pretrained(out, auto_mapping_dict=auto_mapping)

    def _write_model_card(self, directory: str) -> None:
        path = os.path.join(directory, "README.md")
        if os.path.exists(path):
            return
        base = next(iter(self.peft_config.values())).base_model_name_or_path
        lines = ["---", "library_name: peft"]
        if base:
            lines.append(f"base_model: {base}")
        lines += ["---", "", "Adapter saved by peft_kernels in PEFT's format.", "", "### Framework versions", ""]
        lines.append(f"- PEFT {PEFT_FORMAT_VERSION}")
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        autocast_adapter_dtype: bool = True,
        ephemeral_gpu_offload: bool = False,
        low_cpu_mem_usage: bool = False,
        key_mapping: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> PeftModel:
        """Load a PEFT adapter directory. On any error the model is left exactly as it was."""
        path, config, weights, source = _read_adapter(model_id, config, is_trainable, kwargs.get("subfolder"))
        peft_model = cls.__new__(cls)
        nn.Module.__init__(peft_model)
        peft_model._init(model, config, adapter_name, autocast_adapter_dtype, weights, source)
        if not is_trainable:
            peft_model.eval()
        return peft_model

    def load_adapter(
        self,
        model_id: str | os.PathLike,
        adapter_name: str,
        is_trainable: bool = False,
        torch_device: str | None = None,
        autocast_adapter_dtype: bool = True,
        ephemeral_gpu_offload: bool = False,
        low_cpu_mem_usage: bool = False,
        key_mapping: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        """Load another adapter (inactive until ``set_adapter``). On any error the model is left as it was.

        Loading under a name that already exists overwrites that adapter's weights in place, as PEFT does (its
        config stays); the file must then have exactly the adapter's keys and shapes.
        """
        _, config, weights, source = _read_adapter(model_id, None, is_trainable, kwargs.get("subfolder"))
        if adapter_name in self.peft_config:
            self.base_model.load_weights(adapter_name, weights, source)
        else:
            self._add(adapter_name, config, weights, source, autocast_adapter_dtype)
        if is_trainable:  # PEFT: a trainable load is trainable even while inactive
            self.base_model.set_requires_grad(adapter_name)
        else:
            self.eval()


def _read_adapter(
    model_id: str | os.PathLike, config: PeftConfig | None, is_trainable: bool, subfolder: str | None
) -> tuple[str, PeftConfig, dict[str, torch.Tensor], str]:
    path = os.path.join(str(model_id), subfolder) if subfolder else str(model_id)
    if not os.path.isdir(path):
        raise ValueError(f"Can't find adapter directory '{path}' (peft_kernels loads local directories only)")
    if config is None:
        config = PeftConfig.from_pretrained(path)
    config.inference_mode = not is_trainable
    config.check_supported()
    file = checkpoint.weights_file(path)
    return path, config, checkpoint.load_weights(file), file
