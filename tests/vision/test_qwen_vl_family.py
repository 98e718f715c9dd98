"""A batch of a Qwen2-VL / Qwen2.5-VL / Qwen3-VL processor, read by MemVP (`vision.families.QwenVLFamily`): the
placeholders (`<|vision_start|><|image_pad|>*<|vision_end|>`) leave the sequence, the VLM's own tower and merger
turn each image's flattened patches into its own number of tokens (text width), and those go to the row's memory in
order. The language model sees the text alone, at the positions it computes for a text-only prompt."""

import pytest
import torch
from conftest import randomize_memory
from peft import PeftModel, get_peft_model
from vlm_fixtures import digit_images, qwen2_5_vl, qwen2_vl, qwen3_vl, with_labels
from vlm_fixtures import rows_batch as batch

from memvp_peft import MemVPConfig

BUILDERS = {"qwen2_vl": qwen2_vl, "qwen2_5_vl": qwen2_5_vl, "qwen3_vl": qwen3_vl}
TEXT_WIDTH = 64  # the merger's output: what the placeholders carry, and MemVP's visual_dim
SLOTS = 34  # the most tokens of one row below: a 32 x 32 image (16) and a 48 x 24 one (18)


def memvp_config(**overrides) -> MemVPConfig:
    fields = dict(visual_dim=TEXT_WIDTH, num_memory_slots=SLOTS, projector_hidden_dim=16, memory_dropout=0.0,
                  visual_scale=1.0, memory_scale=1.0, task_type="CAUSAL_LM")
    fields.update(overrides)
    return MemVPConfig(**fields)


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def family(request):
    """(name, a fresh base builder, its processor)."""
    _, processor = BUILDERS[request.param]()
    return request.param, BUILDERS[request.param], processor


def adapted(build, **fields):
    model = get_peft_model(build()[0], memvp_config(**fields))
    randomize_memory(model, scale=1.0)
    return model.eval()






def text_only(processor, inputs):
    """The same rows without their images and placeholders: what the language model must see."""
    tokens = processor.tokenizer.convert_tokens_to_ids(["<|image_pad|>", "<|vision_start|>", "<|vision_end|>"])
    keep = inputs["attention_mask"].bool() & ~torch.isin(inputs["input_ids"], torch.tensor(tokens))
    return [row[mask].tolist() for row, mask in zip(inputs["input_ids"], keep)]


@pytest.fixture(scope="module")
def images():
    return digit_images(4)[0]  # 32 x 32, 48 x 24, 32 x 32, 48 x 24


# ------------------------------------------------------------------------------------------- what the LM reads


def test_the_language_model_reads_only_the_text_of_the_processors_batch(family, images):
    _, build, processor = family
    model = adapted(build)
    inputs = batch(processor, [[images[0]], [images[1], images[2]]])
    seen = []
    model.get_base_model().get_input_embeddings().register_forward_hook(lambda m, a, o: seen.append(a[0]))
    with torch.no_grad():
        model(**inputs)
    pad = processor.tokenizer.pad_token_id
    assert [[token for token in row if token != pad] for row in seen[0].tolist()] == text_only(processor, inputs)


def test_the_loss_is_conditioned_on_the_images(family, images):
    _, build, processor = family
    model = adapted(build)
    other = digit_images(6)[0][4:]  # other digits at the same sizes
    with torch.no_grad():
        loss = model(**with_labels(batch(processor, [[images[0]], [images[1]]], answers=["one", "two"]))).loss
        again = model(**with_labels(batch(processor, [[images[0]], [images[1]]], answers=["one", "two"]))).loss
        other_loss = model(**with_labels(batch(processor, [[other[0]], [other[1]]], answers=["one", "two"]))).loss
    torch.testing.assert_close(loss, again)
    assert abs(float(loss) - float(other_loss)) > 1e-4


def test_the_text_sits_at_the_positions_of_a_text_only_prompt(family, images):
    """The processor's batch gives the logits of its text-only rows with the same images handed over as features:
    no image grid shifts the M-RoPE positions, not even one cached by an earlier call of the VLM with images."""
    _, build, processor = family
    model = adapted(build)
    inputs = batch(processor, [[images[0]], [images[1], images[2]]], answers=["one", "two"])
    with torch.no_grad(), model.disable_adapter():
        model(**inputs)  # the VLM's own call caches its rope_deltas
    inner = model.get_base_model().model
    with torch.no_grad():
        features = inner.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
        got = model(**inputs).logits
    rows = text_only(processor, inputs)
    for row, (ids, indices) in enumerate(zip(rows, [[0], [1, 2]])):
        ids = torch.tensor([ids])
        with torch.no_grad():
            want = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                         image_features=[[features[i] for i in indices]]).logits
        torch.testing.assert_close(got[row, : ids.shape[1]], want[0], rtol=1e-4, atol=1e-5)


