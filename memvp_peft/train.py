"""Shim for `python -m memvp_peft.train`: the same program as `memvp-train`, which lives in `memvp_peft.cli.train`.

Why this module exists: `python -m memvp_peft.train` and `torchrun -m memvp_peft.train` are the documented ways to run
training without the console script -- from a source checkout, where no console script is installed, and under a
launcher, which starts a module rather than a script (docs/training.md, docs/scaling.md). The short path keeps those
commands as short as the console script's name.
"""

import sys

from .cli.train import main

if __name__ == "__main__":
    from memvp_peft_console import quiet_third_party_output

    quiet_third_party_output()  # as `memvp-train` does (what peft printed while this package imported is out already)
    sys.exit(main())
