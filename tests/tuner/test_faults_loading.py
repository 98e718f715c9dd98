"""Loading an adapter never builds a silently wrong model: a tensor that is not the adapter's own, a tensor of the
wrong kind or an adapter for a base of another depth is refused by name; `low_cpu_mem_usage=True` loads exactly."""

import copy
import json
import shutil

import pytest
import torch
from conftest import memvp_config, randomize_memory, tiny_llama
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from pristine import assert_untouched
from safetensors.torch import load_file, save_file

WEIGHTS = "adapter_model.safetensors"


@pytest.fixture
def saved(tmp_path):
    pm = get_peft_model(tiny_llama(), memvp_config())
    randomize_memory(pm)
    pm.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def _edit_weights(folder, edit):
    weights = load_file(folder / WEIGHTS)
    edit(weights)
    save_file(weights, folder / WEIGHTS)


def _logits(model):
    torch.manual_seed(3)
    ids, features = torch.randint(3, 64, (2, 6)), torch.randn(2, 5, 16)
    with torch.no_grad():
        return model(input_ids=ids, image_features=features).logits


def test_a_base_model_tensor_in_the_adapter_file_is_refused_by_name(saved):
    _edit_weights(saved, lambda w: w.__setitem__("base_model.model.model.embed_tokens.weight", torch.zeros(64, 32)))
    base = tiny_llama()
    pristine = copy.deepcopy(base)
    with pytest.raises(ValueError, match=r"model\.embed_tokens\.weight.*not one of (this|the) adapter's"):
        PeftModel.from_pretrained(base, saved)
    assert_untouched(base, pristine)


def test_a_stray_tensor_refused_by_load_adapter_leaves_the_first_adapter_alone(saved):
    _edit_weights(saved, lambda w: w.__setitem__("base_model.model.lm_head.weight", torch.zeros(64, 32)))
    pm = get_peft_model(tiny_llama(), memvp_config())
    with pytest.raises(ValueError, match=r"lm_head\.weight"):
        pm.load_adapter(saved, "other")
    assert torch.equal(pm.get_base_model().lm_head.weight, tiny_llama().lm_head.weight)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_an_integer_or_bool_tensor_for_a_float_parameter_is_refused_by_name(saved, dtype):
    _edit_weights(saved, lambda w: w.__setitem__("base_model.memvp_memory.key_pos",
                                                 torch.ones_like(w["base_model.memvp_memory.key_pos"], dtype=dtype)))
    with pytest.raises(ValueError, match=rf"memvp_memory\.key_pos.*{str(dtype).replace('torch.', '')}"):
        PeftModel.from_pretrained(tiny_llama(), saved)


@pytest.mark.parametrize("value, what", [(float("nan"), "1 NaN"), (float("inf"), "1 inf"), (-float("inf"), "1 inf")])
def test_a_non_finite_adapter_value_is_refused_by_name(saved, value, what):
    def poison(weights):
        weights["base_model.memvp_memory.projector.0.weight"][0, 0] = value

    _edit_weights(saved, poison)
    base = tiny_llama()
    pristine = copy.deepcopy(base)
    with pytest.raises(ValueError, match=rf"memvp_memory\.projector\.0\.weight holds {what} value"):
        PeftModel.from_pretrained(base, saved)
    assert_untouched(base, pristine)


def test_an_adapter_value_whose_square_overflows_float32_is_refused_by_name(saved):
    """1e30 is a finite float32, but the first product with it overflows: the model would answer from NaN."""
    _edit_weights(saved, lambda w: w["base_model.memvp_memory.value_pos"].mul_(1e30))
    expected = r"value_pos holds a value of magnitude .*e\+30, but an adapter value is at most 1.84e\+19"
    with pytest.raises(ValueError, match=expected):
        PeftModel.from_pretrained(tiny_llama(), saved)


def test_an_adapter_value_float16_cannot_hold_is_refused_for_a_float16_model(saved):
    _edit_weights(saved, lambda w: w["base_model.memvp_memory.key_pos"].fill_(1e5))
    expected = r"key_pos holds a value of magnitude 1e\+05, but the model computes it in float16"
    with pytest.raises(ValueError, match=expected):
        PeftModel.from_pretrained(tiny_llama().half(), saved)
    assert PeftModel.from_pretrained(tiny_llama(), saved) is not None  # float32 holds it


@pytest.mark.parametrize("layers", [1, 4])
def test_an_adapter_for_a_two_layer_base_is_refused_on_another_depth(saved, layers):
    base = tiny_llama(num_hidden_layers=layers)
    pristine = copy.deepcopy(base)
    with pytest.raises(ValueError, match=rf"2 transformer layers.*has {layers}"):
        PeftModel.from_pretrained(base, saved)
    assert_untouched(base, pristine)


