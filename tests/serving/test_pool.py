"""``AdapterPool``: many registered LoRA / LoHa / LoKr adapters served through a few fixed device slots.

Oracle: the real ``peft`` with one adapter loaded (saved by peft with random non-zero init), per adapter; for
generation also the pool itself run one prompt at a time.
"""

from __future__ import annotations

import json
import shutil
import threading
import warnings
from pathlib import Path

import peft
import pytest
import torch

from peft_kernels.model.config import LoraConfig
from peft_kernels.serving import AdapterPool
from tests.model import helpers
from tests.tolerances import assert_close

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

POOL_TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "gate_proj", "down_proj"]  # not o_proj
MAX_RANK = 9
CAPACITY = 3

# Nine adapters of the three types: ranks, targets, rank/alpha patterns, rsLoRA, low-rank LoKr factors.
ADAPTERS: dict[str, helpers.AdapterSpec] = {
    "lora_r4": ("lora", {"r": 4, "lora_alpha": 8}),
    "lora_pat": (
        "lora",
        {
            "r": 2,
            "lora_alpha": 6,
            "target_modules": ["q_proj", "k_proj", "down_proj"],
            "rank_pattern": {"k_proj": 8},
            "alpha_pattern": {"down_proj": 3},
        },
    ),
    "lora_rs": ("lora", {"r": 8, "lora_alpha": 4, "use_rslora": True, "target_modules": ["v_proj", "up_proj"]}),
    "loha_r2": ("loha", {"r": 2, "alpha": 3}),
    "loha_r3": ("loha", {"r": 3, "alpha": 5, "target_modules": ["k_proj", "v_proj", "up_proj"]}),
    "loha_pat": (
        "loha",
        {"r": 2, "alpha": 4, "target_modules": ["q_proj", "gate_proj"], "rank_pattern": {"q_proj": 1}},
    ),
    "lokr_full": ("lokr", {"r": 8, "alpha": 8}),
    "lokr_both": ("lokr", {"r": 2, "alpha": 3, "decompose_both": True, "target_modules": ["q_proj", "gate_proj"]}),
    "lokr_pat": (
        "lokr",
        {"r": 4, "alpha": 2, "target_modules": ["k_proj", "down_proj"], "alpha_pattern": {"k_proj": 6}},
    ),
}
NAMES = list(ADAPTERS)
SEQ = 6
PROMPTS = [[5, 17, 9], [33, 4, 70, 12, 8, 101, 44], [60, 61], [7, 90, 3, 55, 21]]
GEN_KW = {"max_new_tokens": 5, "do_sample": False}
GEN_BATCHES = [["lora_pat", "loha_r3", None, "lokr_both"], ["lokr_pat", "lora_rs", "loha_pat", "lokr_pat"]]


def _save(root: Path, name: str, spec: helpers.AdapterSpec, seed: int) -> Path:
    model = helpers.build(peft, "llama", {"default": spec}, seed=seed, perturb=False)
    model.save_pretrained(str(root / name))
    return root / name


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Adapter dirs saved by the real peft, and per adapter the oracle's logits and lone-prompt generations."""
    root = tmp_path_factory.mktemp("pool_adapters")
    ids = torch.randint(3, helpers.VOCAB, (4, SEQ), generator=torch.Generator().manual_seed(3))
    dirs, logits, gens = {}, {}, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, (name, spec) in enumerate(ADAPTERS.items()):
            dirs[name] = _save(root, name, spec, seed=10 * i + 1)
        for name in [*NAMES, None]:
            if name is None:
                model = helpers.make_base("llama")
            else:
                model = peft.PeftModel.from_pretrained(helpers.make_base("llama"), str(dirs[name])).eval()
            with torch.no_grad():
                logits[name] = model(input_ids=ids).logits
                for i, p in enumerate(PROMPTS):  # only the (adapter, prompt) pairs the generate test uses
                    if any(batch[i] == name for batch in GEN_BATCHES):
                        gens[name, i] = model.generate(
                            input_ids=torch.tensor([p]),
                            attention_mask=torch.ones(1, len(p), dtype=torch.long),
                            pad_token_id=0,
                            **GEN_KW,
                        )[0, len(p) :].tolist()
        # Adapters the pool must refuse.
        dirs["lokr_factor"] = _save(root, "lokr_factor", ("lokr", {"r": 2, "alpha": 2, "decompose_factor": 4}), 97)
        dirs["o_proj"] = _save(root, "o_proj", ("lora", {"r": 2, "lora_alpha": 2, "target_modules": ["o_proj"]}), 98)
        dirs["lora_big"] = _save(root, "lora_big", ("lora", {"r": 10, "lora_alpha": 2}), 99)
        dirs["loha_big"] = _save(root, "loha_big", ("loha", {"r": 4, "alpha": 2}), 100)
    return {"dirs": dirs, "ids": ids, "logits": logits, "gens": gens}


