"""What a run ran on (package versions, load average, processor name), recorded in every report's meta.

Timings mean little without the machine and its load, so each report carries them next to the numbers.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Optional


def package_version(package: str) -> Optional[str]:
    """The installed version of `package`, or None where its metadata is missing."""
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:  # pragma: no cover
        return None


def load_average() -> Optional[list[float]]:
    """The 1/5/15-minute load average (None where the platform has none): how busy the machine was."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):  # pragma: no cover
        return None


def cpu_name() -> str:
    """The processor's model name (from /proc/cpuinfo on Linux, else what `platform` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
