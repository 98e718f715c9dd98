"""A batch of a VLM's own processor, read by MemVP (`tuner/entry.py`): its image placeholders leave the
sequence -- the language model sees exactly the tokens MemVPProcessor builds for the same text -- and its images go
to each row's memory. Training, evaluation and generate() work with the family's processor; what cannot be matched
is refused."""

import pytest
import torch
from conftest import randomize_memory
from llava_family_fixtures import (
    LLAVA_TEMPLATE,
    SHORT_QUESTION,
    TOKENS_PER_TILE,
    chat_texts,
    flipped,
    image_token,
    llava_next_processor,
    llava_processor,
    memvp_config,
    onevision_image_processor,
    processor_batch,
    sized_images,
    tiny_llava,
    tiny_llava_next,
    tiny_llava_onevision,
    vlm_tokenizer,
)
from peft import PeftModel, get_peft_model
from trl_fixtures import QUESTION, digit_images

from memvp_peft import MemVPProcessor
from memvp_peft.demo_models import clip_image_processor


@pytest.fixture(scope="module")
def tokenizer():
    return vlm_tokenizer()


@pytest.fixture(scope="module")
def images():
    return digit_images(3)[0]


def adapted(base, **fields):
    model = get_peft_model(base, memvp_config(**fields))
    randomize_memory(model, scale=1.0)
    return model.eval()


@pytest.fixture
def llava(tokenizer):
    return adapted(tiny_llava(tokenizer), num_memory_slots=2 * TOKENS_PER_TILE)


def memvp_processor(tokenizer):
    return MemVPProcessor(clip_image_processor(32), tokenizer, chat_template=LLAVA_TEMPLATE)


def memvp_batch(tokenizer, images_per_row, padding_side="right", questions=None):
    """What MemVPProcessor builds for the same conversations as `processor_batch`: the text without placeholders."""
    processor = memvp_processor(tokenizer)
    texts = chat_texts(processor, images_per_row, questions=questions)
    return processor(images=images_per_row, text=texts, return_tensors="pt", padding=True, padding_side=padding_side)


def with_labels(batch):
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    return {**batch, "labels": labels}


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


# ---------------------------------------------------------------------------------------------- the text it reads


#: Rows that lose 16, 0, 16 and 32 placeholders, with a longer and a shorter question: padded before and after.
ROWS = (([0], QUESTION), ([], SHORT_QUESTION), ([2], SHORT_QUESTION), ([0, 1], QUESTION))


def rows_of(images):
    return [[images[i] for i in indices] for indices, _ in ROWS], [question for _, question in ROWS]


@pytest.mark.parametrize("side", ["right", "left"])
def test_the_language_model_reads_the_tokens_and_logits_of_a_memvp_processor_batch(tokenizer, llava, images, side):
    rows, questions = rows_of(images)
    theirs = processor_batch(llava_processor(tokenizer), rows, side, questions=questions)
    ours = memvp_batch(tokenizer, rows, side, questions=questions)
    assert theirs["input_ids"].shape[1] == ours["input_ids"].shape[1] + 2 * TOKENS_PER_TILE
    assert not ours["attention_mask"].all()
    torch.testing.assert_close(logits(llava, theirs), logits(llava, ours), rtol=0, atol=0)


def test_the_decoder_layers_see_only_the_text_tokens(tokenizer, llava, images):
    rows = [[images[0]], [images[1]]]
    theirs = processor_batch(llava_processor(tokenizer), rows)
    text_tokens = memvp_batch(tokenizer, rows)["input_ids"].shape[1]
    lengths = []
    for layer in llava.get_base_model().model.language_model.layers:
        layer.register_forward_pre_hook(
            lambda module, args, kwargs: lengths.append((args[0] if args else kwargs["hidden_states"]).shape[1]),
            with_kwargs=True)
    logits(llava, theirs)
    assert lengths == [text_tokens] * 2
    assert (theirs["input_ids"] == image_token(tokenizer)).sum() == 2 * TOKENS_PER_TILE


def test_the_processor_batch_gives_the_image_conditioned_loss(tokenizer, llava, images):
    processor = llava_processor(tokenizer)
    rows = [[images[0]], [images[1]]]
    with torch.no_grad():
        loss = llava(**with_labels(processor_batch(processor, rows))).loss
        other = processor_batch(processor, [[flipped(images)[0]], [flipped(images)[1]]])
        other_images = llava(**with_labels(other)).loss
        memvp = llava(**with_labels(memvp_batch(tokenizer, rows))).loss
    torch.testing.assert_close(loss, memvp, rtol=0, atol=0)
    assert abs(float(loss) - float(other_images)) > 1e-3


