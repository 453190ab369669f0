"""``AdapterPool``: multi-tenant serving of many adapters through a fixed number of device slots.

The pool takes a plain transformers model (not a ``PeftModel``) and the names of the modules to serve
(``target_modules``, PEFT's matching: a list of module-name suffixes or one regex). At construction it replaces
every matching ``nn.Linear`` / ``Conv1D`` with a ``FusedAdapterLinear`` whose ``bank_source`` is a preallocated,
fixed-shape bank owned by the pool; after that the module tree never changes. Per fused layer:

- a LoRA bank ``A [capacity, max_rank, in]``, ``B [capacity, out, max_rank]``, ``scale [capacity]`` fp32,
  ``rank [capacity]`` int32, holding LoRA adapters and LoHa adapters (packed as their exact rank r1*r2 LoRA);
- a LoKr bank ``w1 [capacity, a, b]``, ``w2 [capacity, c, d]``, ``scale [capacity]`` in the layer's default factor
  shapes (``factorization(out)``, ``factorization(in)``; low-rank LoKr factors are multiplied out). A LoKr adapter
  with other factor shapes (a non-default ``decompose_factor``) is refused at registration.

Pool slot ``k`` is slot ``k`` of both banks: ``capacity`` counts adapters of any type. An adapter that does not
target a layer leaves that layer base-only for its rows. Loading an adapter into a slot writes the slot in place
(``copy_``; columns past its rank zeroed) and bumps every layer bank's ``generation``; no tensor is reallocated.

Registered adapters live in CPU memory (already packed, in the pool's dtype); ``prepare`` (called by ``forward`` and
``generate``) copies the adapters a batch needs into free or least-recently-used slots not used by the batch.

Threading: one re-entrant lock guards the registry, the slots and every batch's forward / generate. Registration
reads and packs files before taking the lock, so a forward sees either the old or the new set of adapters, never a
half-written slot. Call the model through the pool: a direct ``pool.model(...)`` call runs base-only and does not
take the lock.
"""

from __future__ import annotations

import os
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peft_kernels.layers import factors
from peft_kernels.layers.bank import AdapterBank, LokrGroup
from peft_kernels.layers.fused_linear import BASE_ONLY, FusedAdapterLinear, is_conv1d
from peft_kernels.model import checkpoint
from peft_kernels.model.config import LoHaConfig, LoKrConfig, LoraConfig, PeftConfig
from peft_kernels.model.targeting import is_target, resolve_target_modules
from peft_kernels.ops.reference import pack_loha

__all__ = ["AdapterPool"]


@dataclass
class _ModuleAdapter:
    """One adapter's tensors for one layer, ready to copy into a slot (CPU, pool dtype)."""

    kind: str  # "lora" (LoRA or packed LoHa) | "lokr"
    first: torch.Tensor  # lora: A [r, in]; lokr: w1 [a, b]
    second: torch.Tensor  # lora: B [out, r]; lokr: w2 [c, d]
    scale: float
    rank: int  # lora: true rank; lokr: 0


@dataclass
class _Adapter:
    name: str
    peft_type: str
    source: str
    modules: dict[str, _ModuleAdapter]  # layer key -> tensors


@dataclass
class _PoolLayer:
    key: str
    layer: FusedAdapterLinear
    bank: AdapterBank


def _matches(key: str, targets: str | Sequence[str]) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    return any(key == t or key.endswith(f".{t}") for t in targets)


