"""What TRL's vision collator makes of MemVPProcessor's batches: which tokens are supervised, per TRL option."""

import torch
from trl import SFTConfig, SFTTrainer
from trl_fixtures import (
    NAMES,
    digit_images,
    llm_and_encoder,
    memvp_config,
    messages_dataset,
    prompt_completion_dataset,
    trainer_args,
    word_tokenizer,
)

from memvp_peft import MemVPProcessor
from memvp_peft.data import MemVPDataCollator
from memvp_peft.demo_models import clip_image_processor


def _batch(tmp_path, dataset, **options):
    tokenizer = word_tokenizer()
    llm, clip = llm_and_encoder(tokenizer)
    trainer = SFTTrainer(model=llm, peft_config=memvp_config(vision_encoder=clip), train_dataset=dataset,
                         processing_class=MemVPProcessor(clip_image_processor(32), tokenizer),
                         args=trainer_args(SFTConfig, tmp_path, shuffle_dataset=False, **options))
    loader = trainer.get_train_dataloader()
    return tokenizer, next(iter(loader))


def _collator_batch(tokenizer, count):
    images, labels = digit_images(count)
    records = [{"image": image, "question": "What digit is shown ?", "answer": NAMES[t]} for image, t in zip(images, labels)]
    return MemVPDataCollator(tokenizer, clip_image_processor(32))(records)


def _same_rows(batch, reference):
    """The same rows up to padding order (the loader may shuffle): compare sorted per-row (ids, labels)."""
    def rows(b):
        return sorted((ids[m.bool()].tolist(), lab[m.bool()].tolist())
                      for ids, lab, m in zip(b["input_ids"], b["labels"], b["attention_mask"]))
    return rows(batch) == rows(reference)


def test_prompt_completion_rows_supervise_the_answer_exactly_as_the_collator_does(tmp_path):
    """completion_only_loss (TRL's default for prompt-completion): the answer and its EOS, nothing else."""
    tokenizer, batch = _batch(tmp_path, prompt_completion_dataset(4))
    reference = _collator_batch(tokenizer, 4)
    assert _same_rows(batch, reference)
    torch.testing.assert_close(batch["pixel_values"].sum(), reference["pixel_values"].sum())


def test_memvp_data_collator_reads_trl_prompt_completion_rows_as_trl_trains_them(tmp_path):
    """The same dataset through MemVPDataCollator (its prompt/completion layout) and through TRL's own collator:
    the same rows, the loss on the completion alone."""
    tokenizer, batch = _batch(tmp_path, prompt_completion_dataset(4))
    rows = prompt_completion_dataset(4)
    ours = MemVPDataCollator(tokenizer, clip_image_processor(32))([rows[i] for i in range(4)])
    assert _same_rows(ours, batch)


def test_messages_with_assistant_only_loss_supervise_the_assistant_turns_as_the_collator_does(tmp_path):
    tokenizer, batch = _batch(tmp_path, messages_dataset(4), assistant_only_loss=True)
    assert _same_rows(batch, _collator_batch(tokenizer, 4))


def test_messages_without_assistant_only_loss_supervise_every_token_as_trl_documents(tmp_path):
    tokenizer, batch = _batch(tmp_path, messages_dataset(4))
    reference = _collator_batch(tokenizer, 4)
    mask = batch["attention_mask"].bool()
    assert torch.equal(batch["labels"][mask], batch["input_ids"][mask])
    assert sorted(r[m.bool()].tolist() for r, m in zip(batch["input_ids"], mask)) == sorted(
        r[m.bool()].tolist() for r, m in zip(reference["input_ids"], reference["attention_mask"]))
