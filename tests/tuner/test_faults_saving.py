"""A `PeftModel.save_pretrained` of a MemVP adapter that fails part-way -- here on a full disk -- costs nothing: the
folder loads as the previous adapter, in the failed process and in any other once it has exited; while the failed
process still runs, another process is refused with a message instead of loading half of each adapter.

The disk fills for real: the saving process is forked and given a file-size limit (RLIMIT_FSIZE) that the new weights
file exceeds but the config and model card do not, so the write fails inside safetensors / torch.save exactly as on a
full disk. torch.save (`safe_serialization=False`) truncates the old weights file before it writes."""

import multiprocessing
import resource
import signal

import pytest
import torch
from conftest import memvp_config, randomize_memory, tiny_llama
from peft import PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict

OLD_SLOTS, NEW_SLOTS = 8, 4096  # the new weights (2 x 4096 x 32 float32 positions, 1 MiB) do not fit under the limit
FILE_SIZE_LIMIT = 256 * 1024


def _adapter(slots, seed):
    pm = get_peft_model(tiny_llama(), memvp_config(num_memory_slots=slots))
    randomize_memory(pm, seed=seed)
    return pm


def _save_on_a_full_disk(model, folder, safe_serialization, then_load, failed, may_exit):
    """Fail a save as on a full disk; report whether it raised and whether this process then loads the old adapter."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    try:
        model.save_pretrained(folder, safe_serialization=safe_serialization)
    except Exception:
        failed.set()
    may_exit.wait(60)
    if then_load:
        loaded = PeftModel.from_pretrained(tiny_llama(), folder)
        raise SystemExit(0 if loaded.peft_config["default"].num_memory_slots == OLD_SLOTS else 3)


def _assert_old_adapter(folder, old):
    loaded = PeftModel.from_pretrained(tiny_llama(), folder)
    assert loaded.peft_config["default"].num_memory_slots == OLD_SLOTS
    for key, tensor in get_peft_model_state_dict(old).items():
        assert torch.equal(get_peft_model_state_dict(loaded)[key], tensor)


def _failed_save(tmp_path, then_load, safe_serialization=False):
    folder = tmp_path / "adapter"
    old = _adapter(OLD_SLOTS, seed=1)
    old.save_pretrained(folder, safe_serialization=safe_serialization)
    context = multiprocessing.get_context("fork")
    failed, may_exit = context.Event(), context.Event()
    saver = context.Process(target=_save_on_a_full_disk,
                            args=(_adapter(NEW_SLOTS, seed=2), str(folder), safe_serialization, then_load, failed,
                                  may_exit))
    saver.start()
    return folder, old, saver, failed, may_exit


@pytest.mark.parametrize("safe_serialization", [True, False], ids=["safetensors", "bin"])
def test_a_peft_save_that_fails_on_a_full_disk_is_undone_by_the_next_load_of_the_same_process(tmp_path,
                                                                                               safe_serialization):
    folder, old, saver, failed, may_exit = _failed_save(tmp_path, then_load=True, safe_serialization=safe_serialization)
    may_exit.set()
    saver.join(120)
    assert failed.is_set() and saver.exitcode == 0  # the save raised, and that process then loaded the old adapter
    _assert_old_adapter(folder, old)


def test_a_load_while_the_failed_saver_still_runs_is_refused_and_the_old_adapter_loads_once_it_exits(tmp_path):
    folder, old, saver, failed, may_exit = _failed_save(tmp_path, then_load=False)
    try:
        assert failed.wait(120)
        with pytest.raises(ValueError, match=rf"being overwritten by PeftModel.save_pretrained in process {saver.pid}"):
            PeftModel.from_pretrained(tiny_llama(), folder)
    finally:
        may_exit.set()
        saver.join(120)
    _assert_old_adapter(folder, old)
