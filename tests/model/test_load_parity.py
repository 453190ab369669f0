"""1. Load parity: adapters made and saved by the real peft, loaded by peft_kernels, give peft's outputs."""

from __future__ import annotations

import pytest
import torch

from tests.model.helpers import (
    CONFIG_KEYS,
    SUBJECT,
    TWO_ADAPTERS,
    comparable,
    make_inputs,
    run,
    twins,
)
from tests.tolerances import assert_close

_LOKR_TARGETS = ["q_proj", "v_proj", "gate_proj", "down_proj"]

# (id, model kind, (peft type, config kwargs)); every adapter uses random non-zero init.
LOAD_CASES = [
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
                "alpha_pattern": {"q_proj": 32, "down_proj": 5},
                "modules_to_save": ["lm_head"],
            },
        ),
    ),
    (
        "llama-lora-layers_to_transform",
        "llama",
        ("lora", {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "up_proj"], "layers_to_transform": [1]}),
    ),
    (
        "llama-lora-regex",
        "llama",
        (
            "lora",
            {
                "r": 4,
                "lora_alpha": 8,
                "target_modules": r".*\.layers\.0\.self_attn\.(q|k)_proj|.*\.layers\.1\.mlp\.gate_proj",
            },
        ),
    ),
    ("llama-lora-all-linear", "llama", ("lora", {"r": 4, "lora_alpha": 4, "target_modules": "all-linear"})),
    # PEFT resolves rank/alpha patterns by FIRST match in key order (not the most specific key)
    (
        "llama-lora-pattern-first-match",
        "llama",
        (
            "lora",
            {
                "r": 4,
                "lora_alpha": 8,
                "rank_pattern": {".*q_proj": 3, "model.layers.1.self_attn.q_proj": 5},
                "alpha_pattern": {r"layers\.1\..*": 2},
            },
        ),
    ),
    (
        "llama-lora-suffix-targets-exclude",
        "llama",
        (
            "lora",
            {
                "r": 4,
                "lora_alpha": 8,
                "target_modules": ["self_attn.q_proj", "mlp.up_proj", "v_proj"],
                "exclude_modules": ["model.layers.0.self_attn.v_proj"],
            },
        ),
    ),
    (
        "llama-lora-layers_pattern-int",
        "llama",
        (
            "lora",
            {
                "r": 4,
                "lora_alpha": 8,
                "target_modules": ["q_proj", "down_proj"],
                "layers_to_transform": 1,
                "layers_pattern": "layers",
            },
        ),
    ),
    ("llama-lora-dropout-in-eval", "llama", ("lora", {"r": 4, "lora_alpha": 8, "lora_dropout": 0.3})),
    ("gpt2-lora-conv1d", "gpt2", ("lora", {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_proj", "c_fc"]})),
    (
        "gpt2-lora-all-linear-rslora",
        "gpt2",
        ("lora", {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "use_rslora": True}),
    ),
    ("bert_cls-lora-classifier", "bert_cls", ("lora", {"r": 4, "lora_alpha": 8})),
    ("bert-lora-all-linear", "bert", ("lora", {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"})),
    ("llama-loha-qv", "llama", ("loha", {"r": 4, "alpha": 8})),
    (
        "llama-loha-all-linear-patterns-lm_head",
        "llama",
        (
            "loha",
            {
                "r": 4,
                "alpha": 8,
                "target_modules": "all-linear",
                "rank_pattern": {"down_proj": 2},
                "alpha_pattern": {"q_proj": 3},
                "modules_to_save": ["lm_head"],
            },
        ),
    ),
    ("llama-loha-layers_to_transform", "llama", ("loha", {"r": 2, "alpha": 4, "layers_to_transform": [0]})),
    (
        "llama-loha-pattern-first-match",
        "llama",
        ("loha", {"r": 4, "alpha": 4, "rank_pattern": {".*q_proj": 2, "model.layers.1.self_attn.q_proj": 6}}),
    ),
    (
        "llama-lokr-regex-exclude",
        "llama",
        (
            "lokr",
            {
                "r": 2,
                "alpha": 4,
                "target_modules": r".*(q|v|up)_proj",
                "exclude_modules": r".*layers\.1\.self_attn\.v_proj",
            },
        ),
    ),
    ("bert_cls-loha", "bert_cls", ("loha", {"r": 4, "alpha": 4, "target_modules": ["query", "key", "value", "dense"]})),
    ("llama-lokr-full-factors", "llama", ("lokr", {"r": 8, "alpha": 16, "target_modules": _LOKR_TARGETS})),
    ("llama-lokr-r2-lowrank-w2", "llama", ("lokr", {"r": 2, "alpha": 4, "target_modules": _LOKR_TARGETS})),
    (
        "llama-lokr-r2-decompose_both",
        "llama",
        ("lokr", {"r": 2, "alpha": 4, "decompose_both": True, "target_modules": _LOKR_TARGETS}),
    ),
    (
        "llama-lokr-decompose_factor4",
        "llama",
        ("lokr", {"r": 8, "alpha": 8, "decompose_factor": 4, "target_modules": _LOKR_TARGETS}),
    ),
    (
        "llama-lokr-r2-decompose_both-factor4",
        "llama",
        ("lokr", {"r": 2, "alpha": 3, "decompose_both": True, "decompose_factor": 4, "target_modules": _LOKR_TARGETS}),
    ),
    (
        "llama-lokr-all-linear-patterns-lm_head",
        "llama",
        (
            "lokr",
            {
                "r": 4,
                "alpha": 8,
                "target_modules": "all-linear",
                "rank_pattern": {"gate_proj": 1},
                "alpha_pattern": {"o_proj": 2},
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
        "bert-lokr-decompose_both",
        "bert",
        ("lokr", {"r": 2, "alpha": 2, "decompose_both": True, "target_modules": "all-linear"}),
    ),
    ("bert_cls-lokr", "bert_cls", ("lokr", {"r": 8, "alpha": 4})),
]


def _ids(cases):
    return [c[0] for c in cases]


@pytest.mark.parametrize("case_id,kind,spec", LOAD_CASES, ids=_ids(LOAD_CASES))
def test_from_pretrained_matches_peft(tmp_path, case_id, kind, spec):
    subject, oracle = twins(tmp_path, kind, {"default": spec})
    inputs = make_inputs(kind)
    expected = run(oracle, inputs)
    with oracle.disable_adapter():
        base = run(oracle, inputs)
    assert (expected - base).abs().max() > 1e-3, "the oracle adapter is a no-op; the case tests nothing"

    assert_close(run(subject, inputs), expected, msg=case_id)
    assert isinstance(subject, SUBJECT.PeftModel)
    assert subject.active_adapters == ["default"]
    assert subject.active_adapter == "default"  # PEFT: a plain str for a PeftModel


@pytest.mark.parametrize("case_id,kind,spec", LOAD_CASES[::3], ids=_ids(LOAD_CASES[::3]))
def test_loaded_config_matches_peft(tmp_path, case_id, kind, spec):
    subject, oracle = twins(tmp_path, kind, {"default": spec})
    ptype = spec[0]
    s_cfg, o_cfg = subject.peft_config["default"], oracle.peft_config["default"]
    for key in CONFIG_KEYS[ptype]:
        if key == "auto_mapping":  # only written to the file
            continue
        assert comparable(getattr(s_cfg, key)) == comparable(getattr(o_cfg, key)), key


@pytest.mark.parametrize("ptype", ["lora", "loha", "lokr"])
def test_load_adapter_and_set_adapter(tmp_path, ptype):
    subject, oracle = twins(tmp_path, "llama", TWO_ADAPTERS[ptype])
    inputs = make_inputs("llama")

    # load_adapter does not activate the new adapter
    assert_close(run(subject, inputs), run(oracle, inputs), msg="default active")
    assert set(subject.peft_config) == {"default", "second"}
    active = [(subject.active_adapters, subject.active_adapter)]

    subject.set_adapter("second")
    oracle.set_adapter("second")
    expected = run(oracle, inputs)
    assert_close(run(subject, inputs), expected, msg="second active")
    active.append((subject.active_adapters, subject.active_adapter))

    subject.set_adapter("default")
    oracle.set_adapter("default")
    assert_close(run(subject, inputs), run(oracle, inputs), msg="back to default")
    assert (run(subject, inputs) - expected).abs().max() > 1e-3
    assert active == [(["default"], "default"), (["second"], "second")]


@pytest.mark.parametrize("ptype", ["lora", "lokr"])
def test_load_under_other_adapter_names(tmp_path, ptype):
    from tests.model.helpers import ORACLE, load, save_with_peft

    adapters = TWO_ADAPTERS[ptype]
    root = save_with_peft(tmp_path / "saved", "llama", adapters)
    rename = {"default": "alpha", "second": "beta"}
    subject = load(SUBJECT, "llama", root, adapters, load_names=rename)
    oracle = load(ORACLE, "llama", root, adapters, load_names=rename)
    inputs = make_inputs("llama")
    assert set(subject.peft_config) == {"alpha", "beta"}
    assert_close(run(subject, inputs), run(oracle, inputs), msg="alpha")
    subject.set_adapter("beta")
    oracle.set_adapter("beta")
    assert_close(run(subject, inputs), run(oracle, inputs), msg="beta")
    assert subject.active_adapters == ["beta"]


def test_load_gpt2_and_bert_two_adapters(tmp_path):
    gpt2 = {
        "default": ("lora", {"r": 4, "lora_alpha": 8}),
        "second": ("lora", {"r": 2, "lora_alpha": 2, "target_modules": ["c_fc"], "use_rslora": True}),
    }
    bert = {
        "default": ("lora", {"r": 4, "lora_alpha": 8}),
        "second": ("lora", {"r": 2, "lora_alpha": 2, "target_modules": ["key", "dense"]}),
    }
    for kind, adapters in (("gpt2", gpt2), ("bert_cls", bert)):
        subject, oracle = twins(tmp_path / kind, kind, adapters)
        inputs = make_inputs(kind)
        for name in ("default", "second"):
            subject.set_adapter(name)
            oracle.set_adapter(name)
            assert_close(run(subject, inputs), run(oracle, inputs), msg=f"{kind} {name}")


def test_inference_mode_after_from_pretrained(tmp_path):
    subject, oracle = twins(tmp_path, "llama", {"default": ("lora", {"r": 4, "modules_to_save": ["lm_head"]})})
    assert not any(p.requires_grad for p in subject.parameters())
    assert subject.get_nb_trainable_parameters() == oracle.get_nb_trainable_parameters()
    assert not subject.training


def test_loaded_state_dict_names_match_peft(tmp_path):
    """In-memory parameter names of a loaded PeftModel are PEFT's (``...q_proj.lora_A.default.weight``)."""
    for ptype, adapters in TWO_ADAPTERS.items():
        subject, oracle = twins(tmp_path / ptype, "llama", adapters)
        s_names = {n for n, _ in subject.named_parameters() if _is_adapter_param(n)}
        o_names = {n for n, _ in oracle.named_parameters() if _is_adapter_param(n)}
        assert o_names
        assert s_names == o_names, (ptype, sorted(s_names ^ o_names)[:10])
        sd_s, sd_o = subject.state_dict(), oracle.state_dict()
        for name in o_names:
            assert sd_s[name].shape == sd_o[name].shape, name
            assert torch.equal(sd_s[name], sd_o[name]), name


def _is_adapter_param(name: str) -> bool:
    return any(t in name for t in (".lora_", ".hada_", ".lokr_", ".modules_to_save."))
