"""`leave_process_group` / `run_then_leave_process_group`: how a launched memvp-train / recipe process leaves
torch.distributed.

The two-process behaviour (a rank that finishes early no longer aborts with "terminate called without an active
exception") is exercised by
tests/integrations/test_deepspeed.py::test_memvp_train_under_zero3_trains_saves_and_answers; these tests pin the
single-process contract that makes it safe to call unconditionally.
"""


import pytest
import torch

from memvp_peft.distributed import leave_process_group, run_then_leave_process_group
from process_launch import free_port


def test_leave_process_group_destroys_a_joined_group():
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        assert torch.distributed.is_initialized()
        leave_process_group()
        assert not torch.distributed.is_initialized()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def test_leave_process_group_is_a_no_op_outside_a_distributed_run():
    assert not torch.distributed.is_initialized()
    leave_process_group()
    assert not torch.distributed.is_initialized()


def test_memvp_train_leaves_the_process_group_even_when_the_options_are_rejected(capsys):
    from memvp_peft.cli.train import main

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        assert main(["--quick", "--lora_rank", "-1", "--output_dir", "/nonexistent/never"]) == 2
        assert not torch.distributed.is_initialized()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _join_one_process_group() -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)


def test_a_recipe_main_that_returns_leaves_the_group_and_passes_its_result_on():
    _join_one_process_group()
    try:
        assert run_then_leave_process_group(lambda: 7) == 7
        assert not torch.distributed.is_initialized()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def test_a_recipe_main_that_raises_leaves_the_group_and_the_error_propagates():
    def failing_main():
        raise RuntimeError("rank failed")

    _join_one_process_group()
    try:
        with pytest.raises(RuntimeError, match="rank failed"):
            run_then_leave_process_group(failing_main)
        assert not torch.distributed.is_initialized()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
