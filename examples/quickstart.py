"""Quick start: make a LoRA and a LoHa adapter with the real peft, load them with peft_kernels, compare the answers.

Needs no download: the model is a tiny random Llama made in code. Run: python examples/quickstart.py
"""

from __future__ import annotations

import tempfile
import warnings

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import peft_kernels

warnings.filterwarnings("ignore")


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    return LlamaForCausalLM(config).eval()


def main() -> None:
    import peft  # the oracle

    workdir = tempfile.mkdtemp()
    reference = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=8, lora_alpha=16, init_lora_weights=False))
    reference.add_adapter("style", peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False))
    reference.save_pretrained(workdir)
    reference.eval()

    ours = peft_kernels.PeftModel.from_pretrained(tiny_llama(), workdir)
    ours.load_adapter(f"{workdir}/style", adapter_name="style")

    input_ids = torch.randint(0, 128, (3, 12))
    names = ["default", "style", "__base__"]
    with torch.no_grad():
        expected = reference(input_ids, adapter_names=names).logits
        got = ours(input_ids, adapter_names=names).logits
        tokens = ours.generate(input_ids, adapter_names=names, max_new_tokens=8, do_sample=False)
    print(f"backends here: {peft_kernels.backend_info()}")
    print(f"max |peft_kernels - peft| over logits, one adapter per row: {(got - expected).abs().max().item():.2e}")
    print(f"generated (row per adapter {names}):\n{tokens[:, 12:]}")
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5), "peft_kernels disagrees with peft"
    print("OK: same answers as peft")


if __name__ == "__main__":
    main()
