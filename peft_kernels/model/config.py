"""``LoraConfig``, ``LoHaConfig``, ``LoKrConfig``: PEFT 0.21.2's fields, defaults and ``adapter_config.json`` format.

Every field PEFT writes is mirrored so a config round-trips through PEFT unchanged. Fields for features the fused
layers do not implement (DoRA, LoRA bias, alternative init schemes, conv decompositions, ...) are accepted only at
their default values; anything else raises ``NotImplementedError`` naming the field, before any model is touched.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

CONFIG_NAME = "adapter_config.json"
# The on-disk format we write is PEFT 0.21.2's; PEFT compares nothing against this field on load.
PEFT_FORMAT_VERSION = "0.21.2"

# PEFT's default targets when target_modules is None (peft.utils.constants, identical for LoRA, LoHa and LoKr).
DEFAULT_TARGET_MODULES: dict[str, list[str] | str] = {
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
    "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "gpt_neo": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "deberta": ["in_proj"],
    "llama": ["q_proj", "v_proj"],
    "llama4": ["q_proj", "v_proj"],
    "gpt_bigcode": ["c_attn"],
    "mpt": ["Wqkv"],
    "falcon": ["query_key_value"],
    "codegen": ["qkv_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "stablelm": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
}


@dataclass
class PeftConfig:
    """Fields common to every adapter config (PEFT's ``PeftConfigMixin`` / ``PeftConfig``)."""

    peft_type_name: ClassVar[str] = ""
    # field name -> the only value the fused layers support (a non-default value raises NotImplementedError)
    unsupported: ClassVar[dict[str, Any]] = {}

    task_type: str | None = None
    peft_type: str | None = None
    auto_mapping: dict | None = None
    peft_version: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False

    def __post_init__(self) -> None:
        self.peft_type = self.peft_type_name
        if self.peft_version is None:
            self.peft_version = PEFT_FORMAT_VERSION
        tm = getattr(self, "target_modules", None)
        if isinstance(tm, list):
            self.target_modules = set(tm)
        em = getattr(self, "exclude_modules", None)
        if isinstance(em, list):
            self.exclude_modules = set(em)
        if getattr(self, "layers_pattern", None) and getattr(self, "layers_to_transform", None) is None:
            raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified. ")
        if isinstance(tm, str) and getattr(self, "layers_to_transform", None) is not None:
            raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a str.")

    # ------------------------------------------------------------------------------------------------ checking
    def check_supported(self) -> None:
        """Raise NotImplementedError naming the first field set to a feature peft_kernels does not implement."""
        for name, ok in self.unsupported.items():
            value = getattr(self, name)
            if value != ok and not (ok is None and value in ({}, [], False)):
                raise NotImplementedError(
                    f"{type(self).__name__}.{name}={value!r} is not supported by peft_kernels "
                    f"(supported: {ok!r}); load this adapter with the real peft instead"
                )

    # ------------------------------------------------------------------------------------------------------ io
    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for k, v in out.items():
            if isinstance(v, set):
                out[k] = sorted(v)
        return out

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Write ``adapter_config.json`` exactly as PEFT does (sorted keys, indent 2, inference_mode true)."""
        if os.path.isfile(save_directory):
            raise AssertionError(f"Provided path ({save_directory}) should be a directory, not a file")
        os.makedirs(save_directory, exist_ok=True)
        out = self.to_dict()
        out["inference_mode"] = True
        if kwargs.get("auto_mapping_dict") is not None:
            out["auto_mapping"] = kwargs["auto_mapping_dict"]
        with open(os.path.join(save_directory, CONFIG_NAME), "w") as f:
            f.write(json.dumps(out, indent=2, sort_keys=True))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> PeftConfig:
        """The config class ``data['peft_type']`` names (``cls`` if absent). Unknown keys are dropped with a warning,
        as PEFT does, so newer files load."""
        data = dict(data)
        peft_type = data.get("peft_type")
        target_cls = cls
        if peft_type is None and cls is PeftConfig:
            raise ValueError(f"{source}: no 'peft_type' field; cannot tell which adapter method this is")
        if peft_type is not None:
            if peft_type not in CONFIG_CLASSES:
                raise NotImplementedError(
                    f"{source}: peft_type {peft_type!r} is not supported by peft_kernels "
                    f"(supported: {', '.join(CONFIG_CLASSES)})"
                )
            target_cls = CONFIG_CLASSES[peft_type]
            if cls is not PeftConfig and target_cls is not cls:
                raise ValueError(f"{source}: peft_type {peft_type!r} does not match {cls.__name__}")
        known = {f.name for f in fields(target_cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            warnings.warn(f"{source}: unexpected keys dropped: {', '.join(unknown)}", stacklevel=2)
        return target_cls(**{k: v for k, v in data.items() if k in known and k != "peft_type"})

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None, **kwargs):
        path = (
            os.path.join(pretrained_model_name_or_path, subfolder) if subfolder else str(pretrained_model_name_or_path)
        )
        file = os.path.join(path, CONFIG_NAME)
        if not os.path.isfile(file):
            raise ValueError(f"Can't find '{CONFIG_NAME}' at '{path}' (peft_kernels loads local directories only)")
        try:
            with open(file) as f:
                data = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{file}: not valid JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise ValueError(f"{file}: expected a JSON object, got {type(data).__name__}")
        data.update(kwargs)
        return cls.from_dict(data, source=file)


@dataclass
class LoraConfig(PeftConfig):
    """PEFT's ``LoraConfig`` (0.21.2 fields and defaults)."""

    peft_type_name: ClassVar[str] = "LORA"
    unsupported: ClassVar[dict[str, Any]] = {
        "use_dora": False,
        "lora_bias": False,
        "megatron_config": None,
        "trainable_token_indices": None,
        "eva_config": None,
        "corda_config": None,
        "lora_ga_config": None,
        "velora_config": None,
        "alora_invocation_tokens": None,
        "use_qalora": False,
        "monteclora_config": None,
        "layer_replication": None,
        "target_parameters": None,
        "use_bdlora": None,
        "arrow_config": None,
        "kasa_config": None,
    }

    r: int = 8
    target_modules: list[str] | set[str] | str | None = None
    exclude_modules: list[str] | set[str] | str | None = None
    lora_alpha: int | float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    init_lora_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    megatron_config: dict | None = None
    megatron_core: str | None = "megatron.core"
    trainable_token_indices: Any = None
    loftq_config: dict = field(default_factory=dict)
    eva_config: Any = None
    corda_config: Any = None
    lora_ga_config: Any = None
    use_dora: bool = False
    velora_config: Any = None
    alora_invocation_tokens: list[int] | None = None
    use_qalora: bool = False
    qalora_group_size: int = 16
    monteclora_config: Any = None
    layer_replication: list | None = None
    lora_bias: bool = False
    target_parameters: list[str] | None = None
    use_bdlora: Any = None
    arrow_config: Any = None
    kasa_config: Any = None
    ensure_weight_tying: bool = False

    def check_supported(self) -> None:
        super().check_supported()
        if self.bias != "none":
            raise NotImplementedError(f"LoraConfig.bias={self.bias!r} is not supported by peft_kernels (only 'none')")
        if self.loftq_config:
            raise NotImplementedError("LoraConfig.loftq_config is not supported by peft_kernels")
        if self.init_lora_weights not in (True, False) and str(self.init_lora_weights).lower() != "gaussian":
            raise NotImplementedError(
                f"LoraConfig.init_lora_weights={self.init_lora_weights!r} is not supported by peft_kernels "
                "(True, False or 'gaussian'); initialise with peft and load the saved adapter"
            )


@dataclass
class _LycorisConfig(PeftConfig):
    unsupported: ClassVar[dict[str, Any]] = {"use_effective_conv2d": False}

    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    r: int = 8
    alpha: int | float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False


@dataclass
class LoHaConfig(_LycorisConfig):
    """PEFT's ``LoHaConfig`` (0.21.2 fields and defaults)."""

    peft_type_name: ClassVar[str] = "LOHA"

    target_modules: list[str] | set[str] | str | None = None
    exclude_modules: list[str] | set[str] | str | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None


@dataclass
class LoKrConfig(_LycorisConfig):
    """PEFT's ``LoKrConfig`` (0.21.2 fields and defaults)."""

    peft_type_name: ClassVar[str] = "LOKR"

    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False
    target_modules: list[str] | set[str] | str | None = None
    exclude_modules: list[str] | set[str] | str | None = None
    init_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None


CONFIG_CLASSES: dict[str, type[PeftConfig]] = {"LORA": LoraConfig, "LOHA": LoHaConfig, "LOKR": LoKrConfig}
