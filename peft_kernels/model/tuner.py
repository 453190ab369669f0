"""``AdapterModel``: the ``base_model`` of a ``PeftModel``. It puts ``FusedAdapterLinear`` layers into a transformers
model, keeps the adapters' configs and state, and implements PEFT's tuner methods (set/delete/merge/unload...).

One ``FusedAdapterLinear`` holds every adapter of a module whatever its type, so LoRA, LoHa and LoKr mix freely
(``PeftMixedModel``) without PEFT's nested wrappers. Adding an adapter is transactional: everything is checked
before the model is touched, and a failure part-way undoes what was done.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from peft_kernels.layers.fused_linear import ADAPTER_LAYER_NAMES, BASE_ONLY, FusedAdapterLinear, is_conv1d
from peft_kernels.model import checkpoint
from peft_kernels.model.config import LoHaConfig, LoKrConfig, LoraConfig, PeftConfig
from peft_kernels.model.modules_to_save import ModulesToSaveWrapper
from peft_kernels.model.targeting import is_target, resolve_target_modules


def _parent(model: nn.Module, key: str) -> tuple[nn.Module, str]:
    parent_name, _, child = key.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def _features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear, Conv1D or FusedAdapterLinear."""
    if isinstance(module, FusedAdapterLinear):
        return module.in_features, module.out_features
    if is_conv1d(module):
        return tuple(module.weight.shape)
    return module.in_features, module.out_features


