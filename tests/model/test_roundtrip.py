"""2. Round trips both ways: what peft_kernels saves is what peft saves, and each library loads the other's files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.model.helpers import (
    CONFIG_KEYS,
    ORACLE,
    SUBJECT,
    TWO_ADAPTERS,
    build,
    comparable,
    load,
    make_base,
    make_inputs,
    read_config,
    run,
    safetensors_shapes,
    save_with_peft,
)
from tests.tolerances import assert_close

_REGEX = r".*\.layers\.0\.self_attn\.(q|k)_proj|.*\.layers\.1\.mlp\.gate_proj"

RT_CASES = [
    ("llama-lora-qv", "llama", ("lora", {"r": 8, "lora_alpha": 16})),
    (
        "llama-lora-rslora-patterns-lm_head",
        "llama",
        (
            "lora",
            {
                "r": 8,
                "lora_alpha": 16,
                "use_rslora": True,
                "target_modules": ["q_proj", "v_proj", "down_proj"],
                "rank_pattern": {"v_proj": 4, "layers.1.self_attn.q_proj": 2},
                "alpha_pattern": {"q_proj": 32},
                "modules_to_save": ["lm_head"],
            },
        ),
    ),
    (
        "llama-lora-pattern-first-match-exclude",
        "llama",
        (
            "lora",
            {
                "r": 4,
                "lora_alpha": 8,
                "target_modules": ["q_proj", "v_proj"],
                "exclude_modules": ["model.layers.0.self_attn.v_proj"],
                "rank_pattern": {".*q_proj": 3, "model.layers.1.self_attn.q_proj": 5},
            },
        ),
    ),
    ("llama-lora-regex", "llama", ("lora", {"r": 4, "lora_alpha": 8, "target_modules": _REGEX})),
    (
        "llama-lora-layers_to_transform",
        "llama",
        ("lora", {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "up_proj"], "layers_to_transform": [0]}),
    ),
    ("llama-lora-all-linear", "llama", ("lora", {"r": 4, "lora_alpha": 4, "target_modules": "all-linear"})),
    ("gpt2-lora-conv1d", "gpt2", ("lora", {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_proj", "c_fc"]})),
    ("bert_cls-lora-classifier", "bert_cls", ("lora", {"r": 4, "lora_alpha": 8})),
    ("bert-lora-no-task-type", "bert", ("lora", {"r": 4, "lora_alpha": 8, "target_modules": ["query", "dense"]})),
    (
        "llama-loha-patterns",
        "llama",
        (
            "loha",
            {
                "r": 4,
                "alpha": 8,
                "target_modules": ["q_proj", "v_proj", "down_proj"],
                "rank_pattern": {"down_proj": 2},
                "alpha_pattern": {"v_proj": 3},
            },
        ),
    ),
    ("bert_cls-loha", "bert_cls", ("loha", {"r": 2, "alpha": 4, "target_modules": ["query", "key", "dense"]})),
    ("llama-lokr-full", "llama", ("lokr", {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj", "gate_proj"]})),
    ("llama-lokr-r2-lowrank-w2", "llama", ("lokr", {"r": 2, "alpha": 4, "target_modules": ["q_proj", "gate_proj"]})),
    (
        "llama-lokr-decompose_both-factor4-lm_head",
        "llama",
        (
            "lokr",
            {
                "r": 2,
                "alpha": 4,
                "decompose_both": True,
                "decompose_factor": 4,
                "target_modules": ["q_proj", "v_proj", "down_proj"],
                "modules_to_save": ["lm_head"],
            },
        ),
    ),
    (
        "llama_odd-lokr-factor3-all-linear",
        "llama_odd",
        ("lokr", {"r": 8, "alpha": 4, "decompose_factor": 3, "target_modules": "all-linear"}),
    ),
    (
        "llama_odd-lokr-factor5-r2-decompose_both",
        "llama_odd",
        ("lokr", {"r": 2, "alpha": 4, "decompose_factor": 5, "decompose_both": True, "target_modules": "all-linear"}),
    ),
    ("llama_odd-lokr-r1-all-linear", "llama_odd", ("lokr", {"r": 1, "alpha": 1, "target_modules": "all-linear"})),
    ("llama_odd-loha-r3-all-linear", "llama_odd", ("loha", {"r": 3, "alpha": 2, "target_modules": "all-linear"})),
    (
        "bert-lokr-all-linear",
        "bert",
        ("lokr", {"r": 1, "alpha": 2, "decompose_both": True, "target_modules": "all-linear"}),
    ),
]


def _ids(cases):
    return [c[0] for c in cases]


@pytest.mark.parametrize("case_id,kind,spec", RT_CASES, ids=_ids(RT_CASES))
def test_subject_saved_adapter_loads_in_peft(tmp_path, case_id, kind, spec):
    subject = build(SUBJECT, kind, {"default": spec})
    subject.save_pretrained(str(tmp_path / "pk"))
    oracle = ORACLE.PeftModel.from_pretrained(make_base(kind), str(tmp_path / "pk"))
    inputs = make_inputs(kind)
    expected = run(oracle, inputs)
    with oracle.disable_adapter():
        assert (expected - run(oracle, inputs)).abs().max() > 1e-3, "adapter is a no-op; the case tests nothing"
    assert_close(run(subject, inputs), expected, msg=case_id)


@pytest.mark.parametrize("case_id,kind,spec", RT_CASES, ids=_ids(RT_CASES))
def test_saved_files_match_peft(tmp_path, case_id, kind, spec):
    ptype = spec[0]
    build(SUBJECT, kind, {"default": spec}).save_pretrained(str(tmp_path / "pk"))
    build(ORACLE, kind, {"default": spec}).save_pretrained(str(tmp_path / "peft"))
    ours, theirs = tmp_path / "pk", tmp_path / "peft"

    assert safetensors_shapes(ours) == safetensors_shapes(theirs)
    with safe_open(str(ours / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}

    our_cfg, their_cfg = read_config(ours), read_config(theirs)
    for key in CONFIG_KEYS[ptype]:
        assert key in our_cfg, f"adapter_config.json lacks {key!r}"
        assert comparable(our_cfg[key]) == comparable(their_cfg[key]), key
    # PEFT also writes the model card at the root
    assert sorted(os.listdir(ours)) == sorted(os.listdir(theirs))


@pytest.mark.parametrize("case_id,kind,spec", RT_CASES[::2], ids=_ids(RT_CASES[::2]))
def test_peft_to_subject_to_peft(tmp_path, case_id, kind, spec):
    """A peft-saved adapter, loaded and re-saved by peft_kernels, has the same tensors, bit for bit."""
    root = save_with_peft(tmp_path / "peft", kind, {"default": spec})
    subject = SUBJECT.PeftModel.from_pretrained(make_base(kind), str(root))
    subject.save_pretrained(str(tmp_path / "resaved"))

    original = load_file(str(root / "adapter_model.safetensors"))
    resaved = load_file(str(tmp_path / "resaved" / "adapter_model.safetensors"))
    assert sorted(resaved) == sorted(original)
    for key, tensor in original.items():
        assert resaved[key].dtype == tensor.dtype and torch.equal(resaved[key], tensor), key

    oracle = ORACLE.PeftModel.from_pretrained(make_base(kind), str(tmp_path / "resaved"))
    oracle_orig = ORACLE.PeftModel.from_pretrained(make_base(kind), str(root))
    inputs = make_inputs(kind)
    assert_close(run(oracle, inputs), run(oracle_orig, inputs))


@pytest.mark.parametrize("ptype", ["lora", "loha", "lokr"])
def test_multi_adapter_layout_and_peft_load(tmp_path, ptype):
    adapters = TWO_ADAPTERS[ptype]
    subject = build(SUBJECT, "llama", adapters)
    subject.save_pretrained(str(tmp_path / "pk"))
    build(ORACLE, "llama", adapters).save_pretrained(str(tmp_path / "peft"))
    ours, theirs = tmp_path / "pk", tmp_path / "peft"

    for sub in ("", "second"):
        assert (ours / sub / "adapter_config.json").is_file(), f"{sub or 'root'}/adapter_config.json"
        assert (ours / sub / "adapter_model.safetensors").is_file(), f"{sub or 'root'}/adapter_model.safetensors"
        assert safetensors_shapes(ours / sub) == safetensors_shapes(theirs / sub), sub
    assert sorted(os.listdir(ours / "second")) == sorted(os.listdir(theirs / "second"))

    oracle = load(ORACLE, "llama", ours, adapters)
    inputs = make_inputs("llama")
    for name in ("default", "second"):
        subject.set_adapter(name)
        oracle.set_adapter(name)
        assert_close(run(subject, inputs), run(oracle, inputs), msg=name)


def test_non_default_first_adapter_goes_to_subfolder(tmp_path):
    adapters = {"alpha": ("lora", {"r": 4, "lora_alpha": 8}), "beta": ("lora", {"r": 2, "target_modules": ["o_proj"]})}
    subject = build(SUBJECT, "llama", adapters)
    subject.save_pretrained(str(tmp_path / "pk"))
    root = tmp_path / "pk"
    assert not (root / "adapter_model.safetensors").exists()
    assert not (root / "adapter_config.json").exists()
    oracle = load(ORACLE, "llama", root, adapters)
    inputs = make_inputs("llama")
    assert oracle.active_adapter == "alpha"
    assert_close(run(subject, inputs), run(oracle, inputs))


def test_selected_adapters(tmp_path):
    adapters = TWO_ADAPTERS["lora"]
    subject = build(SUBJECT, "llama", adapters)
    subject.save_pretrained(str(tmp_path / "pk"), selected_adapters=["second"])
    build(ORACLE, "llama", adapters).save_pretrained(str(tmp_path / "peft"), selected_adapters=["second"])
    ours, theirs = tmp_path / "pk", tmp_path / "peft"

    assert not (ours / "adapter_model.safetensors").exists()
    assert not (ours / "adapter_config.json").exists()
    assert (ours / "second" / "adapter_model.safetensors").is_file()
    assert safetensors_shapes(ours / "second") == safetensors_shapes(theirs / "second")
    assert sorted(os.listdir(ours)) == sorted(os.listdir(theirs))

    oracle = ORACLE.PeftModel.from_pretrained(make_base("llama"), str(ours / "second"), adapter_name="second")
    subject.set_adapter("second")
    inputs = make_inputs("llama")
    assert_close(run(subject, inputs), run(oracle, inputs))


def test_subject_saves_and_reloads_itself(tmp_path):
    adapters = TWO_ADAPTERS["lokr"]
    subject = build(SUBJECT, "llama", adapters)
    subject.save_pretrained(str(tmp_path / "pk"))
    again = load(SUBJECT, "llama", Path(tmp_path / "pk"), adapters)
    inputs = make_inputs("llama")
    for name in ("default", "second"):
        subject.set_adapter(name)
        again.set_adapter(name)
        assert_close(run(again, inputs), run(subject, inputs), msg=name)


@pytest.mark.parametrize("ptype", ["lora", "lokr"])
def test_bin_format_both_ways(tmp_path, ptype):
    """``safe_serialization=False`` writes ``adapter_model.bin``; PEFT reads it when no safetensors file exists."""
    adapters = {"default": TWO_ADAPTERS[ptype]["default"]}
    build(ORACLE, "llama", adapters).save_pretrained(str(tmp_path / "peft"), safe_serialization=False)
    assert (tmp_path / "peft" / "adapter_model.bin").is_file()
    subject = SUBJECT.PeftModel.from_pretrained(make_base("llama"), str(tmp_path / "peft"))
    oracle = ORACLE.PeftModel.from_pretrained(make_base("llama"), str(tmp_path / "peft"))
    inputs = make_inputs("llama")
    assert_close(run(subject, inputs), run(oracle, inputs), msg="peft .bin -> peft_kernels")

    subject.save_pretrained(str(tmp_path / "pk"), safe_serialization=False)
    assert (tmp_path / "pk" / "adapter_model.bin").is_file()
    assert not (tmp_path / "pk" / "adapter_model.safetensors").exists()
    again = ORACLE.PeftModel.from_pretrained(make_base("llama"), str(tmp_path / "pk"))
    assert_close(run(again, inputs), run(oracle, inputs), msg="peft_kernels .bin -> peft")
