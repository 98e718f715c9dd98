"""Shim for `python -m memvp_peft.convert`: the authors' checkpoint converter, which lives in `memvp_peft.cli.convert`.

Why this module exists: `python -m memvp_peft.convert checkpoint.pth output_dir` is the documented command that turns
the MemVP and ADEM-VL authors' released `.pth` into a peft adapter folder (docs/vision.md, docs/scienceqa.md); the
program sits with the other command-line programs in `memvp_peft.cli`. `convert_authors_checkpoint`, its Python form,
is importable from here too.
"""

import sys

from .cli.convert import convert_authors_checkpoint, main

__all__ = ["convert_authors_checkpoint", "main"]

if __name__ == "__main__":
    sys.exit(main())
