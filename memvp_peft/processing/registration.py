"""`AutoProcessor` finds the class a `processor_config.json` names among transformers' own processors and those
registered with `AutoProcessor.register(config_class, processor_class)`.

Registration is keyed by a model config class: that key is also how `AutoProcessor` picks a processor for a folder
whose files name none (by `type(config)`). MemVP is not a model, so the key here is `MemVPProcessorConfig`, a config
class no checkpoint has: the registration makes the name `MemVPProcessor` resolvable and changes the processor
`AutoProcessor` chooses for no model.
"""

from __future__ import annotations

from transformers import AutoProcessor, PreTrainedConfig


class MemVPProcessorConfig(PreTrainedConfig):
    """The registration key of `MemVPProcessor` (see the module docstring); never instantiated by a checkpoint."""

    model_type = "memvp_processor"


def register_memvp_processor() -> None:
    """Make `AutoProcessor.from_pretrained` resolve `"processor_class": "MemVPProcessor"` (idempotent)."""
    from .processor import MemVPProcessor

    AutoProcessor.register(MemVPProcessorConfig, MemVPProcessor, exist_ok=True)
