"""From pixels to memory: attached CLIP/SigLIP encoders, vision adapters, multi-image samples, VLM bases."""

import pytest
import torch
from conftest import memvp_config, randomize_memory, tiny_llama
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

import memvp_peft

VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)


def clip(seed=0):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    return CLIPVisionModel(CLIPVisionConfig(**VISION)).eval()


def siglip(seed=0):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    return SiglipVisionModel(SiglipVisionConfig(**VISION)).eval()


def manual_features(encoder, pixels, drop_cls=True):
    with torch.no_grad():
        hidden = encoder(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        if drop_cls:
            hidden = hidden[:, 1:]
        return encoder.post_layernorm(hidden)


@pytest.fixture
def text():
    torch.manual_seed(5)
    ids = torch.randint(3, 64, (2, 6))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.fixture
def pixels():
    torch.manual_seed(9)
    return torch.randn(2, 3, 32, 32)


@pytest.mark.parametrize("make, drop_cls", [(clip, True), (siglip, False)])
def test_pixel_values_equal_features_of_penultimate_block(make, drop_cls, text, pixels):
    encoder = make()
    pm = get_peft_model(tiny_llama(), memvp_config(num_memory_slots=20, vision_encoder=encoder)).eval()
    randomize_memory(pm)
    with torch.no_grad():
        from_pixels = pm(**text, pixel_values=pixels).logits
        from_features = pm(**text, image_features=manual_features(encoder, pixels, drop_cls)).logits
    torch.testing.assert_close(from_pixels, from_features)


def test_full_strategy_keeps_cls(text, pixels):
    encoder = clip()
    pm = get_peft_model(
        tiny_llama(), memvp_config(num_memory_slots=20, vision_encoder=encoder, vision_feature_select_strategy="full")
    ).eval()
    randomize_memory(pm)
    with torch.no_grad():
        got = pm(**text, pixel_values=pixels).logits
        want = pm(**text, image_features=manual_features(encoder, pixels, drop_cls=False)).logits
    torch.testing.assert_close(got, want)


def test_encoder_is_frozen_and_not_saved(text, pixels, tmp_path):
    encoder = clip()
    pm = get_peft_model(tiny_llama(), memvp_config(num_memory_slots=20, vision_encoder=encoder))
    assert not any(p.requires_grad for p in encoder.parameters())
    pm(**text, pixel_values=pixels, labels=text["input_ids"]).loss.backward()
    assert all(p.grad is None for p in encoder.parameters())
    pm.save_pretrained(tmp_path)
    keys = list(load_file(tmp_path / "adapter_model.safetensors"))
    assert all("memvp_memory" in k for k in keys) and not any("vision_adapters" in k for k in keys)
    config = memvp_peft.MemVPConfig.from_pretrained(tmp_path)
    assert config.vision_encoder and config.vision_num_layers == 2 and config.vision_feature_layer == -2


def test_encoder_width_must_match_visual_dim():
    with pytest.raises(ValueError, match="width 16 .*visual_dim=24"):
        get_peft_model(tiny_llama(), memvp_config(visual_dim=24, vision_encoder=clip()))


def test_pixel_values_without_encoder_explain_the_remedy(text, pixels):
    pm = get_peft_model(tiny_llama(), memvp_config())
    with pytest.raises(ValueError, match="attach_vision_encoder"):
        pm(**text, pixel_values=pixels)


def test_vision_adapters_train_and_save(text, pixels, tmp_path):
    encoder = clip()
    config = memvp_config(num_memory_slots=20, vision_encoder=encoder, vision_adapter_dim=4, vision_adapter_dropout=0.0)
    pm = get_peft_model(tiny_llama(), config)
    adapters = pm.base_model.memvp_memory["default"].vision_adapters
    assert len(adapters) == 2 and all(torch.count_nonzero(a.fc2.weight) == 0 for a in adapters)
    with torch.no_grad():  # zero-initialised up-projection: identical to no adapters at start
        before = pm(**text, image_features=manual_features(encoder, pixels)).logits
        torch.testing.assert_close(pm(**text, pixel_values=pixels).logits, before)
    pm.train()
    pm(**text, pixel_values=pixels, labels=text["input_ids"]).loss.backward()
    # feature_layer=-2: block 0 feeds the memory (trained); the last block's output is never read
    assert adapters[0].fc2.weight.grad is not None and adapters[0].fc2.weight.grad.abs().sum() > 0
    assert adapters[1].fc2.weight.grad is None
    randomize_memory(pm)
    pm.eval()
    with torch.no_grad():
        expected = pm(**text, pixel_values=pixels).logits
        assert not torch.allclose(expected, pm(**text, image_features=manual_features(encoder, pixels)).logits)
    pm.save_pretrained(tmp_path)
    keys = list(load_file(tmp_path / "adapter_model.safetensors"))
    assert any("vision_adapters.1.fc2.weight" in k for k in keys)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    memvp_peft.attach_vision_encoder(loaded, clip())
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(**text, pixel_values=pixels).logits, expected, rtol=0, atol=0)


def test_encoder_from_local_folder_reloads_with_the_adapter(text, pixels, tmp_path):
    clip().save_pretrained(tmp_path / "clip")
    config = memvp_config(num_memory_slots=20, vision_encoder=str(tmp_path / "clip"))
    pm = get_peft_model(tiny_llama(), config)
    randomize_memory(pm)
    with torch.no_grad():
        expected = pm.eval()(**text, pixel_values=pixels).logits
    pm.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**text, pixel_values=pixels).logits, expected, rtol=0, atol=0)


