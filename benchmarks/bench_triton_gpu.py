"""Benchmark the Triton ``adapter_linear`` paths on a CUDA GPU against the bare base GEMM and against PEFT.

    python benchmarks/bench_triton_gpu.py [--dtype bf16] [--csv out.csv] [--quick]
    python benchmarks/bench_triton_gpu.py --compile-only [--archs 80,90]   # no GPU: build every kernel variant

For each case (rows M, layer K -> N, rank, adapters in the batch) and each path (fused, two_kernel, decode, auto)
it reports the median time (``triton.testing.do_bench``, p20/p50/p80), achieved bandwidth (bytes of x, W, out and
the distinct adapters' factors) and FLOP/s, the ratio to ``F.linear`` alone and to PEFT (peft LoRA layer built with
``init_lora_weights=False``; several adapters through ``adapter_names``). Each path's output is checked against
PEFT's before it is timed. Prints a table and writes a CSV keyed by GPU name, torch and triton versions.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

PATHS = ("fused", "two_kernel", "decode", "auto")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# (name, M, K, N, rank, adapters): decode, small batch, prefill; one adapter and a multi-tenant mix.
CASES = [
    ("decode-1ad", 1, 4096, 4096, 16, 1),
    ("decode-8ad", 8, 4096, 4096, 16, 8),
    ("decode-32ad", 32, 4096, 4096, 16, 32),
    ("batch-1ad", 128, 4096, 4096, 16, 1),
    ("batch-8ad", 128, 4096, 4096, 16, 8),
    ("prefill-1ad", 2048, 4096, 4096, 16, 1),
    ("prefill-4ad", 2048, 4096, 4096, 16, 4),
    ("prefill-r64", 2048, 4096, 4096, 64, 4),
    ("mlp-up-8ad", 512, 4096, 11008, 16, 8),
    ("long-prefill", 8192, 4096, 4096, 16, 4),
]
DEVICE = "cuda"
QUICK = {"decode-8ad", "batch-8ad", "prefill-4ad"}


class _Proj(torch.nn.Module):
    def __init__(self, k: int, n: int):
        super().__init__()
        self.proj = torch.nn.Linear(k, n)

    def forward(self, x):
        return self.proj(x)


def _peft_layer(k: int, n: int, rank: int, adapters: int, dtype: torch.dtype, device: str = "cuda"):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["proj"], init_lora_weights=False)
    model = get_peft_model(_Proj(k, n), cfg, adapter_name="a0")
    for i in range(1, adapters):
        model.add_adapter(f"a{i}", cfg)
    return model.to(device=device, dtype=dtype).eval()


def _bank(model, adapters: int):
    """The peft layer's weights as our op's arguments (LoRA bank in slot order a0, a1, ...)."""
    layer = model.base_model.model.proj
    names = [f"a{i}" for i in range(adapters)]
    a = torch.stack([layer.lora_A[nm].weight for nm in names]).detach().contiguous()
    b = torch.stack([layer.lora_B[nm].weight for nm in names]).detach().contiguous()
    dev = a.device
    scale = torch.tensor([float(layer.scaling[nm]) for nm in names], dtype=torch.float32, device=dev)
    rank = torch.full((adapters,), a.shape[1], dtype=torch.int32, device=dev)
    empty = torch.zeros(0, 0, 0, dtype=a.dtype, device=dev)
    return layer.base_layer, a, b, scale, rank, empty


def _gpu_timer(fn):
    import triton.testing

    p50, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=25, rep=100)
    return p50, p20, p80


def run(dtype_name: str, quick: bool, csv_path: str) -> None:
    from peft_kernels.ops.triton import load_op

    op = load_op()
    dtype = DTYPES[dtype_name]
    rows_out, header = [], None
    import triton

    meta = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "commit": _commit(),
        "dtype": dtype_name,
    }
    print(f"# {meta}")
    for name, m, k, n, rank, adapters in CASES:
        if quick and name not in QUICK:
            continue
        for row in _bench_case(op, meta, dtype, name, m, k, n, rank, adapters):
            rows_out.append(row)
            header = list(row)
            cols = ("case", "M", "rank", "adapters", "path", "ms_p50", "GB/s", "TFLOP/s", "vs_base", "vs_peft")
            print("  ".join(f"{c}={row[c]}" for c in cols), f"err={row['rel_err_vs_peft']}")
        torch.cuda.empty_cache()

    _print_table(rows_out)
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows_out)
    print(f"wrote {csv_path}")


@torch.inference_mode()
def _bench_case(op, meta: dict, dtype, name: str, m: int, k: int, n: int, rank: int, adapters: int) -> list[dict]:
    torch.manual_seed(0)
    model = _peft_layer(k, n, rank, adapters, dtype, DEVICE)
    base, a, b, scale, ranks, empty = _bank(model, adapters)
    x = torch.randn(m, k, device=DEVICE, dtype=dtype) / k**0.5
    slots = torch.arange(m, device=DEVICE, dtype=torch.int32) % adapters
    names = [f"a{int(s)}" for s in slots.tolist()]
    ids = slots[:, None].contiguous()
    no_lokr = torch.zeros(m, 0, dtype=torch.int32, device=DEVICE)
    args = (x, base.weight, base.bias, a, b, scale, ranks, ids, empty, empty, scale[:0], no_lokr)

    def peft_fn():
        return model(x) if adapters == 1 else model(x, adapter_names=names)

    y_peft = peft_fn()
    t_base = _gpu_timer(lambda: F.linear(x, base.weight, base.bias))[0]
    t_peft = _gpu_timer(peft_fn)[0]
    used = min(adapters, m)
    bytes_moved = x.element_size() * (m * k + n * k + m * n + used * rank * (k + n))
    flops = 2 * m * n * k + 2 * m * rank * (k + n)
    rows = []
    for path in PATHS:

        def fn(path=path):
            return op(*args) if path == "auto" else op(*args, path)

        y = fn()
        err = ((y.float() - y_peft.float()).abs().max() / y_peft.float().abs().max().clamp_min(1e-6)).item()
        p50, p20, p80 = _gpu_timer(fn)
        rows.append(
            {
                **meta,
                "case": name,
                "M": m,
                "K": k,
                "N": n,
                "rank": rank,
                "adapters": adapters,
                "path": path,
                "ms_p50": round(p50, 4),
                "ms_p20": round(p20, 4),
                "ms_p80": round(p80, 4),
                "GB/s": round(bytes_moved / p50 / 1e6, 1),
                "TFLOP/s": round(flops / p50 / 1e9, 2),
                "base_ms": round(t_base, 4),
                "peft_ms": round(t_peft, 4),
                "vs_base": round(p50 / t_base, 3),
                "vs_peft": round(p50 / t_peft, 3),
                "rel_err_vs_peft": f"{err:.1e}",
            }
        )
    return rows


def _print_table(rows: list[dict]) -> None:
    cols = ("case", "M", "K", "N", "rank", "adapters", "path", "ms_p50", "GB/s", "TFLOP/s", "vs_base", "vs_peft")
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print("  ".join(c.rjust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r[c]).rjust(widths[c]) for c in cols))


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def compile_only(archs: tuple[int, ...] = (80, 90)) -> None:
    """Build every kernel variant for each arch with triton.compile + ptxas (no GPU): catches compiled-mode errors
    the interpreter lets through, and prints register and stack use from cuobjdump."""
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from peft_kernels.ops.triton import configs, kernels

    cfg = configs.PROFILES["gpu"]
    int_ptrs = {"rank_ptr", "perm_ptr", "tile_start_ptr", "tile_len_ptr", "slots_ptr", "lokr_ids_ptr", "ids_ptr"}
    int_ptrs |= {"tile_slot_ptr"}
    f32_ptrs = {"scale_ptr", "lokr_scale_ptr", "s_ptr", "t_ptr"}

    def signature(fn, dt: str, constexprs: dict) -> dict:
        sig = {}
        for name in fn.arg_names:
            if name in constexprs:
                sig[name] = "constexpr"
            elif name.endswith("_ptr"):
                sig[name] = "*i32" if name in int_ptrs else "*fp32" if name in f32_ptrs else f"*{dt}"
            else:
                sig[name] = "i32"
        return sig

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")

    def usage(cubin: bytes) -> str:
        if not os.path.exists(cuobjdump):
            return ""
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            out = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
        return " ".join(w for line in out.splitlines() if "REG:" in line for w in line.split()[:2])

    def build(fn, dt: str, constexprs: dict, launch: dict, arch: int, label: str) -> None:
        t = time.time()
        src = ASTSource(fn, signature(fn, dt, constexprs), constexprs)
        options = {"num_warps": launch["num_warps"], "num_stages": launch["num_stages"]}
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        print(f"sm_{arch} {dt:4s} {label:40s} {time.time() - t:5.1f}s  {usage(compiled.asm['cubin'])}")

    gemm_cfg = {0: cfg["fused"], 1: cfg["two_kernel_gemm"], 2: cfg["decode_gemm"]}
    for arch in archs:
        for dt, dot in (("fp32", 1), ("fp16", 0), ("bf16", 0)):
            for delta in (0, 1, 2):
                for lokr in (False, True):
                    g = gemm_cfg[delta]
                    ce = {"DELTA": delta, "HAS_BIAS": True, "HAS_LOKR": lokr, "DOT": dot}
                    ce |= {key: g[key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_R")}
                    build(kernels._adapter_linear_kernel, dt, ce, g, arch, f"adapter_linear DELTA={delta} lokr={lokr}")
            s = cfg["two_kernel_shrink"]
            ce = {"DOT": dot, "BLOCK_M": s["BLOCK_M"], "BLOCK_K": s["BLOCK_K"], "BLOCK_R": s["BLOCK_R"]}
            build(kernels._sgmv_shrink_kernel, dt, ce, s, arch, "sgmv_shrink")
            s = cfg["decode_shrink"]
            build(kernels._bgmv_shrink_kernel, dt, {"BLOCK_K": s["BLOCK_K"], "BLOCK_R": s["BLOCK_R"]}, s, arch, "bgmv")
            s = cfg["lokr_shrink"]
            ce = {"DOT": dot, "BLOCK_J": s["BLOCK_J"], "BLOCK_C": s["BLOCK_C"], "BLOCK_D": s["BLOCK_D"]}
            build(kernels._lokr_shrink_kernel, dt, ce, s, arch, "lokr_shrink")
    print("all kernels compiled")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--csv", default="bench_triton_gpu.csv")
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(sorted(QUICK))}")
    parser.add_argument("--compile-only", action="store_true", help="build every kernel for --archs; no GPU needed")
    parser.add_argument("--archs", default="80,90", help="compute capabilities for --compile-only (default 80,90)")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("bench_triton_gpu.py: unset TRITON_INTERPRET; the interpreter is for tests, not timings")
    if args.compile_only:
        compile_only(tuple(int(a) for a in args.archs.split(",")))
        return
    if not torch.cuda.is_available():
        sys.exit(
            "bench_triton_gpu.py: no CUDA device (torch.cuda.is_available() is False); nothing to time here. "
            "Run it on a GPU machine, or use --compile-only to check that the kernels build."
        )
    run(args.dtype, args.quick, args.csv)


if __name__ == "__main__":
    main()
