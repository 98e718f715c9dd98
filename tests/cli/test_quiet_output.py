"""The console scripts print what a user can act on: other libraries' notes about themselves are dropped, the
package's own warnings and the training progress stay. The scripts run as pip installs them: `memvp_peft_console`'s
entry functions, in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from memvp_peft_console import DROPPED_PROGRESS_BARS

ACCELERATOR_GUESS = "Setting accelerator to CPU"


def _console(program: str, *argv: str, cwd) -> subprocess.CompletedProcess:
    """`program` (train, infer) as its console script runs it."""
    code = f"import sys; from memvp_peft_console import {program}; sys.exit({program}())"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=900, cwd=cwd,
                          env=env)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("quiet")
    done = _console("train", "--quick", "--max_steps", "4", "--output_dir", "run", cwd=folder)
    assert done.returncode == 0, done.stderr[-3000:]
    return folder, done


@pytest.mark.slow
def test_memvp_train_drops_the_accelerator_guess_and_weight_file_bars(quick_run):
    _, done = quick_run
    printed = done.stdout + done.stderr
    assert ACCELERATOR_GUESS not in printed
    assert not [bar for bar in DROPPED_PROGRESS_BARS if bar in printed]


@pytest.mark.slow
def test_memvp_train_keeps_its_progress_and_loss_lines(quick_run):
    _, done = quick_run
    assert "step      4/4  loss" in done.stdout and "4/4 [" in done.stderr  # the loss line and the Trainer's bar


@pytest.mark.slow
def test_memvp_infer_keeps_the_packages_own_warnings(quick_run):
    folder, _ = quick_run
    config_path = folder / "run" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["num_memory_slot"] = 8  # a typo memvp_peft warns about when the adapter loads
    config_path.write_text(json.dumps(config))
    done = _console("infer", "--adapter", "run", "--image", "digits:3", cwd=folder)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "adapter_config.json holds keys MemVPConfig does not know, ignored: 'num_memory_slot'" in done.stderr
    assert ACCELERATOR_GUESS not in done.stdout + done.stderr and "Loading weights" not in done.stderr


def test_the_kernel_hub_notes_bitsandbytes_logs_at_import_are_dropped_and_its_other_warnings_kept():
    """What bitsandbytes and the kernel hub log while `import peft` imports bitsandbytes on a CPU with AVX-512 BF16
    (not this one, so the records are logged here by hand, under the loggers and in the words the libraries use)."""
    code = textwrap.dedent("""
        import logging
        from memvp_peft_console import quiet_third_party_output
        quiet_third_party_output()
        import memvp_peft
        logging.getLogger("kernels._internals.hf_hub").warning(
            "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' because Hugging Face "
            "Hub is in offline mode.")
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
            "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already `pip "
            "install kernels` and the kernels >= 0.11.1", ValueError("not trusted"))
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning("another bitsandbytes warning")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "publisher trust" not in done.stderr and "gemm_4bit_forward" not in done.stderr
    assert "another bitsandbytes warning" in done.stderr