def make_pool(saved, names=NAMES, capacity=CAPACITY) -> AdapterPool:
    pool = AdapterPool(helpers.make_base("llama"), capacity, MAX_RANK, target_modules=POOL_TARGETS)
    for n in names:
        pool.register(n, saved["dirs"][n])
    return pool


def bank_ptrs(pool: AdapterPool) -> list[int]:
    out = []
    for bank in pool.banks().values():
        g = bank.lokr_groups[0]
        out += [t.data_ptr() for t in (bank.lora_a, bank.lora_b, bank.lora_scale, bank.lora_rank, g.w1, g.w2, g.scale)]
    return out


def snapshot(pool: AdapterPool):
    banks = {}
    for key, bank in pool.banks().items():
        g = bank.lokr_groups[0]
        banks[key] = (
            [t.clone() for t in (bank.lora_a, bank.lora_b, bank.lora_scale, bank.lora_rank, g.w1, g.w2, g.scale)],
            dict(bank.lora_slots),
            dict(g.slots),
            bank.generation,
            len(bank.lokr_groups),
        )
    return pool.registered(), pool.resident(), pool.slots(), banks, bank_ptrs(pool)


def assert_same(a, b) -> None:
    assert a[:3] == b[:3]
    assert a[4] == b[4]
    for key, (tensors, lslots, kslots, gen, ngroups) in a[3].items():
        t2, l2, k2, g2, n2 = b[3][key]
        assert (lslots, kslots, gen, ngroups) == (l2, k2, g2, n2), key
        for x, y in zip(tensors, t2):
            assert torch.equal(x, y), key


def check_rows(saved, out_logits: torch.Tensor, rows: list[int], names: list[str | None]) -> None:
    for i, (row, name) in enumerate(zip(rows, names)):
        assert_close(out_logits[i], saved["logits"][name][row], msg=f"row {i} adapter {name}")


def test_many_adapters_over_few_slots_match_peft(saved):
    pool = make_pool(saved)
    ptrs = bank_ptrs(pool)
    gen0 = next(iter(pool.banks().values())).generation
    batches = [
        ["lora_r4", "loha_r2", None, "lokr_full"],
        ["lokr_both", "lora_pat", "lora_pat", "loha_r3"],
        ["lora_rs", None, "loha_pat", "lokr_pat"],
        ["lokr_full", "lora_r4", "lokr_full", None],  # back to adapters evicted earlier
        ["loha_pat", "loha_r3", "lokr_pat", "loha_pat"],
    ]
    seen_slots: dict[str, set[int]] = {}
    for names in batches:
        rows = list(range(len(names)))
        out = pool.forward(saved["ids"], names).logits
        check_rows(saved, out, rows, names)
        for n, slot in enumerate(pool.slots()):
            if slot is not None:
                seen_slots.setdefault(slot, set()).add(n)
        assert len(pool.resident()) <= CAPACITY
    assert bank_ptrs(pool) == ptrs  # loads and evictions never reallocate
    assert next(iter(pool.banks().values())).generation > gen0
    # results do not depend on the slot: some adapter was served from more than one slot
    assert any(len(s) > 1 for s in seen_slots.values())