def test_the_depth_is_recorded_in_the_saved_config(saved):
    assert json.loads((saved / "adapter_config.json").read_text())["base_num_layers"] == 2


def test_an_adapter_that_adapts_only_some_layers_still_loads(tmp_path):
    pm = get_peft_model(tiny_llama(), memvp_config(layers_to_transform=[1]))
    randomize_memory(pm)
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert loaded.peft_config["default"].target_modules == ["model.layers.1.mlp"]
    torch.testing.assert_close(_logits(loaded), _logits(pm.eval()))


def test_an_adapter_saved_before_the_depth_was_recorded_still_loads(saved):
    config = json.loads((saved / "adapter_config.json").read_text())
    del config["base_num_layers"]
    (saved / "adapter_config.json").write_text(json.dumps(config))
    PeftModel.from_pretrained(tiny_llama(), saved)


# ------------------------------------------------------------------------------------------------ low_cpu_mem_usage


def test_get_peft_model_low_cpu_mem_usage_creates_the_memory_on_the_meta_device():
    pm = get_peft_model(tiny_llama(), memvp_config(), low_cpu_mem_usage=True)
    memory = pm.base_model.memvp_memory["default"]
    assert all(p.device.type == "meta" for p in memory.parameters())


def test_a_meta_memory_is_materialised_by_loading_its_weights(saved):
    reference = PeftModel.from_pretrained(tiny_llama(), saved)
    pm = get_peft_model(tiny_llama(), memvp_config(), low_cpu_mem_usage=True)
    weights = load_file(saved / WEIGHTS)
    set_peft_model_state_dict(pm, weights, low_cpu_mem_usage=True)
    assert not any(p.device.type == "meta" for p in pm.parameters())
    torch.testing.assert_close(_logits(pm.eval()), _logits(reference))


def test_from_pretrained_low_cpu_mem_usage_gives_the_logits_of_the_normal_load(saved):
    normal = PeftModel.from_pretrained(tiny_llama(), saved)
    low = PeftModel.from_pretrained(tiny_llama(), saved, low_cpu_mem_usage=True)
    assert not any(p.device.type == "meta" for p in low.parameters())
    assert torch.equal(_logits(low), _logits(normal))


def test_from_pretrained_low_cpu_mem_usage_with_lora_gives_the_logits_of_the_normal_load(tmp_path):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "gate_proj"], init_lora_weights=False)
    pm = get_peft_model(tiny_llama(), memvp_config(lora_config=lora))
    randomize_memory(pm)
    pm.save_pretrained(tmp_path)
    normal = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    low = PeftModel.from_pretrained(tiny_llama(), tmp_path, low_cpu_mem_usage=True)
    assert not any(p.device.type == "meta" for p in low.parameters())
    assert torch.equal(_logits(low), _logits(normal))


def test_a_modules_to_save_adapter_still_loads(tmp_path):
    pm = get_peft_model(tiny_llama(), memvp_config(modules_to_save=["lm_head"]))
    randomize_memory(pm)
    with torch.no_grad():
        pm.base_model.model.lm_head.modules_to_save["default"].weight.mul_(2.0)
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(_logits(loaded), _logits(pm.eval()))


def test_a_copy_of_a_folder_loads_as_a_second_adapter(saved, tmp_path):
    shutil.copytree(saved, tmp_path / "copy")
    pm = PeftModel.from_pretrained(tiny_llama(), saved)
    pm.load_adapter(tmp_path / "copy", "other")
    assert set(pm.base_model.memvp_memory) == {"default", "other"}


def test_from_pretrained_low_cpu_mem_usage_loads_a_real_vision_encoder_from_its_folder(tmp_path):
    from memvp_peft.demo_models import tiny_clip

    tiny_clip(hidden_size=16).save_pretrained(tmp_path / "clip")
    config = memvp_config(num_memory_slots=20, vision_encoder=str(tmp_path / "clip"), vision_adapter_dim=4)
    pm = get_peft_model(tiny_llama(), config)
    randomize_memory(pm)
    pm.save_pretrained(tmp_path / "adapter")
    normal = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter")
    low = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter", low_cpu_mem_usage=True)
    assert not any(p.device.type == "meta" for p in low.base_model.vision_encoder.model.parameters())
    ids, pixels = torch.randint(3, 64, (2, 5)), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(low(input_ids=ids, pixel_values=pixels).logits,
                           normal(input_ids=ids, pixel_values=pixels).logits)
