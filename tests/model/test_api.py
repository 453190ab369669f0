"""3. PeftModel API semantics, call by call against the real peft with the same adapters loaded in both."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from tests.model.helpers import (
    ORACLE,
    SUBJECT,
    TWO_ADAPTERS,
    build,
    generate,
    labels_for,
    make_base,
    make_config,
    make_inputs,
    run,
    trainable_names,
    twins,
)
from tests.tolerances import assert_close

_LOHA = ("loha", {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]})
_LOKR = ("lokr", {"r": 2, "alpha": 4, "decompose_both": True, "target_modules": ["q_proj", "v_proj", "gate_proj"]})

# (id, model kind, adapter spec): one adapter "default", loaded from a peft-saved directory.
API_CASES = [
    (
        "llama-lora-rslora-lm_head",
        "llama",
        ("lora", {"r": 4, "lora_alpha": 8, "use_rslora": True, "modules_to_save": ["lm_head"]}),
    ),
    ("gpt2-lora-conv1d", "gpt2", ("lora", {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_proj"]})),
    ("bert_cls-lora-classifier", "bert_cls", ("lora", {"r": 4, "lora_alpha": 8})),
    ("llama-loha", "llama", _LOHA),
    ("llama-lokr-lm_head", "llama", (_LOKR[0], {**_LOKR[1], "modules_to_save": ["lm_head"]})),
    ("bert-lokr", "bert", ("lokr", {"r": 8, "alpha": 4, "target_modules": ["query", "value", "dense"]})),
]
_IDS = [c[0] for c in API_CASES]


def _no_kernel_modules(model: nn.Module) -> None:
    left = [
        (n, type(m).__module__)
        for n, m in model.named_modules()
        if type(m).__module__.startswith(("peft", "peft_kernels"))
    ]
    assert not left, f"adapter modules left after unload: {left[:5]}"


# ---------------------------------------------------------------------------------------------------------------------
# get_peft_model, add_adapter, parameter counts
# ---------------------------------------------------------------------------------------------------------------------

COUNT_CASES = [
    ("llama-lora-lm_head", "llama", ("lora", {"r": 4, "modules_to_save": ["lm_head"]})),
    ("gpt2-lora", "gpt2", ("lora", {"r": 4, "target_modules": "all-linear"})),
    ("bert_cls-lora", "bert_cls", ("lora", {"r": 8})),
    ("llama-loha-all-linear", "llama", ("loha", {"r": 4, "target_modules": "all-linear"})),
    ("llama-lokr-decompose_both", "llama", _LOKR),
    ("bert-lokr", "bert", ("lokr", {"r": 8, "target_modules": "all-linear"})),
]


@pytest.mark.parametrize("case_id,kind,spec", COUNT_CASES, ids=[c[0] for c in COUNT_CASES])
def test_get_peft_model_counts_and_trainable(case_id, kind, spec, capsys):
    ptype, kw = spec
    subject = SUBJECT.get_peft_model(make_base(kind), make_config(SUBJECT, ptype, kind, **kw))
    oracle = ORACLE.get_peft_model(make_base(kind), make_config(ORACLE, ptype, kind, **kw))
    assert isinstance(subject, SUBJECT.PeftModel)
    assert subject.get_nb_trainable_parameters() == oracle.get_nb_trainable_parameters()
    assert trainable_names(subject) == trainable_names(oracle)

    subject.print_trainable_parameters()
    ours = capsys.readouterr().out
    oracle.print_trainable_parameters()
    theirs = capsys.readouterr().out
    assert ours == theirs


@pytest.mark.parametrize("ptype", ["lora", "loha", "lokr"])
def test_add_adapter_is_not_activated_and_frozen(ptype):
    first, second = TWO_ADAPTERS[ptype]["default"], TWO_ADAPTERS[ptype]["second"]
    subject = build(SUBJECT, "llama", {"default": first})
    oracle = build(ORACLE, "llama", {"default": first})
    inputs = make_inputs("llama")
    before = run(subject, inputs)

    subject.add_adapter("second", make_config(SUBJECT, second[0], "llama", **second[1]))
    oracle.add_adapter("second", make_config(ORACLE, second[0], "llama", **second[1]))
    assert_close(run(subject, inputs), before, msg="adding an adapter changed the output")
    assert set(subject.peft_config) == {"default", "second"}
    assert trainable_names(subject) == trainable_names(oracle)
    assert subject.get_nb_trainable_parameters() == oracle.get_nb_trainable_parameters()
    assert subject.active_adapters == ["default"]
    assert subject.active_adapter == "default"


def test_add_adapter_errors_like_peft():
    subject = build(SUBJECT, "llama", {"default": ("lora", {"r": 4})})
    snapshot_names = {n for n, _ in subject.named_parameters()}
    with pytest.raises(ValueError):  # PEFT: "Adapter with name 'default' already exists."
        subject.add_adapter("default", make_config(SUBJECT, "lora", "llama", r=2))
    with pytest.raises(ValueError):  # PEFT: "Cannot combine adapters with different peft types."
        subject.add_adapter("other", make_config(SUBJECT, "loha", "llama", r=2))
    assert set(subject.peft_config) == {"default"}
    assert {n for n, _ in subject.named_parameters()} == snapshot_names


# ---------------------------------------------------------------------------------------------------------------------
# set_adapter, several active adapters, disable_adapter, delete_adapter
# ---------------------------------------------------------------------------------------------------------------------


def test_set_adapter_unknown_raises_value_error(tmp_path):
    subject, _ = twins(tmp_path, "llama", TWO_ADAPTERS["lora"])
    with pytest.raises(ValueError):
        subject.set_adapter("nope")
    assert subject.active_adapters == ["default"]


@pytest.mark.parametrize("ptype", ["lora", "loha", "lokr"])
def test_several_active_adapters_via_base_model(tmp_path, ptype):
    # modules_to_save allows one active adapter only (PEFT raises), so leave it out here
    adapters = {
        name: (spec[0], {k: v for k, v in spec[1].items() if k != "modules_to_save"})
        for name, spec in TWO_ADAPTERS[ptype].items()
    }
    subject, oracle = twins(tmp_path, "llama", adapters)
    subject.base_model.set_adapter(["default", "second"])
    oracle.base_model.set_adapter(["default", "second"])
    inputs = make_inputs("llama")
    assert_close(run(subject, inputs), run(oracle, inputs))
    assert subject.active_adapters == ["default", "second"]


@pytest.mark.parametrize("case_id,kind,spec", API_CASES, ids=_IDS)
def test_disable_adapter_context(tmp_path, case_id, kind, spec):
    subject, oracle = twins(tmp_path, kind, {"default": spec})
    inputs = make_inputs(kind)
    base = run(make_base(kind), inputs)
    adapted = run(oracle, inputs)
    with subject.disable_adapter():
        assert_close(run(subject, inputs), base, msg="inside disable_adapter")
    assert_close(run(subject, inputs), adapted, msg="after disable_adapter")


@pytest.mark.parametrize("ptype", ["lora", "lokr"])
def test_delete_adapter_active_falls_back_like_peft(tmp_path, ptype):
    spec = TWO_ADAPTERS[ptype]["second"]
    other = TWO_ADAPTERS[ptype]["default"]
    adapters = {"b": spec, "a": other, "c": (spec[0], {**spec[1], "r": 1})}
    subject, oracle = twins(tmp_path, "llama", adapters)
    inputs = make_inputs("llama")

    # deleting a non-active adapter keeps the active one
    subject.delete_adapter("c")
    oracle.delete_adapter("c")
    assert_close(run(subject, inputs), run(oracle, inputs), msg="after deleting c")

    # deleting the active adapter: PEFT falls back to the alphabetically first remaining adapter ("a")
    subject.delete_adapter("b")
    oracle.delete_adapter("b")
    assert_close(run(subject, inputs), run(oracle, inputs), msg="after deleting b")
    assert set(subject.peft_config) == set(oracle.peft_config) == {"a"}
    s_names = {n for n, _ in subject.named_parameters() if ".b." in n or n.endswith(".b") or ".c." in n}
    assert not s_names, f"parameters of deleted adapters remain: {sorted(s_names)[:5]}"
    assert subject.active_adapters == oracle.active_adapters == ["a"]
    assert subject.active_adapter == oracle.active_adapter


def test_delete_adapter_errors_like_peft(tmp_path):
    subject, _ = twins(tmp_path, "llama", TWO_ADAPTERS["lora"])
    with pytest.raises(ValueError):  # PEFT: "Adapter nope does not exist"
        subject.delete_adapter("nope")
    subject.merge_adapter()
    with pytest.raises(ValueError):  # PEFT: "Cannot delete adapter(s) ['default'] while they are merged."
        subject.delete_adapter("default")
    assert set(subject.peft_config) == {"default", "second"}


# ---------------------------------------------------------------------------------------------------------------------
# merge / unmerge / merge_and_unload / unload / get_base_model
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case_id,kind,spec", API_CASES, ids=_IDS)
def test_merge_and_unmerge_adapter(tmp_path, case_id, kind, spec):
    subject, oracle = twins(tmp_path, kind, {"default": spec})
    inputs = make_inputs(kind)
    unmerged = run(oracle, inputs)

    subject.merge_adapter()
    oracle.merge_adapter()
    merged_expected = run(oracle, inputs)
    assert_close(run(subject, inputs), merged_expected, msg="merged vs peft merged")
    assert_close(run(subject, inputs), unmerged, msg="merged vs unmerged")

    subject.unmerge_adapter()
    assert_close(run(subject, inputs), unmerged, msg="unmerged again")

    # after unmerging, the base weights are back: disabled output equals the base model
    with subject.disable_adapter():
        assert_close(run(subject, inputs), run(make_base(kind), inputs), msg="base after unmerge")


def test_merge_non_active_adapter_and_safe_merge(tmp_path):
    subject, oracle = twins(tmp_path, "llama", TWO_ADAPTERS["lokr"])
    inputs = make_inputs("llama")
    subject.merge_adapter(["second"], safe_merge=True)
    oracle.merge_adapter(["second"], safe_merge=True)
    assert_close(run(subject, inputs), run(oracle, inputs), msg="default active + second merged")
    # set_adapter unmerges (PEFT warns, then unmerges every merged layer)
    subject.set_adapter("second")
    oracle.set_adapter("second")
    assert_close(run(subject, inputs), run(oracle, inputs), msg="after set_adapter")


@pytest.mark.parametrize("case_id,kind,spec", API_CASES, ids=_IDS)
def test_merge_and_unload(tmp_path, case_id, kind, spec):
    subject, oracle = twins(tmp_path, kind, {"default": spec})
    inputs = make_inputs(kind)
    expected = run(oracle.merge_and_unload(), inputs)

    merged = subject.merge_and_unload()
    base = make_base(kind)
    assert type(merged) is type(base)
    _no_kernel_modules(merged)
    assert [(n, type(m)) for n, m in merged.named_modules()] == [(n, type(m)) for n, m in base.named_modules()]
    for name, module in merged.named_modules():
        if isinstance(base.get_submodule(name), (nn.Linear, Conv1D)):
            assert type(module) in (nn.Linear, Conv1D), name
    assert sorted(merged.state_dict()) == sorted(base.state_dict())
    assert_close(run(merged, inputs), expected)
    assert (expected - run(base, inputs)).abs().max() > 1e-3


@pytest.mark.parametrize("case_id,kind,spec", API_CASES, ids=_IDS)
def test_unload(tmp_path, case_id, kind, spec):
    subject, oracle = twins(tmp_path, kind, {"default": spec})
    inputs = make_inputs(kind)
    expected = run(oracle.unload(), inputs)  # with modules_to_save, PEFT keeps the active copy

    unloaded = subject.unload()
    base = make_base(kind)
    assert type(unloaded) is type(base)
    _no_kernel_modules(unloaded)
    assert [(n, type(m)) for n, m in unloaded.named_modules()] == [(n, type(m)) for n, m in base.named_modules()]
    assert_close(run(unloaded, inputs), expected)
    # targeted layers get their original weights back, bit for bit
    base_sd, sd = base.state_dict(), unloaded.state_dict()
    assert sorted(sd) == sorted(base_sd)
    saved = set(getattr(oracle.peft_config["default"], "modules_to_save", None) or [])
    for key, tensor in base_sd.items():
        if not any(key.startswith(m + ".") for m in saved):
            assert torch.equal(sd[key], tensor), key


@pytest.mark.parametrize("case_id,kind,spec", API_CASES[:3], ids=_IDS[:3])
def test_get_base_model(tmp_path, case_id, kind, spec):
    subject, oracle = twins(tmp_path, kind, {"default": spec})
    inner = subject.get_base_model()
    assert isinstance(inner, type(make_base(kind)))
    inputs = make_inputs(kind)
    # the HF model with the adapters injected (not unloaded)
    assert_close(run(inner, inputs), run(oracle, inputs))
    assert subject.config.vocab_size == oracle.config.vocab_size


# ---------------------------------------------------------------------------------------------------------------------
# forward / generate pass-through
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case_id,kind,spec", API_CASES, ids=_IDS)
def test_forward_passthrough(tmp_path, case_id, kind, spec):
    subject, oracle = twins(tmp_path, kind, {"default": spec})
    inputs = make_inputs(kind)
    kwargs = {"output_hidden_states": True}
    if kind != "bert":
        kwargs["labels"] = labels_for(kind, inputs)
    with torch.no_grad():
        ours = subject(**inputs, **kwargs)
        theirs = oracle(**inputs, **kwargs)
        positional = subject(inputs["input_ids"])
    if kind != "bert":
        assert_close(ours.loss, theirs.loss, msg="loss")
        assert_close(ours.logits, theirs.logits, msg="logits")
        assert_close(positional.logits, theirs.logits, msg="positional input_ids")
    else:
        assert_close(ours.last_hidden_state, theirs.last_hidden_state)
        assert_close(positional.last_hidden_state, theirs.last_hidden_state)
    assert len(ours.hidden_states) == len(theirs.hidden_states)
    for a, b in zip(ours.hidden_states, theirs.hidden_states):
        assert_close(a, b, msg="hidden_states")


@pytest.mark.parametrize(
    "kind,spec",
    [
        ("llama", ("lora", {"r": 4, "lora_alpha": 16, "modules_to_save": ["lm_head"]})),
        ("gpt2", ("lora", {"r": 4, "lora_alpha": 16})),
        ("llama", _LOHA),
        ("llama", _LOKR),
    ],
    ids=["llama-lora", "gpt2-lora", "llama-loha", "llama-lokr"],
)
def test_generate_greedy_tokens(tmp_path, kind, spec):
    subject, oracle = twins(tmp_path, kind, {"default": spec})
    inputs = make_inputs(kind, batch=2, seq=6)
    expected = generate(oracle, inputs)
    got = generate(subject, inputs)
    assert torch.equal(got, expected), f"{got}\n{expected}"


def test_counts_after_from_pretrained(tmp_path, capsys):
    for trainable in (False, True):
        subject, oracle = twins(tmp_path / str(trainable), "llama", TWO_ADAPTERS["lora"], is_trainable=trainable)
        assert subject.get_nb_trainable_parameters() == oracle.get_nb_trainable_parameters()
        assert trainable_names(subject) == trainable_names(oracle)
        subject.print_trainable_parameters()
        ours = capsys.readouterr().out
        oracle.print_trainable_parameters()
        assert ours == capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------------
# default init, merged + disabled, selective merge_and_unload, half-precision base
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ptype", ["lora", "loha", "lokr"])
def test_default_init_is_a_no_op(ptype):
    """PEFT's default init makes a new adapter a no-op (LoRA B = 0, LoHa w2_b = 0, LoKr w1 = 0)."""
    cls = {"lora": "LoraConfig", "loha": "LoHaConfig", "lokr": "LoKrConfig"}[ptype]
    cfg = getattr(SUBJECT, cls)(target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM", r=4)
    subject = SUBJECT.get_peft_model(make_base("llama"), cfg).eval()
    inputs = make_inputs("llama")
    assert_close(run(subject, inputs), run(make_base("llama"), inputs))


def test_disable_adapter_while_merged(tmp_path):
    subject, oracle = twins(tmp_path, "llama", {"default": _LOKR})
    inputs = make_inputs("llama")
    subject.merge_adapter()
    oracle.merge_adapter()
    with oracle.disable_adapter():
        expected = run(oracle, inputs)
    with subject.disable_adapter():
        got = run(subject, inputs)
    assert_close(got, expected)
    assert_close(got, run(make_base("llama"), inputs))


@pytest.mark.parametrize("ptype", ["lora", "lokr"])
def test_merge_and_unload_selected_adapters(tmp_path, ptype):
    subject, oracle = twins(tmp_path, "llama", TWO_ADAPTERS[ptype])
    inputs = make_inputs("llama")
    expected = run(oracle.merge_and_unload(adapter_names=["second"]), inputs)
    assert_close(run(subject.merge_and_unload(adapter_names=["second"]), inputs), expected)


@pytest.mark.parametrize("ptype", ["lora", "loha", "lokr"])
def test_bf16_base_model(tmp_path, ptype):
    """Adapters on a bf16 base: PEFT keeps adapter weights in fp32 (autocast_adapter_dtype) and returns bf16."""
    from tests.model.helpers import adapter_dir, save_with_peft

    spec = {"lora": ("lora", {"r": 4, "lora_alpha": 8}), "loha": _LOHA, "lokr": _LOKR}[ptype]
    root = save_with_peft(tmp_path / "saved", "llama", {"default": spec})
    subject = SUBJECT.PeftModel.from_pretrained(
        make_base("llama").to(torch.bfloat16), str(adapter_dir(root, "default"))
    )
    oracle = ORACLE.PeftModel.from_pretrained(make_base("llama").to(torch.bfloat16), str(adapter_dir(root, "default")))
    inputs = make_inputs("llama")
    got, expected = run(subject, inputs), run(oracle, inputs)
    assert got.dtype == expected.dtype == torch.bfloat16
    assert_close(got, expected)
    s_dtypes = {
        n: p.dtype for n, p in subject.named_parameters() if any(t in n for t in (".lora_", ".hada_", ".lokr_"))
    }
    o_dtypes = {n: p.dtype for n, p in oracle.named_parameters() if any(t in n for t in (".lora_", ".hada_", ".lokr_"))}
    assert s_dtypes == o_dtypes


def test_peftmodel_constructor_like_peft(tmp_path):
    """``PeftModel(model, config, adapter_name)`` directly (no task subclass) injects like get_peft_model."""
    cfg_kw = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    subject = SUBJECT.PeftModel(make_base("llama"), make_config(SUBJECT, "lora", None, **cfg_kw), "first")
    oracle = ORACLE.PeftModel(make_base("llama"), make_config(ORACLE, "lora", None, **cfg_kw), "first")
    assert subject.get_nb_trainable_parameters() == oracle.get_nb_trainable_parameters()
    assert trainable_names(subject) == trainable_names(oracle)
    subject.save_pretrained(str(tmp_path / "pk"))
    again = ORACLE.PeftModel.from_pretrained(make_base("llama"), str(tmp_path / "pk" / "first"), adapter_name="first")
    inputs = make_inputs("llama")
    assert_close(run(subject.eval(), inputs), run(again, inputs))
