"""Sweep layer shapes and batch compositions for the bare layer, PEFT and each of our backends; save CSV/JSON + plots.

    python benchmarks/sweep.py [--quick] [--device cpu|cuda] [--out benchmarks/results] [--no-plots]
    python benchmarks/plot.py benchmarks/results/<stem>.json          # redraw the figures of a saved run

Providers (all timed on the same ``nn.Linear`` weights, outputs checked against PEFT's before timing):

- ``base``:           ``F.linear(x, W, b)``: the bare base layer, no adapters;
- ``peft``:           the real PEFT layer (``peft`` tuners on that ``nn.Linear``, ``init_weights=False``). LoRA with
                      several adapters runs PEFT's own ``adapter_names=`` mixed batch. PEFT has no per-row adapters for
                      LoHa/LoKr (it ignores ``adapter_names``), so for those its realistic alternative is measured:
                      group the rows by adapter, ``set_adapter`` + forward per group, scatter the outputs back;
- ``ours:<backend>``: ``FusedAdapterLinear`` forward under ``torch.no_grad()`` with ``PEFT_KERNELS_BACKEND=<backend>``:
                      what users run, including the Python layer (bank cache, slot ids from ``adapter_names``);
- ``op:<backend>``:   the raw ``ops.adapter_linear(..., backend=<backend>)`` call with the same tensors the layer passes.

Backends are ``ops.available_backends(device)``; on CPU, triton is excluded (under ``TRITON_INTERPRET`` it is an
interpreter, not a measurement). ``torch`` is our pure-PyTorch reference (informational).

Batch compositions: ``D`` distinct adapters in the layer and how the ``M`` rows pick them: ``identical`` (D=1, every row
the one adapter, set with ``set_adapter``), ``uniform`` (each row draws uniformly), ``zipf`` (row draws with p ~ 1/rank),
``distinct`` (round-robin: every row a different adapter while M <= D, all D used equally otherwise). Multi-adapter
compositions are skipped at M=1 (one row = one adapter = identical).

Timing: warm-up calls, then rounds in which every provider runs once (inner loop sized to ~``target`` seconds), the
provider order rotating each round so drift and neighbours' load hit all providers alike. Times are medians over
rounds; a ratio to base is the median over rounds of (provider / base in the same round), so slow drift of a shared
machine cancels. ``torch.cuda.synchronize()`` brackets GPU samples. ``--threads`` sets torch's thread count: on a
machine shared with other jobs, 1 thread avoids OpenMP threads waiting on a descheduled sibling (10x swings).

Results are keyed by device name, torch version, ``peft_kernels.__version__``, peft version, git commit and date (in the
JSON ``meta`` and in every CSV row); files are ``<out>/<device-slug>_<mode>.{json,csv}`` and ``..._<figure>.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import peft_kernels
from peft_kernels import FusedAdapterLinear, ops

HERE = os.path.dirname(os.path.abspath(__file__))
ADAPTERS = {"lora": 16, "loha": 8, "lokr": 8}  # adapter type -> rank
COMPOSITIONS = [
    (1, "identical"),
    (8, "uniform"),
    (8, "zipf"),
    (8, "distinct"),
    (32, "uniform"),
    (32, "zipf"),
    (32, "distinct"),
]
QUICK_COMPOSITIONS = [(1, "identical"), (8, "zipf"), (32, "uniform")]
FULL_LAYERS = [(1024, 1024), (2048, 2048), (4096, 4096), (4096, 11008)]
QUICK_LAYERS = [(1024, 1024), (2048, 2048)]
ROWS = [1, 16, 64, 256]


# ------------------------------------------------------------------------------------------------------- metadata
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def git_commit() -> str:
    def run(*cmd: str) -> str:
        return subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, check=False).stdout.strip()

    commit = run("git", "rev-parse", "--short=12", "HEAD") or "unknown"
    dirty = run("git", "status", "--porcelain", "--untracked-files=no", "--", "../peft_kernels", "../csrc")
    return commit + ("-dirty" if dirty else "")


def metadata(device: torch.device, mode: str, threads: int, backends: list[str]) -> dict:
    import peft

    return {
        "device_type": device.type,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "peft_kernels": peft_kernels.__version__,
        "peft": peft.__version__,
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "mode": mode,
        "threads": threads,
        "cpu_count": os.cpu_count(),
        "loadavg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "dtype": "float32",
        "backends": backends,
        "python": platform.python_version(),
    }


def stem_of(meta: dict) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", meta["device_name"].lower()).strip("-")[:40]
    return f"{meta['device_type']}-{slug}_{meta['mode']}"


# ------------------------------------------------------------------------------------------------------ workloads
def _peft_config(kind: str, r: int):
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    if kind == "lora":
        return LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"], init_lora_weights=False)
    if kind == "loha":
        return LoHaConfig(r=r, alpha=2 * r, target_modules=["0"], init_weights=False)
    return LoKrConfig(r=r, alpha=2 * r, target_modules=["0"], init_weights=False)


def peft_layer(base: nn.Linear, kind: str, r: int, names: list[str]) -> nn.Module:
    from peft import get_peft_model

    torch.manual_seed(1)
    model = get_peft_model(nn.Sequential(base), _peft_config(kind, r), adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, _peft_config(kind, r))
    model.eval()
    return model.base_model.model[0]


def fused_from_peft(layer: nn.Module, kind: str, names: list[str]) -> FusedAdapterLinear:
    """Our layer around the same base ``nn.Linear`` with the PEFT layer's adapters (same tensors, same scales)."""
    fused = FusedAdapterLinear(layer.get_base_layer())
    for name in names:
        s = float(layer.scaling[name])
        if kind == "lora":
            fused.add_lora(name, layer.lora_A[name].weight, layer.lora_B[name].weight, scaling=s)
        elif kind == "loha":
            p = [getattr(layer, f"hada_{w}")[name] for w in ("w1_a", "w1_b", "w2_a", "w2_b")]
            fused.add_loha(name, *p, scaling=s)
        else:
            kw = {
                key: getattr(layer, f"lokr_{key}")[name]
                for key in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b")
                if name in getattr(layer, f"lokr_{key}")
            }
            fused.add_lokr(name, **kw, scaling=s, r=int(layer.r[name]))
    return fused.eval()


