"""Builders shared by the model-layer parity tests (tests/model).

The oracle is the real Hugging Face ``peft`` (0.21.2); the subject is ``peft_kernels``. Both expose the same
names (``PeftModel``, ``PeftMixedModel``, ``LoraConfig``, ``LoHaConfig``, ``LoKrConfig``, ``get_peft_model``), so most
builders take the library module (``peft`` or ``peft_kernels``) as their first argument.

Base models are tiny random transformers built after ``torch.manual_seed`` (no downloads), in eval mode, with every
dropout probability set to 0 so train-mode forwards are deterministic too. Adapters made with the real peft use random
non-zero init (``init_lora_weights=False`` / ``init_weights=False``) so they are never no-ops, and
``modules_to_save`` copies are perturbed before saving so they differ from the base module.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

import peft
import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

import peft_kernels as pk

VOCAB = 128
ORACLE: ModuleType = peft
# PEFT_KERNELS_TESTS_SELF_CHECK=1 runs the suite with the real peft as the subject too: a check of the tests
# themselves (everything where we mirror PEFT must pass; the deliberate improvements over PEFT must fail).
SUBJECT: ModuleType = peft if os.environ.get("PEFT_KERNELS_TESTS_SELF_CHECK") == "1" else pk

# ---------------------------------------------------------------------------------------------------------------------
# Base models and inputs
# ---------------------------------------------------------------------------------------------------------------------


def _llama() -> nn.Module:
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
    )


def _llama_odd() -> nn.Module:
    """Sizes with awkward factorizations for LoKr: 48 = 6*8, 84 = 7*12, 24 = 4*6 (k/v out), vocab 128."""
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=48,
            intermediate_size=84,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
    )


def _gpt2() -> nn.Module:
    return GPT2LMHeadModel(
        GPT2Config(
            n_embd=64,
            n_layer=2,
            n_head=4,
            vocab_size=VOCAB,
            n_positions=64,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    )


def _bert_config(**kw: Any) -> BertConfig:
    return BertConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        vocab_size=VOCAB,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        **kw,
    )


def _bert_cls() -> nn.Module:
    return BertForSequenceClassification(_bert_config(num_labels=3))


def _bert() -> nn.Module:
    return BertModel(_bert_config())


BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "llama": _llama,
    "llama_odd": _llama_odd,
    "gpt2": _gpt2,
    "bert_cls": _bert_cls,
    "bert": _bert,
}

# The PEFT task type of each model kind (None: plain PeftModel, no task head).
TASK_TYPE: dict[str, str | None] = {
    "llama": "CAUSAL_LM",
    "llama_odd": "CAUSAL_LM",
    "gpt2": "CAUSAL_LM",
    "bert_cls": "SEQ_CLS",
    "bert": None,
}

# A small default target set per model kind.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "llama_odd": ["q_proj", "v_proj"],
    "gpt2": ["c_attn", "c_proj"],
    "bert_cls": ["query", "value"],
    "bert": ["query", "value"],
}

CAUSAL = ("llama", "llama_odd", "gpt2")


def make_base(kind: str, seed: int = 0) -> nn.Module:
    """A fresh tiny random model of ``kind``; the same ``seed`` gives bit-identical weights."""
    torch.manual_seed(seed)
    return BUILDERS[kind]().eval()


def make_inputs(kind: str, batch: int = 2, seq: int = 8, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def labels_for(kind: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    if kind in CAUSAL:
        return inputs["input_ids"].clone()
    return torch.arange(inputs["input_ids"].shape[0]) % 3


def main_output(out: Any) -> torch.Tensor:
    """Logits of a task model, last hidden state of a bare encoder."""
    if getattr(out, "logits", None) is not None:
        return out.logits
    if getattr(out, "last_hidden_state", None) is not None:
        return out.last_hidden_state
    if isinstance(out, torch.Tensor):
        return out
    return out[0]


@torch.no_grad()
def run(model: nn.Module, inputs: dict[str, torch.Tensor], **kwargs: Any) -> torch.Tensor:
    return main_output(model(**inputs, **kwargs))


GEN_KW = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False, "pad_token_id": 0}


@torch.no_grad()
def generate(model: nn.Module, inputs: dict[str, torch.Tensor], **kwargs: Any) -> torch.Tensor:
    return model.generate(**inputs, **GEN_KW, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------------------------

_CONFIG_CLASS = {"lora": "LoraConfig", "loha": "LoHaConfig", "lokr": "LoKrConfig"}


def make_config(lib: ModuleType, ptype: str, kind: str | None = None, **kw: Any) -> Any:
    """``lib.<Lora|LoHa|LoKr>Config`` with random non-zero init, the model kind's task type and default targets."""
    params: dict[str, Any] = {}
    if ptype == "lora":
        params["init_lora_weights"] = False
    else:
        params["init_weights"] = False
    if kind is not None:
        params["task_type"] = TASK_TYPE[kind]
        params["target_modules"] = list(DEFAULT_TARGETS[kind])
    params.update(kw)
    return getattr(lib, _CONFIG_CLASS[ptype])(**params)


