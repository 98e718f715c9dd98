"""TRL's DPOTrainer with images: the preference pairs reach a MemVP model as pixel_values + image_mask (no placeholder
tokens), the policy trains, and the reference is well defined on both bases."""

import math

import pytest
import torch
from transformers import LlavaForConditionalGeneration
from trl import DPOConfig, DPOTrainer
from trl_fixtures import (
    first_batch,
    llava_projector_state,
    llm_and_encoder,
    memvp_config,
    preference_dataset,
    save_tiny_llava,
    train_and_list_changed,
    trainer_args,
    without_images,
    word_tokenizer,
)

from memvp_peft import MemVPDPOTrainer, MemVPProcessor
from memvp_peft.demo_models import clip_image_processor


def _completion_logps(model, batch):
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    inputs = {k: v for k, v in batch.items() if k != "completion_mask"}
    with torch.no_grad():
        return model(**inputs, labels=labels, fused_lm_head=True).log_probs.sum(dim=1)


def test_memvp_dpo_trainer_trains_against_a_frozen_copy_of_the_initial_adapter(tmp_path):
    tokenizer = word_tokenizer()
    llm, clip = llm_and_encoder(tokenizer)
    trainer = MemVPDPOTrainer(model=llm, peft_config=memvp_config(vision_encoder=clip),
                              train_dataset=preference_dataset(), args=trainer_args(DPOConfig, tmp_path),
                              processing_class=MemVPProcessor(clip_image_processor(32), tokenizer))
    model = trainer.model
    assert set(model.peft_config) == {"default", "ref"}
    batch = first_batch(trainer)
    assert batch["pixel_values"].shape[0] == batch["input_ids"].shape[0] == 8  # 4 chosen + 4 rejected rows
    assert batch["image_mask"].all()
    image_logps = _completion_logps(model, batch)
    assert (image_logps - _completion_logps(model, without_images(batch))).abs().max() > 1e-4  # it reads the images
    with torch.no_grad():  # the reference is the initial policy: every reward is 0, the loss log 2
        assert math.isclose(float(trainer.compute_loss(model, dict(batch))), math.log(2), rel_tol=1e-6)
    moved = train_and_list_changed(trainer)
    assert "base_model.memvp_memory.default.projector.0.weight" in moved
    assert not [name for name in moved if ".ref." in name]  # the reference stays frozen


def test_plain_dpo_trainer_on_a_llava_base_uses_the_text_only_base_as_reference(tmp_path):
    """peft_config= makes TRL disable the adapter for the reference: the base Llava then runs on the text alone (a
    MemVP batch has no placeholder for its images), and Llava's own projector never trains."""
    save_tiny_llava(tmp_path / "llava")
    vlm = LlavaForConditionalGeneration.from_pretrained(tmp_path / "llava")
    llava_projector = llava_projector_state(vlm)
    trainer = DPOTrainer(model=vlm, peft_config=memvp_config(), train_dataset=preference_dataset(),
                         processing_class=MemVPProcessor.from_pretrained(tmp_path / "llava"),
                         args=trainer_args(DPOConfig, tmp_path))
    batch = first_batch(trainer)
    with trainer.model.disable_adapter():
        reference = _completion_logps(trainer.model, batch)
        text_only = _completion_logps(trainer.model, without_images(batch))
    torch.testing.assert_close(reference, text_only, rtol=0, atol=0)
    assert "base_model.memvp_memory.default.projector.0.weight" in train_and_list_changed(trainer)
    after = llava_projector_state(trainer.model)
    assert all(torch.equal(after[k], v) for k, v in llava_projector.items())


def test_memvp_dpo_trainer_refuses_a_vlms_own_processor(tmp_path):
    from transformers import LlavaProcessor

    save_tiny_llava(tmp_path / "llava")
    with pytest.raises(ValueError, match=r"MemVPDPOTrainer: processing_class is a LlavaProcessor"):
        MemVPDPOTrainer(model=LlavaForConditionalGeneration.from_pretrained(tmp_path / "llava"),
                        peft_config=memvp_config(), train_dataset=preference_dataset(),
                        processing_class=LlavaProcessor.from_pretrained(tmp_path / "llava"),
                        args=trainer_args(DPOConfig, tmp_path))


def test_a_disabled_adapter_still_runs_a_llava_style_batch_as_the_original_vlm(tmp_path):
    """Only a batch built for MemVP (with image_mask) runs the base on its text alone; Llava's own batch (its
    placeholders, no image_mask) gets its pixel_values back, exactly as without MemVP."""
    from peft import get_peft_model
    from transformers import LlavaProcessor

    save_tiny_llava(tmp_path / "llava")
    vlm = LlavaForConditionalGeneration.from_pretrained(tmp_path / "llava").eval()
    original = LlavaForConditionalGeneration.from_pretrained(tmp_path / "llava").eval()
    images = preference_dataset(1)["images"][0]
    batch = LlavaProcessor.from_pretrained(tmp_path / "llava")(images=images, text=["<image>\nWhat digit"],
                                                                return_tensors="pt")
    model = get_peft_model(vlm, memvp_config())
    with torch.no_grad(), model.disable_adapter():
        torch.testing.assert_close(model(**batch).logits, original(**batch).logits, rtol=0, atol=0)
