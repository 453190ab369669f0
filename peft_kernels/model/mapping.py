"""``get_peft_model``: PEFT's entry point."""

from __future__ import annotations

from torch import nn

from peft_kernels.model.config import PeftConfig
from peft_kernels.model.mixed_model import PeftMixedModel
from peft_kernels.model.peft_model import PeftModel


def get_peft_model(
    model: nn.Module,
    peft_config: PeftConfig,
    adapter_name: str = "default",
    mixed: bool = False,
    autocast_adapter_dtype: bool = True,
    revision: str | None = None,
    low_cpu_mem_usage: bool = False,
) -> PeftModel | PeftMixedModel:
    """Wrap ``model`` with a new adapter made from ``peft_config`` (``mixed=True``: a ``PeftMixedModel``)."""
    if revision is not None:
        peft_config.revision = revision
    cls = PeftMixedModel if mixed else PeftModel
    return cls(model, peft_config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