def test_a_row_without_an_image_reads_only_the_learned_memory(family, images):
    _, build, processor = family
    model = adapted(build)
    inputs = batch(processor, [[images[0]], []], answers=["one", "two"])
    alone = batch(processor, [[]], answers=["two"])
    with torch.no_grad():
        got = model(**inputs).logits
        want = model(**alone).logits  # no visual input at all: p_k / p_v only
    length = alone["input_ids"].shape[1]
    torch.testing.assert_close(got[1, :length], want[0], rtol=1e-4, atol=1e-5)


def test_rows_of_different_image_sizes_and_counts_read_the_same_as_alone(family, images):
    _, build, processor = family
    model = adapted(build)
    rows = [[images[1], images[0]], [images[2]], [images[3]]]
    inputs = batch(processor, rows, answers=["one", "two", "three"])
    with torch.no_grad():
        together = model(**inputs).logits
        for row, row_images in enumerate(rows):
            alone = batch(processor, [row_images], answers=[["one", "two", "three"][row]])
            length = int(alone["attention_mask"].sum())
            want = model(**alone).logits[0, :length]
            torch.testing.assert_close(together[row, :length], want, rtol=1e-4, atol=1e-5)


def test_a_row_needing_more_slots_than_num_memory_slots_is_refused(family, images):
    _, build, processor = family
    model = adapted(build, num_memory_slots=17)
    with pytest.raises(ValueError, match="num_memory_slots"):
        model(**batch(processor, [[images[0]], [images[1]]]))  # 16 and 18 tokens


def test_video_inputs_are_refused(family, images):
    _, build, processor = family
    model = adapted(build)
    inputs = batch(processor, [[images[0]]])
    with pytest.raises(ValueError, match="video inputs"):
        model(**inputs, pixel_values_videos=torch.zeros(8, inputs["pixel_values"].shape[1]),
              video_grid_thw=torch.tensor([[2, 2, 2]]))


def test_the_tower_and_merger_get_no_gradient_and_the_projector_does(family, images):
    _, build, processor = family
    model = adapted(build)
    model.train()
    model(**with_labels(batch(processor, [[images[0]], [images[1]]], answers=["one", "two"]))).loss.backward()
    visual = model.get_base_model().model.visual
    assert all(p.grad is None for p in visual.parameters())
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
    assert model.base_model.memvp_memory["default"].projector[0].weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------- generation


def test_generate_with_kv_cache_follows_the_uncached_decoding(family, images):
    """Left-padded prompts; each decode step's positions continue the text-only prompt's."""
    _, build, processor = family
    model = adapted(build)
    prompt = batch(processor, [[images[0]], [images[1], images[2]]], padding_side="left")
    cached = model.generate(**prompt, max_new_tokens=5, do_sample=False, use_cache=True)
    uncached = model.generate(**prompt, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(cached[:, -5:], uncached[:, -5:])
    alone = model.generate(**batch(processor, [[images[0]]], padding_side="left"), max_new_tokens=5, do_sample=False)
    assert torch.equal(cached[0, -5:], alone[0, -5:])


def test_generate_scores_its_first_token_from_the_images(family, images):
    _, build, processor = family
    model = adapted(build)
    prompt = batch(processor, [[images[0]], [images[1]]], padding_side="left")
    out = model.generate(**prompt, max_new_tokens=1, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        logits = model(**prompt).logits[:, -1]
    torch.testing.assert_close(out.scores[0], logits, rtol=1e-4, atol=1e-5)


def test_beam_search_runs_with_the_images(family, images):
    _, build, processor = family
    model = adapted(build)
    prompt = batch(processor, [[images[0]], [images[1]]], padding_side="left")
    out = model.generate(**prompt, max_new_tokens=3, num_beams=3, num_return_sequences=2, do_sample=False)
    assert out.shape[0] == 4


# ---------------------------------------------------------------------------------------------------- saving


def test_a_saved_adapter_loads_onto_a_fresh_base_and_reads_the_same(family, images, tmp_path):
    _, build, processor = family
    model = adapted(build)
    inputs = batch(processor, [[images[0]], [images[1], images[2]]], answers=["one", "two"])
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(build()[0], tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits)


def test_pixel_values_without_their_grid_are_refused(family, images):
    _, build, processor = family
    model = adapted(build)
    inputs = batch(processor, [[images[0]]])
    del inputs["image_grid_thw"]
    with pytest.raises(ValueError, match="`image_grid_thw` are needed"):
        model(**inputs)


def test_vision_adapters_are_refused_naming_the_family():
    """MemVP's bottlenecks go into a VisionEncoder's blocks; the Qwen tower is run by its family."""
    with pytest.raises(ValueError, match="the Qwen-VL base's own tower is run by its family"):
        get_peft_model(qwen2_vl()[0], memvp_config(vision_adapter_dim=4))


def test_memvps_own_tiling_is_refused_with_the_processors_images(family, images):
    """Each image is read at its own size; tiling it again into MemVP's image_grid would misread it."""
    _, build, processor = family
    model = adapted(build, image_grid=[2, 2])
    with pytest.raises(ValueError, match="image_grid=None"):
        model(**batch(processor, [[images[0]]]))
