"""Adapter-only checkpoints that reload exactly, also in a fresh process and under another adapter name."""

import pytest
import torch
from conftest import assert_fresh_process_reproduces, memvp_config, randomize_memory, tiny_llama
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from memvp_peft.tuner.layer import MemVPLayer


@pytest.fixture
def saved(tmp_path, batch):
    pm = get_peft_model(tiny_llama(), memvp_config())
    randomize_memory(pm)
    pm.eval()
    with torch.no_grad():
        logits = pm(**batch).logits
    pm.save_pretrained(tmp_path / "adapter")
    torch.save({"batch": batch, "logits": logits}, tmp_path / "expected.pt")
    return tmp_path


def test_adapter_file_holds_only_memvp_weights(saved):
    state = load_file(saved / "adapter" / "adapter_model.safetensors")
    assert state and all("memvp_memory" in key for key in state)
    assert not any(".default." in key for key in state)
    assert (saved / "adapter" / "adapter_config.json").exists()
    assert not (saved / "adapter" / "model.safetensors").exists()


def test_reload_reproduces_logits_exactly(saved):
    expected = torch.load(saved / "expected.pt")
    loaded = PeftModel.from_pretrained(tiny_llama(), saved / "adapter").eval()
    with torch.no_grad():
        logits = loaded(**expected["batch"]).logits
    torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=0)


def test_reload_under_another_adapter_name(saved):
    expected = torch.load(saved / "expected.pt")
    loaded = PeftModel.from_pretrained(tiny_llama(), saved / "adapter", adapter_name="vision").eval()
    assert set(loaded.base_model.memvp_memory) == {"vision"}
    with torch.no_grad():
        logits = loaded(**expected["batch"]).logits
    torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=0)


def test_load_adapter_as_second_adapter(saved):
    expected = torch.load(saved / "expected.pt")
    pm = get_peft_model(tiny_llama(), memvp_config())
    pm.load_adapter(saved / "adapter", adapter_name="loaded")
    pm.set_adapter("loaded")
    pm.eval()
    with torch.no_grad():
        logits = pm(**expected["batch"]).logits
    torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=0)


def test_reload_in_a_fresh_process_reproduces_logits(saved, tmp_path):
    expected = torch.load(saved / "expected.pt")
    assert_fresh_process_reproduces(
        tmp_path, "from conftest import tiny_llama", "tiny_llama()", saved / "adapter", expected["batch"],
        expected["logits"],
    )


def test_merge_and_unload_raises_clear_error():
    pm = get_peft_model(tiny_llama(), memvp_config())
    with pytest.raises(ValueError, match="cannot be merged"):
        pm.merge_and_unload()
    with pytest.raises(ValueError, match="cannot be merged"):
        pm.merge_adapter()
    # the model is still usable afterwards
    pm(input_ids=torch.randint(3, 64, (1, 4)), image_features=torch.randn(1, 2, 16))


def test_add_weighted_adapter_is_refused_by_name_and_adds_nothing():
    pm = get_peft_model(tiny_llama(), memvp_config())
    pm.add_adapter("other", memvp_config())
    with pytest.raises(ValueError, match="cannot be combined with add_weighted_adapter"):
        pm.add_weighted_adapter(["default", "other"], [0.5, 0.5], "mix")
    assert set(pm.peft_config) == {"default", "other"} and set(pm.base_model.memvp_memory) == {"default", "other"}


def test_unload_returns_the_untouched_base_model(batch):
    base = tiny_llama()
    reference = {k: v.clone() for k, v in base.state_dict().items()}
    with torch.no_grad():
        expected = base(input_ids=batch["input_ids"]).logits
    pm = get_peft_model(base, memvp_config())
    randomize_memory(pm)
    unloaded = pm.unload()
    assert not any(isinstance(m, MemVPLayer) for m in unloaded.modules())
    assert "forward" not in unloaded.__dict__ and not hasattr(unloaded, "_memvp_runtime")
    assert set(unloaded.state_dict()) == set(reference)
    for key, value in unloaded.state_dict().items():
        assert torch.equal(value, reference[key]), key
    with torch.no_grad():
        torch.testing.assert_close(unloaded(input_ids=batch["input_ids"]).logits, expected)
