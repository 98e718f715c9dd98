"""memvp-peft: Memory-Space Visual Prompting (MemVP, ICML 2024) as a peft tuner.

`import memvp_peft` registers the `MEMVP` peft type (and changes nothing else in peft), after which the usual peft
entry points work:

    from peft import get_peft_model, PeftModel
    from memvp_peft import MemVPConfig

    pm = get_peft_model(model, MemVPConfig(visual_dim=1024, num_memory_slots=320))
    out = pm(input_ids=ids, attention_mask=am, labels=labels, image_features=feats)

Loading a saved MemVP adapter requires this import first; without it peft raises `KeyError: 'MEMVP'`.

The package reads like the data flow: `vision` (frozen encoder -> patch features), `tuner` (the peft tuner: config,
runtime, visual inputs, memory, layers, injection), `data` (records -> batches), `tasks` (the command line's datasets),
`processing` and `trainers` (TRL's trainers), `cli` (memvp-train / memvp-infer / the checkpoint converter) and `bench`
(memvp-bench). docs/architecture.md draws the map and an image's path through it.
"""

from .tuner import (
    MEMVP_PEFT_TYPE,
    FFNMemoryLayer,
    KeyMemoryLayer,
    MemoryState,
    MemVPConfig,
    MemVPLayer,
    MemVPModel,
    ValueMemoryLayer,
    VisualMemory,
    attach_vision_encoder,
    memvp_parameters,
    register_memvp,
)
from .tuner import __all__ as _tuner_names
from .tuner.save_load import save_adapter
from .finite_training import NonFiniteTrainingError, StopOnNonFinite
from .processing import MemVPProcessor

__version__ = "0.1.0"

__all__ = [*_tuner_names, "save_adapter", "MemVPProcessor", "StopOnNonFinite", "NonFiniteTrainingError",
           "MemVPSFTTrainer", "MemVPDPOTrainer"]

_TRL_TRAINERS = ("MemVPSFTTrainer", "MemVPDPOTrainer")


def __getattr__(name: str):
    """The TRL trainers load on first use: `trl` is an optional extra, and `import memvp_peft` must not need it."""
    if name in _TRL_TRAINERS:
        from . import trainers

        return getattr(trainers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
