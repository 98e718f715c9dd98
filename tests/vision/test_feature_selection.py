"""Which hidden state of the encoder an adapter reads: its own `vision_feature_layer`, CLS selection and
post-layernorm, also when several adapters share one attached encoder."""

import pytest
import torch
from conftest import memvp_config, randomize_memory, tiny_llama
from peft import get_peft_model
from test_vision import clip

SELECTIONS = {
    "last_block": dict(vision_feature_layer=-1),
    "embeddings": dict(vision_feature_layer=0),
    "cls_kept": dict(vision_feature_select_strategy="full"),
    "no_layernorm": dict(vision_feature_layernorm=False),
}


def selected_features(encoder, pixels, vision_feature_layer=-2, vision_feature_select_strategy="default",
                      vision_feature_layernorm=True):
    """The features the fields select, computed from the encoder's own hidden states."""
    with torch.no_grad():
        hidden = encoder(pixel_values=pixels, output_hidden_states=True).hidden_states[vision_feature_layer]
        if vision_feature_select_strategy == "default":
            hidden = hidden[:, 1:]
        return encoder.post_layernorm(hidden) if vision_feature_layernorm else hidden


@pytest.fixture
def inputs():
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 64, (2, 6), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, torch.randn(2, 3, 32, 32, generator=generator)


def two_adapters(encoder, selection):
    """'default' reads the paper's features of `encoder`; 'other', added later, reads the ones `selection` names."""
    model = get_peft_model(tiny_llama(), memvp_config(num_memory_slots=20, vision_encoder=encoder))
    model.add_adapter("other", memvp_config(num_memory_slots=20, **selection))
    randomize_memory(model)
    return model.eval()


@pytest.mark.parametrize("selection", list(SELECTIONS.values()), ids=list(SELECTIONS))
def test_a_second_adapter_reads_the_features_it_selects(selection, inputs):
    text, pixels = inputs
    encoder = clip()
    model = two_adapters(encoder, selection)
    model.set_adapter("other")
    with torch.no_grad():
        from_pixels = model(**text, pixel_values=pixels).logits
        from_features = model(**text, image_features=selected_features(encoder, pixels, **selection)).logits
    torch.testing.assert_close(from_pixels, from_features)


@pytest.mark.parametrize("selection", list(SELECTIONS.values()), ids=list(SELECTIONS))
def test_active_adapters_sharing_one_encoding_each_read_their_own_features(selection, inputs):
    """Two adapters active in one call (no vision adapters, so they may share an encoding): each one's memory is
    built from the features it selects, not from the first adapter's."""
    _, pixels = inputs
    encoder = clip()
    model = two_adapters(encoder, selection)
    tuner = model.base_model
    tuner.set_adapter(["default", "other"])
    runtime, memories = tuner._memvp_runtime, tuner.memvp_memory
    with torch.no_grad():
        states = runtime.build(memories, None, None, pixels, 2).states
        for name, fields in (("default", {}), ("other", selection)):
            want = memories[name](selected_features(encoder, pixels, **fields), None)
            torch.testing.assert_close(states[name].tensors(), want.tensors(), msg=name)
