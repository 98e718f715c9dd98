"""memvp-peft: Memory-Space Visual Prompting (MemVP, ICML 2024) as a peft tuner.

`import memvp_peft` registers the `MEMVP` peft type, after which the usual peft entry points work:

    from peft import get_peft_model, PeftModel
    from memvp_peft import MemVPConfig

    pm = get_peft_model(model, MemVPConfig(visual_dim=1024, num_memory_slots=320))
    out = pm(input_ids=ids, attention_mask=am, labels=labels, image_features=feats)

Loading a saved MemVP adapter requires this import first; without it peft raises `KeyError: 'MEMVP'`.
"""

from .registration import MEMVP_PEFT_TYPE, register_memvp
from . import checkpoint_io
from .config import MemVPConfig
from .layer import FFNMemoryLayer, KeyMemoryLayer, MemVPLayer, ValueMemoryLayer
from .model import MemVPModel, attach_vision_encoder, memvp_parameters
from .visual_memory import MemoryState, VisualMemory

register_memvp()
checkpoint_io.install()

__version__ = "0.1.0"

__all__ = [
    "MEMVP_PEFT_TYPE",
    "FFNMemoryLayer",
    "KeyMemoryLayer",
    "MemVPConfig",
    "MemVPLayer",
    "MemVPModel",
    "MemoryState",
    "ValueMemoryLayer",
    "VisualMemory",
    "attach_vision_encoder",
    "memvp_parameters",
]
