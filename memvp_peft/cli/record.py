"""`memvp_cli.json`: how `memvp-train` turned images into the adapter's visual input.

The adapter config records the MemVP math; it cannot say whether the images went through an external vision encoder
(and which), a VLM's own tower, or the built-in digit patches, nor how array images were scaled. `memvp-train` writes
that here, next to the adapter, and `memvp-infer` reads it so that it feeds images exactly as training did.
"""

from __future__ import annotations

import json
import os
from typing import Any

CLI_RECORD = "memvp_cli.json"


def write_cli_record(output_dir: str, record: dict[str, Any]) -> None:
    """Write the record atomically (a staged file moved into place): a crash mid-write never leaves a truncated JSON
    that would make every later `memvp-infer` on this adapter fail."""
    path = os.path.join(output_dir, CLI_RECORD)
    staged = f"{path}.tmp-{os.getpid()}"
    try:
        with open(staged, "w") as handle:
            json.dump(record, handle, indent=2)
        os.replace(staged, path)
    finally:
        if os.path.exists(staged):  # the write failed: drop the partial file, keep the previous record
            os.remove(staged)


def read_cli_record(adapter: str) -> dict[str, Any]:
    """The record, or {} for an adapter trained with the Python API (`memvp-infer` then asks for what it needs)."""
    path = os.path.join(adapter, CLI_RECORD)
    if not os.path.isfile(path):
        return {}
    with open(path) as handle:
        return json.load(handle)
