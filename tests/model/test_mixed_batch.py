"""4. ``adapter_names=[...]`` mixed batches.

LoRA: the oracle is peft's own ``forward(adapter_names=...)`` / ``generate(adapter_names=...)``.
LoHa, LoKr and PeftMixedModel: PEFT silently ignores ``adapter_names`` (its bug), so the oracle is row by row: the real
peft with that row's adapter active (adapters disabled for ``"__base__"``) on that row alone, stacked.
"""

from __future__ import annotations

import pytest
import torch

from tests.model.helpers import (
    ORACLE,
    SUBJECT,
    generate,
    load,
    make_base,
    make_inputs,
    row_by_row,
    run,
    save_with_peft,
    twins,
)
from tests.tolerances import assert_close

NAMES = ["a", "b", "__base__", "a"]

LORA_SETS = {
    "llama": {
        "a": ("lora", {"r": 4, "lora_alpha": 8, "modules_to_save": ["lm_head"]}),
        "b": (
            "lora",
            {
                "r": 2,
                "lora_alpha": 8,
                "use_rslora": True,
                "target_modules": ["q_proj", "k_proj", "down_proj"],
                "modules_to_save": ["lm_head"],
            },
        ),
    },
    "gpt2": {
        "a": ("lora", {"r": 4, "lora_alpha": 8}),
        "b": ("lora", {"r": 8, "lora_alpha": 4, "target_modules": ["c_attn", "c_fc"]}),
    },
    "bert_cls": {
        "a": ("lora", {"r": 4, "lora_alpha": 8}),
        "b": ("lora", {"r": 2, "lora_alpha": 4, "target_modules": ["key", "dense"]}),
    },
}

LYCORIS_SETS = {
    "loha": {
        "a": ("loha", {"r": 4, "alpha": 8, "modules_to_save": ["lm_head"]}),
        "b": (
            "loha",
            {"r": 2, "alpha": 3, "target_modules": ["k_proj", "v_proj", "up_proj"], "modules_to_save": ["lm_head"]},
        ),
    },
    "lokr": {
        "a": ("lokr", {"r": 8, "alpha": 8, "target_modules": ["q_proj", "v_proj", "gate_proj"]}),
        "b": ("lokr", {"r": 2, "alpha": 3, "decompose_both": True, "target_modules": ["q_proj", "down_proj"]}),
    },
}


def _batch(kind: str) -> dict[str, torch.Tensor]:
    return make_inputs(kind, batch=len(NAMES), seq=6, seed=5)


# ---------------------------------------------------------------------------------------------------------------------
# LoRA: peft's own mixed-batch forward is the oracle
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(LORA_SETS))
def test_lora_mixed_batch_forward(tmp_path, kind):
    subject, oracle = twins(tmp_path, kind, LORA_SETS[kind])
    inputs = _batch(kind)
    expected = run(oracle, inputs, adapter_names=NAMES)
    # the oracle call really mixes (sanity of the case): rows differ from the all-"a" batch where names differ
    assert (expected[1] - run(oracle, inputs)[1]).abs().max() > 1e-3
    assert_close(run(subject, inputs, adapter_names=NAMES), expected)
    # the global active adapter is untouched and still used without adapter_names
    assert_close(run(subject, inputs), run(oracle, inputs), msg="plain forward after a mixed batch")


def test_lora_mixed_batch_all_base_equals_base(tmp_path):
    subject, oracle = twins(tmp_path, "llama", LORA_SETS["llama"])
    inputs = _batch("llama")
    with oracle.disable_adapter():
        base = run(oracle, inputs)
    assert_close(run(subject, inputs, adapter_names=["__base__"] * len(NAMES)), base)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_lora_mixed_batch_generate(tmp_path, kind):
    subject, oracle = twins(tmp_path, kind, LORA_SETS[kind])
    inputs = _batch(kind)
    expected = generate(oracle, inputs, adapter_names=NAMES)
    got = generate(subject, inputs, adapter_names=NAMES)
    assert torch.equal(got, expected), f"{got}\n{expected}"


def test_disable_adapter_beats_adapter_names(tmp_path):
    subject, oracle = twins(tmp_path, "llama", LORA_SETS["llama"])
    inputs = _batch("llama")
    with oracle.disable_adapter():
        expected = run(oracle, inputs, adapter_names=NAMES)
    with subject.disable_adapter():
        got = run(subject, inputs, adapter_names=NAMES)
    assert_close(got, expected)


