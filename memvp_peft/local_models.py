"""A shim for the `memvp_peft.local_models` import path of user code and notebooks: the tiny demo models, tokenizers
and image processor live in :mod:`memvp_peft.demo_models` and are re-exported here unchanged."""

from .demo_models import *  # noqa: F401,F403
from .demo_models import __all__  # noqa: F401
