"""Settings that cannot work are refused with a ValueError naming the setting, at construction or at injection --
never accepted silently, never a traceback from deep inside the model."""

import copy
import json
import math
import warnings

import numpy as np
import pytest
import torch
from conftest import memvp_config, tiny_llama
from peft import PeftModel, get_peft_model
from pristine import assert_untouched
from transformers import CLIPVisionConfig, CLIPVisionModel, GPT2Config, GPT2LMHeadModel

from memvp_peft import MemVPConfig


def clip():
    torch.manual_seed(0)
    return CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                            num_attention_heads=4, image_size=32, patch_size=8)).eval()


# --------------------------------------------------------------------------------------------- at construction


@pytest.mark.parametrize("field", ["visual_scale", "memory_scale", "key_init_std", "vision_adapter_scale"])
@pytest.mark.parametrize("value", [math.inf, 1e400, 1e300])
def test_an_infinite_scale_or_std_is_refused(field, value):
    """1e300 is finite in Python but inf in every compute dtype (float32, bfloat16, float16)."""
    with pytest.raises(ValueError, match=rf"{field} must be a finite number"):
        MemVPConfig(**{field: value})


@pytest.mark.parametrize(
    "field, value",
    [
        ("target_modules", [1]),
        ("target_modules", ["mlp", None]),
        ("target_modules", 3),
        ("exclude_modules", [2]),
        ("vision_feature_layer", "-2"),
        ("vision_feature_layer", 1.0),
        ("vision_feature_layer", True),
        ("vision_num_layers", "2"),
        ("vision_num_layers", 0),
        ("vision_feature_layernorm", "no"),
        ("vision_feature_layernorm", 1),
        ("memory_dropout", False),
        ("memory_dropout", "0.1"),
        ("vision_adapter_dropout", True),
        ("layers_to_transform", "0"),
        ("base_num_layers", 0),
        ("base_num_layers", "2"),
    ],
)
def test_a_setting_of_the_wrong_type_is_refused(field, value):
    with pytest.raises(ValueError, match=field):
        MemVPConfig(**{field: value})


@pytest.mark.parametrize("value", [3, ["layers", 1], ""])
def test_a_layers_pattern_that_is_not_a_name_is_refused(value):
    with pytest.raises(ValueError, match="layers_pattern"):
        MemVPConfig(layers_to_transform=[0], layers_pattern=value)


def test_unknown_keys_in_adapter_config_json_are_named_in_a_warning(tmp_path):
    get_peft_model(tiny_llama(), memvp_config()).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["visual_dimm"] = 3
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        PeftModel.from_pretrained(tiny_llama(), tmp_path)
    messages = [str(w.message) for w in caught if "visual_dimm" in str(w.message)]
    assert len(messages) == 1 and "did you mean 'visual_dim'" in messages[0]


# ------------------------------------------------------------------------------------------------ at injection


@pytest.mark.parametrize(
    "targets, activation, message",
    [
        (["gate_proj"], "silu", r"model\.layers\.0\.mlp\.gate_proj is a linear inside the FFN model\.layers\.0\.mlp"),
        (["down_proj"], None, r"down_proj is a linear inside the FFN"),
        (["self_attn"], "silu", r"model\.layers\.0\.self_attn is not an FFN block"),
        (["lm_head"], "silu", r"lm_head is not an FFN block"),
        (["layers.0"], "silu", r"model\.layers\.0 is not an FFN block"),
    ],
)
def test_a_target_that_is_not_an_ffn_is_refused_before_anything_changes(targets, activation, message):
    model = tiny_llama()
    pristine = copy.deepcopy(model)
    with pytest.raises(ValueError, match=message):
        get_peft_model(model, memvp_config(target_modules=targets, activation=activation))
    assert_untouched(model, pristine)


def test_a_plain_ffn_target_outside_an_ffn_is_refused():
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    with pytest.raises(ValueError, match=r"transformer\.h\.0\.attn\.c_proj is not an FFN block"):
        get_peft_model(model, memvp_config(target_modules=["c_fc", "c_proj"]))


def test_targets_named_by_the_ffn_leaf_still_work():
    pm = get_peft_model(tiny_llama(), memvp_config(target_modules=["mlp"]))
    assert pm.peft_config["default"].target_modules == ["mlp"]
    gpt = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    get_peft_model(gpt, memvp_config(target_modules=r".*\.mlp\.c_(fc|proj)"))


@pytest.mark.parametrize("layers", [[0, 5], [2], 7])
def test_layers_to_transform_beyond_the_model_is_refused(layers):
    model = tiny_llama()
    pristine = copy.deepcopy(model)
    with pytest.raises(ValueError, match=r"layers_to_transform.*2 layers"):
        get_peft_model(model, memvp_config(layers_to_transform=layers))
    assert_untouched(model, pristine)


def test_a_layers_pattern_naming_no_layer_stack_is_refused():
    with pytest.raises(ValueError, match=r"layers_pattern='blocks'.*'layers'"):
        get_peft_model(tiny_llama(), memvp_config(layers_to_transform=[0], layers_pattern="blocks"))


def test_the_right_layers_pattern_is_accepted():
    pm = get_peft_model(tiny_llama(), memvp_config(layers_to_transform=[1], layers_pattern="layers"))
    assert pm.peft_config["default"].target_modules == ["model.layers.1.mlp"]


def test_a_vision_encoder_folder_that_does_not_exist_is_refused(tmp_path):
    model = tiny_llama()
    pristine = copy.deepcopy(model)
    with pytest.raises(ValueError, match=r"vision_encoder=.*nope.*not a local folder"):
        get_peft_model(model, memvp_config(vision_encoder=str(tmp_path / "nope")))
    assert_untouched(model, pristine)


