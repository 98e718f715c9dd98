"""memvp-train on a full disk: a write that fails is one error line, never a traceback, and never leaves a
`checkpoint-N` that `--resume_from_checkpoint` would pick without its optimizer, scheduler, RNG or trainer state.

The disk fills for real, without root: RLIMIT_FSIZE caps the size of every file the process writes (SIGXFSZ ignored,
so the write fails with EFBIG as it would with ENOSPC). As root a read-only folder cannot be simulated by chmod, and
a read-only output_dir is refused before the run starts anyway (tests/cli/test_train_refusals.py)."""

import contextlib
import resource
import signal
import subprocess
import sys

import pytest
import torch
from process_launch import launcher_env
from safetensors.torch import save_file
from transformers.trainer_utils import get_last_checkpoint

from memvp_peft.cli.visual_input import embedded_corpus
from memvp_peft.cli.run_folder import write_failure
from memvp_peft.cli.train import build_embedded_base
from memvp_peft.cli.train import main as train_main

LIMIT = 150_000  # bytes: the tiny run's adapter (~100 KB) fits, its optimizer state (~210 KB) does not


def _file_size_limit(limit):
    """Make this process's writes beyond `limit` bytes per file fail with EFBIG (soft limit: it can be raised back)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


@contextlib.contextmanager
def _full_disk(limit):
    previous_signal, previous_limit = signal.getsignal(signal.SIGXFSZ), resource.getrlimit(resource.RLIMIT_FSIZE)
    _file_size_limit(limit)
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, previous_limit)
        signal.signal(signal.SIGXFSZ, previous_signal)


def _error_lines(stderr):
    """The CLI's error lines (a progress bar may precede one on its line), after checking there is no traceback."""
    assert "Traceback" not in stderr, stderr[-3000:]
    return [line[line.index("memvp-train: error:"):] for line in stderr.splitlines() if "memvp-train: error:" in line]


def test_failed_writes_of_torch_safetensors_and_the_os_are_told_apart_from_failed_reads(tmp_path):
    big = {"weight": torch.zeros(64 * 1024)}  # 256 KiB
    failures = []
    for write in (lambda: torch.save(big, tmp_path / "a.pt"), lambda: save_file(big, tmp_path / "a.safetensors"),
                  lambda: (tmp_path / "a.txt").write_bytes(b"x" * 100_000)):
        with _full_disk(50_000):
            try:
                write()
            except Exception as error:  # torch: RuntimeError, safetensors: SafetensorError, Python: OSError(EFBIG)
                failures.append(error)
    assert len(failures) == 3 and all(write_failure(error) for error in failures)
    assert write_failure(failures[0]) == "torch.save could not write its file to the end"
    assert "File too large" in write_failure(failures[1]) and "File too large" in write_failure(failures[2])
    with pytest.raises(FileNotFoundError) as missing:
        open(tmp_path / "absent.json")
    assert write_failure(missing.value) is None  # a failed read stays the error it is


@pytest.mark.slow
def test_a_checkpoint_that_does_not_fit_is_one_error_line_and_leaves_the_last_whole_checkpoint_last(tmp_path):
    base, out = tmp_path / "base", tmp_path / "run"
    model, tokenizer = build_embedded_base(0, embedded_corpus("digits"))
    model.save_pretrained(base)  # a base folder, so the run itself writes only checkpoints and the adapter
    tokenizer.save_pretrained(base)
    common = ["--quick", "--save_steps", "2", "--model_name_or_path", str(base), "--output_dir", str(out)]
    assert train_main([*common, "--max_steps", "2"]) == 0
    first = out / "checkpoint-2"
    assert (first / "adapter_model.safetensors").stat().st_size < LIMIT < (first / "optimizer.pt").stat().st_size
    before = {path: path.read_bytes() for path in [out / "adapter_model.safetensors", *first.iterdir()]}

    resumed = subprocess.run(  # the disk fills while checkpoint-4's optimizer state is written
        [sys.executable, "-m", "memvp_peft.cli.train", *common, "--max_steps", "4", "--resume_from_checkpoint",
         str(first)],
        env=launcher_env(), preexec_fn=lambda: _file_size_limit(LIMIT), capture_output=True, text=True, timeout=900,
    )

    assert resumed.returncode == 2, resumed.stderr[-3000:]
    assert "inline_container" not in resumed.stderr
    errors = _error_lines(resumed.stderr)
    assert len(errors) == 1
    assert errors[0].startswith(f"memvp-train: error: could not write checkpoint-4 into {str(out)!r}: ")
    assert "No checkpoint-4 was left" in errors[0]
    assert sorted(path.name for path in out.iterdir() if path.is_dir()) == ["checkpoint-2"]  # no staging left either
    assert get_last_checkpoint(str(out)) == str(first)  # what --resume_from_checkpoint would continue from
    assert all(path.read_bytes() == content for path, content in before.items())  # that checkpoint and the adapter


def test_a_write_that_fails_outside_a_checkpoint_is_one_error_line(tmp_path, capsys):
    out = tmp_path / "run"
    with _full_disk(500_000):  # the embedded base's weights (~1.2 MB), written before training, do not fit
        assert train_main(["--quick", "--max_steps", "2", "--output_dir", str(out)]) == 2
    errors = _error_lines(capsys.readouterr().err)
    assert len(errors) == 1
    assert errors[0].startswith(f"memvp-train: error: writing the run into output_dir {str(out)!r} failed: ")
    assert "File too large" in errors[0]
