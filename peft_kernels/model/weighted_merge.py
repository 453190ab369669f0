"""``add_weighted_adapter``: PEFT's ``LoraModel.add_weighted_adapter`` (peft 0.21.2, ``tuners/lora/model.py``) and the
merge functions of ``peft.utils.merge_utils``, reimplemented over fused layers (peft is not imported).

For LoRA sources the checks, rank rules, new config and every combination type follow PEFT op for op, so the new
adapter's A/B tensors are the ones PEFT computes from the same adapters (dare masks included, given the same RNG state
when the merge starts). Where we differ, PEFT is wrong or fails half-way; see ``add_weighted_adapter``'s docstring.
"""

from __future__ import annotations

import math
import operator
import warnings
from collections.abc import Sequence
from dataclasses import replace
from functools import reduce
from typing import TYPE_CHECKING

import torch

from peft_kernels.model.config import LoHaConfig, LoKrConfig, LoraConfig, PeftConfig

if TYPE_CHECKING:
    from peft_kernels.layers.fused_linear import FusedAdapterLinear
    from peft_kernels.model.tuner import AdapterModel

# Factor-wise types: the merge runs on the stacked A's and, separately, on the stacked B's (LoRA only).
FACTOR_TYPES = ("linear", "ties", "dare_ties", "dare_linear", "magnitude_prune")
# Dense types: the merge runs on the full delta weights, then a truncated SVD gives the new A and B.
SVD_TYPES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATION_TYPES = ("cat", *FACTOR_TYPES, *SVD_TYPES)
_DENSITY_TYPES = ("ties", "dare_ties", "dare_linear", "magnitude_prune", *SVD_TYPES[1:])
_SIGN_TYPES = ("ties", "dare_ties", "ties_svd", "dare_ties_svd")
_KIND = {LoraConfig: "lora", LoHaConfig: "loha", LoKrConfig: "lokr"}


