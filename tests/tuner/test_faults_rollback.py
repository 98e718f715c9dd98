"""A refused call leaves the model exactly as it was: nothing injected, no adapter registered, no wrapper left."""

import copy
import json

import pytest
import torch
from conftest import memvp_config, randomize_memory, tiny_llama
from peft import LoraConfig, PeftModel, get_peft_model
from pristine import assert_untouched
from transformers import GPT2Config, GPT2LMHeadModel


def gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()


def _logits(model, **visual):
    ids = torch.randint(3, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids, **visual).logits


def _bad_shape_adapter(tmp_path):
    """A folder whose weights do not fit its own config (8 slots saved, 6 declared)."""
    pm = get_peft_model(tiny_llama(), memvp_config(num_memory_slots=8))
    pm.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["num_memory_slots"] = 6
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    return tmp_path


def test_a_refused_get_peft_model_leaves_the_callers_gpt2_untouched():
    model = gpt2()
    pristine = copy.deepcopy(model)
    with pytest.raises(ValueError, match="must be targeted together"):
        get_peft_model(model, memvp_config(target_modules=["c_fc"]))
    assert_untouched(model, pristine)
    torch.testing.assert_close(_logits(model), _logits(pristine))


def test_a_lora_memvp_config_refused_on_its_memvp_part_leaves_no_lora_layer():
    model = tiny_llama()
    pristine = copy.deepcopy(model)
    lora = LoraConfig(r=4, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="gate_proj"):
        get_peft_model(model, memvp_config(target_modules=["gate_proj"], lora_config=lora))
    assert_untouched(model, pristine)


def test_a_refused_lora_part_of_a_second_adapter_leaves_the_model_as_it_was():
    pm = get_peft_model(tiny_llama(), memvp_config())
    pristine = copy.deepcopy(pm)
    lora = LoraConfig(r=4, target_modules=["gate_proj"])  # inside the FFN the first adapter already wraps
    with pytest.raises(ValueError):
        pm.add_adapter("other", memvp_config(lora_config=lora))
    assert_untouched(pm, pristine)
    assert set(pm.peft_config) == {"default"} and set(pm.base_model.memvp_memory) == {"default"}


def test_a_refused_add_adapter_leaves_the_model_as_it_was():
    pm = get_peft_model(gpt2(), memvp_config())
    pristine = copy.deepcopy(pm)
    with pytest.raises(ValueError, match="must be targeted together"):
        pm.add_adapter("other", memvp_config(target_modules=["c_fc"]))
    assert_untouched(pm, pristine)
    assert set(pm.peft_config) == {"default"} and set(pm.base_model.memvp_memory) == {"default"}


def test_a_failure_after_the_lora_part_was_injected_removes_it_again():
    model = tiny_llama()
    pristine = copy.deepcopy(model)
    lora = LoraConfig(r=4, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="excluded"):  # peft's own check, after the LoRA part is in
        get_peft_model(model, memvp_config(exclude_modules=["mlp"], lora_config=lora))
    assert_untouched(model, pristine)


def test_a_failed_load_adapter_leaves_no_second_adapter(tmp_path):
    folder = _bad_shape_adapter(tmp_path / "bad")
    pm = get_peft_model(tiny_llama(), memvp_config())
    randomize_memory(pm)
    pm.eval()
    pristine = copy.deepcopy(pm)
    before = _logits(pm, image_features=torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(1)))
    with pytest.raises(ValueError, match="shape"):
        pm.load_adapter(folder, "other")
    assert set(pm.peft_config) == {"default"} and set(pm.base_model.memvp_memory) == {"default"}
    assert_untouched(pm, pristine)
    after = _logits(pm, image_features=torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(1)))
    assert torch.equal(before, after)


def test_save_after_a_failed_load_adapter_writes_only_the_first_adapter(tmp_path):
    folder = _bad_shape_adapter(tmp_path / "bad")
    pm = get_peft_model(tiny_llama(), memvp_config())
    with pytest.raises(ValueError):
        pm.load_adapter(folder, "other")
    pm.save_pretrained(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.is_dir()) == []


def test_a_failed_from_pretrained_leaves_no_wrapper_or_forward_override_on_the_base(tmp_path):
    folder = _bad_shape_adapter(tmp_path / "bad")
    base = tiny_llama()
    pristine = copy.deepcopy(base)
    with pytest.raises(ValueError, match="shape"):
        PeftModel.from_pretrained(base, folder)
    assert "forward" not in vars(base) and "generate" not in vars(base) and "forward" not in vars(base.model)
    assert_untouched(base, pristine)
    torch.testing.assert_close(_logits(base), _logits(pristine))


def test_a_failed_from_pretrained_with_lora_leaves_the_base_untouched(tmp_path):
    lora = LoraConfig(r=4, target_modules=["q_proj", "gate_proj"])
    get_peft_model(tiny_llama(), memvp_config(lora_config=lora)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["projector_hidden_dim"] = 4
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    base = tiny_llama()
    pristine = copy.deepcopy(base)
    with pytest.raises(ValueError, match="projector"):
        PeftModel.from_pretrained(base, tmp_path)
    assert_untouched(base, pristine)


def _remove(weights):
    weights.unlink()


def _truncate(weights):
    weights.write_bytes(weights.read_bytes()[:40])


@pytest.mark.parametrize("damage, message", [
    pytest.param(_remove, "adapter_model", id="missing"),
    pytest.param(_truncate, "truncated", id="truncated"),
])
def test_a_missing_or_truncated_weights_file_leaves_no_second_adapter(tmp_path, damage, message):
    get_peft_model(tiny_llama(), memvp_config()).save_pretrained(tmp_path)
    damage(tmp_path / "adapter_model.safetensors")
    pm = get_peft_model(tiny_llama(), memvp_config())
    pristine = copy.deepcopy(pm)
    with pytest.raises(ValueError, match=message):
        pm.load_adapter(str(tmp_path), "other")
    assert set(pm.peft_config) == {"default"}
    assert_untouched(pm, pristine)


def test_the_model_is_usable_and_loadable_after_a_refused_load(tmp_path):
    folder = _bad_shape_adapter(tmp_path / "bad")
    good = tmp_path / "good"
    source = get_peft_model(tiny_llama(), memvp_config())
    randomize_memory(source)
    source.save_pretrained(good)
    base = tiny_llama()
    with pytest.raises(ValueError):
        PeftModel.from_pretrained(base, folder)
    loaded = PeftModel.from_pretrained(base, good)
    features = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(_logits(loaded, image_features=features), _logits(source.eval(), image_features=features))


def test_a_bin_adapter_still_loads_as_a_second_adapter(tmp_path):
    source = get_peft_model(tiny_llama(), memvp_config())
    source.save_pretrained(tmp_path, safe_serialization=False)
    pm = get_peft_model(tiny_llama(), memvp_config())
    pm.load_adapter(str(tmp_path), "other")
    assert set(pm.base_model.memvp_memory) == {"default", "other"}
