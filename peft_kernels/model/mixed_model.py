"""``PeftMixedModel``: LoRA, LoHa and LoKr adapters on one model, several active at once (PEFT's mixed model).

PEFT nests one wrapper per adapter type; here every fused layer holds all types, so a mixed batch is still one op.
Unlike PEFT, ``adapter_names=`` works here (PEFT silently ignores it in mixed models).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from peft_kernels.model.peft_model import PeftModel


class PeftMixedModel(PeftModel):
    """Mirrors ``peft.PeftMixedModel``: adapters of different types, ``set_adapter([...])`` activates several.

    ``from_pretrained`` is PeftModel's (it builds ``cls``), so it returns a PeftMixedModel.
    """

    _mixed = True

    def set_adapter(self, adapter_name: str | Sequence[str], inference_mode: bool = False) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        missing = [n for n in names if n not in self.peft_config]
        if missing:
            raise ValueError(f"Adapter(s) {missing} not found, available adapters: {list(self.peft_config)}")
        self.base_model.set_adapter(names, inference_mode=inference_mode)

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(f"Saving is not supported for {type(self).__name__} (yet).")

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        super().load_adapter(model_id, adapter_name, *args, **kwargs)
        self.set_adapter(self.active_adapters)
