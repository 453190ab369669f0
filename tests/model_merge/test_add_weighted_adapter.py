"""``add_weighted_adapter`` against the real peft 0.21.2 (the oracle) on a tiny Llama.

The source adapters are made by peft with random non-zero init, saved, and loaded into both libraries, so both merge
bit-identical tensors. LoRA results are compared tensor by tensor (new A/B) and by logits with the new adapter active.
dare_* types draw random masks: PEFT's injection of the new adapter consumes the RNG before the masks (ours does not,
see weighted_merge.py), so the test runs PEFT's injection under ``fork_rng`` too; then, from the same seed, the masks
are the same and the results match exactly.

Tolerances: fp32 (tests/tolerances.py) everywhere; the SVD checks compare a truncation error against the discarded
singular values with an explicit fp32 slack (see ``test_loha_lokr_svd_truncation_bound``).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import peft
import pytest
import torch
from peft.tuners.lora.model import LoraModel
from transformers import LlamaConfig, LlamaForCausalLM

import peft_kernels as pk
from peft_kernels.model.weighted_merge import merge_tensors
from tests.tolerances import assert_close

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

NEW = "merged"
IDS = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(1))

# name -> (peft type, config kwargs); every adapter is made with a different seed
SPECS = {
    "a": ("lora", {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}),
    "b": ("lora", {"r": 8, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj"]}),
    "c": ("lora", {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}),
    "s": ("lora", {"r": 8, "lora_alpha": 8, "target_modules": r".*\.q_proj"}),
    "rs1": ("lora", {"r": 4, "lora_alpha": 8, "use_rslora": True, "target_modules": ["q_proj", "v_proj"]}),
    "rs2": ("lora", {"r": 8, "lora_alpha": 4, "use_rslora": True, "target_modules": ["q_proj", "v_proj"]}),
    "p1": ("lora", {"r": 8, "lora_alpha": 8, "rank_pattern": {"q_proj": 4}, "target_modules": ["q_proj", "v_proj"]}),
    "p2": ("lora", {"r": 8, "lora_alpha": 16, "rank_pattern": {"q_proj": 4}, "target_modules": ["q_proj", "v_proj"]}),
    "m1": ("lora", {"r": 4, "lora_alpha": 4, "target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}),
    "m2": ("lora", {"r": 4, "lora_alpha": 4, "target_modules": ["v_proj"], "modules_to_save": ["lm_head"]}),
    "h1": ("loha", {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}),
    "h2": ("loha", {"r": 4, "alpha": 4, "target_modules": ["q_proj", "v_proj"]}),
    "k1": ("lokr", {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}),
    "k2": ("lokr", {"r": 2, "alpha": 2, "target_modules": ["q_proj", "v_proj"], "decompose_both": True}),
}
CONFIG_CLASS = {"lora": "LoraConfig", "loha": "LoHaConfig", "lokr": "LoKrConfig"}


def base_model() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    for i, (name, (ptype, kw)) in enumerate(SPECS.items()):
        init = {"init_lora_weights": False} if ptype == "lora" else {"init_weights": False}
        model = base_model()
        torch.manual_seed(100 + i)
        cfg = getattr(peft, CONFIG_CLASS[ptype])(**init, **kw)
        peft.get_peft_model(model, cfg).save_pretrained(root / name)
    return root


def load(lib, saved: Path, names: list[str]):
    model = lib.PeftModel.from_pretrained(base_model(), saved / names[0], adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(saved / n, adapter_name=n)
    return model


def new_params(model, name: str = NEW) -> dict[str, torch.Tensor]:
    return {k: p for k, p in model.named_parameters() if f".{name}." in k and ("lora_A" in k or "lora_B" in k)}


def layers_with(model, name: str):
    """module path -> the adapter layer holding ``name`` (peft's lora.Linear or our FusedAdapterLinear)."""
    return {k: m for k, m in model.named_modules() if hasattr(m, "lora_A") and name in m.lora_A}


@torch.no_grad()
def logits(model, adapter: str) -> torch.Tensor:
    model.set_adapter(adapter)
    return model(input_ids=IDS).logits


def fork_peft_injection(monkeypatch) -> None:
    orig = LoraModel.inject_adapter

    def forked(self, *args, **kwargs):
        with torch.random.fork_rng(devices=[]):
            return orig(self, *args, **kwargs)

    monkeypatch.setattr(LoraModel, "inject_adapter", forked)


def both(saved: Path, names: list[str], weights: list[float], monkeypatch, seed: int = 0, **kw):
    fork_peft_injection(monkeypatch)
    ref, ours = load(peft, saved, names), load(pk, saved, names)
    for model in (ref, ours):
        torch.manual_seed(seed)
        model.add_weighted_adapter(names, weights, NEW, **kw)
    return ref, ours


def assert_same_adapter(ref, ours, *, check_tensors: bool = True) -> None:
    rc, oc = ref.peft_config[NEW], ours.peft_config[NEW]
    assert (oc.r, oc.lora_alpha, set(oc.target_modules)) == (rc.r, rc.lora_alpha, set(rc.target_modules))
    rp, op = new_params(ref), new_params(ours)
    assert sorted(rp) == sorted(op)
    assert not any(p.requires_grad for p in op.values())  # added frozen and inactive
    assert ours.active_adapters == ref.active_adapters and NEW not in ours.active_adapters
    if check_tensors:
        for k in rp:
            assert_close(op[k], rp[k], msg=k)
    assert_close(logits(ours, NEW), logits(ref, NEW), msg="logits")


# -------------------------------------------------------------------------------------------------- LoRA parity
DETERMINISTIC = [
    ("svd", {}),
    ("svd", {"svd_rank": 5}),
    ("svd", {"svd_clamp": 0.9}),
    ("svd", {"svd_full_matrices": False}),
    ("linear", {}),
    ("cat", {}),
    ("ties", {"density": 0.5}),
    ("ties", {"density": 0.3, "majority_sign_method": "frequency"}),
    ("ties_svd", {"density": 0.5}),
    ("magnitude_prune", {"density": 0.4}),
    ("magnitude_prune_svd", {"density": 0.4}),
]


@pytest.mark.parametrize(("ctype", "kw"), DETERMINISTIC, ids=[f"{c}-{k}" for c, k in DETERMINISTIC])
def test_lora_parity_deterministic(saved, monkeypatch, ctype, kw):
    ref, ours = both(saved, ["a", "b"], [0.7, -0.4], monkeypatch, combination_type=ctype, **kw)
    assert_same_adapter(ref, ours)


@pytest.mark.parametrize("ctype", ["dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"])
def test_lora_parity_dare_same_seed(saved, monkeypatch, ctype):
    ref, ours = both(saved, ["a", "b"], [0.7, 0.4], monkeypatch, combination_type=ctype, density=0.5)
    assert_same_adapter(ref, ours)


def test_dare_prunes_and_rescales():
    torch.manual_seed(0)
    t = torch.randn(200, 100) + 3.0  # no exact zeros
    out = merge_tensors("dare_linear", [t], torch.tensor([1.0]), 0.3, "total")
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.02
    assert_close(out[kept], t[kept] / 0.3)


def test_rank_rules_and_single_adapter(saved, monkeypatch):
    for ctype, expected in (("svd", 8), ("cat", 12)):
        ref, ours = load(peft, saved, ["a", "c"]), load(pk, saved, ["a", "c"])
        for m in (ref, ours):
            m.add_weighted_adapter(["a", "c"], [1.0, 1.0], NEW, combination_type=ctype)
        assert ours.peft_config[NEW].r == ref.peft_config[NEW].r == expected
        assert_same_adapter(ref, ours)
    # one adapter: PEFT forces linear, which is exact: dW_new = w dW
    ref, ours = both(saved, ["a"], [-0.5], monkeypatch, combination_type="svd")
    assert_same_adapter(ref, ours)
    for key, layer in layers_with(ours, NEW).items():
        assert_close(layer.get_delta_weight(NEW), -0.5 * layer.get_delta_weight("a"), msg=key)


def test_str_targets_and_existing_name(saved):
    ref, ours = load(peft, saved, ["s", "a"]), load(pk, saved, ["s", "a"])
    for m in (ref, ours):
        with pytest.raises(ValueError, match="same target modules type"):
            m.add_weighted_adapter(["s", "a"], [1.0, 1.0], NEW)
        assert NEW not in m.peft_config
        m.add_weighted_adapter(["s"], [2.0], NEW)
        assert m.peft_config[NEW].target_modules == r"(.*\.q_proj)"
        m.add_weighted_adapter(["a"], [1.0], NEW, combination_type="cat")  # exists: silently nothing
        assert m.peft_config[NEW].r == 8
    assert_close(logits(ours, NEW), logits(ref, NEW))


def test_rank_pattern_zero_padded(saved, monkeypatch):
    """PEFT stores the rank-4 q_proj result in tensors of rank 4 under a config saying 8; ours pads with zeros."""
    ref, ours = both(saved, ["p1", "p2"], [0.6, 0.5], monkeypatch, combination_type="linear")
    assert_same_adapter(ref, ours, check_tensors=False)
    rp, op = new_params(ref), new_params(ours)
    for k in rp:
        r = rp[k].shape[0] if "lora_A" in k else rp[k].shape[1]
        o = op[k][:r] if "lora_A" in k else op[k][:, :r]
        assert_close(o, rp[k], msg=k)
        assert op[k].shape == ((8, 64) if "lora_A" in k else (op[k].shape[0], 8))
        assert not (op[k][r:] if "lora_A" in k else op[k][:, r:]).any()


ERRORS = [
    (["a", "c"], "linear", {}, ValueError, ValueError),  # unequal ranks
    (["a", "c"], "ties", {"density": 0.5}, ValueError, ValueError),
    (["a", "b"], "nope", {}, ValueError, ValueError),
    (["a", "zz"], "svd", {}, ValueError, ValueError),  # missing adapter
    (["m1", "m2"], "svd", {}, ValueError, ValueError),  # modules_to_save on the same module
]


@pytest.mark.parametrize(("names", "ctype", "kw", "ref_exc", "our_exc"), ERRORS)
def test_errors_like_peft(saved, names, ctype, kw, ref_exc, our_exc):
    loadable = [n for n in names if n in SPECS]
    ref, ours = load(peft, saved, loadable), load(pk, saved, loadable)
    with pytest.raises(ref_exc):
        ref.add_weighted_adapter(names, [1.0] * len(names), NEW, combination_type=ctype, **kw)
    with pytest.raises(our_exc):
        ours.add_weighted_adapter(names, [1.0] * len(names), NEW, combination_type=ctype, **kw)
    assert NEW not in ours.peft_config and not new_params(ours)


def test_errors_before_touching_the_model(saved):
    """Where PEFT fails half-way (config added, layers injected), ours raises ValueError with the model untouched."""
    ref, ours = load(peft, saved, ["a", "b"]), load(pk, saved, ["a", "b"])
    with pytest.raises(TypeError):  # density=None reaches `density >= 1`
        ref.add_weighted_adapter(["a", "b"], [1.0, 1.0], NEW, combination_type="ties")
    assert NEW in ref.peft_config  # PEFT's leftover
    for kw in ({"combination_type": "ties"}, {"combination_type": "ties", "density": 0.5, "majority_sign_method": "x"}):
        with pytest.raises(ValueError):
            ours.add_weighted_adapter(["a", "b"], [1.0, 1.0], NEW, **kw)
    with pytest.raises(ValueError, match="weights"):
        ours.add_weighted_adapter(["a", "b"], [1.0], NEW)
    assert NEW not in ours.peft_config and not new_params(ours)


def test_mixed_model_raises(saved):
    for lib in (peft, pk):
        model = lib.PeftMixedModel.from_pretrained(base_model(), saved / "a", adapter_name="a")
        with pytest.raises(NotImplementedError):
            model.add_weighted_adapter(["a"], [1.0], NEW)


# ------------------------------------------------------------------------------------------------------- rsLoRA
@pytest.mark.parametrize(("ctype", "kw"), [("cat", {}), ("svd", {"svd_rank": 12})])
def test_rslora_exact_where_peft_is_sqrt_rank_too_large(saved, monkeypatch, ctype, kw):
    ref, ours = both(saved, ["rs1", "rs2"], [0.7, -0.4], monkeypatch, combination_type=ctype, **kw)
    assert ref.peft_config[NEW].use_rslora and not ours.peft_config[NEW].use_rslora
    rp, op = new_params(ref), new_params(ours)
    for k in rp:  # same A/B as PEFT; only the scaling differs
        assert_close(op[k], rp[k], msg=k)
    ref_layers = layers_with(ref, NEW)
    for key, layer in layers_with(ours, NEW).items():
        true = 0.7 * layer.get_delta_weight("rs1") - 0.4 * layer.get_delta_weight("rs2")
        assert_close(layer.get_delta_weight(NEW), true, msg=key)
        assert_close(ref_layers[key].get_delta_weight(NEW), math.sqrt(12) * true, msg=f"PEFT bug #3761 {key}")


def test_rslora_single_adapter_exact(saved):
    ours = load(pk, saved, ["rs2"])
    ours.add_weighted_adapter(["rs2"], [1.5], NEW)
    for key, layer in layers_with(ours, NEW).items():
        assert_close(layer.get_delta_weight(NEW), 1.5 * layer.get_delta_weight("rs2"), msg=key)


# ----------------------------------------------------------------------------------------------------- LoHa / LoKr
def weighted(layer, names, weights):
    return sum(w * layer.get_delta_weight(n) for n, w in zip(names, weights))


@pytest.mark.parametrize("names", [["h1", "h2"], ["k1", "k2"], ["h1"]])
def test_loha_lokr_svd_full_rank_exact(saved, names):
    weights = [0.6, -0.3][: len(names)]
    ours = load(pk, saved, names)
    ours.add_weighted_adapter(names, weights, NEW, svd_rank=64)  # >= min(out, in) everywhere: lossless
    cfg = ours.peft_config[NEW]
    assert cfg.peft_type == "LORA" and cfg.r == cfg.lora_alpha == 64
    for key, layer in layers_with(ours, NEW).items():
        assert layer.adapter_types[NEW] == "lora" and layer.lora_A[NEW].weight.shape == (64, 64)
        assert_close(layer.get_delta_weight(NEW), weighted(layer, names, weights), msg=key)
    with torch.no_grad():  # the model output is the weighted sum of the sources' deltas
        ours.base_model.set_adapter(names)
        for layer in layers_with(ours, NEW).values():  # the fused bank is keyed on the scalings: rebuilt
            layer.scaling.update({n: layer.scaling[n] * w for n, w in zip(names, weights)})
        expected = ours(input_ids=IDS).logits
    assert_close(logits(ours, NEW), expected)


@pytest.mark.parametrize("names", [["h1", "h2"], ["k1", "k2"]])
def test_loha_lokr_svd_truncation_bound(saved, names):
    """Rank-4 truncation: ||dW_new - sum w dW||_F equals the norm of the discarded singular values (Eckart-Young).
    Slack: fp32 SVD of a 64x64 matrix, relative 1e-4 of ||dW|| (the fp32 rtol of tests/tolerances.py)."""
    weights = [0.6, -0.3]
    ours = load(pk, saved, names)
    ours.add_weighted_adapter(names, weights, NEW, combination_type="svd")
    assert ours.peft_config[NEW].r == 4
    for key, layer in layers_with(ours, NEW).items():
        true = weighted(layer, names, weights)
        s = torch.linalg.svdvals(true.double())
        err = (layer.get_delta_weight(NEW) - true).double().norm()
        assert abs(err - s[4:].norm()) <= 1e-4 * s.norm(), key


def test_loha_pruned_svd_types_and_rejections(saved):
    ours = load(pk, saved, ["h1", "h2"])
    ours.add_weighted_adapter(["h1", "h2"], [1.0, 1.0], NEW, combination_type="ties_svd", density=0.5)
    torch.manual_seed(0)
    ours.add_weighted_adapter(["h1", "h2"], [1.0, 1.0], "dare", combination_type="dare_linear_svd", density=0.5)
    for name in (NEW, "dare"):
        for layer in layers_with(ours, name).values():
            assert torch.linalg.matrix_rank(layer.get_delta_weight(name)) <= 4
    for ctype in ("linear", "cat", "ties"):
        with pytest.raises(ValueError, match="LoHa/LoKr"):
            ours.add_weighted_adapter(["h1", "h2"], [1.0, 1.0], "bad", combination_type=ctype, density=0.5)
    assert "bad" not in ours.peft_config


def test_loha_merge_saves_as_peft_loadable_lora(saved, tmp_path):
    ours = load(pk, saved, ["h1", "h2"])
    ours.add_weighted_adapter(["h1", "h2"], [0.5, 0.5], NEW, svd_rank=16)
    ours.save_pretrained(tmp_path, selected_adapters=[NEW])
    ref = peft.PeftModel.from_pretrained(base_model(), tmp_path / NEW, adapter_name=NEW)
    assert ref.peft_config[NEW].peft_type == "LORA" and ref.peft_config[NEW].r == 16
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_close(logits(ours, NEW), logits(ref, NEW))
