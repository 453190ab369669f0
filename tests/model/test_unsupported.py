"""7. Unsupported or broken input fails at load with an error that names it, and leaves the model unchanged."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tests.model.helpers import (
    ORACLE,
    SUBJECT,
    assert_unchanged,
    make_base,
    make_config,
    make_inputs,
    run,
    save_with_peft,
    snapshot,
    twins,
)
from tests.tolerances import assert_close

_ERRORS = (ValueError, TypeError, NotImplementedError, KeyError, RuntimeError, OSError)


def _expect_load_failure(kind_or_model, path, match: str | None = None, flags=re.IGNORECASE, errors=_ERRORS):
    """``SUBJECT.PeftModel.from_pretrained`` raises (message matching ``match``); the base model is unchanged."""
    model = make_base(kind_or_model) if isinstance(kind_or_model, str) else kind_or_model
    snap = snapshot(model)
    with pytest.raises(errors) as info:
        SUBJECT.PeftModel.from_pretrained(model, str(path))
    if match is not None:
        assert re.search(match, str(info.value), flags), f"error does not name {match!r}: {info.value}"
    assert_unchanged(model, snap)
    return info.value


# ---------------------------------------------------------------------------------------------------------------------
# Other PEFT methods and variants
# ---------------------------------------------------------------------------------------------------------------------


def test_ia3_adapter_is_refused(tmp_path):
    cfg = ORACLE.IA3Config(
        target_modules=["k_proj", "v_proj", "down_proj"],
        feedforward_modules=["down_proj"],
        init_ia3_weights=False,
        task_type="CAUSAL_LM",
    )
    ORACLE.get_peft_model(make_base("llama"), cfg).save_pretrained(str(tmp_path / "ia3"))
    _expect_load_failure("llama", tmp_path / "ia3", match="IA3")


def test_ia3_load_adapter_into_existing_model_leaves_it_unchanged(tmp_path):
    cfg = ORACLE.IA3Config(target_modules=["k_proj"], feedforward_modules=[], task_type="CAUSAL_LM")
    ORACLE.get_peft_model(make_base("llama"), cfg).save_pretrained(str(tmp_path / "ia3"))
    subject, oracle = twins(tmp_path, "llama", {"default": ("lora", {"r": 4})})
    snap = snapshot(subject)
    with pytest.raises(_ERRORS, match="IA3"):
        subject.load_adapter(str(tmp_path / "ia3"), adapter_name="ia3")
    assert_unchanged(subject, snap)
    assert set(subject.peft_config) == {"default"}
    inputs = make_inputs("llama")
    assert_close(run(subject, inputs), run(oracle, inputs))


def test_dora_checkpoint_is_refused(tmp_path):
    save_with_peft(tmp_path / "dora", "llama", {"default": ("lora", {"r": 4, "use_dora": True})})
    _expect_load_failure("llama", tmp_path / "dora", match="dora")


def test_dora_config_is_refused():
    model = make_base("llama")
    snap = snapshot(model)
    with pytest.raises(_ERRORS, match="(?i)dora"):
        SUBJECT.get_peft_model(model, make_config(SUBJECT, "lora", "llama", r=4, use_dora=True))
    assert_unchanged(model, snap)


# ---------------------------------------------------------------------------------------------------------------------
# Layer types: GPT-2 Conv1D for LoHa / LoKr (PEFT: TypeError), Conv2d targets
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ptype", ["loha", "lokr"])
def test_lycoris_on_gpt2_conv1d_raises_like_peft(ptype):
    # PEFT: TypeError("Target module of type <class 'transformers.pytorch_utils.Conv1D'> not supported, ...")
    oracle_model = make_base("gpt2")
    with pytest.raises(TypeError, match="Conv1D"):
        ORACLE.get_peft_model(oracle_model, make_config(ORACLE, ptype, "gpt2", target_modules=["c_attn"]))

    model = make_base("gpt2")
    snap = snapshot(model)
    with pytest.raises((TypeError, ValueError), match="Conv1D"):
        SUBJECT.get_peft_model(model, make_config(SUBJECT, ptype, "gpt2", target_modules=["c_attn"]))
    assert_unchanged(model, snap)


@pytest.mark.parametrize("ptype", ["loha", "lokr"])
def test_lycoris_conv1d_checkpoint_is_refused(tmp_path, ptype):
    """A hand-made LoHa/LoKr checkpoint for GPT-2's Conv1D (peft cannot make one) is refused, naming Conv1D."""
    root = tmp_path / ptype
    make_config(ORACLE, ptype, "gpt2", r=2, target_modules=["c_attn"]).save_pretrained(str(root))
    tensors = {}
    for layer in (0, 1):
        prefix = f"base_model.model.transformer.h.{layer}.attn.c_attn."
        if ptype == "loha":
            for w in ("w1", "w2"):
                tensors[prefix + f"hada_{w}_a"] = torch.randn(192, 2)
                tensors[prefix + f"hada_{w}_b"] = torch.randn(2, 64)
        else:
            tensors[prefix + "lokr_w1"] = torch.randn(12, 8)
            tensors[prefix + "lokr_w2"] = torch.randn(16, 8)
    save_file(tensors, str(root / "adapter_model.safetensors"), metadata={"format": "pt"})
    _expect_load_failure("gpt2", root, match="Conv1D")


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.lin = nn.Linear(8, 4)

    def forward(self, x):
        return self.lin(self.conv(x).mean((2, 3)))


