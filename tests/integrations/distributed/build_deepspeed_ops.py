"""Build (or load from the cache) the DeepSpeed C++ ops that the CPU runs of tests/integrations/test_deepspeed.py
need.

On a CPU-only machine DeepSpeed JIT-compiles, on first use:

* `deepspeed_shm_comm` -- always, when its communication backend starts;
* `fused_adam`         -- the "AdamW" optimizer of zero2.json / zero3.json;
* `cpu_adam`           -- DeepSpeedCPUAdam of zero3_offload.json.

The first build takes minutes on 2 cores (about 3 min for the first two, 2 min for cpu_adam); afterwards they load
from the torch extensions cache (`TORCH_EXTENSIONS_DIR`, default ~/.cache/torch_extensions) in seconds. Building
them here, once and in one process, keeps that cost out of the per-run timeouts of the distributed tests and stops
two ranks from compiling the same op at the same time.

Prints one JSON line: {"op name": seconds, ...}. Exit status 0 when every op loaded.
"""

from __future__ import annotations

import json
import sys
import time

BUILDERS = ("ShareMemCommBuilder", "FusedAdamBuilder", "CPUAdamBuilder")


def main(names: list[str]) -> int:
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    timings = {}
    for name in names:
        builder = accelerator.create_op_builder(name)
        if builder is None:
            timings[name] = None  # this accelerator does not use the op
            continue
        started = time.time()
        builder.load(verbose=False)
        timings[builder.NAME] = round(time.time() - started, 1)
    print(json.dumps({"accelerator": accelerator._name, "ops": timings}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or list(BUILDERS)))
