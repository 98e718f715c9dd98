"""A batch of Mistral 3's own `PixtralProcessor`, read by MemVP (`vision.families.Mistral3Family`): the `[IMG]`
tokens leave the sequence with the `[IMG_BREAK]` / `[IMG_END]` markers between them, the VLM's Pixtral tower reads
each image at its own `image_sizes` (before the VLM's projector and its patch merger, at the adapter's
`vision_feature_layer`), and each image's real patches go to its row's memory in the variable form."""

import pytest
import torch
from conftest import randomize_memory
from peft import PeftModel, get_peft_model
from vlm_fixtures import digit_images, logits, mistral3, with_labels
from vlm_fixtures import rows_batch as batch

from memvp_peft import MemVPConfig
from memvp_peft.vision.families import Mistral3Family, family_of

TOWER_WIDTH = 32  # Pixtral's width: MemVP's visual_dim
# 4-pixel patches: a 32 x 32 image is 8 x 8 = 64 patches, a 48 x 24 one (resized to 32 x 16) 8 x 4 = 32
PATCHES = (64, 32)
SLOTS = 96  # the most patches of one row below: one image of each size
MARKERS = ("[IMG]", "[IMG_BREAK]", "[IMG_END]")


def memvp_config(**overrides) -> MemVPConfig:
    fields = dict(visual_dim=TOWER_WIDTH, num_memory_slots=SLOTS, projector_hidden_dim=16, memory_dropout=0.0,
                  visual_scale=1.0, memory_scale=1.0, task_type="CAUSAL_LM")
    fields.update(overrides)
    return MemVPConfig(**fields)


def adapted(seed: int = 0, **fields):
    model = get_peft_model(mistral3(seed)[0], memvp_config(**fields))
    randomize_memory(model, scale=1.0)
    return model.eval()


@pytest.fixture(scope="module")
def processor():
    return mistral3()[1]


@pytest.fixture(scope="module")
def model():
    return adapted()


@pytest.fixture(scope="module")
def images():
    return digit_images(4)[0]  # 32 x 32, 48 x 24, 32 x 32, 48 x 24






def text_only(processor, inputs):
    """Each row's ids without its images' tokens and markers: what the language model must see."""
    markers = torch.tensor(processor.tokenizer.convert_tokens_to_ids(list(MARKERS)))
    keep = inputs["attention_mask"].bool() & ~torch.isin(inputs["input_ids"], markers)
    return [row[mask].tolist() for row, mask in zip(inputs["input_ids"], keep)]


