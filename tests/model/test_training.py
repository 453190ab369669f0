"""6. Training: loss and the gradient of every adapter parameter equal PEFT's, keyed by PEFT's parameter names."""

from __future__ import annotations

import re

import pytest
import torch

from tests.model.helpers import (
    ORACLE,
    SUBJECT,
    TWO_ADAPTERS,
    labels_for,
    make_base,
    make_config,
    make_inputs,
    run,
    trainable_names,
    twins,
)
from tests.tolerances import assert_close

_LOKR_T = ["q_proj", "v_proj", "gate_proj", "down_proj"]

TRAIN_CASES = [
    (
        "llama-lora-rslora-pattern-lm_head",
        "llama",
        (
            "lora",
            {
                "r": 4,
                "lora_alpha": 8,
                "use_rslora": True,
                "rank_pattern": {"v_proj": 2},
                "modules_to_save": ["lm_head"],
            },
        ),
    ),
    ("gpt2-lora-conv1d", "gpt2", ("lora", {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_proj", "c_fc"]})),
    ("bert_cls-lora-classifier", "bert_cls", ("lora", {"r": 4, "lora_alpha": 8})),
    ("llama-loha-all-linear", "llama", ("loha", {"r": 4, "alpha": 8, "target_modules": "all-linear"})),
    ("bert_cls-loha", "bert_cls", ("loha", {"r": 2, "alpha": 4, "target_modules": ["query", "value", "dense"]})),
    ("llama-lokr-full", "llama", ("lokr", {"r": 8, "alpha": 8, "target_modules": _LOKR_T})),
    ("llama-lokr-r2-lowrank-w2", "llama", ("lokr", {"r": 2, "alpha": 4, "target_modules": _LOKR_T})),
    (
        "llama-lokr-decompose_both-lm_head",
        "llama",
        (
            "lokr",
            {"r": 2, "alpha": 4, "decompose_both": True, "target_modules": _LOKR_T, "modules_to_save": ["lm_head"]},
        ),
    ),
    (
        "bert_cls-lokr-factor4",
        "bert_cls",
        ("lokr", {"r": 2, "alpha": 2, "decompose_factor": 4, "decompose_both": True}),
    ),
]

# PEFT's in-memory names (adapter name inside the key); LoKr with decompose_both has lokr_w1_a/_b instead of lokr_w1.
EXPECTED_NAMES = {
    "lora": r"base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_A\.default\.weight",
    "loha": r"base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.hada_w1_a\.default",
    "lokr": r"base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lokr_w1(_a)?\.default",
}


def _loss(model, kind, inputs):
    return model(**inputs, labels=labels_for(kind, inputs)).loss


def _compare_grads(subject, oracle, kind, inputs):
    subject.train()
    oracle.train()
    ours_loss, their_loss = _loss(subject, kind, inputs), _loss(oracle, kind, inputs)
    assert_close(ours_loss, their_loss, msg="loss")
    ours_loss.backward()
    their_loss.backward()
    ours = {n: p.grad for n, p in subject.named_parameters() if p.requires_grad}
    theirs = {n: p.grad for n, p in oracle.named_parameters() if p.requires_grad}
    assert set(ours) == set(theirs), f"trainable parameters differ: {sorted(set(ours) ^ set(theirs))[:6]}"
    for name, grad in theirs.items():
        assert ours[name] is not None, f"no gradient for {name}"
        assert_close(ours[name], grad, msg=name)
    return ours


@pytest.mark.parametrize("case_id,kind,spec", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_is_trainable_gradients_match_peft(tmp_path, case_id, kind, spec):
    subject, oracle = twins(tmp_path, kind, {"default": spec}, is_trainable=True)
    grads = _compare_grads(subject, oracle, kind, make_inputs(kind))
    if kind == "llama":
        assert any(re.fullmatch(EXPECTED_NAMES[spec[0]], n) for n in grads), sorted(grads)[:4]


@pytest.mark.parametrize(
    "kind,spec",
    [
        ("llama", ("lora", {"r": 4, "lora_alpha": 8, "modules_to_save": ["lm_head"]})),
        ("gpt2", ("lora", {"r": 2, "lora_alpha": 4})),
        ("llama", ("loha", {"r": 2, "alpha": 4})),
        ("llama", ("lokr", {"r": 2, "alpha": 4, "decompose_both": True, "target_modules": _LOKR_T})),
    ],
    ids=["llama-lora", "gpt2-lora", "llama-loha", "llama-lokr"],
)
def test_get_peft_model_train_mode_gradients(tmp_path, kind, spec):
    """A model made by our get_peft_model in train mode trains like peft with the same (saved) adapter."""
    ptype, kw = spec
    torch.manual_seed(3)
    subject = SUBJECT.get_peft_model(make_base(kind).train(), make_config(SUBJECT, ptype, kind, **kw))
    subject.save_pretrained(str(tmp_path / "pk"))
    oracle = ORACLE.PeftModel.from_pretrained(make_base(kind), str(tmp_path / "pk"), is_trainable=True)
    _compare_grads(subject, oracle, kind, make_inputs(kind))


def test_sgd_step_tracks_peft(tmp_path):
    subject, oracle = twins(tmp_path, "llama", {"default": TRAIN_CASES[-2][2]}, is_trainable=True)
    inputs = make_inputs("llama")
    for model in (subject, oracle):
        model.train()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        _loss(model, "llama", inputs).backward()
        opt.step()
        model.eval()
    assert_close(run(subject, inputs), run(oracle, inputs))


@pytest.mark.parametrize("ptype", ["lora", "loha"])
def test_set_adapter_moves_trainability_like_peft(tmp_path, ptype):
    subject, oracle = twins(tmp_path, "llama", TWO_ADAPTERS[ptype], is_trainable=True)
    assert trainable_names(subject) == trainable_names(oracle)
    subject.set_adapter("second")
    oracle.set_adapter("second")
    assert trainable_names(subject) == trainable_names(oracle)
    _compare_grads(subject, oracle, "llama", make_inputs("llama"))


@pytest.mark.parametrize(
    "spec",
    [
        ("lora", {"r": 4, "lora_alpha": 8, "lora_dropout": 1.0}),
        ("loha", {"r": 4, "alpha": 8, "module_dropout": 1.0}),
        ("lokr", {"r": 2, "alpha": 4, "module_dropout": 1.0}),
    ],
    ids=["lora-dropout1", "loha-module_dropout1", "lokr-module_dropout1"],
)
def test_dropout_one_in_training_drops_the_adapter(tmp_path, spec):
    """Deterministic dropout extremes: in train mode, lora_dropout=1 zeros the LoRA input and module_dropout=1 never
    applies a LoHa/LoKr adapter (PEFT: ``torch.rand(1) > module_dropout``), so the output is the base output; in eval
    both are identities."""
    subject, oracle = twins(tmp_path, "llama", {"default": spec}, is_trainable=True)
    inputs = make_inputs("llama")
    base = run(make_base("llama"), inputs)
    subject.train()
    oracle.train()
    assert_close(run(oracle, inputs), base, msg="oracle (sanity)")
    assert_close(run(subject, inputs), base, msg="train mode")
    subject.eval()
    oracle.eval()
    assert_close(run(subject, inputs), run(oracle, inputs), msg="eval mode")
