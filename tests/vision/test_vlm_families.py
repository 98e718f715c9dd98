"""The VLM families (`vision/families.py`): one object per family, picked once at injection, that knows its
processor's placeholder tokens (from the config), how many each image stands for (the model's own count), its image
keywords, and the tower MemVP reads."""

import pytest
import torch
from llava_family_fixtures import (
    TOKENS_PER_TILE,
    image_token,
    llava_next_processor,
    memvp_config,
    next_image_processor,
    onevision_image_processor,
    processor_batch,
    sized_images,
    tiny_llava,
    tiny_llava_next,
    tiny_llava_onevision,
    vlm_tokenizer,
)
from peft import get_peft_model
from test_unread_vlm_tower import tiny_qwen2_vl, tiny_unread_vlm

from memvp_peft.demo_models import tiny_llama
from memvp_peft.vision import FAMILIES, family_of, supported_families
from memvp_peft.vision.families import (
    LlavaFamily,
    LlavaNextFamily,
    LlavaOnevisionFamily,
    ProcessorImages,
    QwenVLFamily,
    VLMFamily,
)


@pytest.fixture(scope="module")
def tokenizer():
    return vlm_tokenizer()


@pytest.mark.parametrize("build, family", [
    (tiny_llava, LlavaFamily), (tiny_llava_next, LlavaNextFamily), (tiny_llava_onevision, LlavaOnevisionFamily),
    (lambda tokenizer: tiny_qwen2_vl(), QwenVLFamily),
], ids=["llava", "llava_next", "llava_onevision", "qwen2_vl"])
def test_each_supported_model_type_gets_its_familys_object(tokenizer, build, family):
    assert type(family_of(build(tokenizer))) is family


def test_a_language_model_and_a_vlm_without_a_family_get_none(tokenizer):
    assert family_of(tiny_llama(tokenizer, hidden_size=32)) is None
    assert family_of(tiny_unread_vlm()) is None


def test_the_family_is_picked_once_at_injection_and_kept_by_the_runtime(tokenizer):
    model = get_peft_model(tiny_llava_next(tokenizer), memvp_config(num_memory_slots=3 * TOKENS_PER_TILE))
    assert isinstance(model.base_model._memvp_runtime.family, LlavaNextFamily)


def test_token_ids_are_read_from_the_config(tokenizer):
    """Checkpoints of one family disagree on the ids: whatever the config says is what is removed."""
    model = tiny_llava_onevision(tokenizer)
    model.config.image_token_id = 7
    family = family_of(model)
    assert (family.image_token_id, family.video_token_id) == (7, tokenizer.convert_tokens_to_ids("<video>"))
    assert family.sequence_token_ids == (7,)


def test_the_tower_memvp_reads_is_the_vlms_own_before_its_projector(tokenizer):
    base = tiny_llava_next(tokenizer)
    model = get_peft_model(base, memvp_config(num_memory_slots=3 * TOKENS_PER_TILE))
    assert model.base_model._memvp_runtime.vision.model is base.model.vision_tower
    assert family_of(base).encoder_tower(base) is base.model.vision_tower


def test_llava_next_counts_the_placeholders_its_processor_writes(tokenizer):
    wide, tall = sized_images()
    batch = processor_batch(llava_next_processor(tokenizer), [[wide], [tall]])
    images = ProcessorImages(batch["pixel_values"], {"image_sizes": batch["image_sizes"]})
    written = (batch["input_ids"] == image_token(tokenizer)).sum(dim=1).tolist()
    assert family_of(tiny_llava_next(tokenizer)).image_token_counts(images) == written


@pytest.mark.parametrize("build, grouped", [
    (tiny_llava_next, False),
    (tiny_llava_onevision, False),
    (tiny_llava_onevision, True),
    (lambda tokenizer: tiny_llava_onevision(tokenizer, vision_aspect_ratio="anyres_max_1"), False),
], ids=["llava_next", "onevision_one_image_a_row", "onevision_two_images_a_row", "onevision_pooled_grid"])
def test_placeholder_counts_are_the_models_own_feature_counts(tokenizer, build, grouped):
    """The model refuses a batch whose placeholders are not its feature count; the family counts the same."""
    model = build(tokenizer)
    onevision = model.config.model_type == "llava_onevision"
    wide, tall = sized_images()
    image_processor = onevision_image_processor() if onevision else next_image_processor()
    processed = image_processor(images=[[wide, tall]] if grouped else [[wide], [tall]], return_tensors="pt")
    keywords = {"image_sizes": processed["image_sizes"]}
    if onevision:
        keywords["batch_num_images"] = processed["batch_num_images"]
    with torch.no_grad():
        features = model.model.get_image_features(
            pixel_values=processed["pixel_values"], **keywords,
            **({"vision_aspect_ratio": model.config.vision_aspect_ratio} if onevision else {}))
    counts = family_of(model).image_token_counts(ProcessorImages(processed["pixel_values"], keywords))
    assert counts == [len(feature) for feature in features.pooler_output]


