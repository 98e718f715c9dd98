"""The console scripts `memvp-train`, `memvp-infer`, `memvp-bench` and `memvp-serve`: quiet what other libraries
print that a user cannot act on, then run the program (`memvp_peft.cli.train`, `memvp_peft.cli.infer`,
`memvp_peft.bench`, `memvp_peft.serving.launch`).

Why a package beside `memvp_peft` rather than inside it: part of that output comes while `memvp_peft` imports --
`import peft` imports bitsandbytes, which on a CPU with AVX-512 BF16 asks the Hugging Face kernel hub for a kernel
and logs the kernel hub's trust check and the failed load -- and any module inside `memvp_peft` imports the package
(and so peft) first. The quieting is the programs' alone: `import memvp_peft` changes no logging or warning filter,
and this module imports nothing of `memvp_peft` before it has run.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Callable, Optional

#: logger -> the beginnings of the messages it logs that are dropped: nothing a user of the programs can act on.
#: bitsandbytes (at import, on CPUs with AVX-512 BF16): its optional CPU 4-bit kernel from the kernel hub could not
#: be had (no connection, offline, not cached); the kernel hub's note that it cannot check the publisher offline;
#: DeepSpeed's guess at the accelerator on a machine without a GPU, from its first `get_accelerator()`.
DROPPED_LOG_MESSAGES = {
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community",),
    "kernels._internals.hf_hub": ("Skipping publisher trust check",),
    "DeepSpeed": ("Setting accelerator to CPU",),
}
#: transformers' progress bars over the weight files of a model it loads or saves (the local tiny bases' in
#: fractions of a second); downloads keep their bars (huggingface_hub's), and so does training
DROPPED_PROGRESS_BARS = ("Loading weights", "Writing model shards")


class _DropMessages(logging.Filter):
    """Drops a logger's records whose message begins with one of `beginnings`; every other record passes."""

    def __init__(self, beginnings: tuple[str, ...]) -> None:
        super().__init__()
        self.beginnings = beginnings

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.beginnings)


def _without_weight_file_bars(factory: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                              previous: Optional[Callable[..., Any]]) -> Any:
    from transformers.utils.logging import EmptyTqdm

    if kwargs.get("desc") in DROPPED_PROGRESS_BARS:
        return EmptyTqdm(*args, **kwargs)
    return previous(factory, args, kwargs) if previous is not None else factory(*args, **kwargs)


_quieted = False


def quiet_third_party_output() -> None:
    """Drop the messages of `DROPPED_LOG_MESSAGES`, peft's FutureWarnings (about peft's own use of other libraries)
    and transformers' `DROPPED_PROGRESS_BARS`, for this process; once. Everything else -- memvp_peft's warnings
    included -- is shown as before."""
    global _quieted
    if _quieted:
        return
    _quieted = True
    for name, beginnings in DROPPED_LOG_MESSAGES.items():
        logging.getLogger(name).addFilter(_DropMessages(beginnings))  # the logger the library creates later
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"peft(\.|$)")
    from transformers.utils import logging as transformers_logging

    previous = transformers_logging.set_tqdm_hook(None)
    transformers_logging.set_tqdm_hook(
        lambda factory, args, kwargs: _without_weight_file_bars(factory, args, kwargs, previous))


def train() -> int:
    """`memvp-train`."""
    quiet_third_party_output()
    from memvp_peft.cli.train import main

    return main()


def infer() -> int:
    """`memvp-infer`."""
    quiet_third_party_output()
    from memvp_peft.cli.infer import main

    return main()


def bench() -> None:
    """`memvp-bench`."""
    quiet_third_party_output()
    from memvp_peft.bench import main

    main()


def serve() -> int:
    """`memvp-serve` (vLLM's OpenAI-compatible server with a MemVP adapter; needs the `vllm` extra)."""
    quiet_third_party_output()
    from memvp_peft.serving.launch import main

    return main()
