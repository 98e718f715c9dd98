"""Gradient checkpointing with vision adapters: the recomputation of an encoder block inside backward adds the
same vision adapters the forward added, so every trainable parameter gets the gradient it gets without
checkpointing -- a VLM's own tower (which `gradient_checkpointing_enable` on the VLM checkpoints too) and a separate
CLIP encoder the user checkpoints alike, with reentrant and non-reentrant checkpointing."""

import pytest
import torch
from conftest import memvp_config, randomize_memory, tiny_llama
from peft import get_peft_model
from test_vision import clip, tiny_llava


def llava_with_vision_adapters():
    return get_peft_model(tiny_llava(), memvp_config(num_memory_slots=20, vision_adapter_dim=4))


def llama_with_clip_adapters():
    return get_peft_model(tiny_llama(), memvp_config(num_memory_slots=20, vision_adapter_dim=4,
                                                     vision_encoder=clip(), vision_feature_layer=-1))


def checkpoint_language_model(model, use_reentrant):
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})


def checkpoint_encoder_too(model, use_reentrant):
    """The LM and the separate encoder, which the user puts in training mode with checkpointing on."""
    checkpoint_language_model(model, use_reentrant)
    encoder = model.base_model.vision_encoder.model
    encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    encoder.train()


def gradients(model, checkpointing=None, use_reentrant=None):
    randomize_memory(model)  # vision adapters' fc2 nonzero: their fc1 gets a gradient too
    model.train()
    if checkpointing is not None:
        checkpointing(model, use_reentrant)
    generator = torch.Generator().manual_seed(4)
    ids = torch.randint(3, 63, (2, 6), generator=generator)
    pixels = torch.randn(2, 3, 32, 32, generator=generator)
    model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels, labels=ids).loss.backward()
    return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


def assert_same_gradients(got, expected):
    assert set(got) == set(expected)
    assert any("vision_adapters" in name for name in expected)
    for name, want in expected.items():
        assert got[name] is not None, f"{name} got no gradient under checkpointing"
        torch.testing.assert_close(got[name], want, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_checkpointing_a_vlm_gives_its_tower_adapters_the_same_gradients(use_reentrant):
    expected = gradients(llava_with_vision_adapters())
    got = gradients(llava_with_vision_adapters(), checkpoint_language_model, use_reentrant)
    assert_same_gradients(got, expected)


@pytest.mark.parametrize("checkpointing", [checkpoint_language_model, checkpoint_encoder_too],
                         ids=["language_model", "encoder_too"])
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_checkpointing_with_a_separate_encoder_gives_its_adapters_the_same_gradients(checkpointing, use_reentrant):
    expected = gradients(llama_with_clip_adapters())
    got = gradients(llama_with_clip_adapters(), checkpointing, use_reentrant)
    assert_same_gradients(got, expected)


def test_unload_takes_the_checkpoint_wrappers_off_a_separate_encoder():
    model = llama_with_clip_adapters()
    layers = model.base_model.vision_encoder.layers
    gradients(model, checkpoint_encoder_too, False)
    checkpoint_functions = [layer._gradient_checkpointing_func for layer in layers]
    assert all(hasattr(function, "__wrapped__") for function in checkpoint_functions)  # wrapped by the training call
    model.unload()
    assert all(layer._gradient_checkpointing_func is function.__wrapped__
               for layer, function in zip(layers, checkpoint_functions))
