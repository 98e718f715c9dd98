"""Processing for MemVP in the transformers/TRL stack: `MemVPProcessor`, a `ProcessorMixin` for a tokenizer and an
image processor (a VLM's own pair, or a language model's tokenizer with a separate CLIP/SigLIP encoder's processor).

Importing this package registers `MemVPProcessor` with `AutoProcessor`, so `AutoProcessor.from_pretrained` of a folder
a MemVPProcessor saved returns one (after `import memvp_peft`, as for the adapter itself).
"""

from .registration import register_memvp_processor
from .processor import MemVPProcessor

register_memvp_processor()

__all__ = ["MemVPProcessor", "register_memvp_processor"]
