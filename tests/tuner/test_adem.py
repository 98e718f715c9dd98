"""ADEM-VL's memory form as a MemVPConfig option: multiscale slots, the silu(x) silu(K)^T read, the score drop.

Logits are compared with tests/reference_adem.py (written from the paper and the authors' sampler/adapter, sharing no
code with the package), in fp32 and eval mode with randomised adapter weights.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from conftest import VISUAL_DIM, VOCAB, randomize_memory, tiny_llama
from peft import get_peft_model
from reference_adem import adem_drop, reference_form_logits, reference_gpt2_drop_logits
from reference_memvp import adapter_state
from transformers import GPT2Config, GPT2LMHeadModel

from memvp_peft import MemVPConfig
from memvp_peft.demo_models import tiny_clip
from memvp_peft.tuner.layer import drop_lowest_scores

TOL = dict(rtol=1e-5, atol=1e-6)


def adem_config(**overrides):
    """ADEM-VL's memory form on `image_features` (the CLS token and the CLIP adapters need an encoder)."""
    settings = dict(visual_dim=VISUAL_DIM, multiscale_tokens=[16, 4], num_memory_slots=24, projector_hidden_dim=8,
                    cls_token=False, vision_adapter_dim=0)
    settings.update(overrides)
    return MemVPConfig.adem_vl(**settings)


def adapted(base, config):
    model = get_peft_model(copy.deepcopy(base), config)
    randomize_memory(model)
    return model.eval()


@pytest.fixture(scope="module")
def base():
    return tiny_llama()


def inputs(seed=5, batch=3, tokens=16):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randint(3, VOCAB, (batch, 7), generator=generator),
            torch.randn(batch, tokens, VISUAL_DIM, generator=generator))


def word_tokenizer():
    from memvp_peft.demo_models import build_word_tokenizer

    return build_word_tokenizer(["Image : N/A", "Question: what is shown ? Answer:"])


def test_adem_vl_preset_is_the_authors_release():
    tokenizer = word_tokenizer()
    config = MemVPConfig.adem_vl(tokenizer)
    assert (config.multiscale_tokens, config.num_memory_slots, config.memory_read, config.drop_ratio) == (
        [256, 64], 320, "adem", 0.1)
    assert (config.memory_dropout, config.memory_scale, config.visual_scale) == (0.0, 0.1, 0.01)
    assert (config.vision_adapter_dim, config.vision_adapter_scale, config.vision_adapter_dropout) == (12, 0.1, 0.1)
    assert config.cls_token
    assert config.cls_token_prefix_ids == tokenizer("Image: ", add_special_tokens=False)["input_ids"]
    assert config.cls_token_text_only_prefix_ids == tokenizer("Image: N/A", add_special_tokens=False)["input_ids"]
    assert config.memory_tokens(256) == 320


def test_adem_vl_preset_without_a_tokenizer_is_refused():
    with pytest.raises(ValueError, match="pass tokenizer="):
        MemVPConfig.adem_vl()


def test_drop_zeroes_exactly_the_lowest_fraction_of_each_row():
    scores = torch.randn(2, 3, 20)
    dropped = drop_lowest_scores(scores, 0.1)
    assert torch.equal(dropped, adem_drop(scores, 0.1))
    assert ((dropped == 0).sum(-1) == 2).all()  # int(0.1 * 20) per token
    kept = dropped != 0
    assert (scores[kept].reshape(2, 3, 18).min(-1).values >= scores.sort(-1).values[..., 2]).all()


def test_drop_ratio_below_one_slot_drops_nothing():
    scores = torch.randn(4, 9)
    assert torch.equal(drop_lowest_scores(scores, 0.1), scores)


@pytest.mark.parametrize("config, seed", [
    pytest.param(adem_config(), 5, id="adem-read-with-drop"),
    pytest.param(adem_config(drop_ratio=0.0), 9, id="adem-read-without-drop"),
    pytest.param(MemVPConfig(visual_dim=VISUAL_DIM, num_memory_slots=20, projector_hidden_dim=8, memory_dropout=0.0,
                             drop_ratio=0.25), 3, id="memvp-read-with-drop"),
])
def test_logits_match_reference(base, config, seed):
    """The ADEM-VL read with and without the score drop, and the drop on MemVP's own read: each as the reference."""
    model = adapted(base, config)
    ids, features = inputs(seed=seed)
    with torch.no_grad():
        got = model(input_ids=ids, image_features=features).logits
    torch.testing.assert_close(got, reference_form_logits(base, adapter_state(model), config, ids, features), **TOL)