def test_a_text_only_row_in_the_batch_reads_only_the_learned_memory(tokenizer, llava, images):
    processor = llava_processor(tokenizer)
    mixed = processor_batch(processor, [[images[0]], []], answers=["one", "two"])
    alone = processor_batch(processor, [[]], answers=["two"])
    width = alone["input_ids"].shape[1]
    with torch.no_grad():
        text_only = llava(**alone).logits[0]  # no visual input at all: K = p_k, V = p_v
    torch.testing.assert_close(logits(llava, mixed)[1, :width], text_only, rtol=1e-5, atol=1e-6)


def test_given_position_ids_are_dropped_so_the_model_counts_the_text_alone(tokenizer, llava, images):
    batch = processor_batch(llava_processor(tokenizer), [[images[0]], [images[1]]])
    positions = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])
    torch.testing.assert_close(logits(llava, {**batch, "position_ids": positions}), logits(llava, batch))


def test_llava_next_reads_each_images_real_tiles_into_its_rows_memory(tokenizer):
    """A wide and a tall image: each is the overview plus a 1x2 / 2x1 grid (3 tiles; the processor pads to its
    batch's most), one row each, plus a text-only row."""
    model = adapted(tiny_llava_next(tokenizer), num_memory_slots=3 * TOKENS_PER_TILE)
    wide, tall = sized_images()
    theirs = processor_batch(llava_next_processor(tokenizer), [[wide], [], [tall]])
    ours = memvp_batch(tokenizer, [[], [], []])
    tiles = theirs["pixel_values"]
    pixel_values = torch.stack([tiles[0, :3], torch.zeros_like(tiles[0, :3]), tiles[1, :3]])
    image_mask = torch.tensor([[True] * 3, [False] * 3, [True] * 3])
    want = logits(model, {"input_ids": ours["input_ids"], "attention_mask": ours["attention_mask"],
                          "pixel_values": pixel_values, "image_mask": image_mask})
    torch.testing.assert_close(logits(model, theirs), want, rtol=0, atol=0)


@pytest.mark.parametrize("grouped", [False, True], ids=["one_image_a_row", "two_images_in_a_row"])
def test_llava_onevision_reads_its_image_processors_batch(tokenizer, grouped):
    """OneVision's processor cannot be built here (its video processor needs torchvision): its image processor's
    batch, with the text its processor writes -- the counts its model checks -- built by hand."""
    model = adapted(tiny_llava_onevision(tokenizer), num_memory_slots=3 * TOKENS_PER_TILE)
    wide, tall = sized_images()
    processed = onevision_image_processor()(images=[[wide, tall]] if grouped else [[wide], [tall]],
                                            return_tensors="pt")
    counts = [17, 17] if grouped else [52, 46]  # the overview and a newline / the unpadded grid with its newlines
    rows = [counts] if grouped else [[counts[0]], [counts[1]]]
    texts = ["USER: " + "".join("<image>" * count for count in row) + " What digit ?" for row in rows]
    theirs = tokenizer(texts, return_tensors="pt", padding=True)
    ours = tokenizer(["USER: What digit ?"] * len(rows), return_tensors="pt")
    tiles = processed["pixel_values"]
    pixel_values = tiles[:, 0][None] if grouped else tiles[:, :3]
    with torch.no_grad():
        got = model(**theirs, pixel_values=tiles, image_sizes=processed["image_sizes"],
                    batch_num_images=processed["batch_num_images"]).logits
        want = model(**ours, pixel_values=pixel_values, image_mask=torch.ones(pixel_values.shape[:2], dtype=torch.bool)
                     ).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_disabled_adapter_hands_the_vlm_its_processors_whole_batch(tokenizer):
    base = tiny_llava_next(tokenizer)
    batch = processor_batch(llava_next_processor(tokenizer), [[sized_images()[0]], [sized_images()[1]]])
    want = logits(base, batch)
    model = adapted(base, num_memory_slots=3 * TOKENS_PER_TILE)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, batch), want, rtol=0, atol=0)


# -------------------------------------------------------------------------------------------------------- generate


def test_generate_strips_the_prompt_once_and_returns_it_without_placeholders(tokenizer, llava, images):
    rows, questions = rows_of(images)
    prompt = processor_batch(llava_processor(tokenizer), rows, padding_side="left", questions=questions)
    ours = memvp_batch(tokenizer, rows, padding_side="left", questions=questions)
    with torch.no_grad():
        out = llava.generate(**prompt, max_new_tokens=4, do_sample=False)
        want = llava.generate(**ours, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, want)
    assert torch.equal(out[:, : ours["input_ids"].shape[1]], ours["input_ids"])


@pytest.mark.parametrize(
    "options", [{"use_cache": False}, {"num_beams": 2}, {"num_beams": 2, "num_return_sequences": 2}],
    ids=["without_cache", "beams", "beams_returning_two"])
