"""An interrupted or bad save never replaces a good adapter; bad adapter files fail loudly, naming the file.

`memvp_peft.save_adapter` (and a model made `atomic_saves`) stages the save; plain `PeftModel.save_pretrained` is
peft's own, but MemVP's tuner hooks still refuse partitioned tensors before it writes and strict shapes on load."""

import os

import pytest
import torch
from conftest import memvp_config, randomize_memory, tiny_llama
from peft import PeftModel, get_peft_model

from memvp_peft import save_adapter
from memvp_peft.tuner.save_load import atomic_saves, check_adapter_folder


@pytest.fixture
def good(tmp_path, batch):
    pm = get_peft_model(tiny_llama(), memvp_config())
    randomize_memory(pm, seed=1)
    save_adapter(pm, tmp_path)
    with torch.no_grad():
        logits = pm.eval()(**batch).logits
    return tmp_path, logits


def _reload_logits(path, batch):
    with torch.no_grad():
        return PeftModel.from_pretrained(tiny_llama(), path).eval()(**batch).logits


def test_save_leaves_no_staging_folder(good):
    path, _ = good
    assert sorted(os.listdir(path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]


def test_crash_mid_save_keeps_previous_adapter(good, batch, monkeypatch):
    path, logits = good
    pm = get_peft_model(tiny_llama(), memvp_config())
    randomize_memory(pm, seed=2)
    import peft.peft_model

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"\x00partial")
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(peft.peft_model, "safe_save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(pm, path)
    monkeypatch.undo()
    assert not [n for n in os.listdir(path) if n.startswith(".memvp-saving-")]
    torch.testing.assert_close(_reload_logits(path, batch), logits, rtol=0, atol=0)


def test_overwriting_save_replaces_the_adapter(good, batch):
    path, old = good
    pm = get_peft_model(tiny_llama(), memvp_config())
    randomize_memory(pm, seed=3)
    save_adapter(pm, path)
    with torch.no_grad():
        expected = pm.eval()(**batch).logits
    new = _reload_logits(path, batch)
    torch.testing.assert_close(new, expected, rtol=0, atol=0)
    assert not torch.equal(new, old)


def test_partitioned_empty_tensors_are_refused_and_previous_adapter_kept(good, batch):
    path, logits = good
    pm = get_peft_model(tiny_llama(), memvp_config())
    memory = pm.base_model.memvp_memory["default"]
    memory.key_pos.data = torch.empty(0)  # what an unconsolidated ZeRO-3 rank holds
    with pytest.raises(ValueError, match="0 elements"):
        pm.save_pretrained(path)
    torch.testing.assert_close(_reload_logits(path, batch), logits, rtol=0, atol=0)


def test_only_rank_zero_writes(tmp_path, monkeypatch):
    pm = get_peft_model(tiny_llama(), memvp_config())
    monkeypatch.setenv("RANK", "1")
    save_adapter(pm, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()
    save_adapter(pm, tmp_path / "adapter2", is_main_process=False)
    assert not (tmp_path / "adapter2").exists()


def test_truncated_adapter_file_is_named_in_the_error(good):
    path, _ = good
    weights = path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors is truncated"):
        check_adapter_folder(str(path))


def test_truncated_adapter_file_fails_to_load(good):
    path, _ = good
    weights = path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(Exception, match="(?i)header|deserializ"):
        PeftModel.from_pretrained(tiny_llama(), path)


def test_missing_weights_file_is_reported(good):
    path, _ = good
    (path / "adapter_model.safetensors").unlink()
    with pytest.raises(ValueError, match="has no adapter_model.safetensors"):
        check_adapter_folder(str(path))


def test_atomic_saves_stages_the_save_of_that_instance_only(good, batch, monkeypatch):
    path, logits = good
    pm = atomic_saves(get_peft_model(tiny_llama(), memvp_config()))
    other = get_peft_model(tiny_llama(), memvp_config())
    assert "save_pretrained" in vars(pm) and "save_pretrained" not in vars(other)
    import peft.peft_model

    def crash(tensors, filename, metadata=None):
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(peft.peft_model, "safe_save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        pm.save_pretrained(path)
    monkeypatch.undo()
    assert not [n for n in os.listdir(path) if n.startswith(".memvp-saving-")]
    torch.testing.assert_close(_reload_logits(path, batch), logits, rtol=0, atol=0)


def test_adapter_for_another_base_is_rejected_with_shapes(good):
    path, _ = good
    with pytest.raises(ValueError, match=r"shape \(8, 32\).*expects \(8, 48\)"):
        PeftModel.from_pretrained(tiny_llama(hidden_size=48), path)


def test_checkpoint_missing_a_tensor_is_rejected(good):
    from safetensors.torch import load_file, save_file

    path, _ = good
    weights = path / "adapter_model.safetensors"
    state = load_file(weights)
    state.pop(next(k for k in state if k.endswith("value_pos")))
    save_file(state, weights)
    with pytest.raises(ValueError, match="lacks 1 tensor"):
        PeftModel.from_pretrained(tiny_llama(), path)


def test_crash_mid_cli_record_write_keeps_the_previous_record(tmp_path):
    from memvp_peft.cli.record import read_cli_record, write_cli_record

    write_cli_record(str(tmp_path), {"featurizer": "digit_patches", "kind": "causal"})
    with pytest.raises(TypeError):  # json.dump fails half-way through: an object it cannot serialise
        write_cli_record(str(tmp_path), {"kind": "causal", "vision_model_name_or_path": object()})
    assert read_cli_record(str(tmp_path)) == {"featurizer": "digit_patches", "kind": "causal"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memvp_cli.json"]  # no partial file left behind