def test_an_adapter_recording_an_encoder_folder_that_is_gone_still_loads(tmp_path):
    import shutil

    import memvp_peft

    clip().save_pretrained(tmp_path / "clip")
    pm = get_peft_model(tiny_llama(), memvp_config(num_memory_slots=20, vision_encoder=str(tmp_path / "clip")))
    pm.save_pretrained(tmp_path / "adapter")
    shutil.rmtree(tmp_path / "clip")
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter")
    assert loaded.base_model.vision_encoder is None
    memvp_peft.attach_vision_encoder(loaded, clip())
    loaded(input_ids=torch.randint(3, 64, (1, 4)), pixel_values=torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize("layer", [3, -4])
def test_a_vision_feature_layer_beyond_the_encoder_is_refused(layer):
    model = tiny_llama()
    pristine = copy.deepcopy(model)
    with pytest.raises(ValueError, match=rf"vision_feature_layer={layer}.*3 hidden states"):
        get_peft_model(model, memvp_config(num_memory_slots=20, vision_encoder=clip(), vision_feature_layer=layer))
    assert_untouched(model, pristine)


@pytest.mark.parametrize("layer", [2, -3, 0])
def test_every_vision_feature_layer_of_the_encoder_is_accepted(layer):
    pm = get_peft_model(tiny_llama(), memvp_config(num_memory_slots=20, vision_encoder=clip(), vision_feature_layer=layer))
    pm(input_ids=torch.randint(3, 64, (1, 4)), pixel_values=torch.randn(1, 3, 32, 32))


# ------------------------------------------------------------------------------------------------ visual input


def test_float64_features_that_overflow_float32_are_refused():
    pm = get_peft_model(tiny_llama(), memvp_config())
    features = torch.full((2, 3, 16), 1e39, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"image_features.*float32"):
        pm(input_ids=torch.randint(3, 64, (2, 4)), image_features=features)
    assert pm.base_model._memvp_runtime.active() is None


def test_large_float64_features_that_fit_float32_are_accepted():
    pm = get_peft_model(tiny_llama(), memvp_config())
    features = torch.full((2, 3, 16), 1e30, dtype=torch.float64)
    pm(input_ids=torch.randint(3, 64, (2, 4)), image_features=features)


# --------------------------------------------------------------------------------------- assignments, after injection


@pytest.mark.parametrize(
    "field, value, message",
    [("drop_ratio", math.nan, "must be a number in"), ("memory_scale", math.inf, "must be a finite number"),
     ("visual_dim", 0, "must be a positive integer"), ("memory_read", "fast", "must be one of")],
)
def test_an_assignment_is_checked_like_the_construction_and_a_refused_one_changes_nothing(field, value, message):
    config = memvp_config()
    before = getattr(config, field)
    with pytest.raises(ValueError, match=rf"MemVPConfig\.{field} {message}"):
        setattr(config, field, value)
    assert getattr(config, field) == before


@pytest.mark.parametrize("field, value", [("memory_scale", 0.5), ("visual_scale", 0.5), ("memory_read", "adem"),
                                          ("drop_ratio", 0.2), ("num_memory_slots", 16)])
def test_a_field_the_model_was_built_with_cannot_change_after_injection(tmp_path, field, value):
    """The layers read these when they are built: a new value would be saved but not used, and the reloaded adapter
    would compute something else than the one that ran."""
    pm = get_peft_model(tiny_llama(), memvp_config())
    config = pm.peft_config["default"]
    before = getattr(config, field)
    with pytest.raises(ValueError, match=rf"MemVPConfig\.{field} cannot change after the adapter was injected"):
        setattr(config, field, value)
    pm.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())[field] == before


def test_fields_read_at_every_call_and_peft_bookkeeping_may_change_after_injection():
    pm = get_peft_model(tiny_llama(), memvp_config())
    config = pm.peft_config["default"]
    config.inference_mode = True
    config.vision_adapter_scale = 0.2
    config.memory_scale = config.memory_scale  # the value it was built with: no change
    assert config.inference_mode and config.vision_adapter_scale == 0.2


def test_a_config_copied_with_a_new_value_builds_a_new_adapter():
    """What the refusal tells to do instead."""
    import dataclasses

    pm = get_peft_model(tiny_llama(), memvp_config())
    other = get_peft_model(tiny_llama(), dataclasses.replace(pm.peft_config["default"], memory_scale=0.5))
    assert other.get_base_model().model.layers[0].mlp.memvp_scale["default"] == 0.5


# --------------------------------------------------------------------------------------- numbers of other types


@pytest.mark.parametrize("field, value, stored", [
    ("drop_ratio", np.float32(0.5), 0.5), ("memory_dropout", np.float64(0.25), 0.25),
    ("visual_scale", np.float16(0.5), 0.5), ("num_memory_slots", np.int64(8), 8), ("visual_dim", np.int32(16), 16),
])
def test_a_numpy_number_is_accepted_and_saved_as_the_python_number_it_is(tmp_path, field, value, stored):
    config = memvp_config(**{field: value})
    assert getattr(config, field) == stored and type(getattr(config, field)) is type(stored)
    config.save_pretrained(str(tmp_path))
    assert json.loads((tmp_path / "adapter_config.json").read_text())[field] == stored


def test_a_numpy_number_assigned_later_is_stored_as_a_python_number():
    config = memvp_config()
    config.drop_ratio = np.float32(0.25)
    assert config.drop_ratio == 0.25 and type(config.drop_ratio) is float


@pytest.mark.parametrize("value", [np.bool_(True), np.float32(1.5), np.float32("nan")])
def test_a_numpy_value_out_of_range_is_refused_like_a_python_one(value):
    with pytest.raises(ValueError, match="MemVPConfig.drop_ratio must be a number in"):
        memvp_config(drop_ratio=value)
