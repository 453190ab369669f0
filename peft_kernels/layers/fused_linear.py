"""``FusedAdapterLinear``: a drop-in for ``nn.Linear`` (and GPT-2's ``Conv1D``) that holds its base layer plus LoRA,
LoHa and LoKr adapters, and runs one fused op per forward.

Parameters carry PEFT's names (``lora_A.<name>.weight``, ``hada_w1_a.<name>``, ``lokr_w1.<name>`` ...), so state
dicts, optimiser filters and checkpoints look the same as PEFT's. The forward:

- eval (and inference): one ``adapter_linear`` call with the layer's adapter bank (cached until a parameter changes)
  and per-row slot ids built from the active adapters or from ``adapter_names``;
- training: PEFT's per-adapter math in factored form (dropout, LoHa/LoKr rank and module dropout), with autograd.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from peft_kernels import ops
from peft_kernels.layers import factors
from peft_kernels.layers.bank import AdapterBank, build_bank, empty_lokr
from peft_kernels.ops.reference import lokr_delta, lora_delta, pack_loha

LOHA_PARAMS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LOKR_PARAMS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
ADAPTER_LAYER_NAMES = ("lora_A", "lora_B", *LOHA_PARAMS, *LOKR_PARAMS)
BASE_ONLY = "__base__"


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 ``Conv1D``: a linear layer whose weight is stored [in, out]."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


class FusedAdapterLinear(nn.Module):
    """A base linear layer plus a bank of LoRA / LoHa / LoKr adapters, computed in one fused op.

    Standalone use::

        layer = FusedAdapterLinear(nn.Linear(4096, 4096))
        layer.add_lora("a", lora_A, lora_B, scaling=2.0)          # A: [r, in], B: [out, r]
        layer.add_loha("b", w1a, w1b, w2a, w2b, scaling=1.0)
        layer.add_lokr("c", w1=w1, w2=w2, scaling=1.0)
        layer.set_adapter(["a", "c"])                               # both active on every row
        y = layer(x)
        y = layer(x, adapter_names=["a", "__base__", "b"])         # one adapter per sample (x.shape[0] == 3)
    """

    adapter_layer_names = ADAPTER_LAYER_NAMES

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        if isinstance(base_layer, nn.Linear):
            self.fan_in_fan_out = False
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        elif is_conv1d(base_layer):
            self.fan_in_fan_out = True
            self.in_features, self.out_features = base_layer.weight.shape
        else:
            raise TypeError(
                f"FusedAdapterLinear wraps nn.Linear or transformers' Conv1D, got {type(base_layer).__name__}"
            )
        self.base_layer = base_layer
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        for name in LOHA_PARAMS + LOKR_PARAMS:
            setattr(self, name, nn.ParameterDict())
        self.adapter_types: dict[str, str] = {}  # name -> "lora" | "loha" | "lokr", in order of addition
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.rank_dropout: dict[str, float] = {}
        self.module_dropout: dict[str, float] = {}
        self.rank_dropout_scale: dict[str, bool] = {}
        self._active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disable_adapters = False
        # Names in adapter_names that this layer does not hold: an error when used alone; the model layer, which
        # checks names against every layer, sets this to False (a module an adapter does not target is base-only).
        self.strict_adapter_names = True
        self._bank: tuple[tuple, AdapterBank] | None = None
        # An external bank (serving.AdapterPool): callable(dtype, device) -> AdapterBank with fixed shapes, whose
        # ``generation`` changes whenever a slot's content or owner changes.
        self.bank_source: Callable[[torch.dtype, torch.device], AdapterBank] | None = None
        # name -> its parameters, for the cheap change check of the cached bank (parameters are updated in place by
        # load_state_dict, optimisers and .to(), which bump _version or move data_ptr)
        self._params: dict[str, list[torch.Tensor]] = {}
        self._ids: dict[tuple, tuple[torch.Tensor, list[torch.Tensor]]] = {}  # per-row slot ids of recent batches

    # ----------------------------------------------------------------------------------------------- construction
    @classmethod
    def from_linear(cls, linear: nn.Module) -> FusedAdapterLinear:
        return cls(linear)

    def _check_new(self, name: str) -> None:
        if not isinstance(name, str) or not name or name == BASE_ONLY:
            raise ValueError(f"invalid adapter name {name!r}")
        if name in self.adapter_types:
            raise ValueError(f"adapter {name!r} already exists in this layer")

    def _check_shape(self, name: str, what: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
        if tuple(t.shape) != tuple(shape):
            raise ValueError(
                f"adapter {name!r}: {what} has shape {tuple(t.shape)}, expected {tuple(shape)} for a layer of "
                f"in={self.in_features}, out={self.out_features}"
            )

    def _param_kwargs(self, dtype: torch.dtype | None) -> dict:
        w = self.base_layer.weight
        if dtype is None:
            # PEFT's autocast_adapter_dtype: fp16/bf16 bases get fp32 adapters.
            dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
        return {"device": w.device if w.device.type != "meta" else None, "dtype": dtype}

    def _register(self, name: str, kind: str, r: int, alpha: float, scaling: float) -> None:
        self.adapter_types[name] = kind
        self.r[name], self.alpha[name], self.scaling[name] = r, alpha, scaling
        self._params[name] = list(self.adapter_params(name).values())
        self._bank = None

    def add_lora(
        self,
        name: str,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        scaling: float = 1.0,
        *,
        alpha: float | None = None,
        dropout: float = 0.0,
    ) -> None:
        """Add a LoRA adapter from tensors. lora_A: [r, in], lora_B: [out, r]; delta = scaling * B A x."""
        self._check_new(name)
        r = lora_A.shape[0]
        self._check_shape(name, "lora_A", lora_A, (r, self.in_features))
        self._check_shape(name, "lora_B", lora_B, (self.out_features, r))
        self._make_lora(name, r, dropout, lora_A.dtype)
        with torch.no_grad():
            self.lora_A[name].weight.copy_(lora_A)
            self.lora_B[name].weight.copy_(lora_B)
        self._register(name, "lora", r, r * scaling if alpha is None else alpha, scaling)

    def _make_lora(self, name: str, r: int, dropout: float, dtype: torch.dtype | None) -> None:
        kw = self._param_kwargs(dtype)
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, **kw)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, **kw)
        self.lora_dropout[name] = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()

    def create_lora(
        self,
        name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: bool | str = True,
        dtype: torch.dtype | None = None,
    ) -> None:
        """A new LoRA adapter initialised as PEFT does (``LoraLayer.update_layer``)."""
        self._check_new(name)
        if r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
        self._make_lora(name, r, lora_dropout, dtype)
        factors.init_lora(self.lora_A[name].weight, self.lora_B[name].weight, r, init_lora_weights)
        scaling = lora_alpha / (r**0.5) if use_rslora else lora_alpha / r
        self._register(name, "lora", r, lora_alpha, scaling)

    def _add_params(self, name: str, params: dict[str, torch.Tensor], dtype: torch.dtype | None) -> None:
        kw = self._param_kwargs(dtype)
        for pname, t in params.items():
            getattr(self, pname)[name] = nn.Parameter(t.detach().to(**{k: v for k, v in kw.items() if v is not None}))

    def add_loha(
        self,
        name: str,
        w1a: torch.Tensor,
        w1b: torch.Tensor,
        w2a: torch.Tensor,
        w2b: torch.Tensor,
        scaling: float = 1.0,
        *,
        alpha: float | None = None,
    ) -> None:
        """Add a LoHa adapter: delta W = scaling * (w1a w1b) ⊙ (w2a w2b); w1a, w2a: [out, r], w1b, w2b: [r, in]."""
        self._check_new(name)
        r = w1a.shape[1]
        for what, t, shape in (
            ("hada_w1_a", w1a, (self.out_features, r)),
            ("hada_w1_b", w1b, (r, self.in_features)),
            ("hada_w2_a", w2a, (self.out_features, w2a.shape[1])),
            ("hada_w2_b", w2b, (w2a.shape[1], self.in_features)),
        ):
            self._check_shape(name, what, t, shape)
        self._add_params(name, dict(zip(LOHA_PARAMS, (w1a, w1b, w2a, w2b))), w1a.dtype)
        self._register(name, "loha", r, r * scaling if alpha is None else alpha, scaling)

    def create_loha(
        self,
        name: str,
        r: int,
        alpha: float,
        rank_dropout: float = 0.0,
        module_dropout: float = 0.0,
        init_weights: bool = True,
        dtype: torch.dtype | None = None,
    ) -> None:
        """A new LoHa adapter initialised as PEFT does (scale alpha / r)."""
        self._check_new(name)
        if r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
        shapes = {
            "hada_w1_a": (self.out_features, r),
            "hada_w1_b": (r, self.in_features),
            "hada_w2_a": (self.out_features, r),
            "hada_w2_b": (r, self.in_features),
        }
        kw = {k: v for k, v in self._param_kwargs(dtype).items() if v is not None}
        params = {n: torch.empty(s, **kw) for n, s in shapes.items()}
        factors.init_loha(params, init_weights)
        self._add_params(name, params, dtype)
        self.rank_dropout[name], self.module_dropout[name] = rank_dropout, module_dropout
        self._register(name, "loha", r, alpha, alpha / r)

    def add_lokr(
        self,
        name: str,
        *,
        w1: torch.Tensor | None = None,
        w1_a: torch.Tensor | None = None,
        w1_b: torch.Tensor | None = None,
        w2: torch.Tensor | None = None,
        w2_a: torch.Tensor | None = None,
        w2_b: torch.Tensor | None = None,
        scaling: float = 1.0,
        r: int | None = None,
        alpha: float | None = None,
    ) -> None:
        """Add a LoKr adapter: delta W = scaling * kron(w1, w2), w1 = w1 or w1_a w1_b, w2 = w2 or w2_a w2_b."""
        self._check_new(name)
        if (w1 is None) == (w1_a is None or w1_b is None):
            raise ValueError(f"adapter {name!r}: give either w1 or both w1_a and w1_b")
        if (w2 is None) == (w2_a is None or w2_b is None):
            raise ValueError(f"adapter {name!r}: give either w2 or both w2_a and w2_b")
        s1 = tuple(w1.shape) if w1 is not None else (w1_a.shape[0], w1_b.shape[1])
        s2 = tuple(w2.shape) if w2 is not None else (w2_a.shape[0], w2_b.shape[1])
        if s1[0] * s2[0] != self.out_features or s1[1] * s2[1] != self.in_features:
            raise ValueError(
                f"adapter {name!r}: kron of w1 {s1} and w2 {s2} is {s1[0] * s2[0]}x{s1[1] * s2[1]}, "
                f"the layer is {self.out_features}x{self.in_features}"
            )
        given = {
            "lokr_w1": w1,
            "lokr_w1_a": w1_a,
            "lokr_w1_b": w1_b,
            "lokr_w2": w2,
            "lokr_w2_a": w2_a,
            "lokr_w2_b": w2_b,
        }
        params = {k: v for k, v in given.items() if v is not None}
        self._add_params(name, params, next(iter(params.values())).dtype)
        rank = r if r is not None else (w2_a.shape[1] if w2_a is not None else 1)
        self.rank_dropout[name], self.module_dropout[name], self.rank_dropout_scale[name] = 0.0, 0.0, False
        self._register(name, "lokr", rank, rank * scaling if alpha is None else alpha, scaling)

    def create_lokr(
        self,
        name: str,
        r: int,
        alpha: float,
        decompose_both: bool = False,
        decompose_factor: int = -1,
        rank_dropout: float = 0.0,
        module_dropout: float = 0.0,
        rank_dropout_scale: bool = False,
        init_weights: bool | str = True,
        dtype: torch.dtype | None = None,
    ) -> None:
        """A new LoKr adapter with PEFT's factor shapes (``factorization``) and init; scale alpha / r."""
        self._check_new(name)
        if r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
        shapes = factors.lokr_shapes(self.out_features, self.in_features, r, decompose_both, decompose_factor)
        kw = {k: v for k, v in self._param_kwargs(dtype).items() if v is not None}
        params = {n: torch.empty(s, **kw) for n, s in shapes.items()}
        factors.init_lokr(params, init_weights)
        self._add_params(name, params, dtype)
        self.rank_dropout[name], self.module_dropout[name] = rank_dropout, module_dropout
        self.rank_dropout_scale[name] = rank_dropout_scale
        self._register(name, "lokr", r, alpha, alpha / r)

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` (raises if it is merged); active adapters lose it."""
        if name not in self.adapter_types:
            raise ValueError(f"adapter {name!r} does not exist in this layer")
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged; unmerge it before deleting it")
        for attr in ("lora_A", "lora_B", "lora_dropout", *LOHA_PARAMS, *LOKR_PARAMS):
            container = getattr(self, attr)
            if name in container:
                del container[name]
        for d in (self.adapter_types, self.r, self.alpha, self.scaling, self.rank_dropout, self.module_dropout):
            d.pop(name, None)
        self.rank_dropout_scale.pop(name, None)
        self._active_adapters = [a for a in self._active_adapters if a != name]
        self._params.pop(name, None)
        self._bank = None

    # ------------------------------------------------------------------------------------------------ selection
    @property
    def active_adapters(self) -> list[str]:
        return list(self._active_adapters)

    @property
    def active_adapter(self) -> list[str]:
        return self.active_adapters

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def set_adapter(self, adapter_names: str | Sequence[str], inference_mode: bool = False) -> None:
        """Activate these adapters (several add up); names this layer does not hold are ignored, as in PEFT.

        Active adapters become trainable unless ``inference_mode``; the others are frozen.
        """
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for attr in ADAPTER_LAYER_NAMES:
            for key, p in getattr(self, attr).items():
                p.requires_grad_(key in names and not inference_mode)
        self._active_adapters = names

    def adapter_params(self, name: str) -> dict[str, torch.Tensor]:
        """PEFT attribute name -> tensor of adapter ``name`` (lora_A/lora_B give their weights)."""
        out: dict[str, torch.Tensor] = {}
        if name in self.lora_A:
            out["lora_A"], out["lora_B"] = self.lora_A[name].weight, self.lora_B[name].weight
        for attr in LOHA_PARAMS + LOKR_PARAMS:
            container = getattr(self, attr)
            if name in container:
                out[attr] = container[name]
        return out

    # -------------------------------------------------------------------------------------------------- factors
    def lora_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A [r, in], B [out, r] of a LoRA adapter, or the packed rank r1*r2 factors of a LoHa adapter."""
        if self.adapter_types[name] == "lora":
            return self.lora_A[name].weight, self.lora_B[name].weight
        p = self.adapter_params(name)
        return pack_loha(p["hada_w1_a"], p["hada_w1_b"], p["hada_w2_a"], p["hada_w2_b"])

    def lokr_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """w1 [a, b], w2 [c, d] of a LoKr adapter, low-rank products multiplied out."""
        p = self.adapter_params(name)
        w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
        w2 = p["lokr_w2"] if "lokr_w2" in p else p["lokr_w2_a"] @ p["lokr_w2_b"]
        return w1, w2

    def get_delta_weight(self, name: str) -> torch.Tensor:
        """The dense delta in the base weight's layout ([out, in], or [in, out] for Conv1D). For merging only.

        Computed in at least fp32 (as PEFT does on CPU for fp16/bf16 weights).
        """
        kind = self.adapter_types[name]
        s = self.scaling[name]
        if kind == "lokr":
            w1, w2 = (_upcast(t) for t in self.lokr_factors(name))
            delta = torch.kron(w1, w2) * s
        elif kind == "loha":
            w1a, w1b, w2a, w2b = (_upcast(self.adapter_params(name)[k]) for k in LOHA_PARAMS)
            delta = (w1a @ w1b) * (w2a @ w2b) * s
        else:
            a, b = (_upcast(t) for t in self.lora_factors(name))
            delta = (b @ a) * s
        return delta.t() if self.fan_in_fan_out else delta

    # -------------------------------------------------------------------------------------------------- merging
    def merge(self, safe_merge: bool = False, adapter_names: Sequence[str] | None = None) -> None:
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        weight = self.base_layer.weight
        for name in names:
            if name not in self.adapter_types or name in self.merged_adapters:
                continue
            delta = self.get_delta_weight(name)
            with torch.no_grad():
                if safe_merge:
                    merged = weight.data.float() + delta
                    if not torch.isfinite(merged).all():
                        raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
                    weight.data.copy_(merged.to(weight.dtype))
                else:
                    weight.data += delta.to(weight.dtype)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        weight = self.base_layer.weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            with torch.no_grad():
                weight.data -= self.get_delta_weight(name).to(weight.dtype)

    def get_base_layer(self) -> nn.Module:
        return self.base_layer

    # -------------------------------------------------------------------------------------------------- forward
    def _base_weight(self) -> torch.Tensor:
        w = self.base_layer.weight
        return w.t() if self.fan_in_fan_out else w  # [out, in]

    def _bank_key(self, dtype: torch.dtype, device: torch.device) -> tuple:
        parts: list = [dtype, device]
        for name, params in self._params.items():
            parts.append((name, self.scaling[name]))
            parts.extend((p._version, p.data_ptr()) for p in params)
        return tuple(parts)

    def bank(self, dtype: torch.dtype, device: torch.device, differentiable: bool = False) -> AdapterBank:
        """The layer's adapter bank in ``dtype`` on ``device``; cached until an adapter parameter changes.

        With ``bank_source`` set (an adapter pool serving this layer), the bank is the pool's preallocated one.
        """
        if self.bank_source is not None:
            return self.bank_source(dtype, device)
        if differentiable:
            return self._build_bank(dtype, device)
        if torch.compiler.is_compiling() and self._bank is not None and self._bank[0][:2] == (dtype, device):
            # Under torch.compile the change check (data pointers, versions) would break the graph; a compiled
            # inference graph assumes fixed adapters: recompile (or torch._dynamo.reset()) after changing them.
            return self._bank[1]
        key = self._bank_key(dtype, device)
        if self._bank is None or self._bank[0] != key:
            with torch.no_grad():
                self._bank = (key, self._build_bank(dtype, device))
            self._ids.clear()
        return self._bank[1]

    def _build_bank(self, dtype: torch.dtype, device: torch.device) -> AdapterBank:
        lora_like, lokr = {}, {}
        for name, kind in self.adapter_types.items():
            if kind == "lokr":
                lokr[name] = (*self.lokr_factors(name), self.scaling[name])
            else:
                lora_like[name] = (*self.lora_factors(name), self.scaling[name])
        return build_bank(lora_like, lokr, self.in_features, self.out_features, dtype, device)

    def _row_names(self, adapter_names: Sequence[str] | None) -> list[list[str]] | None:
        """Per sample, the adapters to apply; None when every sample uses the active adapters."""
        if adapter_names is None:
            return None
        rows = []
        for n in adapter_names:
            if n == BASE_ONLY:
                rows.append([])
            elif n in self.adapter_types or self.bank_source is not None:
                rows.append([n])  # a pooled adapter not resident in this layer's bank gets slot -1 (base only)
            elif self.strict_adapter_names:
                raise ValueError(f"Trying to infer with non-existing adapter(s): {n}")
            else:
                rows.append([])  # an adapter that does not target this module: base only here
        return rows

    def _slot_ids(
        self, bank: AdapterBank, names_per_sample: list[list[str]], tokens_per_sample: int, device: torch.device
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """int32 slot ids per row: LoRA bank [M, P], and one [M, Q] per LoKr group; -1 pads."""
        width = max((len(r) for r in names_per_sample), default=0)
        lora = [[bank.lora_slots.get(n, -1) for n in r] for r in names_per_sample]
        groups = [[[g.slots.get(n, -1) for n in r] for r in names_per_sample] for g in bank.lokr_groups]

        def to_tensor(rows: list[list[int]]) -> torch.Tensor:
            rows = [[i for i in r if i >= 0] for r in rows]
            p = max((len(r) for r in rows), default=0) if width else 0
            t = torch.full((len(rows), p), -1, dtype=torch.int32)
            for i, r in enumerate(rows):
                t[i, : len(r)] = torch.tensor(r, dtype=torch.int32)
            if tokens_per_sample != 1:
                t = t.repeat_interleave(tokens_per_sample, dim=0)
            return t.to(device)

        return to_tensor(lora), [to_tensor(g) for g in groups]

    def forward(self, x: torch.Tensor, *args, adapter_names: Sequence[str] | None = None, **kwargs) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            if len(x) != len(adapter_names):
                raise ValueError(
                    "Length of `adapter_names` should be the same as the number of inputs, but got "
                    f"{len(adapter_names)} and {len(x)} respectively."
                )
            if self.merged:
                raise ValueError(
                    "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first."
                )
        elif self.merged:
            return self.base_layer(x, *args, **kwargs)
        rows = self._row_names(adapter_names)
        active = [a for a in self._active_adapters if a in self.adapter_types]
        if rows is None and not active:  # (a pooled layer is driven by adapter_names)
            return self.base_layer(x, *args, **kwargs)
        if self.training:
            if rows is not None:
                raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
            return self._forward_training(x, active)
        return self._forward_fused(x, rows if rows is not None else [active], tokens=_tokens_per_sample(x, rows))

    def _forward_fused(self, x: torch.Tensor, rows: list[list[str]], tokens: int) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        m = x2.shape[0]
        differentiable = torch.is_grad_enabled() and any(p.requires_grad for ps in self._params.values() for p in ps)
        bank = self.bank(x2.dtype, x2.device, differentiable)
        key = (tuple(tuple(r) for r in rows), tokens, m, x2.device, id(bank), bank.generation)
        cached = None if differentiable else self._ids.get(key)
        if cached is None:
            if len(rows) == 1 and tokens == m:  # the same adapters on every row: one sample spanning all rows
                lora_ids, lokr_ids = self._slot_ids(bank, rows, 1, x2.device)
                lora_ids = lora_ids.expand(m, -1).contiguous()
                lokr_ids = [t.expand(m, -1).contiguous() for t in lokr_ids]
            else:
                lora_ids, lokr_ids = self._slot_ids(bank, rows, tokens, x2.device)
            if len(self._ids) >= 16:
                self._ids.clear()
            cached = self._ids[key] = (lora_ids, lokr_ids)
        lora_ids, lokr_ids = cached
        first = bank.lokr_groups[0] if bank.lokr_groups else None
        w1, w2, s = (first.w1, first.w2, first.scale) if first else empty_lokr(x2.dtype, x2.device)
        y = ops.adapter_linear(
            x2,
            self._base_weight(),
            self.base_layer.bias,
            bank.lora_a,
            bank.lora_b,
            bank.lora_scale,
            bank.lora_rank,
            lora_ids,
            w1,
            w2,
            s,
            lokr_ids[0] if first else torch.zeros(m, 0, dtype=torch.int32, device=x2.device),
        )
        # LoKr adapters of a second factor shape in one layer (different decompose_factor): rare; reference math.
        for group, ids in zip(bank.lokr_groups[1:], lokr_ids[1:]):
            for slot in range(group.w1.shape[0]):
                hit = (ids == slot).sum(dim=1)
                if bool(hit.any()):
                    delta = lokr_delta(x2.to(group.w1.dtype), group.w1[slot], group.w2[slot], group.scale[slot])
                    y = y + (delta * hit[:, None].to(delta.dtype)).to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def _forward_training(self, x: torch.Tensor, active: Iterable[str]) -> torch.Tensor:
        """PEFT's training forward in factored form: dropout on the LoRA input, LoHa/LoKr module and rank dropout."""
        result = self.base_layer(x)
        out_dtype = result.dtype
        for name in active:
            kind = self.adapter_types[name]
            if kind == "lora":
                a = self.lora_A[name].weight
                xa = self.lora_dropout[name](x.to(a.dtype))
                result = result + lora_delta(xa, a, self.lora_B[name].weight, self.scaling[name])
                continue
            if self.module_dropout.get(name, 0.0) and torch.rand(1) <= self.module_dropout[name]:
                continue  # PEFT keeps the adapter when rand > module_dropout
            if kind == "loha":
                a, b = self.lora_factors(name)
                delta = lora_delta(x.to(a.dtype), a, b, self.scaling[name])
            else:
                w1, w2 = self.lokr_factors(name)
                delta = lokr_delta(x.to(w1.dtype), w1, w2, self.scaling[name])
            p = self.rank_dropout.get(name, 0.0)
            if p:
                drop = (torch.rand(self.out_features, device=delta.device) > p).to(delta.dtype)
                if kind == "loha" or self.rank_dropout_scale.get(name, False):
                    drop = drop / drop.mean()
                delta = delta * drop
            result = result + delta
        return result.to(out_dtype)

    def extra_repr(self) -> str:
        kinds = ", ".join(f"{n}:{k}" for n, k in self.adapter_types.items())
        return f"in_features={self.in_features}, out_features={self.out_features}, adapters=[{kinds}]"


def _upcast(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _tokens_per_sample(x: torch.Tensor, rows: list[list[str]] | None) -> int:
    m = x.numel() // x.shape[-1]
    if rows is None:
        return m
    return m // len(rows)
