"""LLaVA-NeXT and LLaVA-OneVision batches from their own processors (AnyRes tiles, `image_sizes`), read by MemVP
(`vision/families.py`): the same behaviours the other families' files check -- the image-conditioned loss, a
language model that sees the text alone, a text-only row that reads only the learned memory, `generate()` with and
without the KV cache and with beams, and a saved adapter that reloads to the same logits."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_memory
from peft import PeftModel, get_peft_model
from vlm_fixtures import FAMILIES, chat_batch, digit_images, logits, text_batch, with_labels

from memvp_peft import MemVPConfig
from memvp_peft.vision.families import LlavaNextFamily, LlavaOnevisionFamily, family_of

#: family -> (family class, memory slots of one row: the overview + AnyRes tiles of the fixtures' larger image fit)
CASES = {"llava_next": (LlavaNextFamily, 128), "llava_onevision": (LlavaOnevisionFamily, 128)}
ANSWERS = ["one", "two"]


def adapted(name: str, seed: int = 0):
    base, processor = FAMILIES[name](seed)
    config = MemVPConfig(visual_dim=32, num_memory_slots=CASES[name][1], projector_hidden_dim=16, memory_dropout=0.0,
                         visual_scale=1.0, memory_scale=1.0, task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    randomize_memory(model, scale=1.0)
    return model.eval(), processor


@pytest.fixture(scope="module", params=sorted(CASES))
def family(request):
    """(name, adapted model, processor), built once per family."""
    model, processor = adapted(request.param)
    return request.param, model, processor


@pytest.fixture(scope="module")
def images():
    """Two real digit scans of different sizes, so AnyRes gives each its own tile grid and token count."""
    return digit_images(2)[0]








def test_each_family_is_picked_by_its_model_type(family):
    name, model, _ = family
    assert isinstance(family_of(model.get_base_model()), CASES[name][0])


def test_the_processor_batch_gives_the_image_conditioned_loss(family, images):
    name, model, processor = family
    with torch.no_grad():
        loss = model(**with_labels(chat_batch(processor, images, answers=ANSWERS))).loss
        swapped = model(**with_labels(chat_batch(processor, images[::-1], answers=ANSWERS))).loss
    assert torch.isfinite(loss)
    assert abs(float(loss) - float(swapped)) > 1e-5  # float noise is ~1e-7


def test_the_decoder_layers_see_only_the_text_tokens(family, images):
    name, model, processor = family
    theirs = chat_batch(processor, images, answers=ANSWERS)
    text_tokens = text_batch(processor, answers=ANSWERS)["input_ids"].shape[1]
    assert theirs["input_ids"].shape[1] > text_tokens  # the processor did write the image tokens
    lengths = []
    handles = [layer.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append((args[0] if args else kwargs["hidden_states"]).shape[1]),
        with_kwargs=True) for layer in model.get_base_model().get_decoder().layers]
    try:
        logits(model, theirs)
    finally:
        for handle in handles:
            handle.remove()
    assert lengths == [text_tokens] * len(handles)


def test_a_text_only_row_in_the_batch_reads_only_the_learned_memory(family, images):
    """Row 1 has no image (no placeholder, no pixels: the processor's pixels belong to row 0's placeholders); its
    logits are those of the same text in a call without any visual input (K = p_k, V = p_v)."""
    name, model, processor = family
    image_row = chat_batch(processor, images[:1], answers=["one"])
    text_row = text_batch(processor, answers=["two"], rows=1)
    width = max(image_row["input_ids"].shape[1], text_row["input_ids"].shape[1])

    def padded(tensor):
        return torch.nn.functional.pad(tensor, (0, width - tensor.shape[1]), value=0)

    mixed = {key: torch.cat([padded(image_row[key]), padded(text_row[key])]) for key in ("input_ids", "attention_mask")}
    mixed.update(pixel_values=image_row["pixel_values"], image_sizes=image_row["image_sizes"])
    alone = text_row["input_ids"].shape[1]
    torch.testing.assert_close(logits(model, mixed)[1, :alone], logits(model, dict(text_row))[0],
                               rtol=1e-5, atol=1e-5)


def test_generate_with_and_without_the_kv_cache_agree_and_return_the_prompt_without_image_tokens(family, images):
    name, model, processor = family
    prompt = chat_batch(processor, images, padding_side="left")
    text = text_batch(processor, padding_side="left")["input_ids"]
    with torch.no_grad():
        cached = model.generate(**prompt, max_new_tokens=4, do_sample=False)
        uncached = model.generate(**prompt, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[:, : text.shape[1]], text)


def test_beam_search_keeps_each_rows_images_with_its_beams(family, images):
    """Beams copy each row's memory with its row: two rows generated together give what each gives alone."""
    name, model, processor = family
    both = chat_batch(processor, images, padding_side="left")
    with torch.no_grad():
        together = model.generate(**both, max_new_tokens=4, do_sample=False, num_beams=2)
        for row, image in enumerate(images):
            alone = model.generate(**chat_batch(processor, [image], padding_side="left"), max_new_tokens=4,
                                   do_sample=False, num_beams=2)
            assert torch.equal(together[row, -4:], alone[0, -4:])


def test_a_saved_adapter_reloads_to_the_same_logits_on_the_processor_batch(family, images, tmp_path):
    name, model, processor = family
    batch = chat_batch(processor, images, answers=ANSWERS)
    before = logits(model, batch)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(FAMILIES[name](0)[0], tmp_path).eval()
    torch.testing.assert_close(logits(reloaded, batch), before, rtol=0, atol=0)