def test_adem_text_only_rows_read_silu_of_the_position_memory(base):
    config = adem_config()
    model = adapted(base, config)
    ids, features = inputs()
    mask = torch.tensor([True, False, True])
    with torch.no_grad():
        got = model(input_ids=ids, image_features=features, image_mask=mask).logits
        text_only = model(input_ids=ids).logits
    state = adapter_state(model)
    torch.testing.assert_close(got, reference_form_logits(base, state, config, ids, features, mask), **TOL)
    torch.testing.assert_close(text_only, reference_form_logits(base, state, config, ids), **TOL)


def test_drop_on_a_plain_ffn_matches_reference():
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32)).eval()
    config = MemVPConfig(visual_dim=VISUAL_DIM, num_memory_slots=20, projector_hidden_dim=8, memory_dropout=0.0,
                         drop_ratio=0.2)
    model = adapted(gpt2, config)
    ids, features = inputs(seed=4)
    with torch.no_grad():
        got = model(input_ids=ids, image_features=features).logits
    torch.testing.assert_close(got, reference_gpt2_drop_logits(gpt2, adapter_state(model), config, ids, features),
                               **TOL)


def test_adem_read_on_a_plain_ffn_is_refused_and_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32))
    before = {name: type(module) for name, module in gpt2.named_modules()}
    with pytest.raises(ValueError, match="needs the whole FFN wrapped"):
        get_peft_model(gpt2, adem_config())
    assert {name: type(module) for name, module in gpt2.named_modules()} == before


def test_adem_generate_answers_like_greedy_forward(base):
    model = adapted(base, adem_config())
    ids, features = inputs(seed=7, batch=2)
    with torch.no_grad():
        out = model.generate(input_ids=ids, image_features=features, max_new_tokens=3, do_sample=False,
                             pad_token_id=0)
        running = ids
        for _ in range(3):
            logits = model(input_ids=running, image_features=features).logits
            running = torch.cat([running, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, running)


def test_adem_trains_the_projector_and_position_memory(base):
    model = get_peft_model(copy.deepcopy(base), adem_config(drop_ratio=0.1))
    ids, features = inputs()
    model(input_ids=ids, labels=ids, image_features=features).loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())


# ------------------------------------------------------------------------------------------- the CLS input token
# (that the converted authors' model reads as theirs is tests/cli/test_convert.py's check against their forward)

BOS = 1
PREFIX, TEXT_ONLY_PREFIX = [10, 11, 12], [10, 11, 13, 14, 15]  # 'Image: ' / 'Image: N/A' in some tokenizer


def cls_config(**overrides):
    settings = dict(visual_dim=VISUAL_DIM, multiscale_tokens=[16, 4], num_memory_slots=20,
                    projector_hidden_dim=8, vision_adapter_dim=4, cls_token_prefix_ids=PREFIX,
                    cls_token_text_only_prefix_ids=TEXT_ONLY_PREFIX)
    settings.update(overrides)
    return MemVPConfig.adem_vl(**settings)


def cls_model(base, config=None, encoder=None):
    """An ADEM-VL adapter with the CLS token on `base`, on a tiny CLIP (a 4x4 patch grid of width VISUAL_DIM)."""
    settings = {f.name: getattr(config or cls_config(), f.name) for f in dataclasses.fields(MemVPConfig)}
    settings["vision_encoder"] = encoder if encoder is not None else tiny_clip(hidden_size=VISUAL_DIM)
    config = MemVPConfig(**settings)
    model = get_peft_model(copy.deepcopy(base), config)
    randomize_memory(model)
    return model.eval()


def cls_inputs(batch=3, tokens=6, seed=2):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, tokens), generator=generator)
    ids[:, 0] = BOS
    return ids, torch.randn(batch, 3, 32, 32, generator=generator)