def test_llava_next_gives_each_row_its_images_real_tiles_and_masks_the_rest(tokenizer):
    wide, tall = sized_images()
    batch = processor_batch(llava_next_processor(tokenizer), [[wide], [tall]])
    images = ProcessorImages(batch["pixel_values"], {"image_sizes": batch["image_sizes"]})
    visual = family_of(tiny_llava_next(tokenizer)).memvp_visual_inputs(images, [[0, 1], []])
    assert visual["pixel_values"].shape == (2, 6, 3, 32, 32)
    assert torch.equal(visual["pixel_values"][0], batch["pixel_values"][:, :3].reshape(6, 3, 32, 32))
    assert visual["image_mask"].tolist() == [[True] * 6, [False] * 6]


def test_rows_take_the_images_in_order_by_their_placeholders(tokenizer):
    family = family_of(tiny_llava(tokenizer))
    token = family.image_token_id
    ids = torch.tensor([[token] * 32 + [5], [5] * 33, [token] * 16 + [5] * 17])
    images = ProcessorImages(torch.zeros(3, 3, 32, 32), {})
    assert family.images_of_rows(ids, torch.ones_like(ids, dtype=torch.bool), images) == [[0, 1], [], [2]]


def test_placeholders_at_padded_positions_are_not_counted(tokenizer):
    family = family_of(tiny_llava(tokenizer))
    ids = torch.tensor([[family.image_token_id] * 16 + [5, family.image_token_id]])
    real = torch.tensor([[True] * 17 + [False]])
    assert family.images_of_rows(ids, real, ProcessorImages(torch.zeros(1, 3, 32, 32), {})) == [[0]]


@pytest.mark.parametrize("name", ["pixel_values_videos", "image_sizes_videos"])
def test_onevisions_video_inputs_are_refused_by_name(tokenizer, name):
    family = family_of(tiny_llava_onevision(tokenizer))
    with pytest.raises(ValueError, match=rf"\[{name!r}\] came with the call: the LLaVA-OneVision processor.s video"):
        family.take_image_inputs(torch.zeros(1, 1, 3, 32, 32), {name: torch.zeros(1)})


def test_video_placeholders_are_refused(tokenizer):
    family = family_of(tiny_llava_onevision(tokenizer))
    with pytest.raises(ValueError, match=r"video placeholder token .*not videos"):
        family.check_unread_tokens(torch.tensor([[5, family.video_token_id]]))


def test_llava_refuses_image_sizes_its_tower_would_not_read(tokenizer):
    with pytest.raises(ValueError, match=r"\['image_sizes'\] came with the call: Llava passes .image_sizes. only to "
                                         r"a Pixtral tower"):
        family_of(tiny_llava(tokenizer)).take_image_inputs(torch.zeros(1, 3, 32, 32), {"image_sizes": [[32, 32]]})


def test_llava_next_needs_its_image_sizes(tokenizer):
    family = family_of(tiny_llava_next(tokenizer))
    with pytest.raises(ValueError, match=r"`image_sizes` are needed with its `pixel_values`"):
        family.image_token_counts(ProcessorImages(torch.zeros(1, 3, 3, 32, 32), {}))


def test_every_family_implements_the_interface_and_is_named_in_the_supported_list():
    assert all(issubclass(family, VLMFamily) and not family.__abstractmethods__ for family in FAMILIES)
    assert supported_families() == ("Llava (llava), LLaVA-NeXT (llava_next), LLaVA-OneVision (llava_onevision), "
                                    "Gemma 3 (gemma3), Idefics3 (idefics3, smolvlm), Qwen-VL (qwen2_vl, qwen2_5_vl, qwen3_vl), "
                                    "Mistral 3 (mistral3)")


def test_a_vlm_without_a_family_still_refuses_its_processors_placeholders():
    """VipLlava has no family (taken only with a separate encoder): its placeholders are refused, naming the
    supported families."""
    from test_unsupported_vlm import tiny_vipllava
    from test_vision import clip

    model = get_peft_model(tiny_vipllava(), memvp_config(visual_dim=16, num_memory_slots=20, vision_encoder=clip()))
    ids = torch.full((1, 4), 5)
    ids[0, 1] = model.get_base_model().config.image_token_id
    with pytest.raises(ValueError, match=r"supported families \(Llava \(llava\), LLaVA-NeXT"):
        model(input_ids=ids, image_features=torch.randn(1, 4, 16))
