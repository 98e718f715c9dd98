"""`register()`: memvp-peft's vLLM plugin, run by vLLM in each of its processes through the `vllm.general_plugins`
entry point (pyproject.toml).

It registers the MemVP model classes by name -- `MemVPLlamaForCausalLM`, `MemVPMistralForCausalLM`,
`MemVPQwen2ForCausalLM`, `MemVPQwen3ForCausalLM` -- lazily (vLLM imports `memvp_peft.serving.model` only where a
model is built or inspected), and installs the runner hook (`runner_hook.py`) in processes that run a model. A model
is served with MemVP only when asked: `--hf-overrides '{"architectures": ["MemVPLlamaForCausalLM"],
"memvp_adapter": "<adapter folder>"}'` (what `memvp-serve` passes); every other model vLLM serves is untouched.

On a vLLM release the hook was not tested with, `register()` only logs: vLLM calls every installed plugin, and a
plugin that raised would stop vLLM from serving anything. The refusal then comes where it matters -- when a MemVP
model is built (the model class installs the hook itself, which raises).
"""

from __future__ import annotations

import logging

from .model import BASES, memvp_architecture
from .runner_hook import TESTED_VLLM, check_vllm_version, install_runner_hook

logger = logging.getLogger(__name__)

_registered = False


def register() -> None:
    """Register the MemVP model classes and install the runner hook (idempotent)."""
    global _registered
    if _registered:
        return
    import vllm
    from vllm import ModelRegistry

    try:
        check_vllm_version(vllm.__version__)
    except RuntimeError as error:
        logger.warning("%s MemVP models are not registered.", error)
        return
    for base in BASES:
        name = memvp_architecture(base)
        if name not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(name, f"memvp_peft.serving.model:{name}")
    install_runner_hook()
    _registered = True


__all__ = ["register", "TESTED_VLLM"]