def test_cls_token_is_off_by_default_and_saved_in_the_adapter_config(tmp_path):
    assert not MemVPConfig().cls_token and MemVPConfig().cls_token_prefix_ids is None
    cls_config(vision_adapter_dim=0).save_pretrained(tmp_path)
    loaded = MemVPConfig.from_pretrained(tmp_path)
    assert (loaded.cls_token, loaded.cls_token_prefix_ids, loaded.cls_token_text_only_prefix_ids) == (
        True, PREFIX, TEXT_ONLY_PREFIX)


@pytest.mark.parametrize("overrides, message", [
    (dict(cls_token_prefix_ids=None), "must be a list of token ids"),
    (dict(cls_token_text_only_prefix_ids=[3, -1]), "must be a list of token ids"),
    (dict(cls_token=False), "only apply with cls_token=True"),
    (dict(num_frames=2), "num_frames brings several images"),
    (dict(task_type="SEQ_2_SEQ_LM"), "encoder-decoder"),
])
def test_cls_token_settings_that_cannot_apply_are_refused(overrides, message):
    settings = dict(cls_token=True, cls_token_prefix_ids=PREFIX, cls_token_text_only_prefix_ids=TEXT_ONLY_PREFIX)
    with pytest.raises(ValueError, match=message):
        MemVPConfig(**{**settings, **overrides})