def test_generate_with_the_kv_cache_equals_generate_without_and_beams_follow_the_memory(tokenizer, llava, images,
                                                                                       options):
    rows, questions = rows_of(images)
    prompt = processor_batch(llava_processor(tokenizer), rows, padding_side="left", questions=questions)
    ours = memvp_batch(tokenizer, rows, padding_side="left", questions=questions)
    with torch.no_grad():
        out = llava.generate(**prompt, max_new_tokens=4, do_sample=False, **options)
        want = llava.generate(**ours, max_new_tokens=4, do_sample=False, **options)
        cached = llava.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, want)
    if options == {"use_cache": False}:
        assert torch.equal(out, cached)


# ---------------------------------------------------------------------------------------------------- save / load


def test_a_saved_adapter_reloads_to_the_same_logits_on_the_processor_batch(tokenizer, llava, images, tmp_path):
    batch = processor_batch(llava_processor(tokenizer), [[images[0]], [images[1]]])
    before = logits(llava, batch)
    llava.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_llava(tokenizer), tmp_path).eval()
    torch.testing.assert_close(logits(reloaded, batch), before, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ what is refused


def test_placeholders_without_pixel_values_are_refused_naming_the_family(tokenizer, llava, images):
    batch = processor_batch(llava_processor(tokenizer), [[images[0]]])
    del batch["pixel_values"]
    with pytest.raises(ValueError, match=r"contain the Llava image placeholder token \(id \d+\), but no `pixel_values` "
                                         r"came with them"):
        llava(**batch)


def test_placeholders_with_image_features_are_refused(tokenizer, llava, images):
    batch = processor_batch(llava_processor(tokenizer), [[images[0]]])
    del batch["pixel_values"]
    with pytest.raises(ValueError, match=r"but they came with `image_features` / an `image_mask`"):
        llava(**batch, image_features=torch.randn(1, TOKENS_PER_TILE, 32))


def test_more_images_than_the_placeholders_stand_for_are_refused(tokenizer, llava, images):
    batch = processor_batch(llava_processor(tokenizer), [[images[0]], [images[1]]])
    batch["pixel_values"] = torch.cat([batch["pixel_values"], batch["pixel_values"][:1]])
    with pytest.raises(ValueError, match=r"the call brings 3 images but the placeholders of `input_ids` stand for 2"):
        llava(**batch)


def test_fewer_images_than_placeholders_are_refused(tokenizer, llava, images):
    batch = processor_batch(llava_processor(tokenizer), [[images[0]], [images[1]]])
    batch["pixel_values"] = batch["pixel_values"][:1]
    with pytest.raises(ValueError, match=r"row 1 of `input_ids` holds 16 image placeholder tokens"):
        llava(**batch)


def test_image_sizes_without_placeholders_are_refused(tokenizer):
    model = adapted(tiny_llava_next(tokenizer), num_memory_slots=3 * TOKENS_PER_TILE)
    ours = memvp_batch(tokenizer, [[]])
    with pytest.raises(ValueError, match=r"\['image_sizes'\] came without the LLaVA-NeXT processor's image "
                                         r"placeholders"):
        model(**ours, pixel_values=torch.randn(1, 3, 32, 32), image_mask=torch.tensor([True]),
              image_sizes=torch.tensor([[32, 32]]))


def test_a_batch_padded_on_both_sides_is_refused(tokenizer, llava, images):
    batch = processor_batch(llava_processor(tokenizer), [[images[0]], [images[1]]])
    batch["attention_mask"][0, 0] = 0
    batch["attention_mask"][1, -1] = 0
    with pytest.raises(ValueError, match=r"pads some rows on the left and others on the right"):
        llava(**batch)


def test_an_adapter_that_tiles_itself_refuses_llava_next_tiles(tokenizer):
    model = adapted(tiny_llava_next(tokenizer), num_memory_slots=5 * TOKENS_PER_TILE, image_grid=[2, 2])
    batch = processor_batch(llava_next_processor(tokenizer), [[sized_images()[0]]])
    with pytest.raises(ValueError, match=r"the LLaVA-NeXT processor tiles each image itself, but an active adapter "
                                         r"has image_grid=\[2, 2\]"):
        model(**batch)


def test_under_torch_compile_a_family_bases_pixel_values_without_an_image_mask_are_refused(tokenizer, llava, images,
                                                                                           monkeypatch):
    """Finding the placeholders reads values and changes the sequence length: no compiled graph can follow. Refused
    by metadata alone (never silently read as words)."""
    batch = processor_batch(llava_processor(tokenizer), [[images[0]]])
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with pytest.raises(ValueError, match=r"under torch.compile a Llava base's `pixel_values` need an `image_mask`"):
        llava(**batch)


# ------------------------------------------------------------------------------------------- what a trainer counts


def test_a_family_base_tells_the_trainer_not_to_count_label_tokens_before_the_call(tokenizer, llava):
    """The Trainer would count the placeholders' labels, which the call takes out, and divide the loss by them."""
    base = llava.get_base_model()
    assert base.accepts_loss_kwargs is False
    llava.unload()
    assert "accepts_loss_kwargs" not in vars(base)
