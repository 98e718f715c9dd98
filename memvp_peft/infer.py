"""Shim for `python -m memvp_peft.infer`: the same program as `memvp-infer`, which lives in `memvp_peft.cli.infer`.

Why this module exists: `python -m memvp_peft.infer` is the documented way to run inference without the console script
(from a source checkout, where no console script is installed); the short path keeps that command as short as the
console script's name.
"""

import sys

from .cli.infer import main

if __name__ == "__main__":
    from memvp_peft_console import quiet_third_party_output

    quiet_third_party_output()  # as `memvp-infer` does (what peft printed while this package imported is out already)
    sys.exit(main())
