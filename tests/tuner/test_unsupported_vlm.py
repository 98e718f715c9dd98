"""A VLM base of no supported family (VipLlava here) is refused at `get_peft_model`, before anything changes, naming
its class and the supported families -- unless a separate encoder (`MemVPConfig(vision_encoder=...)`) reads the
adapter's pixels: then the adapter goes on its language model, takes `pixel_values` through that encoder or
`image_features` computed with it, and the VLM's own placeholders are refused at the call. Supported families and
plain language models are unaffected."""

import copy
import re
import warnings

import pytest
import torch
from conftest import memvp_config, randomize_memory, tiny_llama
from peft import get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from test_vision import clip, manual_features, tiny_llava

from memvp_peft.vision import supported_families

IMAGE_TOKEN = 63


def tiny_vipllava(seed=0):
    """VipLlava from a config: a Llava-like layout, but no family MemVP supports (its processor's batches are not
    read, nor its multi-layer tower features)."""
    from transformers import CLIPVisionConfig, LlamaConfig, VipLlavaConfig, VipLlavaForConditionalGeneration

    torch.manual_seed(seed)
    return VipLlavaForConditionalGeneration(VipLlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                       num_attention_heads=4, image_size=32, patch_size=8),
        text_config=LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, pad_token_id=0),
        image_token_id=IMAGE_TOKEN, vision_feature_layers=[-2, -1])).eval()


@pytest.fixture
def text():
    ids = torch.randint(3, IMAGE_TOKEN, (2, 6), generator=torch.Generator().manual_seed(5))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_refused_at_get_peft_model_naming_the_class_the_supported_families_and_the_remedy():
    with pytest.raises(ValueError, match=(
            r"the base VipLlavaForConditionalGeneration is a VLM of no family MemVP supports \(supported families: "
            + re.escape(supported_families()) + r"\).*MemVPConfig\(vision_encoder=")):
        get_peft_model(tiny_vipllava(), memvp_config(num_memory_slots=20))


def test_the_refused_model_is_unchanged():
    model = tiny_vipllava()
    before = copy.deepcopy(model.state_dict())
    modules = [(name, type(module)) for name, module in model.named_modules()]
    with pytest.raises(ValueError, match="no family MemVP supports"):
        get_peft_model(model, memvp_config(num_memory_slots=20))
    assert [(name, type(module)) for name, module in model.named_modules()] == modules
    assert not any(isinstance(module, BaseTunerLayer) for module in model.modules())
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert all(p.requires_grad for p in model.parameters())  # nothing frozen either


def test_a_separate_encoder_lets_the_language_model_take_the_adapter_and_its_pixels(text):
    encoder = clip()
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model = get_peft_model(tiny_vipllava(), memvp_config(num_memory_slots=20, vision_encoder=encoder))
    assert sorted(model.peft_config["default"].target_modules) == [
        "model.language_model.layers.0.mlp", "model.language_model.layers.1.mlp"]
    randomize_memory(model)
    with torch.no_grad():
        from_pixels = model.eval()(**text, pixel_values=pixels).logits
        from_features = model(**text, image_features=manual_features(encoder, pixels)).logits
        other = model(**text, image_features=manual_features(encoder, pixels.flip(0))).logits
    torch.testing.assert_close(from_pixels, from_features)
    assert not torch.allclose(from_features, other)


def test_the_vlms_own_tower_named_as_the_encoder_reads_its_pixels(text):
    """Where the VLM's tower is a CLIP/SigLIP vision model, naming it as `vision_encoder` is the separate encoder."""
    base = tiny_vipllava()
    tower = base.model.vision_tower
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    model = get_peft_model(base, memvp_config(num_memory_slots=20, vision_encoder=tower))
    randomize_memory(model)
    with torch.no_grad():
        from_pixels = model.eval()(**text, pixel_values=pixels).logits
        from_features = model(**text, image_features=manual_features(tower, pixels)).logits
    torch.testing.assert_close(from_pixels, from_features)


def test_with_a_separate_encoder_the_vlms_own_placeholders_are_refused_at_the_call(text):
    model = get_peft_model(tiny_vipllava(), memvp_config(num_memory_slots=20, vision_encoder=clip()))
    ids = text["input_ids"].clone()
    ids[:, 1] = IMAGE_TOKEN
    with pytest.raises(ValueError, match=f"image placeholder token \\(id {IMAGE_TOKEN}\\)"):
        model(input_ids=ids, image_features=torch.randn(2, 4, 16))


def test_a_further_adapter_reads_the_encoder_already_attached():
    model = get_peft_model(tiny_vipllava(), memvp_config(num_memory_slots=20, vision_encoder=clip()))
    model.add_adapter("other", memvp_config(num_memory_slots=20))
    assert model.base_model.vision_encoder is not None and "other" in model.peft_config


@pytest.mark.parametrize("make", [tiny_llava, tiny_llama], ids=["supported_family", "plain_llm"])
def test_a_supported_family_and_a_plain_language_model_are_unaffected(make):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model = get_peft_model(make(), memvp_config(num_memory_slots=20))
    assert any(isinstance(module, BaseTunerLayer) for module in model.modules())