def _upcast(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


class AdapterPool:
    """Serve many registered LoRA / LoHa / LoKr adapters over ``capacity`` device slots per fused layer.

    ``model``: a plain transformers model (it is modified in place: targeted layers are wrapped, it is put in eval
    mode). ``target_modules``: the modules to serve, the union of every adapter's targets (list of name suffixes, or
    a regex matched against the full module path). ``dtype`` / ``device``: of the banks, default the base weights'.
    """

    def __init__(
        self,
        model: nn.Module,
        capacity: int,
        max_rank: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        *,
        target_modules: str | Sequence[str],
    ) -> None:
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be a positive integer, got {capacity!r}")
        if not isinstance(max_rank, int) or max_rank < 1:
            raise ValueError(f"max_rank must be a positive integer, got {max_rank!r}")
        if not target_modules:
            raise ValueError("target_modules must name the modules the pool serves")
        self.model = model
        self.capacity = capacity
        self.max_rank = max_rank
        self.target_modules = target_modules if isinstance(target_modules, str) else list(target_modules)

        plan: list[tuple[str, nn.Module]] = []
        for key, module in model.named_modules():
            if isinstance(module, FusedAdapterLinear):
                raise ValueError(
                    f"module {key} is already a FusedAdapterLinear: AdapterPool takes a plain transformers model "
                    "(not a PeftModel or a model with injected adapters)"
                )
            if not key or not _matches(key, self.target_modules):
                continue
            if not (type(module) is nn.Linear or is_conv1d(module)):
                raise TypeError(
                    f"target module {key} is a {type(module).__name__}; the pool serves nn.Linear and Conv1D only"
                )
            plan.append((key, module))
        if not plan:
            raise ValueError(f"target_modules {target_modules!r} match no nn.Linear / Conv1D module of the model")
        first_w = plan[0][1].weight
        self.dtype = dtype if dtype is not None else first_w.dtype
        self.device = torch.device(device) if device is not None else first_w.device

        self._layers: dict[str, _PoolLayer] = {}
        for key, module in plan:
            layer = FusedAdapterLinear(module)
            layer.strict_adapter_names = False
            parent_name, _, child = key.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
            bank = self._allocate(layer)
            layer.bank_source = self._bank_source(key, bank)
            layer.register_forward_pre_hook(self._route_hook, with_kwargs=True)
            self._layers[key] = _PoolLayer(key, layer, bank)
        model.eval()
        # Module keys outside the fused layers, for PEFT's target matching of registered adapters.
        self._module_keys = [
            k for k, _ in model.named_modules() if k and not any(k.startswith(p + ".") for p in self._layers)
        ]

        self._lock = threading.RLock()
        self._local = threading.local()  # per thread: the adapter names routed to the layers during a call
        self._adapters: dict[str, _Adapter] = {}
        self._owner: list[str | None] = [None] * capacity  # slot -> resident adapter
        self._lru: OrderedDict[str, int] = OrderedDict()  # resident adapter -> slot, least recently used first

    # ------------------------------------------------------------------------------------------------- banks
    def _allocate(self, layer: FusedAdapterLinear) -> AdapterBank:
        c, r, dt, dev = self.capacity, self.max_rank, self.dtype, self.device
        (a, c_), (b, d) = factors.factorization(layer.out_features), factors.factorization(layer.in_features)
        return AdapterBank(
            lora_a=torch.zeros(c, r, layer.in_features, dtype=dt, device=dev),
            lora_b=torch.zeros(c, layer.out_features, r, dtype=dt, device=dev),
            lora_scale=torch.zeros(c, dtype=torch.float32, device=dev),
            lora_rank=torch.zeros(c, dtype=torch.int32, device=dev),
            lora_slots={},
            lokr_groups=[
                LokrGroup(
                    w1=torch.zeros(c, a, b, dtype=dt, device=dev),
                    w2=torch.zeros(c, c_, d, dtype=dt, device=dev),
                    scale=torch.zeros(c, dtype=torch.float32, device=dev),
                    slots={},
                )
            ],
        )

    def _bank_source(self, key: str, bank: AdapterBank):
        def source(dtype: torch.dtype, device: torch.device) -> AdapterBank:
            if dtype != self.dtype or torch.device(device) != bank.lora_a.device:
                raise ValueError(
                    f"AdapterPool: layer {key} got {dtype} activations on {device}, the pool's banks are {self.dtype} "
                    f"on {bank.lora_a.device}; create the pool with dtype=/device= matching the activations"
                )
            return bank

        return source

    def banks(self) -> dict[str, AdapterBank]:
        """Layer key -> its bank (the preallocated tensors; read-only for callers)."""
        return {k: p.bank for k, p in self._layers.items()}

    def _route_hook(self, module: nn.Module, args: tuple, kwargs: dict):
        names = getattr(self._local, "names", None)
        if names is None:
            return None
        x = args[0] if args else kwargs["x"]
        n = len(x)
        if n != len(names) and len(names) and n % len(names) == 0:  # generate's beam / num_return_sequences expansion
            factor = n // len(names)
            names = [nm for nm in names for _ in range(factor)]
        kwargs["adapter_names"] = names
        return args, kwargs

    @contextmanager
    def _routed(self, names: list[str]) -> Iterator[None]:
        self._local.names = names
        try:
            yield
        finally:
            self._local.names = None

    # ------------------------------------------------------------------------------------------- registration
    def register(self, name: str, path_or_tensors: str | os.PathLike | tuple[PeftConfig, dict[str, torch.Tensor]]):
        """Register adapter ``name`` from a PEFT adapter directory, or from ``(config, state_dict)`` with PEFT's
        checkpoint keys. Everything is read and checked before the pool changes; on any error it is unchanged."""
        if not isinstance(name, str) or not name or name == BASE_ONLY:
            raise ValueError(f"invalid adapter name {name!r}")
        with self._lock:
            if name in self._adapters:
                raise ValueError(f"adapter {name!r} is already registered; unregister it first")
        adapter = self._read(name, path_or_tensors)  # outside the lock: file IO and packing
        with self._lock:
            if name in self._adapters:
                raise ValueError(f"adapter {name!r} is already registered; unregister it first")
            self._adapters[name] = adapter

    def unregister(self, name: str) -> None:
        """Forget adapter ``name``; its slot (if resident) becomes free."""
        with self._lock:
            if name not in self._adapters:
                raise KeyError(f"adapter {name!r} is not registered")
            slot = self._lru.pop(name, None)
            if slot is not None:
                self._clear_slot(slot, name)
                self._owner[slot] = None
                self._bump()
            del self._adapters[name]

    def _read(self, name: str, src: Any) -> _Adapter:
        if isinstance(src, tuple) and len(src) == 2:
            config, raw = src
            if not isinstance(config, PeftConfig):
                raise TypeError(f"adapter {name!r}: expected (PeftConfig, state_dict), got {type(config).__name__}")
            import copy

            config = copy.deepcopy(config)
            source = "<tensors>"
            weights = {k if k.startswith(checkpoint.PREFIX) else checkpoint.PREFIX + k: v for k, v in raw.items()}
        elif isinstance(src, str | os.PathLike):
            path = os.fspath(src)
            if not os.path.isdir(path):
                raise ValueError(f"adapter {name!r}: can't find adapter directory '{path}'")
            try:
                config = PeftConfig.from_pretrained(path)
                source = checkpoint.weights_file(path)
                weights = checkpoint.load_weights(source)
            except ValueError as exc:
                raise ValueError(f"adapter {name!r}: {exc}") from exc
        else:
            raise TypeError(f"adapter {name!r}: expected a directory path or (config, state_dict), got {type(src)}")
        config.check_supported()
        if getattr(config, "modules_to_save", None):
            raise ValueError(f"adapter {name!r}: modules_to_save is not supported by AdapterPool")
        if not isinstance(config, LoraConfig | LoHaConfig | LoKrConfig):
            raise NotImplementedError(f"adapter {name!r}: peft_type {config.peft_type!r} is not supported")
        resolve_target_modules(config, self.model)
        targets = [k for k in self._module_keys if is_target(config, k)]
        if not targets:
            raise ValueError(f"adapter {name!r}: target modules {config.target_modules} not found in the model")
        outside = [k for k in targets if k not in self._layers]
        if outside:
            raise ValueError(
                f"adapter {name!r} targets module(s) the pool does not serve: {', '.join(outside[:5])} "
                f"(pool target_modules={self.target_modules!r})"
            )
        expected: dict[str, tuple[int, ...]] = {}
        for key in targets:
            layer = self._layers[key].layer
            for attr, shape in checkpoint.expected_shapes(config, key, layer.in_features, layer.out_features).items():
                expected[f"{checkpoint.PREFIX}{key}.{checkpoint.checkpoint_suffix(attr)}"] = shape
        checkpoint.check_weights(source, weights, expected, name)
        modules = {}
        for key in targets:
            prefix = f"{checkpoint.PREFIX}{key}."
            own = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix) and k[len(prefix) :]}
            modules[key] = self._prepare_module(name, config, key, own)
        return _Adapter(name, str(config.peft_type), source, modules)

    def _prepare_module(self, name: str, config: PeftConfig, key: str, w: dict[str, torch.Tensor]) -> _ModuleAdapter:
        r, alpha = checkpoint.module_rank_alpha(config, key)
        layer = self._layers[key].layer
        cpu = {"dtype": self.dtype, "device": "cpu"}
        if isinstance(config, LoraConfig | LoHaConfig):
            if isinstance(config, LoraConfig):
                a, b = w["lora_A.weight"], w["lora_B.weight"]
                scale = alpha / (r**0.5) if config.use_rslora else alpha / r
                what = f"rank {a.shape[0]}"
            else:
                a, b = pack_loha(*(_upcast(w[k]) for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")))
                scale = alpha / r
                what = f"rank {a.shape[0]} (LoHa r1*r2 = {w['hada_w1_a'].shape[1]}*{w['hada_w2_a'].shape[1]})"
            rank = a.shape[0]
            if rank > self.max_rank:
                raise ValueError(
                    f"adapter {name!r}: module {key} has {what}, above the pool's max_rank={self.max_rank}"
                )
            return _ModuleAdapter(
                "lora", a.detach().to(**cpu).contiguous(), b.detach().to(**cpu).contiguous(), scale, rank
            )
        w1 = w["lokr_w1"] if "lokr_w1" in w else _upcast(w["lokr_w1_a"]) @ _upcast(w["lokr_w1_b"])
        w2 = w["lokr_w2"] if "lokr_w2" in w else _upcast(w["lokr_w2_a"]) @ _upcast(w["lokr_w2_b"])
        group = self._layers[key].bank.lokr_groups[0]
        if tuple(w1.shape) != tuple(group.w1.shape[1:]) or tuple(w2.shape) != tuple(group.w2.shape[1:]):
            raise ValueError(
                f"adapter {name!r}: LoKr factors of module {key} are w1 {tuple(w1.shape)}, w2 {tuple(w2.shape)} "
                f"(decompose_factor={config.decompose_factor}); the pool's LoKr bank for this "
                f"{layer.out_features}x{layer.in_features} layer holds the default factor shapes w1 "
                f"{tuple(group.w1.shape[1:])}, w2 {tuple(group.w2.shape[1:])}"
            )
        return _ModuleAdapter(
            "lokr", w1.detach().to(**cpu).contiguous(), w2.detach().to(**cpu).contiguous(), alpha / r, 0
        )

    # ------------------------------------------------------------------------------------------------ slots
    def registered(self) -> list[str]:
        with self._lock:
            return list(self._adapters)

    def resident(self) -> list[str]:
        """Adapters in device slots, least recently used first (the next to be evicted first)."""
        with self._lock:
            return list(self._lru)

    def slots(self) -> list[str | None]:
        """Slot -> the adapter it holds (None: free)."""
        with self._lock:
            return list(self._owner)

    def _normalize(self, adapter_names: Sequence[str | None]) -> list[str]:
        if isinstance(adapter_names, str):
            raise TypeError("adapter_names must be a list with one name (or None) per sample")
        return [BASE_ONLY if n is None else n for n in adapter_names]

    def prepare(self, adapter_names: Sequence[str | None]) -> dict[str, int]:
        """Make every adapter of a batch resident; returns name -> slot. Raises before any change when the batch
        names an unregistered adapter or more distinct adapters than ``capacity``."""
        names = self._normalize(adapter_names)
        with self._lock:
            return self._prepare_locked(names)

    def _prepare_locked(self, names: list[str]) -> dict[str, int]:
        needed = list(dict.fromkeys(n for n in names if n != BASE_ONLY))
        unknown = [n for n in needed if n not in self._adapters]
        if unknown:
            raise ValueError(f"adapter(s) not registered in the pool: {', '.join(unknown)}")
        if len(needed) > self.capacity:
            raise ValueError(
                f"the batch needs {len(needed)} distinct adapters but the pool has {self.capacity} slots; "
                "split the batch"
            )
        missing = [n for n in needed if n not in self._lru]
        if missing:
            batch = set(needed)
            free = [k for k, owner in enumerate(self._owner) if owner is None]
            victims = [n for n in self._lru if n not in batch]  # least recently used first
            for name in missing:
                if free:
                    slot = free.pop(0)
                else:
                    old = victims.pop(0)
                    slot = self._lru.pop(old)
                    self._clear_slot(slot, old)
                self._load_slot(slot, self._adapters[name])
                self._owner[slot] = name
                self._lru[name] = slot
            self._bump()
        for n in needed:
            self._lru.move_to_end(n)
        return {n: self._lru[n] for n in needed}

    def _clear_slot(self, slot: int, name: str) -> None:
        for p in self._layers.values():
            p.bank.lora_slots.pop(name, None)
            p.bank.lokr_groups[0].slots.pop(name, None)

    @torch.no_grad()
    def _load_slot(self, slot: int, adapter: _Adapter) -> None:
        for key, p in self._layers.items():
            bank, group = p.bank, p.bank.lokr_groups[0]
            m = adapter.modules.get(key)
            if m is None:
                continue  # not targeted: base-only rows here (slot id -1)
            if m.kind == "lora":
                r = m.rank
                bank.lora_a[slot, :r].copy_(m.first)
                bank.lora_a[slot, r:].zero_()
                bank.lora_b[slot, :, :r].copy_(m.second)
                bank.lora_b[slot, :, r:].zero_()
                bank.lora_scale[slot].fill_(m.scale)
                bank.lora_rank[slot].fill_(r)
                bank.lora_slots[adapter.name] = slot
            else:
                group.w1[slot].copy_(m.first)
                group.w2[slot].copy_(m.second)
                group.scale[slot].fill_(m.scale)
                group.slots[adapter.name] = slot

    def _bump(self) -> None:
        for p in self._layers.values():
            p.bank.generation += 1

    # ------------------------------------------------------------------------------------------------ requests
    def forward(self, input_ids: torch.Tensor, adapter_names: Sequence[str | None], **kwargs: Any) -> Any:
        """``model(input_ids, **kwargs)`` with one adapter (or None / "__base__") per sample."""
        names = self._normalize(adapter_names)
        if len(names) != len(input_ids):
            raise ValueError(f"got {len(input_ids)} inputs but {len(names)} adapter names")
        with self._lock, torch.no_grad():
            self._prepare_locked(names)
            with self._routed(names):
                return self.model(input_ids=input_ids, **kwargs)

    __call__ = forward

    def generate(
        self,
        prompts: Sequence[Sequence[int]] | torch.Tensor,
        adapter_names: Sequence[str | None],
        **generate_kwargs: Any,
    ) -> list[list[int]]:
        """Batched generation, one adapter per prompt; returns each prompt's generated tokens (prompt excluded,
        ending at the first EOS), the same as generating each prompt alone with its adapter. With
        ``num_return_sequences=n`` there are n consecutive rows per prompt.

        Lists of token ids are left-padded with ``pad_token_id`` (from the kwargs, else 0) and masked; a tensor is
        taken as is (with ``attention_mask`` from the kwargs if given).
        """
        names = self._normalize(adapter_names)
        pad = generate_kwargs.get("pad_token_id")
        if pad is None:
            pad = 0
            generate_kwargs["pad_token_id"] = pad
        if isinstance(prompts, torch.Tensor):
            input_ids = prompts
            mask = generate_kwargs.pop("attention_mask", None)
            if mask is None:
                mask = torch.ones_like(input_ids)
        else:
            prompts = [list(p) for p in prompts]
            if not prompts or any(len(p) == 0 for p in prompts):
                raise ValueError("generate needs at least one prompt, each with at least one token")
            width = max(len(p) for p in prompts)
            input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
            mask = torch.zeros((len(prompts), width), dtype=torch.long)
            for i, p in enumerate(prompts):
                input_ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
                mask[i, width - len(p) :] = 1
        if len(names) != len(input_ids):
            raise ValueError(f"got {len(input_ids)} prompts but {len(names)} adapter names")
        device = self._any_weight_device()
        eos = generate_kwargs.get("eos_token_id")
        if eos is None:
            eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        eos_set = set() if eos is None else ({eos} if isinstance(eos, int) else set(eos))
        with self._lock, torch.no_grad():
            self._prepare_locked(names)
            with self._routed(names):
                out = self.model.generate(
                    input_ids=input_ids.to(device), attention_mask=mask.to(device), **generate_kwargs
                )
        new = out[:, input_ids.shape[1] :].tolist()
        result = []
        for row in new:
            for i, t in enumerate(row):
                if t in eos_set:
                    row = row[: i + 1]
                    break
            result.append(row)
        return result

    def _any_weight_device(self) -> torch.device:
        p = next(iter(self._layers.values())).layer.base_layer.weight
        return p.device