def _convnet():
    torch.manual_seed(0)
    return ConvNet().eval()


@pytest.mark.parametrize(
    "ptype,kw",
    [
        ("lora", {"r": 2}),
        ("loha", {"r": 2, "use_effective_conv2d": True}),
        ("lokr", {"r": 2}),
    ],
    ids=["lora", "loha-effective", "lokr"],
)
def test_conv2d_target_refused_or_exact(tmp_path, ptype, kw):
    """DESIGN: conv layers may use the reference path or be refused with a clear error, never a wrong answer."""
    torch.manual_seed(1)
    made = ORACLE.get_peft_model(_convnet(), make_config(ORACLE, ptype, None, target_modules=["conv", "lin"], **kw))
    made.save_pretrained(str(tmp_path / "conv"))
    oracle = ORACLE.PeftModel.from_pretrained(_convnet(), str(tmp_path / "conv"))

    model = _convnet()
    snap = snapshot(model)
    x = torch.randn(2, 3, 8, 8)
    try:
        subject = SUBJECT.PeftModel.from_pretrained(model, str(tmp_path / "conv"))
    except _ERRORS as err:
        assert re.search(r"conv", str(err), re.IGNORECASE), f"error does not name the Conv2d target: {err}"
        assert_unchanged(model, snap)
        return
    with torch.no_grad():
        assert_close(subject(x), oracle(x))


# ---------------------------------------------------------------------------------------------------------------------
# Broken adapter_model.safetensors
# ---------------------------------------------------------------------------------------------------------------------