def row_adapters(m: int, d: int, popularity: str, seed: int) -> list[int]:
    rng = random.Random(seed)
    if popularity == "identical" or d == 1:
        return [0] * m
    if popularity == "uniform":
        return [rng.randrange(d) for _ in range(m)]
    if popularity == "zipf":
        return rng.choices(range(d), weights=[1.0 / (i + 1) for i in range(d)], k=m)
    if popularity == "distinct":
        order = list(range(d))
        rng.shuffle(order)
        return [order[i % d] for i in range(m)]
    raise ValueError(popularity)


@dataclass
class Provider:
    fn: Callable[[], torch.Tensor]
    backend_env: str | None = None  # PEFT_KERNELS_BACKEND while this provider runs


@contextlib.contextmanager
def backend_env(value: str | None):
    if value is None:
        yield
        return
    before = os.environ.get("PEFT_KERNELS_BACKEND")
    os.environ["PEFT_KERNELS_BACKEND"] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ["PEFT_KERNELS_BACKEND"]
        else:
            os.environ["PEFT_KERNELS_BACKEND"] = before


def capture_op_args(fused: FusedAdapterLinear, call: Callable[[], torch.Tensor]) -> tuple:
    """The positional arguments the layer passes to ``ops.adapter_linear`` (one call, op patched for its duration)."""
    seen: list[tuple] = []
    real = ops.adapter_linear

    def spy(*args, **kwargs):
        seen.append(args)
        return real(*args, **kwargs)

    ops.adapter_linear = spy
    try:
        call()
    finally:
        ops.adapter_linear = real
    if len(seen) != 1:
        raise RuntimeError(f"expected one adapter_linear call per forward, saw {len(seen)}")
    return seen[0]


