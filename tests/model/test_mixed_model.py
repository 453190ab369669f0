"""5. PeftMixedModel: LoRA + LoHa + LoKr on one model, several adapters active at once, against peft's PeftMixedModel."""

from __future__ import annotations

import pytest
import torch

from tests.model.helpers import (
    ORACLE,
    SUBJECT,
    make_base,
    make_config,
    make_inputs,
    normalize_nested,
    run,
    save_with_peft,
)
from tests.tolerances import assert_close

# Overlapping targets so some modules carry two or three adapter types.
MIXED = {
    "lora": ("lora", {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}),
    "loha": ("loha", {"r": 2, "alpha": 4, "target_modules": ["q_proj", "k_proj", "up_proj"]}),
    "lokr": ("lokr", {"r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj", "o_proj", "down_proj"]}),
    "lora2": ("lora", {"r": 2, "lora_alpha": 2, "use_rslora": True, "target_modules": ["q_proj", "gate_proj"]}),
}

ACTIVE_SETS = [
    ["lora"],
    ["loha"],
    ["lokr"],
    ["lora", "loha"],
    ["loha", "lokr"],
    ["lora", "loha", "lokr"],
    ["lokr", "loha", "lora"],
    ["lora", "lora2", "lokr"],
    ["lora", "loha", "lokr", "lora2"],
]


@pytest.fixture(scope="module")
def saved_dirs(tmp_path_factory):
    """Each adapter saved by a plain peft PeftModel (PeftMixedModel cannot save)."""
    root = tmp_path_factory.mktemp("mixed_saved")
    for name, spec in MIXED.items():
        save_with_peft(root / name, "llama", {name: spec})
    return {name: root / name / name for name in MIXED}


def _load_mixed(lib, dirs, order=("lora", "loha", "lokr", "lora2")):
    model = lib.PeftMixedModel.from_pretrained(make_base("llama"), str(dirs[order[0]]), adapter_name=order[0])
    for name in order[1:]:
        model.load_adapter(str(dirs[name]), adapter_name=name)
    return model


def test_from_pretrained_and_load_adapter(saved_dirs):
    subject, oracle = _load_mixed(SUBJECT, saved_dirs), _load_mixed(ORACLE, saved_dirs)
    assert isinstance(subject, SUBJECT.PeftMixedModel)
    inputs = make_inputs("llama")
    # load_adapter does not activate: the first adapter stays active
    assert_close(run(subject, inputs), run(oracle, inputs), msg="after loading")
    assert subject.active_adapters == oracle.active_adapters == ["lora"]
    for active in ACTIVE_SETS:
        subject.set_adapter(active)
        oracle.set_adapter(active)
        assert_close(run(subject, inputs), run(oracle, inputs), msg=str(active))


def test_single_adapter_in_mixed_equals_peftmodel(saved_dirs):
    """A mixed model with one adapter active gives the plain PeftModel output for that adapter."""
    subject = _load_mixed(SUBJECT, saved_dirs)
    inputs = make_inputs("llama")
    for name in ("loha", "lokr"):
        subject.set_adapter([name])
        plain = ORACLE.PeftModel.from_pretrained(make_base("llama"), str(saved_dirs[name]), adapter_name=name)
        assert_close(run(subject, inputs), run(plain, inputs), msg=name)


def test_disable_merge_unload(saved_dirs):
    subject, oracle = _load_mixed(SUBJECT, saved_dirs), _load_mixed(ORACLE, saved_dirs)
    active = ["lora", "loha", "lokr"]
    subject.set_adapter(active)
    oracle.set_adapter(active)
    inputs = make_inputs("llama")
    expected = run(oracle, inputs)
    base = run(make_base("llama"), inputs)

    with subject.disable_adapter():
        assert_close(run(subject, inputs), base, msg="disabled")
    assert_close(run(subject, inputs), expected, msg="re-enabled")

    subject.merge_adapter()
    assert_close(run(subject, inputs), expected, msg="merged")
    subject.unmerge_adapter()
    assert_close(run(subject, inputs), expected, msg="unmerged")

    merged = subject.merge_and_unload()
    assert type(merged) is type(make_base("llama"))
    assert_close(run(merged, inputs), run(oracle.merge_and_unload(), inputs), msg="merge_and_unload")