class AdapterModel(nn.Module):
    """PEFT's tuner (``LoraModel`` / ``LoHaModel`` / ``LoKrModel`` / ``MixedModel``) over fused layers."""

    def __init__(self, model: nn.Module, peft_config: dict[str, PeftConfig], adapter_name: str, mixed: bool = False):
        super().__init__()
        self.model = model
        self.peft_config = peft_config
        self.mixed = mixed
        self.active_adapter: str | list[str] = adapter_name
        self._disabled = False
        self.inject_adapter(adapter_name, peft_config[adapter_name])
        self.model.peft_config = self.peft_config

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    # -------------------------------------------------------------------------------------------- structure
    def fused_layers(self) -> Iterator[tuple[str, FusedAdapterLinear]]:
        for key, m in self.model.named_modules():
            if isinstance(m, FusedAdapterLinear):
                yield key, m

    def save_wrappers(self) -> Iterator[tuple[str, ModulesToSaveWrapper]]:
        for key, m in self.model.named_modules():
            if isinstance(m, ModulesToSaveWrapper):
                yield key, m

    def adapter_modules(self) -> list[nn.Module]:
        """Every fused layer and modules_to_save wrapper (cached: walking the model costs ~10 ms per forward on a
        2-layer Llama; inject, delete and unload reset it)."""
        cache = self.__dict__.get("_adapter_modules")
        if cache is None:
            cache = [m for _, m in self.fused_layers()] + [m for _, m in self.save_wrappers()]
            self.__dict__["_adapter_modules"] = cache
        return cache

    def _structure_changed(self) -> None:
        self.__dict__.pop("_adapter_modules", None)

    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter] if isinstance(self.active_adapter, str) else list(self.active_adapter)

    # ------------------------------------------------------------------------------------------------ inject
    def _plan(self, config: PeftConfig) -> list[tuple[str, nn.Module]]:
        """The modules ``config`` targets; raises (model untouched) on a module the fused layers cannot take."""
        plan = []
        skip_prefixes: list[str] = []
        for key, module in self.model.named_modules():
            if any(key.startswith(p) for p in skip_prefixes):
                continue
            if isinstance(module, FusedAdapterLinear | ModulesToSaveWrapper):
                skip_prefixes.append(key + ".")
            if not key or not is_target(config, key):
                continue
            conv1d = is_conv1d(module) or (isinstance(module, FusedAdapterLinear) and module.fan_in_fan_out)
            if isinstance(config, LoraConfig) and config.fan_in_fan_out != conv1d:
                warnings.warn(
                    f"fan_in_fan_out is set to {config.fan_in_fan_out} but the target module {key} is "
                    f"{'Conv1D' if conv1d else 'torch.nn.Linear'}. Setting fan_in_fan_out to {conv1d}.",
                    stacklevel=3,
                )
                config.fan_in_fan_out = conv1d
            if isinstance(module, FusedAdapterLinear) or type(module) is nn.Linear:
                pass
            elif is_conv1d(module):
                if not isinstance(config, LoraConfig):
                    raise TypeError(
                        f"Target module {key} of type Conv1D is not supported by {config.peft_type} "
                        "(PEFT supports Conv1D for LoRA only)"
                    )
            else:
                raise TypeError(
                    f"Target module {key} of type {type(module).__name__} is not supported by peft_kernels: only "
                    "torch.nn.Linear and transformers' Conv1D are (no conv, embedding or quantized layers)"
                )
            plan.append((key, module))
        if not plan:
            raise ValueError(
                f"Target modules {config.target_modules} not found in the base model. "
                "Please check the target modules and try again."
            )
        return plan

    def inject_adapter(
        self,
        adapter_name: str,
        config: PeftConfig,
        weights: dict[str, torch.Tensor] | None = None,
        source: str = "",
        autocast_adapter_dtype: bool = True,
    ) -> None:
        """Add adapter ``adapter_name`` to every targeted module; with ``weights`` (PEFT checkpoint keys), load them.

        All checks (config, targets, checkpoint keys and shapes) run before the model changes; if anything still
        fails, every change is undone.
        """
        config.check_supported()
        resolve_target_modules(config, self.model)
        plan = self._plan(config)
        wrappers = self._plan_modules_to_save(config)
        if weights is not None:
            expected = {}
            for key, module in plan:
                for attr, shape in checkpoint.expected_shapes(config, key, *_features(module)).items():
                    expected[f"{checkpoint.PREFIX}{key}.{checkpoint.checkpoint_suffix(attr)}"] = shape
            for key, module in wrappers:
                src = module.original_module if isinstance(module, ModulesToSaveWrapper) else module
                for k, t in src.state_dict().items():
                    expected[f"{checkpoint.PREFIX}{key}.{k}"] = tuple(t.shape)
            checkpoint.check_weights(source, weights, expected, adapter_name)
        undo: list[Callable[[], None]] = []
        try:
            for key, module in plan:
                layer = module if isinstance(module, FusedAdapterLinear) else self._replace(key, module, undo)
                layer.strict_adapter_names = False
                self._create(layer, key, adapter_name, config, autocast_adapter_dtype)
                undo.append(lambda layer=layer: layer.delete_adapter(adapter_name))
                if weights is not None:
                    with torch.no_grad():
                        for attr, p in layer.adapter_params(adapter_name).items():
                            p.copy_(weights[f"{checkpoint.PREFIX}{key}.{checkpoint.checkpoint_suffix(attr)}"])
            for key, module in wrappers:
                wrapper = module if isinstance(module, ModulesToSaveWrapper) else self._wrap_to_save(key, module, undo)
                wrapper.update(adapter_name)
                undo.append(lambda w=wrapper: w.delete_adapter(adapter_name))
                if weights is not None:
                    prefix = f"{checkpoint.PREFIX}{key}."
                    own = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
                    wrapper.modules_to_save[adapter_name].load_state_dict(own)
        except BaseException:
            for action in reversed(undo):
                action()
            raise
        finally:
            self._structure_changed()
        for n, p in self.model.named_parameters():
            if not _is_adapter_param(n):
                p.requires_grad_(False)
        # PEFT: the new adapter's config decides whether the active adapters stay trainable.
        self.set_adapter(self.active_adapter, inference_mode=config.inference_mode)

    def _create(
        self, layer: FusedAdapterLinear, key: str, name: str, config: PeftConfig, autocast_adapter_dtype: bool
    ) -> None:
        r, alpha = checkpoint.module_rank_alpha(config, key)
        dtype = None if autocast_adapter_dtype else layer.base_layer.weight.dtype
        if isinstance(config, LoraConfig):
            layer.create_lora(name, r, alpha, config.lora_dropout, config.use_rslora, config.init_lora_weights, dtype)
        elif isinstance(config, LoHaConfig):
            layer.create_loha(name, r, alpha, config.rank_dropout, config.module_dropout, config.init_weights, dtype)
        elif isinstance(config, LoKrConfig):
            layer.create_lokr(
                name,
                r,
                alpha,
                config.decompose_both,
                config.decompose_factor,
                config.rank_dropout,
                config.module_dropout,
                config.rank_dropout_scale,
                config.init_weights,
                dtype,
            )

    def _replace(self, key: str, module: nn.Module, undo: list[Callable[[], None]]) -> FusedAdapterLinear:
        parent, child = _parent(self.model, key)
        layer = FusedAdapterLinear(module)
        layer.train(module.training)
        setattr(parent, child, layer)
        undo.append(lambda: setattr(parent, child, module))
        return layer

    def _plan_modules_to_save(self, config: PeftConfig) -> list[tuple[str, nn.Module]]:
        names = getattr(config, "modules_to_save", None) or []
        found = []
        for key, module in self.model.named_modules():
            if not key or not any(key.endswith(n) for n in names):
                continue
            if isinstance(module, FusedAdapterLinear):
                raise ValueError(f"module {key} is both an adapter target and in modules_to_save")
            if (
                any(key.startswith(k + ".") for k, _ in found)
                or ".modules_to_save." in key
                or ".original_module" in key
            ):
                continue
            found.append((key, module))
        return found

    def _wrap_to_save(self, key: str, module: nn.Module, undo: list[Callable[[], None]]) -> ModulesToSaveWrapper:
        parent, child = _parent(self.model, key)
        wrapper = ModulesToSaveWrapper(module, "__placeholder__")
        wrapper.delete_adapter("__placeholder__")
        setattr(parent, child, wrapper)
        undo.append(lambda: setattr(parent, child, module))
        return wrapper

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        """Make these adapters' parameters (and modules_to_save copies) trainable or frozen, active or not."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for m in self.adapter_modules():
            for name in names:
                if isinstance(m, FusedAdapterLinear):
                    for p in m.adapter_params(name).values():
                        p.requires_grad_(requires_grad)
                elif name in m.modules_to_save:
                    m.modules_to_save[name].requires_grad_(requires_grad)

    def _freeze_adapter(self, adapter_name: str) -> None:
        self.set_requires_grad(adapter_name, False)

    # ------------------------------------------------------------------------------------------------ state
    def set_adapter(self, adapter_names: str | Sequence[str], inference_mode: bool = False) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"Adapter(s) {unknown} not found, available adapters: {sorted(self.peft_config)}")
        for m in self.adapter_modules():
            if isinstance(m, FusedAdapterLinear) and m.merged:
                warnings.warn(
                    "Adapter cannot be set when the model is merged. Unmerging the model first.", stacklevel=2
                )
                m.unmerge()
            m.set_adapter(names, inference_mode=inference_mode)
        self.active_adapter = adapter_names if isinstance(adapter_names, str) else names

    def _set_adapter_layers(self, enabled: bool) -> None:
        for m in self.adapter_modules():
            m.disable_adapters = not enabled
        self._disabled = not enabled

    def enable_adapter_layers(self) -> None:
        self._set_adapter_layers(True)

    def disable_adapter_layers(self) -> None:
        self._set_adapter_layers(False)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} does not exist")
        for key, m in self.fused_layers():
            if adapter_name in m.merged_adapters:
                raise ValueError(f"Cannot delete adapter {adapter_name!r}: it is merged in {key}; unmerge it first")
        del self.peft_config[adapter_name]
        self._structure_changed()
        for m in self.adapter_modules():
            if isinstance(m, FusedAdapterLinear):
                if adapter_name in m.adapter_types:
                    m.delete_adapter(adapter_name)
            else:
                m.delete_adapter(adapter_name)
        remaining = [a for a in self.active_adapters if a != adapter_name]
        if not remaining and self.peft_config:
            remaining = [sorted(self.peft_config)[0]]
            warnings.warn(
                f"Adapter {adapter_name} was active which is now deleted. Setting active adapter to {remaining[0]}.",
                stacklevel=2,
            )
        if remaining:
            self.set_adapter(remaining[0] if isinstance(self.active_adapter, str) else remaining)
        else:
            self.active_adapter = []

    # -------------------------------------------------------------------------------------------------- merge
    def merge_adapter(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        for _, m in self.fused_layers():
            m.merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def unmerge_adapter(self) -> None:
        for _, m in self.fused_layers():
            m.unmerge()

    def _unload(self, merge: bool, safe_merge: bool = False, adapter_names: Sequence[str] | None = None) -> nn.Module:
        for key, m in list(self.fused_layers()):
            if merge:
                m.merge(safe_merge=safe_merge, adapter_names=adapter_names)
            elif m.merged:
                m.unmerge()
            parent, child = _parent(self.model, key)
            setattr(parent, child, m.get_base_layer())
        for key, w in list(self.save_wrappers()):
            parent, child = _parent(self.model, key)
            setattr(parent, child, w.active_module() if merge or not w.disable_adapters else w.original_module)
        if hasattr(self.model, "peft_config"):
            del self.model.peft_config
        self._structure_changed()
        return self.model

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: Sequence[str] | None = None
    ) -> nn.Module:
        return self._unload(True, safe_merge, adapter_names)

    def unload(self) -> nn.Module:
        return self._unload(False)

    def add_weighted_adapter(
        self,
        adapters,
        weights,
        adapter_name,
        combination_type="svd",
        svd_rank=None,
        svd_clamp=None,
        svd_full_matrices=True,
        svd_driver=None,
        density=None,
        majority_sign_method="total",
    ) -> None:
        """PEFT's ``LoraModel.add_weighted_adapter`` (see ``peft_kernels.model.weighted_merge``)."""
        from peft_kernels.model.weighted_merge import add_weighted_adapter

        return add_weighted_adapter(
            self,
            adapters,
            weights,
            adapter_name,
            combination_type=combination_type,
            svd_rank=svd_rank,
            svd_clamp=svd_clamp,
            svd_full_matrices=svd_full_matrices,
            svd_driver=svd_driver,
            density=density,
            majority_sign_method=majority_sign_method,
        )

    # ---------------------------------------------------------------------------------------------- forward
    @contextlib.contextmanager
    def enable_adapter_names(self, adapter_names: Sequence[str] | None, num_beams: int = 1) -> Iterator[None]:
        """Route ``adapter_names`` (one per sample, ``"__base__"`` for none) to every adapter layer for one call."""
        if adapter_names is None or self._disabled:
            yield
            return
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
        unknown = sorted({n for n in adapter_names if n != BASE_ONLY and n not in self.peft_config})
        if unknown:
            raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(unknown)}")
        names = list(adapter_names)
        if num_beams > 1:
            names = [n for n in names for _ in range(num_beams)]

        def hook(_module, args, kwargs):
            kwargs["adapter_names"] = names
            return args, kwargs

        handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in self.adapter_modules()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def load_weights(self, adapter_name: str, weights: dict[str, torch.Tensor], source: str = "") -> None:
        """Overwrite an existing adapter's tensors from PEFT checkpoint keys; every key and shape is checked first."""
        current = self.adapter_state_dict(adapter_name)
        checkpoint.check_weights(source, weights, {k: tuple(t.shape) for k, t in current.items()}, adapter_name)
        with torch.no_grad():
            for k, t in current.items():
                t.copy_(weights[k])

    # ------------------------------------------------------------------------------------------------ saving
    def adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """Adapter ``adapter_name`` under PEFT's checkpoint keys."""
        out: dict[str, torch.Tensor] = {}
        for key, m in self.fused_layers():
            if adapter_name in m.adapter_types:
                for attr, p in m.adapter_params(adapter_name).items():
                    out[f"{checkpoint.PREFIX}{key}.{checkpoint.checkpoint_suffix(attr)}"] = p
        for key, w in self.save_wrappers():
            if adapter_name in w.modules_to_save:
                for k, t in w.modules_to_save[adapter_name].state_dict().items():
                    out[f"{checkpoint.PREFIX}{key}.{k}"] = t
        return out


def _is_adapter_param(name: str) -> bool:
    return any(f".{attr}." in name for attr in ADAPTER_LAYER_NAMES) or ".modules_to_save." in name