def _raises_like_oracle(subject, oracle, call):
    """The subject raises the same exception type as peft for ``call(model)``; returns both exceptions."""
    with pytest.raises(Exception) as theirs:
        call(oracle)
    with pytest.raises(type(theirs.value)) as ours:
        call(subject)
    return ours.value, theirs.value


def test_lora_adapter_names_errors_like_peft(tmp_path):
    subject, oracle = twins(tmp_path, "llama", LORA_SETS["llama"])
    inputs = _batch("llama")

    # unknown adapter name -> ValueError
    _raises_like_oracle(subject, oracle, lambda m: m(**inputs, adapter_names=["a", "zzz", "a", "a"]))
    # wrong length -> ValueError
    _raises_like_oracle(subject, oracle, lambda m: m(**inputs, adapter_names=["a", "b"]))
    # training mode -> ValueError
    subject.train()
    oracle.train()
    _raises_like_oracle(subject, oracle, lambda m: m(**inputs, adapter_names=NAMES))
    subject.eval()
    oracle.eval()
    # merged adapters -> ValueError
    subject.merge_adapter()
    oracle.merge_adapter()
    ours, theirs = _raises_like_oracle(subject, oracle, lambda m: m(**inputs, adapter_names=NAMES))
    assert isinstance(theirs, ValueError) and isinstance(ours, ValueError)
    subject.unmerge_adapter()
    oracle.unmerge_adapter()
    # still usable afterwards
    assert_close(run(subject, inputs, adapter_names=NAMES), run(oracle, inputs, adapter_names=NAMES))


# ---------------------------------------------------------------------------------------------------------------------
# LoHa / LoKr: row-by-row oracle (PEFT ignores adapter_names for them)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ptype", ["loha", "lokr"])
def test_lycoris_mixed_batch_forward(tmp_path, ptype):
    subject, oracle = twins(tmp_path, "llama", LYCORIS_SETS[ptype])
    inputs = _batch("llama")
    expected = row_by_row(oracle, inputs, NAMES, lambda m, row: run(m, row))
    got = run(subject, inputs, adapter_names=NAMES)
    assert_close(got, expected)
    # the global active adapter is untouched
    assert subject.active_adapters == ["a"]
    assert_close(run(subject, inputs), run(oracle, inputs), msg="plain forward after a mixed batch")


def test_lycoris_mixed_batch_generate(tmp_path):
    subject, oracle = twins(tmp_path, "llama", LYCORIS_SETS["loha"])
    inputs = _batch("llama")
    expected = row_by_row(oracle, inputs, NAMES, lambda m, row: generate(m, row))
    got = generate(subject, inputs, adapter_names=NAMES)
    assert torch.equal(got, expected), f"{got}\n{expected}"


def test_bert_lokr_mixed_batch(tmp_path):
    adapters = {
        "a": ("lokr", {"r": 4, "alpha": 8}),
        "b": ("lokr", {"r": 1, "alpha": 2, "decompose_both": True, "target_modules": ["key", "dense"]}),
    }
    subject, oracle = twins(tmp_path, "bert_cls", adapters)
    inputs = _batch("bert_cls")
    expected = row_by_row(oracle, inputs, NAMES, lambda m, row: run(m, row))
    assert_close(run(subject, inputs, adapter_names=NAMES), expected)


@pytest.mark.parametrize("ptype", ["loha", "lokr"])
def test_lycoris_adapter_names_errors(tmp_path, ptype):
    """PEFT has no errors here (it ignores the kwarg); ours raise the same ValueErrors as PEFT's LoRA path."""
    subject, _ = twins(tmp_path, "llama", LYCORIS_SETS[ptype])
    inputs = _batch("llama")
    with pytest.raises(ValueError):
        run(subject, inputs, adapter_names=["a", "zzz", "a", "a"])
    with pytest.raises(ValueError):
        run(subject, inputs, adapter_names=["a", "b"])
    subject.merge_adapter()
    with pytest.raises(ValueError):
        run(subject, inputs, adapter_names=NAMES)
    subject.unmerge_adapter()
    subject.train()
    with pytest.raises(ValueError):
        run(subject, inputs, adapter_names=NAMES)


# ---------------------------------------------------------------------------------------------------------------------
# PeftMixedModel: row-by-row oracle
# ---------------------------------------------------------------------------------------------------------------------