_LORA = {"default": ("lora", {"r": 4, "lora_alpha": 8})}
_LOKR = {"default": ("lokr", {"r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]})}


def _rewrite(root, fn):
    path = str(root / "adapter_model.safetensors")
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_garbage_safetensors_file(tmp_path):
    root = save_with_peft(tmp_path / "a", "llama", _LORA)
    (root / "adapter_model.safetensors").write_bytes(b"this is not a safetensors file")
    _expect_load_failure("llama", root, errors=Exception)


_Q0 = "model.layers.0.self_attn.q_proj"
_V1 = "model.layers.1.self_attn.v_proj"


@pytest.mark.parametrize(
    "adapters,module,param",
    [(_LORA, _V1, "lora_B.weight"), (_LOKR, _V1, "lokr_w2_b")],
    ids=["lora", "lokr"],
)
def test_missing_key_is_named(tmp_path, adapters, module, param):
    root = save_with_peft(tmp_path / "a", "llama", adapters)
    _rewrite(root, lambda t: t.pop(f"base_model.model.{module}.{param}"))
    err = _expect_load_failure("llama", root, match=re.escape(module))
    assert param.split(".")[0] in str(err), f"error does not name {param}: {err}"


@pytest.mark.parametrize(
    "adapters,module,param,bad_shape",
    [(_LORA, _Q0, "lora_A.weight", (3, 64)), (_LOKR, _Q0, "lokr_w1", (5, 8))],
    ids=["lora", "lokr"],
)
def test_wrong_shape_is_named(tmp_path, adapters, module, param, bad_shape):
    root = save_with_peft(tmp_path / "a", "llama", adapters)

    def corrupt(t):
        t[f"base_model.model.{module}.{param}"] = torch.randn(bad_shape)

    _rewrite(root, corrupt)
    err = _expect_load_failure("llama", root, match=re.escape(module))
    assert param.split(".")[0] in str(err), f"error does not name {param}: {err}"
    assert re.search(rf"{bad_shape[0]},\s*{bad_shape[1]}", str(err)), f"error does not give the bad shape: {err}"


def test_broken_second_adapter_leaves_loaded_model_unchanged(tmp_path):
    root = save_with_peft(tmp_path / "a", "llama", _LORA)
    bad = save_with_peft(tmp_path / "b", "llama", _LORA)
    _rewrite(
        bad, lambda t: t.update({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(3, 64)})
    )
    subject = SUBJECT.PeftModel.from_pretrained(make_base("llama"), str(root))
    inputs = make_inputs("llama")
    before = run(subject, inputs)
    snap = snapshot(subject)
    with pytest.raises(_ERRORS):
        subject.load_adapter(str(bad), adapter_name="second")
    assert_unchanged(subject, snap)
    assert set(subject.peft_config) == {"default"}
    assert subject.active_adapters == ["default"]
    assert_close(run(subject, inputs), before)


# ---------------------------------------------------------------------------------------------------------------------
# Broken adapter_config.json
# ---------------------------------------------------------------------------------------------------------------------


def _edit_config(root, fn):
    path = root / "adapter_config.json"
    cfg = json.loads(path.read_text())
    fn(cfg)
    path.write_text(json.dumps(cfg))


def test_invalid_json_config(tmp_path):
    root = save_with_peft(tmp_path / "a", "llama", _LORA)
    (root / "adapter_config.json").write_text("{not json")
    _expect_load_failure("llama", root, errors=ValueError)


def test_missing_config_file(tmp_path):
    root = save_with_peft(tmp_path / "a", "llama", _LORA)
    (root / "adapter_config.json").unlink()
    # PEFT: ValueError("Can't find 'adapter_config.json' at ...")
    _expect_load_failure("llama", root, match="adapter_config.json", errors=ValueError)


def test_unknown_peft_type(tmp_path):
    root = save_with_peft(tmp_path / "a", "llama", _LORA)
    _edit_config(root, lambda c: c.update(peft_type="FOO"))
    _expect_load_failure("llama", root, match="FOO")


def test_missing_peft_type(tmp_path):
    root = save_with_peft(tmp_path / "a", "llama", _LORA)
    _edit_config(root, lambda c: c.pop("peft_type"))
    _expect_load_failure("llama", root, match="peft_type")


def test_non_positive_rank(tmp_path):
    root = save_with_peft(tmp_path / "a", "llama", _LORA)
    _edit_config(root, lambda c: c.update(r=0))
    # PEFT: ValueError("`r` should be a positive integer value but the value passed is 0")
    _expect_load_failure("llama", root, errors=ValueError)


def test_targets_matching_nothing(tmp_path):
    root = save_with_peft(tmp_path / "a", "llama", _LORA)
    _edit_config(root, lambda c: c.update(target_modules=["no_such_module"]))
    # PEFT: NoMatchingPeftModuleError (a ValueError) "Target modules {'no_such_module'} not found in the base model."
    _expect_load_failure("llama", root, match="no_such_module", errors=ValueError)


def test_unknown_config_keys_are_ignored_like_peft(tmp_path):
    """PEFT drops unknown adapter_config.json keys with a warning (forward compatibility); so do we."""
    root = save_with_peft(tmp_path / "a", "llama", _LORA)
    _edit_config(root, lambda c: c.update(some_future_option=True))
    subject = SUBJECT.PeftModel.from_pretrained(make_base("llama"), str(root))
    oracle = ORACLE.PeftModel.from_pretrained(make_base("llama"), str(root))
    inputs = make_inputs("llama")
    assert_close(run(subject, inputs), run(oracle, inputs))


# ---------------------------------------------------------------------------------------------------------------------
# Options outside the fused path: either refused with an error naming them (model unchanged) or exact
# ---------------------------------------------------------------------------------------------------------------------

REFUSE_OR_EXACT = [
    (
        "lora-embed_tokens",
        "llama",
        ("lora", {"r": 4, "target_modules": ["embed_tokens", "q_proj"]}),
        r"embed|Embedding",
    ),
    ("lora_bias", "llama", ("lora", {"r": 4, "lora_bias": True}), r"lora_bias"),
    ("bias-lora_only", "bert_cls", ("lora", {"r": 4, "bias": "lora_only"}), r"bias"),
    ("bias-all", "bert_cls", ("lora", {"r": 4, "bias": "all"}), r"bias"),
    ("loha-module_dropout", "llama", ("loha", {"r": 2, "module_dropout": 0.5, "rank_dropout": 0.5}), r"dropout"),
]


@pytest.mark.parametrize("case_id,kind,spec,match", REFUSE_OR_EXACT, ids=[c[0] for c in REFUSE_OR_EXACT])
def test_refused_or_exact(tmp_path, case_id, kind, spec, match):
    root = save_with_peft(tmp_path / "saved", kind, {"default": spec})
    if kind == "bert_cls":  # make the saved base biases differ from the fresh model's
        _rewrite(root, lambda t: t.update({k: v + 0.1 for k, v in t.items() if k.endswith(".bias")}))
    oracle = ORACLE.PeftModel.from_pretrained(make_base(kind), str(root))
    model = make_base(kind)
    snap = snapshot(model)
    try:
        subject = SUBJECT.PeftModel.from_pretrained(model, str(root))
    except _ERRORS as err:
        assert re.search(match, str(err), re.IGNORECASE), f"error does not name {match!r}: {err}"
        assert_unchanged(model, snap)
        return
    inputs = make_inputs(kind)
    assert_close(run(subject, inputs), run(oracle, inputs))
