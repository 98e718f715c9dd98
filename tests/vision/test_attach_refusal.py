"""A refused `attach_vision_encoder` changes nothing: the previous encoder stays attached with its adapter hooks, and
the refused encoder is neither hooked nor frozen."""

import pytest
import torch
from conftest import memvp_config, randomize_memory, tiny_llama
from peft import get_peft_model

import memvp_peft
from memvp_peft.vision.encoder import _encoder_layers


def clip(hidden_size=16, layers=2, seed=0):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    return CLIPVisionModel(CLIPVisionConfig(hidden_size=hidden_size, intermediate_size=32, num_hidden_layers=layers,
                                            num_attention_heads=4, image_size=32, patch_size=8)).eval()


def _mlp_hooks(encoder):
    return [len(layer.mlp._forward_hooks) for layer in _encoder_layers(encoder)]


@pytest.fixture
def adapted():
    encoder = clip()
    pm = get_peft_model(tiny_llama(), memvp_config(num_memory_slots=20, vision_encoder=encoder, vision_adapter_dim=4))
    randomize_memory(pm)
    return pm.eval(), encoder


def _logits(pm):
    ids = torch.randint(3, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return pm(input_ids=ids, pixel_values=pixels).logits


@pytest.mark.parametrize(
    "refused, message",
    [(lambda: clip(hidden_size=32), r"width 32.*visual_dim=16"), (lambda: clip(layers=3), r"2-block.*3 blocks")],
)
def test_a_refused_encoder_leaves_the_previous_one_attached_with_its_hooks(adapted, refused, message):
    pm, encoder = adapted
    before = _logits(pm)
    other = refused().train()
    with pytest.raises(ValueError, match=message):
        memvp_peft.attach_vision_encoder(pm, other)
    assert pm.base_model.vision_encoder.model is encoder
    assert _mlp_hooks(encoder) == [1, 1]
    assert all(n == 0 for n in _mlp_hooks(other))
    assert other.training and all(p.requires_grad for p in other.parameters())
    assert torch.equal(_logits(pm), before)


def test_an_accepted_encoder_replaces_the_previous_ones_hooks(adapted):
    pm, encoder = adapted
    other = clip(seed=1)
    memvp_peft.attach_vision_encoder(pm, other)
    assert pm.base_model.vision_encoder.model is other
    assert _mlp_hooks(encoder) == [0, 0] and _mlp_hooks(other) == [1, 1]


def test_a_refused_feature_layer_leaves_the_previous_encoder_attached():
    """Hidden state 2 exists in a 2-block encoder, not in a 1-block one."""
    encoder = clip()
    pm = get_peft_model(tiny_llama(), memvp_config(num_memory_slots=20, vision_encoder=encoder, vision_feature_layer=2))
    hooks = _mlp_hooks(encoder)
    with pytest.raises(ValueError, match="vision_feature_layer=2"):
        memvp_peft.attach_vision_encoder(pm, clip(layers=1, seed=1))
    assert pm.base_model.vision_encoder.model is encoder and _mlp_hooks(encoder) == hooks
