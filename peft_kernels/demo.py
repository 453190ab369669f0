"""``python -m peft_kernels demo``: multi-tenant generation with LoRA, LoHa and LoKr adapters on one base model.

A small random Llama-style model is made in code (no download), with a handful of adapters of each type generated on
the spot (or loaded from PEFT directories given with ``--adapter``). A batch of requests, each naming an adapter (or
none), is served in one ``generate`` call per batch with ``adapter_names=``. When ``peft`` is installed, the answers
are checked against PEFT run request group by request group (PEFT cannot mix LoHa/LoKr adapters in one batch), and
the table compares tokens per second of peft_kernels, PEFT and the bare base model, from one run.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
import warnings
from collections.abc import Callable

import torch
from tqdm import tqdm

from peft_kernels.model.checkpoint import save_weights
from peft_kernels.model.config import LoHaConfig, LoKrConfig, LoraConfig, PeftConfig
from peft_kernels.model.mixed_model import PeftMixedModel

SIZES = {  # name -> (hidden, intermediate, layers, heads, kv heads)
    "tiny": (64, 128, 2, 4, 2),
    "small": (256, 688, 4, 8, 4),
    "medium": (768, 2048, 8, 12, 4),
}


def make_model(size: str, vocab: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, layers, heads, kv = SIZES[size]
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=512,
    )
    return LlamaForCausalLM(config).eval()


def adapter_configs(count: int, rank: int) -> dict[str, PeftConfig]:
    """``count`` adapters cycling LoRA, LoHa, LoKr, each random (not a no-op), on the attention and MLP layers."""
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    out: dict[str, PeftConfig] = {}
    for i in range(count):
        kind = ("lora", "loha", "lokr")[i % 3]
        if kind == "lora":
            cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False)
        elif kind == "loha":
            cfg = LoHaConfig(r=max(rank // 2, 1), alpha=rank, target_modules=targets, init_weights=False)
        else:
            cfg = LoKrConfig(r=rank, alpha=rank, target_modules=targets, init_weights=False)
        out[f"{kind}{i // 3}"] = cfg
    return out


def build(args: argparse.Namespace) -> tuple[PeftMixedModel, dict[str, str]]:
    """Our mixed model with every adapter, and name -> PEFT directory of each adapter (for the oracle)."""
    torch.manual_seed(1)
    model = make_model(args.size, args.vocab)
    dirs: dict[str, str] = {}
    if args.adapter:
        for spec in args.adapter:
            name, _, path = spec.partition("=")
            dirs[name] = path
    else:
        workdir = tempfile.mkdtemp(prefix="peft_kernels_demo_")
        configs = adapter_configs(args.adapters, args.rank)
        first = next(iter(configs))
        mixed = PeftMixedModel(model, configs[first], first)
        for name, cfg in list(configs.items())[1:]:
            mixed.add_adapter(name, cfg)
        for name, cfg in configs.items():  # write each adapter in PEFT's format, so PEFT loads the very same weights
            dirs[name] = os.path.join(workdir, name)
            save_weights(mixed.base_model.adapter_state_dict(name), dirs[name])
            cfg.save_pretrained(dirs[name])
        return mixed.to(args.device).eval(), dirs
    names = list(dirs)
    mixed = PeftMixedModel.from_pretrained(model, dirs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        mixed.load_adapter(dirs[name], adapter_name=name)
    return mixed.to(args.device).eval(), dirs


def peft_oracle(args: argparse.Namespace, dirs: dict[str, str]):
    try:
        import peft
    except ImportError:
        return None
    names = list(dirs)
    model = make_model(args.size, args.vocab)
    oracle = peft.PeftMixedModel.from_pretrained(model, dirs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        oracle.load_adapter(dirs[name], adapter_name=name)
    return oracle.to(args.device).eval()


def timed(device: str, fn: Callable[..., torch.Tensor], *args, **kwargs) -> tuple[torch.Tensor, float]:
    """``fn(*args, **kwargs)`` and its wall time (synchronised on CUDA)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def run(args: argparse.Namespace) -> int:
    warnings.filterwarnings("ignore")
    if args.backend:
        os.environ["PEFT_KERNELS_BACKEND"] = args.backend
    torch.set_grad_enabled(False)
    ours, dirs = build(args)
    names = list(dirs)
    oracle = peft_oracle(args, dirs)
    rng = random.Random(0)
    gen = {"max_new_tokens": args.new_tokens, "do_sample": False, "pad_token_id": 0}
    totals = {"peft_kernels": 0.0, "peft": 0.0, "base": 0.0}
    mismatches = 0
    for _ in tqdm(range(args.batches), desc="serving batches", unit="batch"):
        prompts = torch.randint(1, args.vocab, (args.batch_size, args.prompt_len), device=args.device)
        requested = [rng.choice([*names, "__base__"]) for _ in range(args.batch_size)]
        got, t = timed(args.device, ours.generate, input_ids=prompts, adapter_names=requested, **gen)
        totals["peft_kernels"] += t
        with ours.disable_adapter():
            _, t = timed(args.device, ours.generate, input_ids=prompts, **gen)
        totals["base"] += t
        if oracle is not None:
            expected, t = timed(args.device, _peft_by_group, oracle, prompts, requested, gen)
            totals["peft"] += t
            mismatches += int((got != expected).any(dim=1).sum())
    tokens = args.batches * args.batch_size * args.new_tokens
    print(f"\n{len(names)} adapters ({', '.join(names)}), {args.batches} batches x {args.batch_size} requests, "
          f"{args.new_tokens} new tokens each, model '{args.size}', device {args.device}")  # fmt: skip
    print(f"{'provider':<14}{'tokens/s':>12}{'time vs base':>14}")
    for provider, seconds in totals.items():
        if provider == "peft" and oracle is None:
            print(f"{'peft':<14}{'(peft not installed)':>26}")
            continue
        print(f"{provider:<14}{tokens / seconds:>12.1f}{seconds / totals['base']:>13.2f}x")
    if oracle is not None:
        total = args.batches * args.batch_size
        print(f"answers equal to PEFT's (run adapter by adapter): {total - mismatches}/{total} requests")
        return 1 if mismatches else 0
    return 0


def _peft_by_group(oracle, prompts: torch.Tensor, requested: list[str], gen: dict) -> torch.Tensor:
    """PEFT's answer for each request: its rows generated with only its adapter active (or adapters disabled)."""
    out = None
    for name in dict.fromkeys(requested):
        rows = [i for i, n in enumerate(requested) if n == name]
        if name == "__base__":
            with oracle.disable_adapter():
                part = oracle.generate(input_ids=prompts[rows], **gen)
        else:
            oracle.set_adapter(name)
            part = oracle.generate(input_ids=prompts[rows], **gen)
        if out is None:
            out = part.new_zeros((len(requested), part.shape[1]))
        out[rows] = part
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", choices=sorted(SIZES), default="small", help="model size (default: small)")
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--adapters", type=int, default=6, help="adapters generated on the spot, cycling LoRA/LoHa/LoKr")
    p.add_argument("--adapter", action="append", metavar="NAME=DIR", help="a PEFT adapter directory (repeatable)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batches", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", choices=["auto", "torch", "triton", "cuda", "cpu"], default=None)