# ------------------------------------------------------------------------------------------------- merge functions
# Same ops in the same order as peft.utils.merge_utils, so results (and RNG draws) match PEFT's.
def _reshape_weights(task_tensors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return weights.view(weights.shape + (1,) * (task_tensors.dim() - weights.dim()))


def _magnitude_based_pruning(tensor: torch.Tensor, density: float) -> torch.Tensor:
    mask = torch.zeros_like(tensor).reshape(-1)
    k = int(density * tensor.numel())
    top_k = torch.topk(tensor.abs().reshape(-1), k=k, largest=True)
    mask[top_k[1]] = 1
    return tensor * mask.reshape(tensor.shape)


def _random_pruning(tensor: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
    mask = torch.bernoulli(torch.full_like(input=tensor, fill_value=density))
    pruned = tensor * mask
    if rescale:
        pruned = pruned / density
    return pruned


def _prune(tensor: torch.Tensor, density: float, method: str, rescale: bool = False) -> torch.Tensor:
    if density >= 1:  # warned once, up front
        return tensor
    if method == "magnitude":
        return _magnitude_based_pruning(tensor, density)
    return _random_pruning(tensor, density, rescale=rescale)


def _majority_sign_mask(tensor: torch.Tensor, method: str) -> torch.Tensor:
    sign = tensor.sign()
    sign_magnitude = tensor.sum(dim=0) if method == "total" else sign.sum(dim=0)
    majority_sign = torch.where(sign_magnitude >= 0, 1, -1)
    return sign == majority_sign


def _disjoint_merge(task_tensors: torch.Tensor, majority_sign_mask: torch.Tensor) -> torch.Tensor:
    mixed = (task_tensors * majority_sign_mask).sum(dim=0)
    return mixed / torch.clamp(majority_sign_mask.sum(dim=0), min=1.0)


def _weighted_sum(task_tensors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (task_tensors * _reshape_weights(task_tensors, weights)).sum(dim=0)


def _sign_merge(task_tensors: torch.Tensor, weights: torch.Tensor, method: str) -> torch.Tensor:
    mask = _majority_sign_mask(task_tensors, method)  # elected on the unweighted tensors, as PEFT does
    return _disjoint_merge(task_tensors * _reshape_weights(task_tensors, weights), mask)


def merge_tensors(
    kind: str, tensors: list[torch.Tensor], weights: torch.Tensor, density: float | None, sign_method: str
) -> torch.Tensor:
    """One of PEFT's merge functions by base name: ``task_arithmetic`` ("linear"/"svd"), ``ties``, ``dare_linear``,
    ``dare_ties``, ``magnitude_prune``."""
    if kind in ("linear", "svd"):
        return _weighted_sum(torch.stack(tensors, dim=0), weights)
    if kind in ("ties", "magnitude_prune"):
        stacked = torch.stack([_prune(t, density, "magnitude") for t in tensors], dim=0)
    else:
        stacked = torch.stack([_prune(t, density, "random", rescale=True) for t in tensors], dim=0)
    if kind in ("ties", "dare_ties"):
        return _sign_merge(stacked, weights, sign_method)
    return _weighted_sum(stacked, weights)


# ---------------------------------------------------------------------------------------------------------- checks
def _kind(config: PeftConfig) -> str:
    for cls, kind in _KIND.items():
        if isinstance(config, cls):
            return kind
    raise NotImplementedError(f"add_weighted_adapter: peft_type {config.peft_type!r} is not supported")


def _max_rank(config: PeftConfig) -> int:
    # PEFT: the largest rank any module can have, so the new tensors never overflow
    return config.r if not config.rank_pattern else max(config.r, *config.rank_pattern.values())


def _check(
    tuner: AdapterModel,
    adapters: list[str],
    weights: list[float],
    combination_type: str,
    svd_rank: int | None,
    density: float | None,
    majority_sign_method: str,
) -> tuple[str, int, set[str] | str, bool]:
    """PEFT's ``_check_add_weighted_adapter`` plus the argument checks PEFT only hits half-way through the merge.
    Returns (combination_type, new_rank, new_target_modules, all_lora). Raises before the model is touched."""
    if not adapters:
        raise ValueError("add_weighted_adapter needs at least one adapter")
    for adapter in adapters:
        if adapter not in tuner.peft_config:
            raise ValueError(f"Adapter {adapter} does not exist")
    for adapter in adapters:
        if getattr(tuner.peft_config[adapter], "target_parameters", None):
            raise ValueError(
                f"add_weighted_adapter does not support targeting nn.Parameter (problematic adapter '{adapter}')"
            )
    problematic = [w for _, w in tuner.save_wrappers() if sum(a in w.modules_to_save for a in adapters) > 1]
    if problematic:
        raise ValueError(
            "Cannot add weighted adapters if they target the same module with modules_to_save, but found "
            f"{len(problematic)} such instance(s)."
        )
    if len(weights) != len(adapters):
        raise ValueError(f"Got {len(weights)} weights for {len(adapters)} adapters; give one weight per adapter")

    configs = [tuner.peft_config[a] for a in adapters]
    all_lora = all(_kind(c) == "lora" for c in configs)
    if all_lora and len(adapters) == 1:
        combination_type = "linear"  # PEFT: a single adapter can only be reweighted linearly
    ranks = [_max_rank(c) for c in configs]
    if combination_type in FACTOR_TYPES or combination_type == "cat":
        if not all_lora:
            raise ValueError(
                f"combination_type {combination_type!r} merges LoRA factors; adapters "
                f"{[a for a, c in zip(adapters, configs) if _kind(c) != 'lora']} are LoHa/LoKr: use one of {SVD_TYPES}"
            )
    if combination_type in FACTOR_TYPES:
        if len(set(ranks)) != 1:
            raise ValueError(
                "All adapters must have the same r value when using combination_type linear, ties, dare_ties or "
                "dare_linear."
            )
        new_rank = ranks[0]
        _check_module_ranks_equal(tuner, adapters)
    elif combination_type == "cat":
        new_rank = sum(ranks)
    elif combination_type in SVD_TYPES:
        new_rank = svd_rank or max(ranks)
    else:
        raise ValueError(f"Invalid combination_type: {combination_type}")
    if not isinstance(new_rank, int) or new_rank <= 0:
        raise ValueError(f"svd_rank must be a positive integer, got {svd_rank!r}")

    if combination_type in _DENSITY_TYPES:
        if density is None:
            raise ValueError(f"combination_type {combination_type!r} needs `density` (a value in [0, 1])")
        if density < 0:
            raise ValueError(f"Density should be >= 0, got {density}")
        if density >= 1:
            warnings.warn(
                f"The density {density} is greater than or equal to 1, no pruning will be performed.", stacklevel=3
            )
    if combination_type in _SIGN_TYPES and majority_sign_method not in ("total", "frequency"):
        raise ValueError(f'Unimplemented mask method "{majority_sign_method}" (use "total" or "frequency")')

    target_types = [type(c.target_modules) for c in configs]
    if len(set(target_types)) > 1:
        raise ValueError(
            "all adapter configs should follow the same target modules type. "
            "Combining adapters with `target_modules` type being a mix of list/set and string is not supported."
        )
    if target_types[0] is str:
        new_targets = "|".join(f"({c.target_modules})" for c in configs)
    elif target_types[0] is set:
        new_targets = reduce(operator.or_, (c.target_modules for c in configs))
    else:
        raise TypeError(f"Invalid type {target_types[0]} found in target_modules")
    return combination_type, new_rank, new_targets, all_lora


def _check_module_ranks_equal(tuner: AdapterModel, adapters: list[str]) -> None:
    """Factor-wise merges stack the A's (and B's) of a module: their ranks must agree there too (rank_pattern can
    make them differ even when the configs' max ranks agree; PEFT then fails inside torch.stack, half-way)."""
    for key, layer in tuner.fused_layers():
        ranks = {layer.r[a] for a in adapters if a in layer.adapter_types}
        if len(ranks) > 1:
            raise ValueError(f"Adapters {adapters} have different ranks {sorted(ranks)} on module {key}")


def _new_config(cfg0: PeftConfig, new_rank: int, new_targets: set[str] | str) -> LoraConfig:
    """PEFT's ``replace(cfg0, r=new_rank, lora_alpha=new_rank, ...)`` with rsLoRA off (scaling exactly 1); a LoRA
    config carrying cfg0's targeting fields when cfg0 is LoHa/LoKr."""
    if isinstance(cfg0, LoraConfig):
        return replace(
            cfg0,
            r=new_rank,
            lora_alpha=new_rank,
            target_modules=new_targets,
            alpha_pattern={},
            rank_pattern={},
            use_rslora=False,
        )
    return LoraConfig(
        r=new_rank,
        lora_alpha=new_rank,
        target_modules=new_targets,
        exclude_modules=cfg0.exclude_modules,
        layers_to_transform=cfg0.layers_to_transform,
        layers_pattern=cfg0.layers_pattern,
        modules_to_save=list(cfg0.modules_to_save) if cfg0.modules_to_save is not None else None,
        task_type=cfg0.task_type,
        base_model_name_or_path=cfg0.base_model_name_or_path,
        revision=cfg0.revision,
        inference_mode=cfg0.inference_mode,
    )


# ------------------------------------------------------------------------------------------------------------ fill
def _cat(layer: FusedAdapterLinear, present: list[tuple[str, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    loras_A = [layer.lora_A[a].weight.data * w * layer.scaling[a] for a, w in present]
    loras_B = [layer.lora_B[a].weight.data for a, _ in present]
    return torch.cat(loras_A, dim=0), torch.cat(loras_B, dim=1)


def _factor_merge(
    layer: FusedAdapterLinear, present: list[tuple[str, float]], kind: str, density: float | None, sign_method: str
) -> tuple[torch.Tensor, torch.Tensor]:
    weights_A, weights_B, loras_A, loras_B = [], [], [], []
    for a, w in present:
        # sqrt(|w s|) on each side; the sign goes on A only, so a negative weight stays negative
        ws = w * layer.scaling[a]
        sign = 1 if ws >= 0 else -1
        weights_A.append(math.sqrt(abs(ws)) * sign)
        weights_B.append(math.sqrt(abs(ws)))
        loras_A.append(layer.lora_A[a].weight.data)
        loras_B.append(layer.lora_B[a].weight.data)
    dtype = loras_A[0].dtype
    new_A = merge_tensors(kind, loras_A, torch.tensor(weights_A).to(loras_A[0].device), density, sign_method)
    new_B = merge_tensors(kind, loras_B, torch.tensor(weights_B).to(loras_B[0].device), density, sign_method)
    return new_A.to(dtype), new_B.to(dtype)


def _svd_merge(
    layer: FusedAdapterLinear,
    present: list[tuple[str, float]],
    kind: str,
    new_rank: int,
    density: float | None,
    sign_method: str,
    clamp: float | None,
    full_matrices: bool,
    driver: str | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    deltas = [layer.get_delta_weight(a) for a, _ in present]  # scaling included, >= fp32
    weights = torch.tensor([w for _, w in present]).to(deltas[0].device)
    delta = merge_tensors(kind.removesuffix("_svd"), deltas, weights, density, sign_method)
    if layer.fan_in_fan_out:
        delta = delta.T  # get_delta_weight is in the base weight's [in, out] layout
    U, S, Vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    k = min(new_rank, S.numel())
    U = U[:, :k] @ torch.diag(S[:k])
    Vh = Vh[:k, :]
    if clamp is not None:
        hi_val = torch.quantile(torch.cat([U.flatten(), Vh.flatten()]), clamp)
        U = U.clamp(-hi_val, hi_val)
        Vh = Vh.clamp(-hi_val, hi_val)
    return Vh, U


def _fill(
    tuner: AdapterModel,
    adapter_name: str,
    adapters: list[str],
    weights: list[float],
    combination_type: str,
    new_rank: int,
    svd_clamp: float | None,
    svd_full_matrices: bool,
    svd_driver: str | None,
    density: float | None,
    majority_sign_method: str,
) -> None:
    # Module order and, per module, adapter order (A's before B's) are PEFT's: the dare masks are drawn in its order.
    for _, layer in list(tuner.fused_layers()):
        if adapter_name not in layer.lora_A:
            continue
        target_A, target_B = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        present = [(a, float(w)) for a, w in zip(adapters, weights) if a in layer.adapter_types]
        with torch.no_grad():
            target_A.zero_()
            target_B.zero_()
            if not present:  # targeted by the union of configs, but by none of the sources here: delta 0
                continue
            if combination_type == "cat":
                new_A, new_B = _cat(layer, present)
            elif combination_type in SVD_TYPES:
                new_A, new_B = _svd_merge(
                    layer,
                    present,
                    combination_type,
                    new_rank,
                    density,
                    majority_sign_method,
                    svd_clamp,
                    svd_full_matrices,
                    svd_driver,
                )
            else:
                new_A, new_B = _factor_merge(layer, present, combination_type, density, majority_sign_method)
            # rank below new_rank (rank_pattern, or an SVD of a small module): zero-padded, delta unchanged
            target_A[: new_A.shape[0]].copy_(new_A)
            target_B[:, : new_B.shape[1]].copy_(new_B)


# ------------------------------------------------------------------------------------------------------------- API
def add_weighted_adapter(
    tuner: AdapterModel,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
) -> None:
    """Add adapter ``adapter_name``, the weighted combination of ``adapters``: PEFT's ``add_weighted_adapter``.

    It is added inactive and frozen (``set_adapter(adapter_name)`` to use it); if the name exists, nothing happens.

    LoRA sources, as PEFT (``combination_type`` and rank rules, ``target_modules`` union, the new config
    ``replace(cfg[adapters[0]], r=new_rank, lora_alpha=new_rank, target_modules=union, alpha_pattern={},
    rank_pattern={})``, A/B values):

    - ``cat``: rank = sum of ranks, exact: ``A = cat(w_i s_i A_i)``, ``B = cat(B_i)``.
    - ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: equal ranks required; the merge runs
      separately on the A's (weights ``sign(w s) sqrt|w s|``) and the B's (``sqrt|w s|``), an approximation of
      ``sum w_i dW_i`` (exact for one adapter, which always uses ``linear``).
    - ``svd``, ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd``: the merge runs on the
      dense deltas (scaling included); a truncated SVD to ``svd_rank`` (default: the max rank) gives ``B = U S``,
      ``A = Vh``; ``svd_clamp`` is a quantile clamping both.
    - ``density``: fraction kept by ties/dare/magnitude pruning; ``majority_sign_method``: "total" or "frequency".
      dare masks come from torch's global RNG, drawn in PEFT's order; the random init of the injected adapter is
      drawn under ``torch.random.fork_rng`` so it does not shift them (PEFT's injection consumes the RNG first).

    Differences from PEFT, each where PEFT is wrong or fails half-way:

    - rsLoRA: PEFT copies ``use_rslora=True`` into the new config, so the new scaling is
      ``new_rank / sqrt(new_rank) = sqrt(new_rank)`` instead of 1 and the merged delta is ``sqrt(new_rank)`` times
      too large (huggingface/peft#3761). The new config has ``use_rslora=False``: the weights (and scalings) are baked
      into A/B, so scaling ``lora_alpha / r = 1`` gives the intended delta. A/B are PEFT's.
    - Bad arguments raise ``ValueError`` before the model changes (PEFT adds the config and injects first, then fails:
      ``density=None`` gives a TypeError, an unknown ``majority_sign_method`` a RuntimeError, unequal ranks on one
      module under ``rank_pattern`` a torch.stack error). ``len(weights) != len(adapters)`` raises (PEFT silently
      zips). Any later error removes the half-made adapter.
    - A module the union of ``target_modules`` reaches but no source adapter holds gets a zero delta (PEFT raises
      "No matching LoRAs found" after injecting). Where a module's merged rank is below ``new_rank``
      (``rank_pattern``, or ``svd_rank`` above the module's size) A/B are zero-padded to ``new_rank``, so the saved
      tensors match the config (PEFT stores the smaller tensors, or fails for ``svd_rank > min(out, in)``).

    LoHa / LoKr sources (not in PEFT, whose LoHa/LoKr models have no ``add_weighted_adapter``): only the dense types
    (``svd`` and ``*_svd``), one adapter included. The merge runs on ``layer.get_delta_weight`` exactly as for LoRA,
    and the SVD makes the result a **LoRA adapter** (scaling 1, ``svd_rank`` default: the max ``r`` of the sources,
    although a LoHa delta has rank up to r², a LoKr one up to full: pass ``svd_rank`` for a closer fit; the error is
    the discarded singular values). It lives in the same model (fused layers hold any adapter type) and its config is
    a ``LoraConfig`` with the first source's targeting fields, so ``save_pretrained`` writes it as a standard LoRA
    adapter directory, loadable with ``PeftModel.from_pretrained`` (ours or PEFT's) on the base model. That model's
    ``peft_type`` stays LOHA/LOKR, so ``load_adapter`` of the saved LoRA directory back into it is refused, as for
    any LoRA adapter. Mixing LoRA and LoHa/LoKr sources (possible after such a merge) also uses the dense types.

    ``PeftMixedModel``: raises ``NotImplementedError``, as PEFT.
    """
    if getattr(tuner, "mixed", False):
        raise NotImplementedError("Weighted adapters are not supported for PeftMixedModel (yet).")
    if adapter_name in tuner.peft_config:
        return
    adapters, weights = list(adapters), list(weights)
    combination_type, new_rank, new_targets, _ = _check(
        tuner, adapters, weights, combination_type, svd_rank, density, majority_sign_method
    )
    config = _new_config(tuner.peft_config[adapters[0]], new_rank, new_targets)
    devices = sorted({p.device.index or 0 for p in tuner.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):  # the new adapter's init is overwritten: keep the RNG stream
        tuner.inject_adapter(adapter_name, config)
    tuner.peft_config[adapter_name] = config
    try:
        tuner._freeze_adapter(adapter_name)
        _fill(
            tuner,
            adapter_name,
            adapters,
            weights,
            combination_type,
            new_rank,
            svd_clamp,
            svd_full_matrices,
            svd_driver,
            density,
            majority_sign_method,
        )
    except BaseException:
        tuner.delete_adapter(adapter_name)
        raise
