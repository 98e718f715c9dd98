"""SIGKILL at random moments of a save over an adapter of another shape, and of the load that follows it: the folder
always loads as exactly the old or exactly the new adapter, and the next save leaves no staging leftovers behind.

The saving process is forked from the test process (nothing to import again, so each kill costs a fraction of a
second) and saves two adapters of different `num_memory_slots` over each other in a loop until it is killed. Then a
forked process starts loading the folder -- which first finishes or undoes the interrupted save -- and is killed too,
within the first milliseconds: often in the middle of that recovery (its base model is built before the fork). The
folder is then loaded with plain `PeftModel.from_pretrained` and compared, tensor by tensor, with the adapter its
config names. Three ways through a save are covered: peft's own `PeftModel.save_pretrained` (in place, made kill-safe
by the tuner's hooks), and `save_adapter`'s swap of the whole folder (the usual one) and its journalled in-place move
(used when the saving process works inside the folder)."""

import json
import multiprocessing
import os
import random

import pytest
import torch
from conftest import memvp_config, randomize_memory, tiny_llama
from peft import PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict

from memvp_peft import save_adapter

KILLS = 50
OLD_SLOTS, NEW_SLOTS = 8, 16


def _adapter(slots, seed):
    pm = get_peft_model(tiny_llama(), memvp_config(num_memory_slots=slots))
    randomize_memory(pm, seed=seed)
    return pm


def _save_forever(models, folder, way):
    torch.set_num_threads(1)
    if way == "journal_in_place":
        os.chdir(folder)
    while True:
        for model in models:
            if way == "peft_save_pretrained":
                model.save_pretrained(folder)
            else:
                save_adapter(model, folder)


def _load(base, folder):
    torch.set_num_threads(1)
    PeftModel.from_pretrained(base, folder)


def _leftovers(folder):
    inside = [name for name in os.listdir(folder) if name.startswith(".memvp") or ".memvp-" in name]
    beside = [name for name in os.listdir(os.path.dirname(folder)) if ".memvp-" in name]
    return inside + beside


def _load_exactly_one_of(folder, references):
    """Load `folder` as a user would and require the tensors of the adapter its config names; return its slots."""
    loaded = PeftModel.from_pretrained(tiny_llama(), folder)
    slots = loaded.peft_config["default"].num_memory_slots
    expected, state = references[slots], get_peft_model_state_dict(loaded)
    assert sorted(state) == sorted(expected)
    for key, tensor in expected.items():
        assert torch.equal(state[key], tensor), f"{key} of the {slots}-slot adapter differs after a kill"
    with open(os.path.join(folder, "adapter_config.json")) as handle:
        assert json.load(handle)["num_memory_slots"] == slots
    return slots


@pytest.mark.slow
@pytest.mark.parametrize("way", ["peft_save_pretrained", "folder_swap", "journal_in_place"])
def test_sigkill_mid_save_or_mid_recovery_leaves_exactly_the_old_or_the_new_adapter(tmp_path, way):
    folder = str(tmp_path / "adapter")
    old, new = _adapter(OLD_SLOTS, seed=1), _adapter(NEW_SLOTS, seed=2)
    references = {OLD_SLOTS: get_peft_model_state_dict(old), NEW_SLOTS: get_peft_model_state_dict(new)}
    save_adapter(old, folder)
    (tmp_path / "adapter" / "notes.txt").write_text("kept")  # the user's files and folders survive every save
    (tmp_path / "adapter" / "checkpoint-1").mkdir()
    (tmp_path / "adapter" / "checkpoint-1" / "trainer_state.json").write_text("{}")
    base = tiny_llama()  # for the loads that are killed: built before they start, so they reach the recovery at once
    rng = random.Random(12)
    seen, mid_save = set(), 0
    context = multiprocessing.get_context("fork")
    for _ in range(KILLS):
        saver = context.Process(target=_save_forever, args=([new, old], folder, way), daemon=True)
        saver.start()
        saver.join(rng.uniform(0.02, 0.4))
        saver.kill()  # SIGKILL: no finally, no cleanup
        saver.join()
        mid_save += bool(_leftovers(folder))
        loader = context.Process(target=_load, args=(base, folder), daemon=True)  # killed in its recovery, or before
        loader.start()
        loader.join(rng.uniform(0.0, 0.02))
        loader.kill()
        loader.join()
        seen.add(_load_exactly_one_of(folder, references))
        assert (tmp_path / "adapter" / "notes.txt").read_text() == "kept"
        assert (tmp_path / "adapter" / "checkpoint-1" / "trainer_state.json").read_text() == "{}"
    assert seen == {OLD_SLOTS, NEW_SLOTS}  # the kills did land on both sides of the switch
    assert mid_save > 0  # and in the middle of saves, not only between them
    save_adapter(new, folder)
    assert _leftovers(folder) == []
    assert _load_exactly_one_of(folder, references) == NEW_SLOTS