def test_slot_position_does_not_matter(saved):
    pool = make_pool(saved, names=["lora_r4", "loha_r3", "lokr_full"])
    ids = saved["ids"][:1]
    first = pool.forward(ids, ["lokr_full"]).logits
    assert pool.slots()[0] == "lokr_full"
    pool.unregister("lokr_full")
    pool.prepare(["lora_r4", "loha_r3"])
    pool.register("lokr_full", saved["dirs"]["lokr_full"])
    second = pool.forward(ids, ["lokr_full"]).logits
    assert pool.slots()[2] == "lokr_full"
    assert_close(second, first)
    assert_close(second[0], saved["logits"]["lokr_full"][0])


def test_generate_matches_single_prompts_and_peft(saved):
    pool = make_pool(saved)
    for b, names in enumerate(GEN_BATCHES):  # the second batch evicts and reuses slots
        batched = pool.generate(PROMPTS, names, **GEN_KW)
        assert len({tuple(g) for g in batched}) == len(batched)  # the adapters make a difference
        for i, (p, n, got) in enumerate(zip(PROMPTS, names, batched)):
            assert got == saved["gens"][n, i], (b, i, n)
            if b == 0:
                assert got == pool.generate([p], [n], **GEN_KW)[0], (i, n)


def test_lru_eviction_order(saved):
    pool = make_pool(saved, names=["lora_r4", "loha_r2", "lokr_full", "lora_rs", "loha_r3"])
    pool.prepare(["lora_r4"])
    pool.prepare(["loha_r2", "lokr_full"])
    assert pool.resident() == ["lora_r4", "loha_r2", "lokr_full"]
    pool.prepare(["lora_r4"])  # touch: lora_r4 becomes most recent
    assert pool.resident() == ["loha_r2", "lokr_full", "lora_r4"]
    slot_of_loha = pool.slots().index("loha_r2")
    pool.prepare(["lora_rs"])  # evicts the least recently used: loha_r2
    assert pool.resident() == ["lokr_full", "lora_r4", "lora_rs"]
    assert pool.slots()[slot_of_loha] == "lora_rs"
    pool.prepare(["lokr_full", "loha_r3"])  # lokr_full is in the batch, so lora_r4 goes, not lokr_full
    assert pool.resident() == ["lora_rs", "lokr_full", "loha_r3"]
    pool.unregister("lokr_full")
    assert pool.resident() == ["lora_rs", "loha_r3"] and pool.slots().count(None) == 1
    out = pool.forward(saved["ids"][:2], ["lora_r4", "loha_r3"]).logits  # lora_r4 takes the free slot
    assert pool.resident() == ["lora_rs", "lora_r4", "loha_r3"]
    check_rows(saved, out, [0, 1], ["lora_r4", "loha_r3"])


def test_batch_needing_too_many_adapters_raises_before_any_work(saved):
    pool = make_pool(saved)
    pool.prepare(["lora_r4", "lokr_full"])
    before = snapshot(pool)
    calls = []
    handle = pool.model.register_forward_pre_hook(lambda *a: calls.append(1))
    four = ["loha_r2", "loha_r3", "lora_rs", "lokr_pat"]
    with pytest.raises(ValueError, match="4 distinct adapters but the pool has 3 slots"):
        pool.forward(saved["ids"], four)
    with pytest.raises(ValueError, match="4 distinct adapters"):
        pool.generate(PROMPTS, four, **GEN_KW)
    with pytest.raises(ValueError, match="not registered"):
        pool.forward(saved["ids"][:2], ["lora_r4", "nope"])
    handle.remove()
    assert not calls
    assert_same(snapshot(pool), before)