MIXED = {
    "lora": ("lora", {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}),
    "loha": ("loha", {"r": 2, "alpha": 4, "target_modules": ["q_proj", "k_proj", "up_proj"]}),
    "lokr": ("lokr", {"r": 2, "alpha": 4, "target_modules": ["v_proj", "o_proj", "down_proj"]}),
}


def test_mixed_model_mixed_batch(tmp_path):
    root = tmp_path / "saved"
    for name, spec in MIXED.items():
        save_with_peft(root / name, "llama", {name: spec})
    roots = {name: root / name for name in MIXED}

    def load_mixed(lib):
        first = lib.PeftMixedModel.from_pretrained(make_base("llama"), str(roots["lora"] / "lora"), adapter_name="lora")
        for name in ("loha", "lokr"):
            first.load_adapter(str(roots[name] / name), adapter_name=name)
        return first

    subject, oracle = load_mixed(SUBJECT), load_mixed(ORACLE)
    # a row uses exactly the adapter it names, whatever is globally active (PEFT LoRA semantics)
    subject.set_adapter(["lora", "loha", "lokr"])
    names = ["lokr", "__base__", "lora", "loha", "lokr"]
    inputs = make_inputs("llama", batch=len(names), seq=6, seed=9)
    expected = row_by_row(oracle, inputs, names, lambda m, row: run(m, row))
    assert_close(run(subject, inputs, adapter_names=names), expected)


def test_mixed_batch_with_other_load_names(tmp_path):
    """Adapters loaded under new names are addressed by those names in ``adapter_names``."""
    root = save_with_peft(tmp_path / "saved", "llama", LORA_SETS["llama"])
    rename = {"a": "x", "b": "y"}
    subject = load(SUBJECT, "llama", root, LORA_SETS["llama"], load_names=rename)
    oracle = load(ORACLE, "llama", root, LORA_SETS["llama"], load_names=rename)
    names = ["y", "__base__", "x", "y"]
    inputs = _batch("llama")
    assert_close(run(subject, inputs, adapter_names=names), run(oracle, inputs, adapter_names=names))


def test_row_by_row_oracle_agrees_with_peft_lora(tmp_path):
    """Validates the row-by-row oracle used above on LoRA, where peft's own mixed batch is the reference."""
    _, oracle = twins(tmp_path, "llama", LORA_SETS["llama"])
    inputs = _batch("llama")
    assert_close(
        row_by_row(oracle, inputs, NAMES, lambda m, row: run(m, row)), run(oracle, inputs, adapter_names=NAMES)
    )


def test_lora_mixed_batch_beam_search(tmp_path):
    """PEFT repeats each row's adapter name ``num_beams`` times for beam search."""
    subject, oracle = twins(tmp_path, "llama", LORA_SETS["llama"])
    inputs = _batch("llama")
    expected = generate(oracle, inputs, adapter_names=NAMES, num_beams=2)
    got = generate(subject, inputs, adapter_names=NAMES, num_beams=2)
    assert torch.equal(got, expected), f"{got}\n{expected}"


def _left_padded(kind: str) -> dict[str, torch.Tensor]:
    inputs = make_inputs(kind, batch=len(NAMES), seq=7, seed=11)
    for row, pad in enumerate((0, 3, 1, 5)):
        inputs["input_ids"][row, :pad] = 0
        inputs["attention_mask"][row, :pad] = 0
    return inputs


def test_lora_mixed_batch_generate_left_padded(tmp_path):
    subject, oracle = twins(tmp_path, "llama", LORA_SETS["llama"])
    inputs = _left_padded("llama")
    expected = generate(oracle, inputs, adapter_names=NAMES)
    assert torch.equal(generate(subject, inputs, adapter_names=NAMES), expected)


def test_lokr_mixed_batch_generate_left_padded(tmp_path):
    subject, oracle = twins(tmp_path, "llama", LYCORIS_SETS["lokr"])
    inputs = _left_padded("llama")
    expected = row_by_row(oracle, inputs, NAMES, lambda m, row: generate(m, row))
    assert torch.equal(generate(subject, inputs, adapter_names=NAMES), expected)


def test_adapter_names_override_several_active(tmp_path):
    subject, oracle = twins(tmp_path, "gpt2", LORA_SETS["gpt2"])
    subject.base_model.set_adapter(["a", "b"])
    oracle.base_model.set_adapter(["a", "b"])
    inputs = _batch("gpt2")
    assert_close(run(subject, inputs, adapter_names=NAMES), run(oracle, inputs, adapter_names=NAMES))