def test_unload_and_delete(saved_dirs):
    subject, oracle = _load_mixed(SUBJECT, saved_dirs), _load_mixed(ORACLE, saved_dirs)
    for model in (subject, oracle):
        model.set_adapter(["lora", "loha", "lokr"])
        model.delete_adapter("loha")
    inputs = make_inputs("llama")
    assert_close(run(subject, inputs), run(oracle, inputs), msg="after delete_adapter")
    assert set(subject.peft_config) == set(oracle.peft_config)
    # PEFT's list order here is an artifact of its nested wrappers (['lokr', 'lora']); additive adapters commute
    assert sorted(subject.active_adapters) == sorted(oracle.active_adapters)

    base = make_base("llama")
    unloaded = subject.unload()
    assert type(unloaded) is type(base)
    for key, tensor in base.state_dict().items():
        assert torch.equal(unloaded.state_dict()[key], tensor), key


@pytest.mark.parametrize("how", ["get_peft_model", "constructor"])
def test_create_mixed_and_add_adapter(how):
    """get_peft_model(..., mixed=True) / PeftMixedModel(model, cfg, name) plus add_adapter of other types.

    Random init differs between libraries, so peft's tensors are copied into ours by parameter name (modulo the
    ``.base_layer`` hops of peft's nested wrappers); the names must therefore match peft's.
    """

    def create(lib):
        torch.manual_seed(0)
        ptype, kw = MIXED["lora"]
        cfg = make_config(lib, ptype, None, **kw)
        if how == "get_peft_model":
            model = lib.get_peft_model(make_base("llama"), cfg, adapter_name="lora", mixed=True)
        else:
            model = lib.PeftMixedModel(make_base("llama"), cfg, "lora")
        for name in ("loha", "lokr", "lora2"):
            ptype, kw = MIXED[name]
            model.add_adapter(name, make_config(lib, ptype, None, **kw))
        return model.eval()

    subject, oracle = create(SUBJECT), create(ORACLE)
    assert isinstance(subject, SUBJECT.PeftMixedModel)
    # PEFT's list order here is an artifact of its nested wrappers (['lokr', 'lora']); additive adapters commute
    assert sorted(subject.active_adapters) == sorted(oracle.active_adapters)

    ours = {normalize_nested(n): p for n, p in subject.named_parameters()}
    theirs = {normalize_nested(n): p for n, p in oracle.named_parameters()}
    adapter_keys = {n for n in theirs if any(t in n for t in (".lora_", ".hada_", ".lokr_"))}
    missing = adapter_keys - set(ours)
    assert not missing, f"adapter parameters named differently from peft: {sorted(missing)[:6]}"
    with torch.no_grad():
        for name in adapter_keys:
            assert ours[name].shape == theirs[name].shape, name
            ours[name].copy_(theirs[name])

    inputs = make_inputs("llama")
    for active in ACTIVE_SETS:
        subject.set_adapter(active)
        oracle.set_adapter(active)
        assert_close(run(subject, inputs), run(oracle, inputs), msg=str(active))


def test_mixed_counts_like_peft(saved_dirs):
    subject, oracle = _load_mixed(SUBJECT, saved_dirs), _load_mixed(ORACLE, saved_dirs)
    assert subject.get_nb_trainable_parameters() == oracle.get_nb_trainable_parameters()


def test_mixed_rejects_unknown_adapter_in_set_adapter(saved_dirs):
    subject = _load_mixed(SUBJECT, saved_dirs)
    with pytest.raises(ValueError):  # PEFT: "Adapter nope not found."
        subject.set_adapter(["lora", "nope"])