def build_providers(
    base: nn.Linear, kind: str, names: list[str], slots: list[int], x: torch.Tensor, backends: list[str]
) -> tuple[dict[str, Provider], dict]:
    layer = peft_layer(base, kind, ADAPTERS[kind], names)
    fused = fused_from_peft(layer, kind, names)
    w, b = base.weight, base.bias
    info: dict = {"distinct_used": len(set(slots))}
    row_names = [names[s] for s in slots]
    single = len(names) == 1
    if single:
        layer.set_adapter(names[0])
        fused.set_adapter(names[0])
        peft_fn = lambda: layer(x)  # noqa: E731
        ours_fn = lambda: fused(x)  # noqa: E731
        info["peft_path"] = "set_adapter"
    else:
        ours_fn = lambda: fused(x, adapter_names=row_names)  # noqa: E731
        if kind == "lora":
            peft_fn = lambda: layer(x, adapter_names=row_names)  # noqa: E731
            info["peft_path"] = "adapter_names"
        else:
            groups = {}
            for i, s in enumerate(slots):
                groups.setdefault(names[s], []).append(i)
            groups = {n: torch.tensor(ix, device=x.device) for n, ix in groups.items()}
            n_out = w.shape[0]

            def peft_fn() -> torch.Tensor:  # PEFT's alternative: one set_adapter + forward per adapter group
                out = x.new_empty(x.shape[0], n_out)
                for name, ix in groups.items():
                    layer.set_adapter(name)
                    out[ix] = layer(x[ix])
                return out

            info["peft_path"] = "grouped set_adapter"
    providers = {"base": Provider(lambda: F.linear(x, w, b)), "peft": Provider(peft_fn)}
    with torch.no_grad():
        expected = peft_fn()
        scale = expected.abs().max().item()
        for backend in backends:
            providers[f"ours:{backend}"] = Provider(ours_fn, backend)
            with backend_env(backend):
                got = ours_fn()
                args = capture_op_args(fused, ours_fn)
            info[f"err:{backend}"] = (got - expected).abs().max().item() / scale
            providers[f"op:{backend}"] = Provider(
                lambda args=args, backend=backend: ops.adapter_linear(*args, backend=backend)
            )
    return providers, info


