"""`python -m memvp_peft.train`: the same program as `memvp-train` (which lives in `memvp_peft.cli.train`).

Why this module exists: `python -m memvp_peft.train` and `torchrun -m memvp_peft.train` are the documented ways to run
training without the console script (from a source checkout, under a launcher), and they keep working after the
command-line code moved into `memvp_peft.cli`.
"""

import sys

from .cli.train import main

if __name__ == "__main__":
    from memvp_peft_console import quiet_third_party_output

    quiet_third_party_output()  # as `memvp-train` does (what peft printed while this package imported is out already)
    sys.exit(main())
