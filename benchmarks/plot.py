"""Figures of a ``sweep.py`` run: ``python benchmarks/plot.py benchmarks/results/<stem>.json [--out DIR]``.

``--table 2048`` prints the markdown summary table (ratios to base on the 2048x2048 layer) instead.

Four PNGs next to the data (``<stem>_<figure>.png``):

- ``single_ratio``: one adapter on every row, time / bare layer vs rows M, per adapter type (rows) and layer (columns);
- ``single_time``:  the same in microseconds, with the bare layer;
- ``multi_ratio``:  32 adapters drawn uniformly per row (multi-tenant), time / bare layer vs M;
- ``compositions``: every batch composition at M=64 on the largest square layer, time / bare layer (bars).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

STYLE = {  # provider -> (label, color, linestyle)
    "base": ("base (F.linear)", "black", "-"),
    "peft": ("PEFT", "tab:red", "-"),
    "ours:cpu": ("ours, cpu backend (layer)", "tab:blue", "-"),
    "op:cpu": ("ours, cpu backend (raw op)", "tab:cyan", "--"),
    "ours:cuda": ("ours, cuda backend (layer)", "tab:green", "-"),
    "op:cuda": ("ours, cuda backend (raw op)", "tab:olive", "--"),
    "ours:triton": ("ours, triton backend (layer)", "tab:purple", "-"),
    "op:triton": ("ours, triton backend (raw op)", "tab:pink", "--"),
    "ours:torch": ("ours, torch reference (layer)", "tab:gray", "-"),
    "op:torch": ("ours, torch reference (raw op)", "silver", "--"),
}
TITLES = {"lora": "LoRA r=16", "loha": "LoHa r=8", "lokr": "LoKr r=8"}


def _style(p: str) -> tuple[str, str, str]:
    return STYLE.get(p, (p, None, "-"))


def _header(meta: dict) -> str:
    return (
        f"{meta['device_name']}, {meta['threads']} thread(s), fp32, {meta['date'][:10]}, medians of "
        f"{meta['rounds']} (>= 3 if slow) interleaved rounds\ntorch {meta['torch']}, peft_kernels "
        f"{meta['peft_kernels']} @ {meta['commit']}, peft {meta['peft']}"
    )


def _plain_log_y(ax) -> None:
    from matplotlib.ticker import FuncFormatter

    fmt = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(fmt)

    def minor(v: float, _) -> str:  # label 2, 3, 5 of each decade; every minor tick on a narrow axis
        lo, hi = ax.get_ylim()
        return f"{v:.2g}" if hi / max(lo, 1e-12) < 4 or f"{v:g}"[0] in "235" else ""

    ax.yaxis.set_minor_formatter(FuncFormatter(minor))


def _grid(plt, records: list[dict], select, value: str, title: str, meta: dict, target: float | None, path: str):
    layers = sorted({(r["in"], r["out"]) for r in records}, key=lambda s: s[0] * s[1])
    kinds = [k for k in TITLES if any(r["adapter"] == k for r in records)]
    fig, axes = plt.subplots(
        len(kinds), len(layers), figsize=(4.6 * len(layers) + 0.8, 3.0 * len(kinds) + 1.8), squeeze=False
    )
    providers = [p for p in STYLE if any(p in r["times"] for r in records)]
    if value == "ratio":
        providers = [p for p in providers if p != "base"]
    handles = {}
    for i, kind in enumerate(kinds):
        for j, (k, n) in enumerate(layers):
            ax = axes[i][j]
            recs = sorted((r for r in records if r["adapter"] == kind and (r["in"], r["out"]) == (k, n) and select(r)),
                          key=lambda r: r["rows"])  # fmt: skip
            if not recs:
                ax.set_visible(False)
                continue
            ms = [r["rows"] for r in recs]
            for p in providers:
                ys = [r["ratio"][p] if value == "ratio" else r["times"][p]["median_us"] for r in recs]
                label, color, ls = _style(p)
                (h,) = ax.plot(ms, ys, marker="o", ms=3.5, color=color, ls=ls, lw=1.6, label=label)
                handles[label] = h
            if value == "ratio":
                ax.axhline(1.0, color="black", lw=0.8)
                if target:
                    ax.axhline(target, color="tab:green", lw=0.8, ls=":")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            _plain_log_y(ax)
            ax.set_xticks(ms, [str(m) for m in ms])
            ax.grid(True, which="major", alpha=0.3)
            ax.set_title(f"{TITLES[kind]}, {k}x{n}", fontsize=10)
            if i == len(kinds) - 1:
                ax.set_xlabel("rows M")
            if j == 0:
                ax.set_ylabel("time / base" if value == "ratio" else "time per call (us)")
    if value == "ratio" and target:
        handles[f"target {target}x base"] = plt.Line2D([], [], color="tab:green", lw=0.8, ls=":")
    fig.suptitle(f"{title}\n{_header(meta)}", fontsize=10)
    ncol = 2 if len(layers) <= 2 else 3
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=ncol, fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.03 * ((len(handles) + ncol - 1) // ncol) + 0.01, 1, 1))
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _compositions(plt, records: list[dict], meta: dict, path: str, rows: int = 64) -> str | None:
    squares = sorted({r["in"] for r in records if r["in"] == r["out"]})
    if not squares:
        return None
    k = squares[-1]
    recs = [r for r in records if r["in"] == k and r["out"] == k and r["rows"] == rows]
    if not recs:
        return None
    kinds = [kd for kd in TITLES if any(r["adapter"] == kd for r in recs)]
    comps = []
    for r in recs:
        c = (r["adapters"], r["popularity"])
        if c not in comps:
            comps.append(c)
    providers = [p for p in STYLE if p != "base" and any(p in r["times"] for r in recs)]
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.4 * len(kinds) + 0.6, 4.4), squeeze=False)
    width = 0.8 / len(providers)
    for ax, kind in zip(axes[0], kinds):
        by = {(r["adapters"], r["popularity"]): r for r in recs if r["adapter"] == kind}
        for pi, p in enumerate(providers):
            label, color, _ = _style(p)
            xs = [ci + (pi - (len(providers) - 1) / 2) * width for ci, c in enumerate(comps) if c in by]
            ys = [by[c]["ratio"][p] for c in comps if c in by]
            ax.bar(xs, ys, width=width, color=color, label=label, hatch="//" if p.startswith("op:") else None)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.axhline(1.25, color="tab:green", lw=0.8, ls=":")
        ax.set_yscale("log")
        _plain_log_y(ax)
        ax.set_xticks(range(len(comps)), [f"D={d}\n{pop}" for d, pop in comps], fontsize=8)
        ax.set_title(f"{TITLES[kind]}, {k}x{k}, M={rows}", fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0][0].set_ylabel("time / base")
    handles, labels = axes[0][0].get_legend_handles_labels()
    handles.append(plt.Line2D([], [], color="tab:green", lw=0.8, ls=":"))
    labels.append("multi-tenant target 1.25x")
    fig.suptitle(
        f"Batch compositions (D adapters, row popularity); PEFT LoHa/LoKr with D>1: rows grouped per adapter\n"
        f"{_header(meta)}",
        fontsize=10,
    )
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.035 * (1 + len(labels) // 4) + 0.04, 1, 1))
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _multi(r: dict) -> bool:
    """32 adapters drawn uniformly; at M=1 a row is one adapter, so the identical point stands in."""
    return (r["adapters"] == 32 and r["popularity"] == "uniform") or (r["adapters"] == 1 and r["rows"] == 1)


def plot_all(meta: dict, records: list[dict], out: str, stem: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = [
        _grid(plt, records, lambda r: r["adapters"] == 1, "ratio",
              "One adapter on every row: time / bare layer (lower is better)", meta, 1.15,
              os.path.join(out, f"{stem}_single_ratio.png")),
        _grid(plt, records, lambda r: r["adapters"] == 1, "time",
              "One adapter on every row: time per call", meta, None,
              os.path.join(out, f"{stem}_single_time.png")),
        _grid(plt, records, _multi, "ratio",
              "Multi-tenant: 32 adapters, each row draws one uniformly: time / bare layer (M=1 is one adapter)",
              meta, 1.25, os.path.join(out, f"{stem}_multi_ratio.png")),
    ]  # fmt: skip
    paths.append(_compositions(plt, records, meta, os.path.join(out, f"{stem}_compositions.png")))
    return [p for p in paths if p]


def table(meta: dict, records: list[dict], size: int = 2048) -> str:
    """Markdown table of ratios to base on the ``size`` x ``size`` layer: PEFT vs ours (layer, default backend)."""
    ours = next((p for p in ("ours:cuda", "ours:triton", "ours:cpu") if p in records[0]["times"]), "ours:torch")
    rows = [(1, "identical", m) for m in (1, 16, 64, 256)] + [
        (8, "zipf", 64),
        (32, "uniform", 64),
        (32, "uniform", 256),
    ]
    by = {(r["adapter"], r["adapters"], r["popularity"], r["rows"]): r for r in records if r["in"] == r["out"] == size}
    head = "| batch, " + f"{size}x{size} fp32" + " | " + " | ".join(f"{TITLES[k]}: PEFT | ours" for k in TITLES) + " |"
    lines = [head, "|---" + "|--:" * 2 * len(TITLES) + "|"]
    for d, pop, m in rows:
        label = f"1 adapter, M={m}" if d == 1 else f"{d} adapters ({pop}), M={m}"
        cells = []
        for k in TITLES:
            r = by.get((k, d, pop, m))
            cells += [f"{r['ratio']['peft']:.2f}", f"**{r['ratio'][ours]:.2f}**"] if r else ["-", "-"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json")
    parser.add_argument("--out", help="directory for the PNGs (default: next to the JSON)")
    parser.add_argument("--table", type=int, metavar="SIZE", help="print a markdown table of ratios (SIZE x SIZE)")
    args = parser.parse_args()
    with open(args.json) as f:
        data = json.load(f)
    if args.table:
        print(table(data["meta"], data["records"], args.table))
        return 0
    out = args.out or os.path.dirname(os.path.abspath(args.json))
    stem = os.path.splitext(os.path.basename(args.json))[0]
    for p in plot_all(data["meta"], data["records"], out, stem):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
