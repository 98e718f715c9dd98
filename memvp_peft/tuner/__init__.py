"""MemVP as a peft tuner: config, visual memory, FFN layers, injection, per-call memory scope, save/load rules.

Importing this package registers the `MEMVP` peft type with peft, exactly as `peft/tuners/lora/__init__.py`
registers LoRA, so `get_peft_model`, `PeftConfig.from_pretrained` and `PeftModel.from_pretrained` dispatch to it.
Nothing else in the process changes: peft's classes are not patched.
"""

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.utils import register_peft_method

from .config import MEMVP_NAME, MEMVP_PEFT_TYPE, MEMVP_STORED_NAME, MemVPConfig
from .layer import FFNMemoryLayer, KeyMemoryLayer, MemVPLayer, ValueMemoryLayer
from .memory import MemoryState, VisualMemory
from .model import MemVPModel, attach_vision_encoder, memvp_parameters


def register_memvp() -> None:
    """Register `MemVPConfig`/`MemVPModel` with peft (idempotent: a second call changes nothing), under the peft type
    and under the self-explaining name `adapter_config.json` stores it as (`config.MEMVP_STORED_NAME`)."""
    if PEFT_TYPE_TO_CONFIG_MAPPING.get(MEMVP_PEFT_TYPE) is not MemVPConfig:
        register_peft_method(
            name=MEMVP_NAME.lower(), config_cls=MemVPConfig, model_cls=MemVPModel, prefix=MemVPModel.prefix
        )
    PEFT_TYPE_TO_CONFIG_MAPPING[MEMVP_STORED_NAME] = MemVPConfig


register_memvp()

__all__ = [
    "FFNMemoryLayer",
    "KeyMemoryLayer",
    "MEMVP_PEFT_TYPE",
    "MemVPConfig",
    "MemVPLayer",
    "MemVPModel",
    "MemoryState",
    "ValueMemoryLayer",
    "VisualMemory",
    "attach_vision_encoder",
    "memvp_parameters",
    "register_memvp",
]
