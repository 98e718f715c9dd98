"""TRL's documented VLM script, unchanged, trains MemVP on a Mistral 3: `SFTTrainer(model=<a Mistral 3>,
processing_class=<its own PixtralProcessor>, peft_config=MemVPConfig(...))`. The trainer's loss is the
image-conditioned loss of the same batch computed directly, neither `[IMG]` nor its row and image markers reach the
language model, MemVP's projector trains and the VLM's own tower and projector are untouched."""

import pytest
import torch
from conftest import randomize_memory
from trl import SFTConfig, SFTTrainer
from trl_fixtures import changed, first_batch, memvp_config, memvp_parameters, messages_dataset, trainer_args
from vlm_fixtures import mistral3

from memvp_peft import MemVPSFTTrainer

MARKERS = ("[IMG]", "[IMG_BREAK]", "[IMG_END]")


def drop_in_trainer(trainer_class, output_dir):
    """TRL's script as documented for a VLM, with MemVP's config as the only change (the Pixtral tower's patches, in
    its width 32, are what MemVP reads: visual_dim=32; a 32 x 32 image is 64 of them)."""
    model, processor = mistral3()
    trainer = trainer_class(
        model=model.train(), args=trainer_args(SFTConfig, output_dir), train_dataset=messages_dataset(),
        processing_class=processor, peft_config=memvp_config(visual_dim=32, num_memory_slots=64),
    )
    randomize_memory(trainer.model, scale=1.0)
    return trainer


def marker_ids(trainer) -> torch.Tensor:
    return torch.tensor(trainer.processing_class.tokenizer.convert_tokens_to_ids(list(MARKERS)))


@pytest.mark.parametrize("trainer_class", [SFTTrainer, MemVPSFTTrainer])
def test_the_trainers_loss_is_the_image_conditioned_loss_of_the_batch(tmp_path, trainer_class):
    trainer = drop_in_trainer(trainer_class, tmp_path)
    batch = first_batch(trainer)
    assert "image_sizes" in batch and torch.isin(batch["input_ids"], marker_ids(trainer)).any()
    other_images = {**batch, "pixel_values": batch["pixel_values"].flip(-1)}
    with torch.no_grad():
        trainer_loss = trainer.compute_loss(trainer.model, dict(batch))
        direct = trainer.model(**batch).loss
        with_other_images = trainer.model(**other_images).loss
    torch.testing.assert_close(trainer_loss, direct, rtol=1e-5, atol=1e-6)
    assert abs(float(direct) - float(with_other_images)) > 1e-4


def test_memvp_trains_and_no_image_token_reaches_the_language_model(tmp_path):
    trainer = drop_in_trainer(SFTTrainer, tmp_path)
    embedded = []
    embeddings = trainer.model.get_base_model().get_input_embeddings()
    embeddings.register_forward_hook(lambda module, args, output: embedded.append(args[0]))
    before = memvp_parameters(trainer.model)
    trainer.train()
    assert embedded and not any(torch.isin(ids, marker_ids(trainer)).any() for ids in embedded)
    assert "base_model.memvp_memory.default.projector.0.weight" in changed(before, trainer.model)


def test_the_vlms_own_tower_and_projector_are_untouched(tmp_path):
    trainer = drop_in_trainer(SFTTrainer, tmp_path)
    inner = trainer.model.get_base_model().model
    modules = (inner.vision_tower, inner.multi_modal_projector)
    frozen = [{k: v.clone() for k, v in module.state_dict().items()} for module in modules]
    trainer.train()
    for module, state in zip(modules, frozen):
        assert all(torch.equal(module.state_dict()[k], v) for k, v in state.items())
        assert not any(p.requires_grad for p in module.parameters())