def test_generate_from_pixel_values(text, pixels):
    encoder = clip()
    pm = get_peft_model(tiny_llama(), memvp_config(num_memory_slots=20, vision_encoder=encoder, memory_scale=1.0))
    randomize_memory(pm, scale=1.0)
    pm.eval()
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        a = pm.generate(**text, pixel_values=pixels, **kwargs)
        b = pm.generate(**text, image_features=manual_features(encoder, pixels), **kwargs)
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------- multi-image


def _multi(pm, text, feats, mask=None):
    with torch.no_grad():
        return pm(**text, image_features=feats, image_mask=mask).logits


@pytest.fixture
def multi_pm():
    pm = get_peft_model(tiny_llama(), memvp_config(num_memory_slots=12))
    randomize_memory(pm)
    return pm.eval()


def test_several_images_concatenate_their_memories(multi_pm, text):
    feats = torch.randn(2, 3, 4, 16)  # 3 images of 4 tokens
    torch.testing.assert_close(_multi(multi_pm, text, feats), _multi(multi_pm, text, feats.reshape(2, 12, 16)))


def test_image_order_and_content_matter(multi_pm, text):
    feats = torch.randn(2, 2, 4, 16)
    base = _multi(multi_pm, text, feats)
    swapped = _multi(multi_pm, text, feats.flip(1))
    changed = feats.clone()
    changed[:, 1] += 1.0
    assert not torch.allclose(base, swapped)
    assert not torch.allclose(base, _multi(multi_pm, text, changed))


def test_per_image_mask_switches_single_images_off(multi_pm, text):
    feats = torch.randn(2, 2, 4, 16)
    mask = torch.tensor([[True, False], [True, True]])
    zeroed = feats.clone()
    zeroed[0, 1] = 123.0  # content of a masked image is ignored
    torch.testing.assert_close(_multi(multi_pm, text, feats, mask), _multi(multi_pm, text, zeroed, mask))
    only_first = _multi(multi_pm, text, feats[:, :1], torch.tensor([True, True]))
    # a masked image's slots hold only p_k/p_v: exactly like padding, i.e. like not passing that image
    torch.testing.assert_close(_multi(multi_pm, text, feats, mask)[0], only_first[0])


def test_multi_image_pixel_values(text):
    encoder = clip()
    pm = get_peft_model(tiny_llama(), memvp_config(num_memory_slots=40, vision_encoder=encoder)).eval()
    randomize_memory(pm)
    pixels = torch.randn(2, 2, 3, 32, 32)
    feats = manual_features(encoder, pixels.reshape(4, 3, 32, 32)).reshape(2, 2, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(pm(**text, pixel_values=pixels).logits, pm(**text, image_features=feats).logits)


def test_too_many_images_for_the_memory_is_rejected(multi_pm, text):
    with pytest.raises(ValueError, match=r"16 visual tokens per sample \(4 image\(s\) x 4\)"):
        _multi(multi_pm, text, torch.randn(2, 4, 4, 16))


# ------------------------------------------------------------------------------------------------ VLM bases


def tiny_llava(seed=0):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**VISION),
        text_config=LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, pad_token_id=0,
        ),
        image_token_id=63,
    )
    return LlavaForConditionalGeneration(config).eval()


def llava_features(model, pixels):
    with torch.no_grad():
        hidden = model.model.vision_tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        return model.model.vision_tower.post_layernorm(hidden)


def test_vlm_base_targets_only_language_model_ffns():
    pm = get_peft_model(tiny_llava(), memvp_config(num_memory_slots=20))
    targets = pm.peft_config["default"].target_modules
    assert sorted(targets) == ["model.language_model.layers.0.mlp", "model.language_model.layers.1.mlp"]
    from memvp_peft.tuner.layer import MemVPLayer

    assert not any(isinstance(m, MemVPLayer) for m in pm.base_model.model.model.vision_tower.modules())


def test_vlm_base_runs_language_model_on_text_alone(text, pixels):
    model = tiny_llava()
    pm = get_peft_model(model, memvp_config(num_memory_slots=20))
    randomize_memory(pm)
    pm.eval()
    with torch.no_grad():
        out = pm(**text, pixel_values=pixels).logits
        want = pm(**text, image_features=llava_features(model, pixels)).logits
    assert out.shape == (2, 6, 64)  # the sequence did not grow by the 16 patch tokens
    torch.testing.assert_close(out, want)


def test_vlm_placeholder_tokens_that_are_no_whole_image_are_rejected_with_guidance(text, pixels):
    """One placeholder where Llava's processor writes one per patch (16): the text does not match its images."""
    pm = get_peft_model(tiny_llava(), memvp_config(num_memory_slots=20))
    ids = text["input_ids"].clone()
    ids[:, 0] = 63
    with pytest.raises(ValueError, match=r"row 0 of `input_ids` holds 1 image placeholder tokens \(id 63\), which do "
                                         r"not add up to whole images.*same processor call"):
        pm(input_ids=ids, attention_mask=text["attention_mask"], pixel_values=pixels)


def test_vlm_generate_and_train_from_pixels(text, pixels, tmp_path):
    pm = get_peft_model(tiny_llava(), memvp_config(num_memory_slots=20))
    pm.train()
    pm(**text, pixel_values=pixels, labels=text["input_ids"]).loss.backward()
    assert all(p.grad is not None for n, p in pm.named_parameters() if p.requires_grad)
    pm.eval()
    with torch.no_grad():
        out = pm.generate(**text, pixel_values=pixels, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 10)
    pm.save_pretrained(tmp_path)
    assert all("vision_tower" not in k for k in load_file(tmp_path / "adapter_model.safetensors"))
