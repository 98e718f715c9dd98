"""A shim kept for the `memvp_peft.local_models` import path that earlier docs and user code use: the tiny demo
models, tokenizers and image processor live in :mod:`memvp_peft.demo_models`, re-exported here unchanged."""

from .demo_models import *  # noqa: F401,F403
from .demo_models import __all__  # noqa: F401