def tower_features(model, inputs, layer=-2):
    """Each image's real patches at hidden state `layer` of the VLM's Pixtral tower, run directly."""
    tower = model.get_base_model().model.vision_tower
    with torch.no_grad():
        hidden = tower(inputs["pixel_values"], image_sizes=inputs["image_sizes"], output_hidden_states=True)
    sizes = [(h // 4) * (w // 4) for h, w in inputs["image_sizes"].tolist()]
    return list(hidden.hidden_states[layer].squeeze(0).split(sizes))




# ------------------------------------------------------------------------------------------- what the LM reads


def test_the_family_is_picked_by_its_model_type(model):
    assert isinstance(family_of(model.get_base_model()), Mistral3Family)


def test_the_processor_batch_gives_the_image_conditioned_loss(model, processor, images):
    other = digit_images(6)[0][4:]  # other digits at the same sizes
    with torch.no_grad():
        loss = model(**with_labels(batch(processor, [[images[0]], [images[1]]], answers=["one", "two"]))).loss
        again = model(**with_labels(batch(processor, [[images[0]], [images[1]]], answers=["one", "two"]))).loss
        other_loss = model(**with_labels(batch(processor, [[other[0]], [other[1]]], answers=["one", "two"]))).loss
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, again)
    assert abs(float(loss) - float(other_loss)) > 1e-4


def test_the_decoder_layers_see_only_the_text_tokens(model, processor, images):
    inputs = batch(processor, [[images[0]], [images[1]]], answers=["one", "two"])
    text = text_only(processor, inputs)
    seen, lengths = [], []
    base = model.get_base_model()
    handles = [base.get_input_embeddings().register_forward_hook(lambda m, a, o: seen.append(a[0]))]
    handles += [layer.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append((args[0] if args else kwargs["hidden_states"]).shape[1]),
        with_kwargs=True) for layer in base.get_decoder().layers]
    try:
        logits(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    pad = processor.tokenizer.pad_token_id
    assert [[token for token in row if token != pad] for row in seen[0].tolist()] == text
    assert lengths == [max(len(row) for row in text)] * len(base.get_decoder().layers)


def test_the_memory_holds_the_towers_patches_at_the_adapters_feature_layer(model, processor, images):
    """The processor's batch gives the logits of its text alone with each image's real patches of the tower's hidden
    state `vision_feature_layer` (-2) handed over as features; another hidden state gives other logits."""
    inputs = batch(processor, [[images[0]], [images[1]]], answers=["one", "two"])
    got = logits(model, inputs)
    rows = text_only(processor, inputs)
    for layer, same in ((-2, True), (-1, False)):
        features = tower_features(model, inputs, layer)
        assert [f.shape for f in features] == [(n, TOWER_WIDTH) for n in PATCHES]
        for row, ids in enumerate(rows):
            ids = torch.tensor([ids])
            want = logits(model, {"input_ids": ids, "image_features": [[features[row]]]})
            assert torch.allclose(got[row, : ids.shape[1]], want[0], rtol=1e-4, atol=1e-5) == same


def test_a_row_without_an_image_reads_only_the_learned_memory(model, processor, images):
    inputs = batch(processor, [[images[0]], []], answers=["one", "two"])
    alone = batch(processor, [[]], answers=["two"])
    assert "pixel_values" not in alone
    got = logits(model, inputs)
    want = logits(model, alone)  # no visual input at all: p_k / p_v only
    length = alone["input_ids"].shape[1]
    torch.testing.assert_close(got[1, :length], want[0], rtol=1e-4, atol=1e-5)


def test_rows_of_different_image_sizes_and_counts_read_the_same_as_alone(model, processor, images):
    """A row with a 32 x 32 and a 48 x 24 image (64 + 32 slots) beside rows of one image of either size."""
    rows = [[images[1], images[0]], [images[2]], [images[3]]]
    inputs = batch(processor, rows, answers=["one", "two", "three"])
    together = logits(model, inputs)
    for row, row_images in enumerate(rows):
        alone = batch(processor, [row_images], answers=[["one", "two", "three"][row]])
        length = int(alone["attention_mask"].sum())
        torch.testing.assert_close(together[row, :length], logits(model, alone)[0, :length], rtol=1e-4, atol=1e-5)


def test_a_row_needing_more_slots_than_num_memory_slots_is_refused(processor, images):
    model = adapted(num_memory_slots=63)
    with pytest.raises(ValueError, match="num_memory_slots"):
        model(**batch(processor, [[images[0]], [images[1]]]))  # 64 and 32 patches


def test_the_vlms_projector_and_tower_stay_frozen_and_untouched(processor, images):
    model = adapted()
    inner = model.get_base_model().model
    before = {name: p.detach().clone() for name, p in inner.multi_modal_projector.named_parameters()}
    assert not any(p.requires_grad for p in inner.multi_modal_projector.parameters())
    assert not any(p.requires_grad for p in inner.vision_tower.parameters())
    projector_calls = []
    inner.multi_modal_projector.register_forward_hook(lambda *args: projector_calls.append(1))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    model(**with_labels(batch(processor, [[images[0]], [images[1]]], answers=["one", "two"]))).loss.backward()
    assert model.base_model.memvp_memory["default"].projector[0].weight.grad.abs().sum() > 0
    optimizer.step()
    assert projector_calls == []  # MemVP's projector replaces it: it never runs
    assert all(p.grad is None for p in inner.multi_modal_projector.parameters())
    assert all(p.grad is None for p in inner.vision_tower.parameters())
    assert all(torch.equal(p, before[name]) for name, p in inner.multi_modal_projector.named_parameters())


# ------------------------------------------------------------------------------------------------- generation


def test_generate_with_kv_cache_follows_the_uncached_decoding(model, processor, images):
    prompt = batch(processor, [[images[0]], [images[1], images[2]]], padding_side="left")
    cached = model.generate(**prompt, max_new_tokens=5, do_sample=False, use_cache=True)
    uncached = model.generate(**prompt, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(cached[:, -5:], uncached[:, -5:])
    alone = model.generate(**batch(processor, [[images[0]]], padding_side="left"), max_new_tokens=5, do_sample=False)
    assert torch.equal(cached[0, -5:], alone[0, -5:])


def test_generate_scores_its_first_token_from_the_images(model, processor, images):
    prompt = batch(processor, [[images[0]], [images[1]]], padding_side="left")
    out = model.generate(**prompt, max_new_tokens=1, do_sample=False, output_scores=True, return_dict_in_generate=True)
    torch.testing.assert_close(out.scores[0], logits(model, prompt)[:, -1], rtol=1e-4, atol=1e-5)


def test_beam_search_runs_with_the_images(model, processor, images):
    prompt = batch(processor, [[images[0]], [images[1]]], padding_side="left")
    out = model.generate(**prompt, max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False)
    assert out.shape[0] == 4
    markers = processor.tokenizer.convert_tokens_to_ids(list(MARKERS))
    assert not torch.isin(out, torch.tensor(markers)).any()  # the prompt comes back without its image tokens


# ---------------------------------------------------------------------------------------------------- saving


def test_a_saved_adapter_loads_onto_a_fresh_base_and_reads_the_same(model, processor, images, tmp_path):
    inputs = batch(processor, [[images[0]], [images[1], images[2]]], answers=["one", "two"])
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(mistral3()[0], tmp_path).eval()
    torch.testing.assert_close(logits(loaded, inputs), logits(model, inputs))


# -------------------------------------------------------------------------------------------------- refusals


def test_pixel_values_without_their_image_sizes_are_refused(model, processor, images):
    inputs = batch(processor, [[images[0]]])
    del inputs["image_sizes"]
    with pytest.raises(ValueError, match="`image_sizes` are needed"):
        model(**inputs)


def test_image_tokens_not_laid_out_as_the_images_rows_are_refused(model, processor, images):
    """A text whose `[IMG]` runs do not follow the image's rows: its markers could not be told from text tokens."""
    inputs = batch(processor, [[images[0]]])
    ids = inputs["input_ids"]
    image_token, image_break = processor.tokenizer.convert_tokens_to_ids(["[IMG]", "[IMG_BREAK]"])
    first_break = int((ids[0] == image_break).nonzero()[0])
    ids[0, first_break], ids[0, first_break + 1] = image_token, image_break  # rows of 5 and 3 tokens
    with pytest.raises(ValueError, match="runs of"):
        model(**inputs)


def test_a_text_token_where_a_row_marker_stands_is_refused(model, processor, images):
    """The markers are found by where they stand; a text token there is refused, never taken out as a marker."""
    inputs = batch(processor, [[images[0]]])
    ids = inputs["input_ids"]
    image_break, word = processor.tokenizer.convert_tokens_to_ids(["[IMG_BREAK]", "digit"])
    ids[0, int((ids[0] == image_break).nonzero()[0])] = word
    with pytest.raises(ValueError, match="tokens closing the rows"):
        model(**inputs)


def test_an_out_of_range_feature_layer_is_refused_at_injection():
    with pytest.raises(ValueError, match="vision_feature_layer=-4 is out of range"):
        get_peft_model(mistral3()[0], memvp_config(vision_feature_layer=-4))


def test_a_visual_dim_other_than_the_towers_width_is_refused_at_injection():
    with pytest.raises(ValueError, match="set visual_dim=32"):
        get_peft_model(mistral3()[0], memvp_config(visual_dim=64))


def test_vision_adapters_are_refused_naming_the_family():
    with pytest.raises(ValueError, match="the Mistral 3 base's own tower is run by its family"):
        get_peft_model(mistral3()[0], memvp_config(vision_adapter_dim=4))


def test_memvps_own_tiling_is_refused_with_the_processors_images(processor, images):
    model = adapted(image_grid=[2, 2])
    with pytest.raises(ValueError, match="image_grid=None"):
        model(**batch(processor, [[images[0]]]))
