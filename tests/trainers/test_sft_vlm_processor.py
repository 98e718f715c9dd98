"""TRL's documented VLM script, unchanged, trains MemVP: `SFTTrainer(model=<a Llava>, processing_class=<its own
LlavaProcessor>, peft_config=MemVPConfig(...))`. The trainer's loss is the image-conditioned loss of the same batch
computed directly (also as training scales it), no placeholder reaches the language model, MemVP's projector trains
and Llava's own projector is untouched."""

import pytest
import torch
from conftest import randomize_memory
from peft import get_peft_model
from transformers import LlavaForConditionalGeneration, LlavaProcessor
from trl import SFTConfig, SFTTrainer
from trl_fixtures import (
    changed,
    first_batch,
    llava_projector_state,
    memvp_config,
    memvp_parameters,
    messages_dataset,
    save_tiny_llava,
    trainer_args,
)

from memvp_peft import MemVPProcessor, MemVPSFTTrainer


@pytest.fixture
def llava_folder(tmp_path):
    save_tiny_llava(tmp_path / "llava")
    return tmp_path / "llava"


def drop_in_trainer(trainer_class, folder, output_dir, **overrides):
    """TRL's script as documented for a VLM, with MemVP's config as the only change."""
    trainer = trainer_class(
        model=LlavaForConditionalGeneration.from_pretrained(folder), args=trainer_args(SFTConfig, output_dir),
        train_dataset=messages_dataset(), processing_class=LlavaProcessor.from_pretrained(folder),
        peft_config=memvp_config(**overrides),
    )
    randomize_memory(trainer.model, scale=1.0)
    return trainer


def placeholder_id(folder) -> int:
    return LlavaForConditionalGeneration.from_pretrained(folder).config.image_token_id


@pytest.mark.parametrize("trainer_class", [SFTTrainer, MemVPSFTTrainer])
def test_the_trainers_loss_is_the_image_conditioned_loss_of_the_batch(tmp_path, llava_folder, trainer_class):
    trainer = drop_in_trainer(trainer_class, llava_folder, tmp_path)
    batch = first_batch(trainer)
    assert (batch["input_ids"] == placeholder_id(llava_folder)).any()  # the VLM processor's own batch
    other_images = {**batch, "pixel_values": batch["pixel_values"].flip(-2)}
    with torch.no_grad():
        trainer_loss = trainer.compute_loss(trainer.model, dict(batch))
        direct = trainer.model(**batch).loss
        with_other_images = trainer.model(**other_images).loss
    torch.testing.assert_close(trainer_loss, direct, rtol=1e-5, atol=1e-6)
    assert abs(float(direct) - float(with_other_images)) > 1e-3


def test_the_loss_a_training_step_scales_counts_only_the_labels_the_model_scored(tmp_path, llava_folder):
    """The Trainer counts the batch's label tokens before the call; counted there, the placeholders' labels (which
    the call takes out) would shrink every loss by the share of image tokens."""
    trainer = drop_in_trainer(SFTTrainer, llava_folder, tmp_path)
    raw = next(iter(trainer.get_train_dataloader()))
    _, num_items = trainer.get_batch_samples(iter([raw]), 1, trainer.args.device)
    batch = trainer._prepare_inputs(raw)
    with torch.no_grad():
        step_loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=num_items)
        direct = trainer.model(**batch).loss
    torch.testing.assert_close(step_loss, direct, rtol=1e-5, atol=1e-6)


def test_memvp_trains_and_no_placeholder_reaches_the_language_model(tmp_path, llava_folder):
    trainer = drop_in_trainer(SFTTrainer, llava_folder, tmp_path)
    token = placeholder_id(llava_folder)
    embedded = []
    embeddings = trainer.model.get_base_model().get_input_embeddings()
    embeddings.register_forward_hook(lambda module, args, output: embedded.append(args[0]))
    before = memvp_parameters(trainer.model)
    trainer.train()
    assert embedded and not any((ids == token).any() for ids in embedded)
    assert "base_model.memvp_memory.default.projector.0.weight" in changed(before, trainer.model)


def test_llavas_own_projector_and_tower_are_untouched(tmp_path, llava_folder):
    trainer = drop_in_trainer(SFTTrainer, llava_folder, tmp_path)
    base = trainer.model.get_base_model()
    projector = llava_projector_state(base)
    tower = {k: v.clone() for k, v in base.model.vision_tower.state_dict().items()}
    trainer.train()
    assert all(torch.equal(llava_projector_state(base)[k], v) for k, v in projector.items())
    assert all(torch.equal(base.model.vision_tower.state_dict()[k], v) for k, v in tower.items())
    assert not any(p.requires_grad for p in base.model.multi_modal_projector.parameters())


def test_the_vlm_processor_batch_trains_as_a_memvp_processor_batch_does(tmp_path, llava_folder):
    """Both batches of the same rows give the same loss: the placeholders are the only difference, and they go."""
    trainer = drop_in_trainer(SFTTrainer, llava_folder, tmp_path)
    ours = SFTTrainer(
        model=get_peft_model(LlavaForConditionalGeneration.from_pretrained(llava_folder), memvp_config()),
        args=trainer_args(SFTConfig, tmp_path / "ours"), train_dataset=messages_dataset(),
        processing_class=MemVPProcessor.from_pretrained(llava_folder),
    )
    ours.model.load_state_dict(trainer.model.state_dict())
    with torch.no_grad():
        theirs_loss = trainer.compute_loss(trainer.model, dict(first_batch(trainer)))
        ours_loss = ours.compute_loss(ours.model, dict(first_batch(ours)))
    torch.testing.assert_close(theirs_loss, ours_loss, rtol=1e-5, atol=1e-6)