def test_grown_rows_hold_bos_the_prefix_and_the_cls_then_the_rest():
    """[BOS, prefix, CLS, rest] with an image, [BOS, text-only prefix, rest] without; the shorter insertion padded on
    the left; no loss on what was inserted (nor on BOS); positions counted from the mask."""
    from memvp_peft.tuner.input_tokens import ClsInput, grow_inputs

    embedding = torch.nn.Embedding(VOCAB, 4)
    ids = torch.tensor([[BOS, 20, 21, 22], [BOS, 30, 31, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    cls = torch.randn(2, 1, 4)
    grown = grow_inputs(ClsInput(tuple(PREFIX), tuple(TEXT_ONLY_PREFIX), cls, torch.tensor([True, False])),
                        embedding, ids, mask, ids.masked_fill(mask == 0, -100), (BOS,))
    assert grown.input_ids[0, 1:].tolist() == [BOS, *PREFIX, BOS, 20, 21, 22]  # the CLS position holds BOS's id
    assert grown.input_ids[1].tolist() == [BOS, *TEXT_ONLY_PREFIX, 30, 31, 0]
    assert grown.attention_mask.tolist() == [[0] + [1] * 8, [1] * 8 + [0]]
    assert grown.position_ids.tolist() == [[0, 0, 1, 2, 3, 4, 5, 6, 7], [0, 1, 2, 3, 4, 5, 6, 7, 7]]
    assert grown.labels.tolist() == [[-100] * 6 + [20, 21, 22], [-100] * 6 + [30, 31, -100]]
    with torch.no_grad():
        torch.testing.assert_close(grown.inputs_embeds[0, 5], cls[0, 0])
        torch.testing.assert_close(grown.inputs_embeds[0, 2:5], embedding(torch.tensor(PREFIX)))
        torch.testing.assert_close(grown.inputs_embeds[1, 1:6], embedding(torch.tensor(TEXT_ONLY_PREFIX)))
        torch.testing.assert_close(grown.inputs_embeds[1, 6:], embedding(ids[1, 1:]))
    assert grown.inputs_embeds[0, 0].abs().sum() == 0


def test_cls_token_batch_rows_read_as_each_row_alone(base):
    """Mixed rows (with and without an image, right padding) give each row's logits of the row called alone."""
    model = cls_model(base)
    ids, pixels = cls_inputs()
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    rows = torch.tensor([True, False, True])
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_mask=rows).logits
        for row in range(3):
            length = int(mask[row].sum())
            alone = model(input_ids=ids[row:row + 1, :length], pixel_values=pixels[row:row + 1],
                          image_mask=rows[row:row + 1]).logits[0]
            extra = batched.shape[1] - ids.shape[1] - (alone.shape[0] - length)
            torch.testing.assert_close(batched[row, extra:extra + alone.shape[0]], alone, **TOL)


def test_cls_token_text_only_call_reads_like_rows_without_an_image(base):
    model = cls_model(base)
    ids, pixels = cls_inputs()
    with torch.no_grad():
        text_only = model(input_ids=ids).logits
        masked_off = model(input_ids=ids, pixel_values=pixels, image_mask=torch.zeros(3, dtype=torch.bool)).logits
    assert text_only.shape[1] == ids.shape[1] + len(TEXT_ONLY_PREFIX)
    torch.testing.assert_close(text_only, masked_off, **TOL)


def test_cls_token_generate_answers_like_greedy_forward_and_returns_the_callers_ids(base):
    model = cls_model(base)
    ids, pixels = cls_inputs(batch=3)
    rows = torch.tensor([True, False, True])
    with torch.no_grad():
        out = model.generate(input_ids=ids, pixel_values=pixels, image_mask=rows, max_new_tokens=3, do_sample=False,
                             pad_token_id=0)
        running = ids
        for _ in range(3):
            logits = model(input_ids=running, pixel_values=pixels, image_mask=rows).logits
            running = torch.cat([running, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, running)


def test_cls_token_trains_its_projector_and_the_loss_skips_the_inserted_tokens(base):
    model = cls_model(base)
    model.train()
    ids, pixels = cls_inputs()
    out = model(input_ids=ids, labels=ids, pixel_values=pixels)
    out.loss.backward()
    cls_projector = model.base_model.memvp_memory["default"].cls_projector
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in cls_projector.parameters())
    shifted = out.logits[:, -ids.shape[1]:-1]  # the logits that predict ids[:, 1:]: the CLS position and the rest
    want = torch.nn.functional.cross_entropy(shifted.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, want)


def test_cls_token_text_only_training_call_still_runs_the_cls_projector(base):
    """Data-parallel ranks with and without images must use the same parameters: a text-only call runs the CLS
    projector too (times 0), as the memory runs its projector."""
    model = cls_model(base)
    model.train()
    ids, _ = cls_inputs()
    model(input_ids=ids, labels=ids).loss.backward()
    cls_projector = model.base_model.memvp_memory["default"].cls_projector
    assert all(p.grad is not None and p.grad.abs().sum() == 0 for p in cls_projector.parameters())


@pytest.mark.parametrize("call, message", [
    (lambda model, ids, pixels: model(input_ids=ids, image_features=torch.randn(3, 16, 16)), "image_features"),
    (lambda model, ids, pixels: model(input_ids=ids, pixel_values=pixels[:, None].expand(-1, 2, -1, -1, -1)),
     "2 images per row"),
    (lambda model, ids, pixels: model(input_ids=ids[:, 1:], pixel_values=pixels), "starts with token"),
    (lambda model, ids, pixels: model(inputs_embeds=torch.randn(3, 6, 32), pixel_values=pixels), "inputs_embeds"),
])
def test_cls_token_call_it_cannot_apply_to_is_refused(base, call, message):
    model = cls_model(base)
    ids, pixels = cls_inputs()
    with pytest.raises(ValueError, match=message):
        call(model, ids, pixels)


def test_cls_token_with_an_encoder_without_cls_is_refused(base):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    siglip = SiglipVisionModel(SiglipVisionConfig(hidden_size=VISUAL_DIM, intermediate_size=32, num_hidden_layers=2,
                                                  num_attention_heads=4, image_size=32, patch_size=8))
    model = cls_model(base, encoder=siglip)
    ids, pixels = cls_inputs()
    with pytest.raises(ValueError, match="has none"):
        model(input_ids=ids, pixel_values=pixels)


def test_cls_token_on_an_encoder_decoder_base_is_refused_and_leaves_it_as_it_was():
    from test_seq2seq import t5

    model = t5(gated=True)
    before = {name: type(module) for name, module in model.named_modules()}
    with pytest.raises(ValueError, match="encoder-decoder"):
        get_peft_model(model, cls_config(vision_adapter_dim=0))
    assert {name: type(module) for name, module in model.named_modules()} == before


def test_cls_token_with_a_second_active_adapter_is_refused(base):
    model = cls_model(base)
    model.add_adapter("other", MemVPConfig(visual_dim=16, num_memory_slots=20, projector_hidden_dim=8))
    model.base_model.set_adapter(["default", "other"])
    ids, pixels = cls_inputs()
    with pytest.raises(ValueError, match="Activate one adapter"):
        model(input_ids=ids, pixel_values=pixels)
