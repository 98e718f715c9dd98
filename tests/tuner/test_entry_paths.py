"""Every way a trainer reaches the model carries the images -- or refuses; none trains text-only silently."""

import pytest
import torch
from conftest import VISUAL_DIM, memvp_config, randomize_memory, tiny_llama
from peft import get_peft_model
from trl.trainer.utils import add_fused_lm_head


def _batch(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 64, (2, 7), generator=generator)
    features = torch.randn(2, 4, VISUAL_DIM, generator=generator) * 2
    return ids, features


def _memvp(model):
    pm = get_peft_model(model, memvp_config(memory_scale=1.0))
    randomize_memory(pm, scale=1.0)
    return pm.train()


def _losses(pm, ids, features):
    """(image-conditioned loss through the plain forward, text-only loss, loss through TRL's fused LM head)."""
    with torch.no_grad():
        image = pm(input_ids=ids, labels=ids, image_features=features).loss
        text = pm(input_ids=ids, labels=ids).loss
    fused = pm(input_ids=ids, labels=ids, image_features=features, fused_lm_head=True).loss
    return image, text, fused


@pytest.mark.parametrize("order", ["trl_after_peft", "trl_before_peft"])
def test_trls_fused_lm_head_computes_the_image_conditioned_loss(order):
    ids, features = _batch()
    if order == "trl_after_peft":  # what SFTTrainer does with a PeftModel: it patches get_base_model().forward
        pm = _memvp(tiny_llama())
        add_fused_lm_head(pm.get_base_model())
    else:  # TRL's documented order for its own helper: patch first, then wrap with peft
        base = tiny_llama()
        add_fused_lm_head(base)
        pm = _memvp(base)
    image, text, fused = _losses(pm, ids, features)
    assert not torch.allclose(image, text)
    torch.testing.assert_close(fused.detach(), image, rtol=1e-5, atol=1e-6)
    fused.backward()
    projector = pm.base_model.memvp_memory["default"].projector[0].weight
    assert projector.grad is not None and projector.grad.abs().sum() > 0


def test_trls_fused_forward_keeps_generate_image_conditioned():
    pm = _memvp(tiny_llama()).eval()
    ids, features = _batch(1)
    kwargs = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        before = pm.generate(input_ids=ids, image_features=features, **kwargs)
        add_fused_lm_head(pm.get_base_model())
        after = pm.generate(input_ids=ids, image_features=features, **kwargs)
        text_only = pm.generate(input_ids=ids, **kwargs)
    assert torch.equal(before, after)
    assert not torch.equal(after, text_only)


def test_the_backbone_called_directly_reads_the_images():
    """TRL's fused LM head calls `model.base_model(**kwargs)` itself: the backbone is an entry point too."""
    pm = _memvp(tiny_llama()).eval()
    ids, features = _batch(2)
    with torch.no_grad():
        direct = pm.get_base_model().model(input_ids=ids, image_features=features).last_hidden_state
        full = pm(input_ids=ids, image_features=features, output_hidden_states=True).hidden_states[-1]
        text_only = pm.get_base_model().model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(direct, full, rtol=0, atol=0)
    assert not torch.allclose(direct, text_only)


def test_a_fused_forward_called_on_the_base_model_computes_the_image_conditioned_loss():
    base = tiny_llama()
    pm = _memvp(base)
    add_fused_lm_head(base)  # now base.forward calls the backbone with **kwargs, around MemVP's entry
    ids, features = _batch(3)
    fused = base(input_ids=ids, labels=ids, image_features=features, fused_lm_head=True).loss
    with torch.no_grad():
        image = pm(input_ids=ids, labels=ids, image_features=features).loss
    torch.testing.assert_close(fused.detach(), image, rtol=1e-5, atol=1e-6)


def test_visual_inputs_that_reach_a_decoder_layer_are_refused():
    """A path that hands the images to the layers themselves never went through an entry point: loud, not ignored."""
    pm = _memvp(tiny_llama())
    ids, features = _batch(4)
    backbone = pm.get_base_model().model
    hidden = backbone.embed_tokens(ids)
    position_embeddings = backbone.rotary_emb(hidden, torch.arange(ids.shape[1])[None])
    with pytest.raises(ValueError, match=r"\['image_features'\] reached the decoder layer LlamaDecoderLayer"):
        backbone.layers[0](hidden, position_embeddings=position_embeddings, image_features=features)


def test_the_base_models_own_forward_reads_the_images_too():
    pm = _memvp(tiny_llama()).eval()
    ids, features = _batch(4)
    with torch.no_grad():
        through_peft = pm(input_ids=ids, image_features=features).logits
        through_base = pm.get_base_model()(input_ids=ids, image_features=features).logits
        text_only = pm(input_ids=ids).logits
    torch.testing.assert_close(through_base, through_peft, rtol=0, atol=0)
    assert not torch.allclose(through_base, text_only)


def test_the_base_models_forward_signature_names_the_visual_inputs():
    """The HF Trainer keeps only dataset columns the base model's forward names (remove_unused_columns=True)."""
    import inspect

    pm = _memvp(tiny_llama())
    names = inspect.signature(pm.get_base_model().forward).parameters
    assert {"image_features", "image_mask", "pixel_values", "input_ids", "labels"} <= set(names)
