"""Gemma 3, Idefics3 and SmolVLM batches from their own processors, read by MemVP (`vision/families.py`): the image
tokens and every marker around them leave the sequence, each row's images (Idefics3's real crops) go to its memory
through the tower before the VLM's projector / connector, and the call equals the one MemVP's own layout makes of
the same chat -- the text without image tokens, the pixels as `(rows, images, C, H, W)` with an `image_mask`."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_memory
from peft import PeftModel, get_peft_model
from vlm_fixtures import FAMILIES, chat_batch, digit_images, logits, text_batch, with_labels

from memvp_peft import MemVPConfig
from memvp_peft.vision.families import Gemma3Family, Idefics3Family, family_of

#: family -> (family class, memory slots of one row: SigLIP's 4 x 4 patches per image / per crop, up to 5 crops)
CASES = {"gemma3": (Gemma3Family, 16), "idefics3": (Idefics3Family, 5 * 16), "smolvlm": (Idefics3Family, 5 * 16)}


def _config(slots: int) -> MemVPConfig:
    return MemVPConfig(visual_dim=32, num_memory_slots=slots, projector_hidden_dim=16, memory_dropout=0.0,
                       visual_scale=1.0, memory_scale=1.0, task_type="CAUSAL_LM")


def adapted(name: str, seed: int = 0):
    base, processor = FAMILIES[name](seed)
    model = get_peft_model(base, _config(CASES[name][1]))
    randomize_memory(model, scale=1.0)
    return model.eval(), processor


@pytest.fixture(scope="module", params=sorted(CASES))
def family(request):
    """(name, adapted model, processor), built once per family."""
    model, processor = adapted(request.param)
    return request.param, model, processor


@pytest.fixture(scope="module")
def images():
    return digit_images(2)[0]




def memvp_pixels(name: str, batch) -> dict:
    """The processor's pixels in MemVP's own layout: Gemma 3's one image per row; Idefics3's real crops per row
    (the all-zero padding crops masked out)."""
    pixels = batch["pixel_values"]
    if name == "gemma3":
        return {"pixel_values": pixels[:, None], "image_mask": torch.ones(pixels.shape[0], 1, dtype=torch.bool)}
    return {"pixel_values": pixels, "image_mask": (pixels != 0).flatten(2).any(dim=2)}






def test_each_family_is_picked_by_its_model_type(family):
    name, model, _ = family
    assert isinstance(family_of(model.get_base_model()), CASES[name][0])


@pytest.mark.parametrize("side", ["right", "left"])
def test_the_processor_batch_reads_as_the_text_alone_with_the_images_in_memory(family, images, side):
    name, model, processor = family
    theirs = chat_batch(processor, images, answers=["one", "two"], padding_side=side)
    ours = text_batch(processor, answers=["one", "two"], padding_side=side)
    assert theirs["input_ids"].shape[1] > ours["input_ids"].shape[1]
    want = logits(model, {"input_ids": ours["input_ids"], "attention_mask": ours["attention_mask"],
                          **memvp_pixels(name, theirs)})
    torch.testing.assert_close(logits(model, theirs), want, rtol=1e-5, atol=1e-5)


def test_the_processor_batch_gives_the_image_conditioned_loss(family, images):
    name, model, processor = family
    with torch.no_grad():
        loss = model(**with_labels(chat_batch(processor, images, answers=["one", "two"]))).loss
        swapped = model(**with_labels(chat_batch(processor, images[::-1], answers=["one", "two"]))).loss
    assert torch.isfinite(loss)
    assert abs(float(loss) - float(swapped)) > 1e-5  # float noise is ~1e-7


def test_the_decoder_layers_see_only_the_text_tokens(family, images):
    name, model, processor = family
    theirs = chat_batch(processor, images, answers=["one", "two"])
    text_tokens = text_batch(processor, answers=["one", "two"])["input_ids"].shape[1]
    lengths = []
    handles = [layer.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append((args[0] if args else kwargs["hidden_states"]).shape[1]),
        with_kwargs=True) for layer in model.get_base_model().get_decoder().layers]
    try:
        logits(model, theirs)
    finally:
        for handle in handles:
            handle.remove()
    assert lengths == [text_tokens] * 2


def test_a_text_only_row_in_the_batch_reads_only_the_learned_memory(family, images):
    """Row 1 has no image (a text-only row beside an image row, padded like the processor pads); its logits are those
    of the same text in a call without any visual input (K = p_k, V = p_v)."""
    name, model, processor = family
    image_row = chat_batch(processor, images[:1], answers=["one"])
    text_row = text_batch(processor, answers=["two"], rows=1)
    width = max(image_row["input_ids"].shape[1], text_row["input_ids"].shape[1])

    def padded(tensor, fill):
        return torch.nn.functional.pad(tensor, (0, width - tensor.shape[1]), value=fill)

    mixed = {key: torch.cat([padded(image_row[key], 0), padded(text_row[key], 0)])
             for key in ("input_ids", "attention_mask")}
    pixels = image_row["pixel_values"]
    mixed["pixel_values"] = pixels if name == "gemma3" else torch.cat([pixels, torch.zeros_like(pixels)])
    if name == "gemma3":
        mixed["token_type_ids"] = torch.cat([padded(image_row["token_type_ids"], 0),
                                             torch.zeros(1, width, dtype=torch.long)])
    else:
        mask = image_row["pixel_attention_mask"]
        mixed["pixel_attention_mask"] = torch.cat([mask, torch.zeros_like(mask)])
    alone = text_row["input_ids"].shape[1]
    torch.testing.assert_close(logits(model, mixed)[1, :alone], logits(model, dict(text_row))[0],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options", [{}, {"use_cache": False}, {"num_beams": 2}],
                         ids=["kv_cache", "without_cache", "beams"])
def test_generate_reads_the_prompt_as_the_text_with_the_images_in_memory(family, images, options):
    name, model, processor = family
    prompt = chat_batch(processor, images, padding_side="left")
    ours = text_batch(processor, padding_side="left")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=4, do_sample=False, **options)
        want = model.generate(input_ids=ours["input_ids"], attention_mask=ours["attention_mask"],
                              **memvp_pixels(name, prompt), max_new_tokens=4, do_sample=False, **options)
    assert torch.equal(out, want)
    assert torch.equal(out[:, : ours["input_ids"].shape[1]], ours["input_ids"])


def test_a_saved_adapter_reloads_to_the_same_logits_on_the_processor_batch(family, images, tmp_path):
    name, model, processor = family
    batch = chat_batch(processor, images, answers=["one", "two"])
    before = logits(model, batch)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(FAMILIES[name](0)[0], tmp_path).eval()
    torch.testing.assert_close(logits(reloaded, batch), before, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ Idefics3's crops


@pytest.fixture(scope="module")
def idefics3():
    return adapted("idefics3")


def test_idefics3_takes_the_crop_markers_out_with_the_image_tokens(idefics3, images):
    model, processor = idefics3
    batch = chat_batch(processor, images, answers=["one", "two"])
    family = family_of(model.get_base_model())
    kept = batch["input_ids"][~family.image_marking_tokens(batch["input_ids"]) & batch["attention_mask"].bool()]
    tokens = set(processor.tokenizer.convert_ids_to_tokens(kept.tolist()))
    assert not tokens & {"<image>", "<fake_token_around_image>", "<global-img>", "<row_1_col_1>", "<row_1_col_2>",
                         "<row_2_col_1>", "<row_2_col_2>"}
    assert {"What", "digit", "one", "two"} <= tokens


def test_idefics3_crops_that_do_not_match_the_image_tokens_are_refused(idefics3, images):
    model, processor = idefics3
    batch = chat_batch(processor, images, answers=["one", "two"])
    batch["pixel_values"][1, 1] = 0  # row 1 loses one of its 3 real crops
    with pytest.raises(ValueError, match=r"row 1 of `input_ids` holds 12 image tokens .* but its 2 real crops stand "
                                         r"for 8"):
        model(**batch)


def test_idefics3_crops_padded_inside_are_refused(idefics3, images):
    model, processor = idefics3
    batch = chat_batch(processor, images, answers=["one", "two"])
    batch["pixel_attention_mask"][0, 0, :, 16:] = 0
    with pytest.raises(ValueError, match=r"crops are padded inside"):
        model(**batch)


# ----------------------------------------------------------------------------------- TRL's SFTTrainer, unchanged


def drop_in_trainer(name: str, output_dir):
    """TRL's documented VLM script with the family's own model and processor, MemVP's config the only change."""
    from trl import SFTConfig, SFTTrainer
    from trl_fixtures import messages_dataset, trainer_args

    base, processor = FAMILIES[name](0)
    trainer = SFTTrainer(model=base, args=trainer_args(SFTConfig, output_dir), train_dataset=messages_dataset(),
                         processing_class=processor, peft_config=_config(CASES[name][1]))
    randomize_memory(trainer.model, scale=1.0)
    return trainer


