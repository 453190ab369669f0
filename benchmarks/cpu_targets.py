"""The CPU speed targets of DESIGN.md section 8, measured in one run: ``python benchmarks/cpu_targets.py [--quick]``.

Every workload is timed for each provider, interleaved in rounds (base, ours, peft, torch, base, ours, ...) so drift
of the machine cancels, and reported as medians and ratios to the bare layer:

- base:  ``F.linear`` on the layer's weight (the bare ``nn.Linear``);
- ours:  the C++ CPU kernel ``torch.ops.peft_kernels.adapter_linear``;
- peft:  the real PEFT layer (peft==0.21.2, ``init_weights=False``) around the same ``nn.Linear``;
- torch: our pure-PyTorch reference (informational).

Adapters are built through PEFT's own configs, so the shapes are PEFT's (LoKr r=8 on 4096: w1 64x64 full, w2 64x8 x
8x64 low-rank), then loaded into our bank (LoHa packed as its rank r*r LoRA-equivalent, LoKr factors multiplied out).
Each workload is first checked: ours must match PEFT's output.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from peft_kernels.ops import reference


@dataclass
class Workload:
    name: str
    limit: float  # target for ours / base
    fns: dict[str, Callable[[], torch.Tensor]] = field(default_factory=dict)


def _peft_model(layer: nn.Linear, config, names: list[str]) -> nn.Module:
    from peft import get_peft_model

    model = get_peft_model(nn.Sequential(layer), config, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, config)
    model.eval()
    return model.base_model.model[0]


def _config(kind: str, r: int):
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    if kind == "lora":
        return LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"], init_lora_weights=False)
    if kind == "loha":
        return LoHaConfig(r=r, alpha=2 * r, target_modules=["0"], init_weights=False)
    if kind == "lokr":
        return LoKrConfig(r=r, alpha=2 * r, target_modules=["0"], init_weights=False)
    raise ValueError(kind)


def bank_from_peft(layer: nn.Module, kind: str, names: list[str]) -> dict[str, torch.Tensor]:
    """Our op's bank tensors for the adapters ``names`` of a PEFT layer (slot i holds names[i])."""
    n, k = layer.get_base_layer().weight.shape
    empty_lokr = {
        "lokr_w1": torch.zeros(0, 0, 0),
        "lokr_w2": torch.zeros(0, 0, 0),
        "lokr_scale": torch.zeros(0),
    }
    if kind in ("lora", "loha"):
        pairs = []
        for name in names:
            if kind == "lora":
                pairs.append((layer.lora_A[name].weight, layer.lora_B[name].weight))
            else:
                pairs.append(
                    reference.pack_loha(
                        layer.hada_w1_a[name], layer.hada_w1_b[name], layer.hada_w2_a[name], layer.hada_w2_b[name]
                    )
                )
        return {
            "lora_a": torch.stack([a for a, _ in pairs]).detach().contiguous(),
            "lora_b": torch.stack([b for _, b in pairs]).detach().contiguous(),
            "lora_scale": torch.tensor([float(layer.scaling[nm]) for nm in names]),
            "lora_rank": torch.tensor([a.shape[0] for a, _ in pairs], dtype=torch.int32),
            **empty_lokr,
        }
    w1s, w2s = [], []
    for name in names:
        w1 = layer.lokr_w1[name] if name in layer.lokr_w1 else layer.lokr_w1_a[name] @ layer.lokr_w1_b[name]
        w2 = layer.lokr_w2[name] if name in layer.lokr_w2 else layer.lokr_w2_a[name] @ layer.lokr_w2_b[name]
        w1s.append(w1)
        w2s.append(w2)
    return {
        "lora_a": torch.zeros(0, 0, k),
        "lora_b": torch.zeros(0, n, 0),
        "lora_scale": torch.zeros(0),
        "lora_rank": torch.zeros(0, dtype=torch.int32),
        "lokr_w1": torch.stack(w1s).detach().contiguous(),
        "lokr_w2": torch.stack(w2s).detach().contiguous(),
        "lokr_scale": torch.tensor([float(layer.scaling[nm]) for nm in names]),
    }


def _op_call(op, x, weight, bias, bank, slot_of_row: torch.Tensor, kind: str) -> Callable[[], torch.Tensor]:
    ids = slot_of_row.to(torch.int32).reshape(-1, 1)
    none = torch.zeros(x.shape[0], 0, dtype=torch.int32)
    lora_ids, lokr_ids = (none, ids) if kind == "lokr" else (ids, none)
    args = (
        x,
        weight,
        bias,
        bank["lora_a"],
        bank["lora_b"],
        bank["lora_scale"],
        bank["lora_rank"],
        lora_ids,
        bank["lokr_w1"],
        bank["lokr_w2"],
        bank["lokr_scale"],
        lokr_ids,
    )
    return lambda: op(*args)