# --------------------------------------------------------------------------------------------------------- timing
def measure(
    providers: dict[str, Provider], rounds: int, target: float, budget: float, device: torch.device
) -> dict[str, dict]:
    """Median seconds per call of each provider, interleaved in rounds (rotating order).

    Slow workloads get fewer rounds (at least 3) so one round-robin of them fits ``budget`` seconds in total.
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    names = list(providers)
    inner: dict[str, int] = {}
    per_round = 0.0
    with torch.no_grad():
        for name, p in providers.items():  # warm-up and an estimate of one call
            with backend_env(p.backend_env):
                p.fn()
                sync()
                t0 = time.perf_counter()
                p.fn()
                sync()
                est = time.perf_counter() - t0
            inner[name] = max(1, min(200, int(target / max(est, 1e-7))))
            per_round += inner[name] * est
        rounds = max(3, min(rounds, int(budget / max(per_round, 1e-9))))
        samples: dict[str, list[float]] = {n: [] for n in names}
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                p, k = providers[name], inner[name]
                with backend_env(p.backend_env):
                    sync()
                    t0 = time.perf_counter()
                    for _ in range(k):
                        p.fn()
                    sync()
                    samples[name].append((time.perf_counter() - t0) / k)
    base = samples[names[0]]
    return {
        n: {
            "median_us": statistics.median(s) * 1e6,
            "min_us": min(s) * 1e6,
            # median over rounds of (this provider / the first provider, base) within the same round: drift cancels
            "x_base": statistics.median(t / b for t, b in zip(s, base)),
            "inner": inner[n],
            "rounds": len(s),
        }
        for n, s in samples.items()
    }


# ----------------------------------------------------------------------------------------------------------- main
def configs(quick: bool, layers: list[tuple[int, int]], rows: list[int]):
    comps = QUICK_COMPOSITIONS if quick else COMPOSITIONS
    for k, n in layers:
        for kind in ADAPTERS:
            for d, pop in comps:
                for m in rows:
                    if m == 1 and d > 1:
                        continue
                    yield k, n, kind, d, pop, m


def run(args: argparse.Namespace) -> tuple[dict, list[dict]]:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    backends = [b for b in ops.available_backends(device) if not (device.type == "cpu" and b == "triton")]
    if args.backends:
        backends = [b for b in backends if b in args.backends.split(",")]
    mode = "quick" if args.quick else "full"
    meta = metadata(device, mode, torch.get_num_threads(), backends)
    layers = [tuple(int(v) for v in s.split("x")) for s in args.layers.split(",")] if args.layers else None
    layers = layers or (QUICK_LAYERS if args.quick else FULL_LAYERS)
    rows = [int(v) for v in args.rows.split(",")] if args.rows else ROWS
    rounds = args.rounds or (5 if args.quick else 7)
    target = args.target or (0.004 if args.quick else 0.01)
    budget = args.budget or (1.2 if args.quick else 8.0)
    meta.update(rounds=rounds, target_s=target, budget_s=budget)
    todo = list(configs(args.quick, layers, rows))
    print(
        f"# {meta['device_name']} | torch {meta['torch']} | peft_kernels {meta['peft_kernels']} | peft {meta['peft']}"
    )
    print(f"# commit {meta['commit']} | {meta['date']} | {meta['threads']} threads | backends {backends}")
    print(f"# {len(todo)} workloads, {rounds} interleaved rounds each; times are medians, ratios are to base")
    print("# PEFT LoHa/LoKr with several adapters: rows grouped by adapter, set_adapter + forward per group")
    records: list[dict] = []
    start = time.perf_counter()
    built: dict[tuple, tuple] = {}
    for k, n, kind, d, pop, m in todo:
        if (k, n) not in built:
            built.clear()
            torch.manual_seed(0)
            built[(k, n)] = (nn.Linear(k, n, device=device).requires_grad_(False),)
        (base,) = built[(k, n)]
        names = [f"a{i}" for i in range(d)]
        slots = row_adapters(m, d, pop, seed=m * 1000 + d)
        x = torch.randn(m, k, device=device, generator=torch.Generator(device).manual_seed(m))
        providers, info = build_providers(base, kind, names, slots, x, backends)
        times = measure(providers, rounds, target, budget, device)
        base_us = times["base"]["median_us"]
        rec = {
            "in": k,
            "out": n,
            "adapter": kind,
            "rank": ADAPTERS[kind],
            "adapters": d,
            "popularity": pop,
            "rows": m,
            **info,
            "times": times,
            "ratio": {p: t["x_base"] for p, t in times.items()},
        }
        records.append(rec)
        errs = max(v for key, v in info.items() if key.startswith("err:"))
        line = "  ".join(f"{p}={rec['ratio'][p]:.2f}" for p in times if p != "base")
        print(
            f"{k}x{n} {kind:4s} D={d:2d} {pop:9s} M={m:3d} base={base_us:8.1f}us  {line}  err={errs:.1e}"
            f"  [{time.perf_counter() - start:.0f}s]",
            flush=True,
        )
        if errs > 1e-3:
            print(f"  WARNING: ours differs from PEFT by {errs:.1e} (relative to max |y|)", flush=True)
        del providers
    meta["runtime_s"] = round(time.perf_counter() - start, 1)
    return meta, records


def save(meta: dict, records: list[dict], out: str) -> str:
    os.makedirs(out, exist_ok=True)
    stem = stem_of(meta)
    with open(os.path.join(out, f"{stem}.json"), "w") as f:
        json.dump({"meta": meta, "records": records}, f, indent=1)
    providers = list(records[0]["times"]) if records else []
    key = ["device_name", "torch", "peft_kernels", "commit", "date", "threads"]
    cols = ["in", "out", "adapter", "rank", "adapters", "popularity", "rows", "distinct_used", "peft_path"]
    with open(os.path.join(out, f"{stem}.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(key + cols + [f"{p}_us" for p in providers] + [f"{p}_x_base" for p in providers if p != "base"])
        for r in records:
            w.writerow(
                [meta[c] for c in key]
                + [r[c] for c in cols]
                + [f"{r['times'][p]['median_us']:.1f}" for p in providers]
                + [f"{r['ratio'][p]:.3f}" for p in providers if p != "base"]
            )
    return stem


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="1024/2048 layers, 3 compositions (~3 min on 2 shared cores)"
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--layers", help="override, e.g. 1024x1024,4096x11008 (in x out)")
    parser.add_argument("--rows", help="override, e.g. 1,16,64,256")
    parser.add_argument("--backends", help="restrict our backends, e.g. cpu")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 5 quick, 7 full)")
    parser.add_argument("--target", type=float, help="seconds per provider per round (default 0.004 quick, 0.01)")
    parser.add_argument("--budget", type=float, help="seconds of timing per workload; slow ones get >= 3 rounds")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    meta, records = run(args)
    stem = save(meta, records, args.out)
    print(f"# wrote {args.out}/{stem}.json and .csv in {meta['runtime_s']:.0f}s")
    if not args.no_plots:
        sys.path.insert(0, HERE)
        import plot

        for path in plot.plot_all(meta, records, args.out, stem):
            print(f"# wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