@pytest.mark.parametrize("name", sorted(CASES))
def test_sft_trainers_loss_on_the_processors_batch_is_the_image_conditioned_loss(name, tmp_path):
    from trl_fixtures import first_batch

    trainer = drop_in_trainer(name, tmp_path)
    batch = first_batch(trainer)
    assert (batch["input_ids"] == trainer.model.get_base_model().config.image_token_id).any()
    flipped = {**batch, "pixel_values": batch["pixel_values"].flip(-2)}
    with torch.no_grad():
        trainer_loss = trainer.compute_loss(trainer.model, dict(batch))
        direct = trainer.model(**batch).loss
        other = trainer.model(**flipped).loss
    torch.testing.assert_close(trainer_loss, direct, rtol=1e-5, atol=1e-6)
    assert abs(float(direct) - float(other)) > 1e-5


@pytest.mark.parametrize("name", sorted(CASES))
def test_sft_trainer_trains_memvp_and_no_image_token_reaches_the_language_model(name, tmp_path):
    trainer = drop_in_trainer(name, tmp_path)
    base = trainer.model.get_base_model()
    token = base.config.image_token_id
    embedded = []
    base.get_input_embeddings().register_forward_hook(lambda module, args, output: embedded.append(args[0]))
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters() if "memvp_memory" in k}
    trainer.train()
    assert embedded and not any((ids == token).any() for ids in embedded)
    now = dict(trainer.model.named_parameters())
    assert any(not torch.equal(now[k], v) for k, v in before.items() if "projector" in k)


def test_pooling_shrinks_the_memory_of_idefics3_crops_to_the_slots_it_asks_for(images):
    """pool_kernel=2 pools each crop's 4 x 4 patches to 2 x 2: five crops need 20 slots, not 80."""
    base, processor = FAMILIES["idefics3"](0)
    model = get_peft_model(base, MemVPConfig(**{**_config(5 * 4).to_dict(), "pool_kernel": 2})).eval()
    batch = chat_batch(processor, images, answers=["one", "two"])
    assert torch.isfinite(logits(model, batch)).all()
    unpooled = get_peft_model(FAMILIES["idefics3"](0)[0], _config(5 * 4)).eval()
    with pytest.raises(ValueError, match=r"got 80 visual tokens per sample \(5 image\(s\) x 16\)"):
        logits(unpooled, batch)


def test_gemma3_pixel_values_in_another_layout_are_refused(images):
    model, processor = adapted("gemma3")
    batch = chat_batch(processor, images, answers=["one", "two"])
    batch["pixel_values"] = batch["pixel_values"][:, None]
    with pytest.raises(ValueError, match=r"Gemma 3 processor's `pixel_values` are \(images, channels, height, width\)"):
        model(**batch)