def build(kind: str, n: int, m: int, r: int, adapters: int = 1, tokens: int = 1, limit: float = 1.15) -> Workload:
    """One layer n x n; ``m`` sequences of ``tokens`` rows; ``adapters`` distinct adapters (one per sequence)."""
    from peft_kernels.ops import compiled_cpu

    torch.manual_seed(0)
    base = nn.Linear(n, n)
    names = [f"a{i}" for i in range(adapters)]
    layer = _peft_model(copy.deepcopy(base), _config(kind, r), names)
    bank = bank_from_peft(layer, kind, names)
    x = torch.randn(m * tokens, n)
    weight, bias = base.weight.detach(), base.bias.detach()
    if adapters == 1:
        layer.set_adapter(names[0])
        seq_slot = torch.zeros(m, dtype=torch.int64)
        peft_fn = lambda: layer(x)  # noqa: E731
    else:
        seq_slot = torch.randperm(m) % adapters
        seq_names = [names[i] for i in seq_slot.tolist()]
        x3 = x.view(m, tokens, n) if tokens > 1 else x
        peft_fn = lambda: layer(x3, adapter_names=seq_names)  # noqa: E731
    rows = seq_slot.repeat_interleave(tokens)
    fns = {
        "base": lambda: F.linear(x, weight, bias),
        "ours": _op_call(compiled_cpu.adapter_linear, x, weight, bias, bank, rows, kind),
        "peft": peft_fn,
        "torch": _op_call(reference.adapter_linear, x, weight, bias, bank, rows, kind),
    }
    if compiled_cpu.unavailable_reason(torch.device("cpu")) is not None:
        del fns["ours"]
    with torch.inference_mode():
        expected = fns["peft"]().reshape(m * tokens, n)
        for provider in ("ours", "torch"):
            if provider in fns:
                got = fns[provider]()
                err = (got - expected).abs().max().item() / expected.abs().max().item()
                if err > 1e-4:
                    raise AssertionError(f"{kind} n={n} m={m}: {provider} differs from PEFT (max rel err {err:.2e})")
    label = {"lora": f"LoRA r={r}", "loha": f"LoHa r={r}", "lokr": f"LoKr r={r}"}[kind]
    if adapters > 1:
        label = f"{adapters} x {label}, {m} seq x {tokens} tok"
    return Workload(f"{n}x{n} {label}, M={m * tokens}", limit, fns)


def measure(w: Workload, rounds: int, min_seconds: float) -> dict[str, float]:
    """Median seconds per call of each provider, interleaved in rounds."""
    samples: dict[str, list[float]] = {p: [] for p in w.fns}
    with torch.inference_mode():
        for fn in w.fns.values():  # warm-up
            fn()
        start = time.perf_counter()
        done = 0
        while done < rounds or (time.perf_counter() - start < min_seconds and done < 20 * rounds):
            for p, fn in w.fns.items():
                t0 = time.perf_counter()
                fn()
                samples[p].append(time.perf_counter() - t0)
            done += 1
    return {p: statistics.median(s) for p, s in samples.items()}


def workloads(quick: bool) -> list[Callable[[], Workload]]:
    n, big, mt_n = (1024, 64, 512) if quick else (4096, 256, 2048)
    out: list[Callable[[], Workload]] = []
    for kind, r in (("lora", 16), ("loha", 8), ("lokr", 8)):
        for m in (1, 16, big):
            out.append(lambda kind=kind, r=r, m=m: build(kind, n, m, r))
    adapters = 8 if quick else 32
    out.append(lambda: build("lora", mt_n, 64, 16, adapters=adapters, tokens=1, limit=1.25))
    out.append(lambda: build("lora", mt_n, 64, 16, adapters=adapters, tokens=16, limit=1.15))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, a smoke run of a few seconds")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=None, help="minimum rounds per workload")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from peft_kernels.ops import compiled_cpu

    reason = compiled_cpu.unavailable_reason(torch.device("cpu"))
    if reason is not None:
        print(f"the C++ CPU kernel is unavailable: {reason}", file=sys.stderr)
        return 2
    rounds = args.rounds or (5 if args.quick else 15)
    min_seconds = 0.5 if args.quick else 4.0
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, medians of >= {rounds} rounds")
    header = f"{'workload':<52} {'base ms':>9} {'ours ms':>9} {'peft ms':>9} {'torch ms':>9} {'ours/base':>9} {'peft/base':>9} {'target':>7}  ok"
    print(header)
    print("-" * len(header))
    misses = 0
    for make in workloads(args.quick):
        w = make()
        med = measure(w, rounds, min_seconds)
        ours, peft = med["ours"] / med["base"], med["peft"] / med["base"]
        ok = ours <= w.limit
        misses += not ok
        print(
            f"{w.name:<52} {med['base'] * 1e3:9.3f} {med['ours'] * 1e3:9.3f} {med['peft'] * 1e3:9.3f} "
            f"{med['torch'] * 1e3:9.3f} {ours:9.3f} {peft:9.3f} {w.limit:6.2f}x  {'yes' if ok else 'NO'}",
            flush=True,
        )
    print(f"{misses} target(s) missed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