def _broken_dirs(saved, tmp_path: Path) -> dict[str, Path]:
    src = saved["dirs"]["lora_r4"]
    bad_file = tmp_path / "bad_file"
    shutil.copytree(src, bad_file)
    (bad_file / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    bad_shape = tmp_path / "bad_shape"
    shutil.copytree(src, bad_shape)
    cfg = json.loads((bad_shape / "adapter_config.json").read_text())
    cfg["r"] = 5
    (bad_shape / "adapter_config.json").write_text(json.dumps(cfg))
    return {"bad_file": bad_file, "bad_shape": bad_shape}


def test_failed_registration_leaves_pool_unchanged(saved, tmp_path):
    pool = make_pool(saved, names=["lora_r4", "loha_r2", "lokr_full"])
    pool.forward(saved["ids"][:3], ["lora_r4", "loha_r2", "lokr_full"])
    before = snapshot(pool)
    broken = _broken_dirs(saved, tmp_path)
    cfg = LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"])
    good = {
        f"model.layers.{i}.self_attn.q_proj.{p}": torch.randn(s)
        for i in range(2)
        for p, s in (("lora_A.weight", (2, 64)), ("lora_B.weight", (64, 2)))
    }
    cases = [
        (broken["bad_file"], "cannot read adapter weights"),
        (broken["bad_shape"], "has shape"),
        (saved["dirs"]["o_proj"], "does not serve.*o_proj"),
        (saved["dirs"]["lokr_factor"], "LoKr factors of module .*decompose_factor=4"),
        (saved["dirs"]["lora_big"], "module .*q_proj has rank 10, above the pool's max_rank=9"),
        (saved["dirs"]["loha_big"], r"rank 16 \(LoHa r1\*r2 = 4\*4\), above the pool's max_rank=9"),
        (tmp_path / "missing", "can't find adapter directory"),
        ((cfg, {**good, "model.layers.0.mlp.down_proj.lora_A.weight": torch.randn(2, 128)}), "unexpected keys"),
        ((cfg, {k: v for k, v in good.items() if "layers.1" not in k}), "missing keys"),
    ]
    for src, msg in cases:
        with pytest.raises(ValueError, match=msg) as info:
            pool.register("newcomer", src)
        assert "newcomer" in str(info.value)
        assert_same(snapshot(pool), before)
    with pytest.raises(ValueError, match="already registered"):
        pool.register("lora_r4", saved["dirs"]["lora_r4"])
    assert_same(snapshot(pool), before)
    pool.register("newcomer", (cfg, good))  # the in-memory form works once it is right
    assert "newcomer" in pool.registered()


def test_concurrent_registration_during_forwards(saved):
    initial = ["lora_r4", "loha_r2", "lokr_full"]
    late = ["lora_pat", "loha_r3", "lokr_both", "lokr_pat"]
    pool = make_pool(saved, names=initial, capacity=2)
    ptrs = bank_ptrs(pool)
    errors: list[BaseException] = []
    used: set[str] = set()
    done = threading.Event()

    def forwards(offset: int) -> None:
        try:
            i = offset
            while not done.is_set() or i < offset + 8:
                avail = [n for n in [*initial, *late] if n in pool.registered()]
                names = [avail[i % len(avail)], None, avail[(i + 1) % len(avail)]]
                rows = [i % 4, (i + 1) % 4, (i + 2) % 4]
                out = pool.forward(saved["ids"][rows], names).logits
                check_rows(saved, out, rows, names)
                used.update(n for n in names if n)
                i += 1
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    def registrations() -> None:
        try:
            for n in late:
                pool.register(n, saved["dirs"][n])
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            done.set()

    threads = [threading.Thread(target=forwards, args=(k,)) for k in (0, 5)]
    threads.append(threading.Thread(target=registrations))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert set(late) & used
    for n in late:  # every late adapter serves correctly afterwards
        check_rows(saved, pool.forward(saved["ids"][1:2], [n]).logits, [1], [n])
    assert bank_ptrs(pool) == ptrs


def test_base_rows_and_unregister(saved):
    pool = make_pool(saved, names=["lora_r4"])
    out = pool.forward(saved["ids"][:2], [None, "__base__"]).logits
    check_rows(saved, out, [0, 1], [None, None])
    assert pool.resident() == []
    pool.prepare(["lora_r4"])
    pool.unregister("lora_r4")
    assert pool.registered() == [] and pool.slots() == [None] * CAPACITY
    with pytest.raises(ValueError, match="not registered"):
        pool.forward(saved["ids"][:1], ["lora_r4"])