AdapterSpec = tuple[str, dict[str, Any]]  # (peft type, config kwargs)

# Two adapters of one type with different ranks / targets; the second is saved by peft in the ``second/`` subfolder.
TWO_ADAPTERS: dict[str, dict[str, AdapterSpec]] = {
    "lora": {
        "default": ("lora", {"r": 4, "lora_alpha": 8, "modules_to_save": ["lm_head"]}),
        "second": (
            "lora",
            {
                "r": 2,
                "lora_alpha": 6,
                "target_modules": ["q_proj", "k_proj", "down_proj"],
                "modules_to_save": ["lm_head"],
            },
        ),
    },
    "loha": {
        "default": ("loha", {"r": 4, "alpha": 8}),
        "second": ("loha", {"r": 2, "alpha": 3, "target_modules": ["k_proj", "v_proj", "up_proj"]}),
    },
    "lokr": {
        "default": ("lokr", {"r": 8, "alpha": 8}),
        "second": ("lokr", {"r": 2, "alpha": 3, "decompose_both": True, "target_modules": ["q_proj", "gate_proj"]}),
    },
}


# ---------------------------------------------------------------------------------------------------------------------
# modules_to_save perturbation, snapshots
# ---------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def perturb_modules_to_save(model: nn.Module, seed: int = 123) -> int:
    """Add noise to every ``modules_to_save.<adapter>.*`` copy so the saved copy differs from the base module."""
    g = torch.Generator().manual_seed(seed)
    n = 0
    for name, p in model.named_parameters():
        if ".modules_to_save." in name:
            # the base init's scale, so outputs stay O(1) as the tolerance table assumes
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
            n += 1
    return n


def snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[tuple[str, type]]]:
    """A deep copy of the state dict plus the (name, type) of every module."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    types = [(n, type(m)) for n, m in model.named_modules()]
    return state, types


def assert_unchanged(model: nn.Module, snap: tuple[dict[str, torch.Tensor], list[tuple[str, type]]]) -> None:
    state, types = snap
    now_types = [(n, type(m)) for n, m in model.named_modules()]
    assert now_types == types, "module structure changed: " + str(
        sorted(set(now_types) ^ set(types), key=lambda t: t[0])[:10]
    )
    now = model.state_dict()
    assert sorted(now) == sorted(state), "state_dict keys changed"
    for k, v in state.items():
        assert now[k].shape == v.shape and torch.equal(now[k], v), f"tensor {k} changed"


def trainable_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def normalize_nested(name: str) -> str:
    """Drop the ``.base_layer`` hops so nested (PeftMixedModel) wrappers and flat banks give the same names."""
    return name.replace(".base_layer", "")


# ---------------------------------------------------------------------------------------------------------------------
# Building, saving and loading adapters
# ---------------------------------------------------------------------------------------------------------------------


def adapter_dir(root: Path, name: str) -> Path:
    """Where ``save_pretrained(root)`` puts adapter ``name`` (PEFT: ``default`` at the root, others in a subfolder)."""
    return Path(root) if name == "default" else Path(root) / name


def build(
    lib: ModuleType,
    kind: str,
    adapters: dict[str, AdapterSpec],
    *,
    mixed: bool = False,
    seed: int = 0,
    perturb: bool = True,
) -> Any:
    """``lib.get_peft_model`` with the first adapter, ``add_adapter`` for the rest (random non-zero init)."""
    names = list(adapters)
    torch.manual_seed(seed + 1000)
    ptype, kw = adapters[names[0]]
    model = lib.get_peft_model(make_base(kind), make_config(lib, ptype, kind, **kw), adapter_name=names[0], mixed=mixed)
    for name in names[1:]:
        ptype, kw = adapters[name]
        model.add_adapter(name, make_config(lib, ptype, kind, **kw))
    if perturb:
        perturb_modules_to_save(model, seed=seed + 7)
    return model.eval()


def save_with_peft(root: Path, kind: str, adapters: dict[str, AdapterSpec], seed: int = 0) -> Path:
    """Create the adapters with the real peft and ``save_pretrained`` them (all in one directory tree)."""
    model = build(ORACLE, kind, adapters, seed=seed)
    model.save_pretrained(str(root))
    return Path(root)


def load(
    lib: ModuleType,
    kind: str,
    root: Path,
    names: Iterable[str],
    *,
    is_trainable: bool = False,
    mixed: bool = False,
    load_names: dict[str, str] | None = None,
) -> Any:
    """``lib.PeftModel.from_pretrained`` (or PeftMixedModel) for the first name, ``load_adapter`` for the rest.

    ``load_names`` maps a saved adapter name to the name to load it under (default: the same name).
    """
    names = list(names)
    load_names = load_names or {}
    cls = lib.PeftMixedModel if mixed else lib.PeftModel
    first = names[0]
    model = cls.from_pretrained(
        make_base(kind),
        str(adapter_dir(root, first)),
        adapter_name=load_names.get(first, first),
        is_trainable=is_trainable,
    )
    for name in names[1:]:
        model.load_adapter(
            str(adapter_dir(root, name)), adapter_name=load_names.get(name, name), is_trainable=is_trainable
        )
    return model


def twins(
    tmp_path: Path,
    kind: str,
    adapters: dict[str, AdapterSpec],
    *,
    is_trainable: bool = False,
    mixed: bool = False,
    seed: int = 0,
) -> tuple[Any, Any]:
    """(subject, oracle): the same peft-saved adapters loaded into peft_kernels and into the real peft."""
    root = save_with_peft(tmp_path / "saved_by_peft", kind, adapters, seed=seed)
    subject = load(SUBJECT, kind, root, adapters, is_trainable=is_trainable, mixed=mixed)
    oracle = load(ORACLE, kind, root, adapters, is_trainable=is_trainable, mixed=mixed)
    return subject, oracle


def read_config(path: Path) -> dict[str, Any]:
    with open(Path(path) / "adapter_config.json") as f:
        return json.load(f)


def safetensors_shapes(path: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    from safetensors.torch import load_file

    return {k: (tuple(v.shape), v.dtype) for k, v in load_file(str(Path(path) / "adapter_model.safetensors")).items()}


# Config fields whose value decides the math, the targets or the file layout; compared between our saved
# adapter_config.json and peft's for the same config.
CONFIG_KEYS_COMMON = (
    "peft_type",
    "auto_mapping",
    "task_type",
    "r",
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "rank_pattern",
    "alpha_pattern",
    "modules_to_save",
    "inference_mode",
    "base_model_name_or_path",
    "revision",
)
CONFIG_KEYS = {
    "lora": CONFIG_KEYS_COMMON
    + (
        "lora_alpha",
        "use_rslora",
        "lora_dropout",
        "fan_in_fan_out",
        "bias",
        "use_dora",
        "lora_bias",
        "init_lora_weights",
        "layer_replication",
    ),
    "loha": CONFIG_KEYS_COMMON + ("alpha", "rank_dropout", "module_dropout", "use_effective_conv2d", "init_weights"),
    "lokr": CONFIG_KEYS_COMMON
    + (
        "alpha",
        "rank_dropout",
        "module_dropout",
        "use_effective_conv2d",
        "init_weights",
        "decompose_both",
        "decompose_factor",
        "rank_dropout_scale",
    ),
}


def comparable(value: Any) -> Any:
    """Lists that PEFT stores from sets (target_modules, modules_to_save, ...) compare as sets."""
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return set(value)
    return value


def row_by_row(oracle: Any, inputs: dict[str, torch.Tensor], adapter_names: list[str], fn: Callable) -> torch.Tensor:
    """Oracle for a mixed batch where PEFT ignores ``adapter_names``: each row alone, its adapter set active
    (``"__base__"``: adapters disabled); results stacked along the batch dimension."""
    rows = []
    previous = oracle.active_adapters if isinstance(oracle, peft.PeftMixedModel) else oracle.active_adapter
    for i, name in enumerate(adapter_names):
        row = {k: v[i : i + 1] for k, v in inputs.items()}
        if name == "__base__":
            with oracle.disable_adapter():
                rows.append(fn(oracle, row))
        else:
            oracle.set_adapter([name] if isinstance(oracle, peft.PeftMixedModel) else name)
            rows.append(fn(oracle, row))
    oracle.set_adapter(previous)
    return torch.cat(rows, dim=0)
