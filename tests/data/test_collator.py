"""Tests of memvp_peft.data.MemVPDataCollator: batches, labels, padding, images, errors, use in a Trainer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from data_fixtures import (  # noqa: F401  (fixtures are used by name)
    DIGIT_NAMES,
    IMAGE_SIDE,
    answer_ids,
    collator,
    digits,
    image_dir,
    image_processor,
    supervised_ids,
    tokenizer,
)

from memvp_peft.data import IGNORE_INDEX, MemVPDataCollator, build_prompt


# ---------------------------------------------------------------------------------------------------------- collator
def test_simple_records(collator, tokenizer, digits, image_dir):
    from PIL import Image

    images, targets = digits
    records = [
        {"image": images[0], "question": "What digit is shown in the image ?", "answer": DIGIT_NAMES[targets[0]]},
        {"image": str(image_dir / "digit_1.png"), "prompt": "What digit is shown ?", "answer": DIGIT_NAMES[targets[1]]},
        {"image": Image.open(image_dir / "digit_2.png"), "question": "What digit ?", "answer": DIGIT_NAMES[targets[2]]},
    ]
    batch = collator(records)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "pixel_values", "image_mask"}
    assert batch["input_ids"].dtype == torch.long and batch["labels"].dtype == torch.long
    assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["labels"].shape
    assert batch["pixel_values"].shape == (3, 3, IMAGE_SIDE, IMAGE_SIDE)
    assert batch["pixel_values"].dtype == torch.float32
    assert batch["image_mask"].dtype == torch.bool and batch["image_mask"].tolist() == [True, True, True]
    # The array, the path and the PIL image of the same kind of data all go through the processor.
    for row in range(3):
        assert batch["pixel_values"][row].std() > 0
    # A digits array with its known 0..16 range gives exactly the pixels of the PNG of the same digit.
    ranged = MemVPDataCollator(tokenizer, collator.image_processor, array_value_range=(0, 16))
    from_array = ranged([dict(records[0])])["pixel_values"][0]
    from_png = collator([{"image": str(image_dir / "digit_0.png"), "question": "q", "answer": "a"}])["pixel_values"][0]
    assert torch.allclose(from_array, from_png, atol=1e-6)
    # The text holds no image token at all: it is exactly BOS + prompt + answer + EOS.
    text = build_prompt(records[0]["question"], records[0]["answer"])
    expected = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    assert batch["input_ids"][0, : len(expected)].tolist() == expected


def test_answer_only_labels(collator, tokenizer):
    records = [
        {"image": None, "question": "What digit is shown in the image ?", "answer": "seven"},
        {"image": None, "question": "Is the digit odd or even ?", "answer": "It is odd ."},
    ]
    batch = collator(records)
    for row, record in enumerate(records):
        assert supervised_ids(batch, row) == answer_ids(tokenizer, record["answer"])
        n = int(batch["attention_mask"][row].sum())
        prompt_len = len(tokenizer(build_prompt(record["question"]))["input_ids"])
        assert batch["input_ids"][row, 0].item() == tokenizer.bos_token_id
        assert (batch["labels"][row, :prompt_len] == IGNORE_INDEX).all()
        assert (batch["labels"][row, prompt_len:n] == batch["input_ids"][row, prompt_len:n]).all()
        assert batch["input_ids"][row, n - 1].item() == tokenizer.eos_token_id


def test_full_loss_when_answer_only_is_off(tokenizer, image_processor):
    collator = MemVPDataCollator(tokenizer, image_processor, answer_only_loss=False)
    batch = collator([{"question": "What digit ?", "answer": "two"}, {"question": "Is it odd ?", "answer": "no"}])
    mask = batch["attention_mask"].bool()
    assert (batch["labels"][mask] == batch["input_ids"][mask]).all()
    assert (batch["labels"][~mask] == IGNORE_INDEX).all()


def test_right_padding(collator, tokenizer):
    tokenizer_pad_multiple = 8
    records = [
        {"question": "What digit ?", "answer": "two"},
        {"question": "What digit is shown in the image ?", "answer": "A handwritten digit on a dark background ."},
    ]
    batch = collator(records)
    lengths = batch["attention_mask"].sum(1).tolist()
    assert lengths[0] < lengths[1] == batch["input_ids"].shape[1]
    short = lengths[0]
    assert (batch["attention_mask"][0, :short] == 1).all() and (batch["attention_mask"][0, short:] == 0).all()
    assert (batch["input_ids"][0, short:] == tokenizer.pad_token_id).all()
    assert (batch["labels"][0, short:] == IGNORE_INDEX).all()

    padded = MemVPDataCollator(tokenizer, None, pad_to_multiple_of=tokenizer_pad_multiple)(records)
    assert padded["input_ids"].shape[1] % tokenizer_pad_multiple == 0
    assert padded["attention_mask"].sum(1).tolist() == lengths
    assert "pixel_values" not in padded  # text-only collator (no image processor)


def test_prompts_are_left_padded_for_decoder_only_generation(collator, tokenizer, digits):
    images, _ = digits
    batch = collator.prompts([{"image": images[0], "question": "What digit ?"},
                              {"image": images[1], "question": "What digit is shown in the image ?"}])
    assert set(batch) == {"input_ids", "attention_mask", "pixel_values", "image_mask"}
    assert batch["attention_mask"][0, 0] == 0 and (batch["attention_mask"][:, -1] == 1).all()
    assert batch["input_ids"][0, 0] == tokenizer.pad_token_id


def test_seq2seq_prompts_need_no_answer_and_match_the_training_encoder_input(tokenizer, image_processor, digits):
    """`memvp-infer` on a T5/BART adapter answers records that carry no answer; the encoder must see exactly the
    (right-padded) input it was trained on."""
    images, _ = digits
    collator = MemVPDataCollator(tokenizer, image_processor, seq2seq=True)
    questions = [{"image": images[0], "question": "What digit ?"},
                 {"image": images[1], "question": "What digit is shown in the image ?"}]
    prompts = collator.prompts(questions)
    assert "labels" not in prompts and prompts["attention_mask"][0, -1] == 0  # right padding
    training = collator([dict(q, answer=a) for q, a in zip(questions, ["zero", "one"])])
    for key in ("input_ids", "attention_mask", "pixel_values", "image_mask"):
        assert torch.equal(prompts[key], training[key]), key
    with pytest.raises(ValueError, match="empty answer"):
        collator(questions)  # training still requires the answer


def test_truncation_keeps_the_answer(tokenizer, image_processor):
    record = {"question": "What digit is shown in the image ? " * 5, "answer": "seven"}
    full = MemVPDataCollator(tokenizer, image_processor)([record])
    cut = MemVPDataCollator(tokenizer, image_processor, max_length=10)([record])
    assert full["input_ids"].shape[1] > 10 and cut["input_ids"].shape[1] == 10
    assert cut["input_ids"][0, 0].item() == tokenizer.bos_token_id  # BOS kept, question trimmed from its start
    assert supervised_ids(cut, 0) == answer_ids(tokenizer, "seven")
    assert cut["input_ids"][0, -len(answer_ids(tokenizer, "seven")) - 2 :].tolist() == full["input_ids"][0, -4:].tolist()


def test_text_only_rows(collator, digits):
    images, _ = digits
    mixed = collator(
        [
            {"image": images[3], "question": "What digit ?", "answer": "three"},
            {"question": "What color is the sky ?", "answer": "blue ."},
            {"image": None, "question": "Is it odd ?", "answer": "yes"},
        ]
    )
    assert mixed["image_mask"].tolist() == [True, False, False]
    assert mixed["pixel_values"].shape == (3, 3, IMAGE_SIDE, IMAGE_SIDE)
    assert mixed["pixel_values"][0].abs().sum() > 0
    assert (mixed["pixel_values"][1:] == 0).all()

    text_only = collator([{"question": "What color is the sky ?", "answer": "blue ."}] * 2)
    assert text_only["image_mask"].tolist() == [False, False]
    assert text_only["pixel_values"].shape == (2, 3, IMAGE_SIDE, IMAGE_SIDE)
    assert (text_only["pixel_values"] == 0).all()


def test_multi_image_records(collator, tokenizer, image_processor, digits, image_dir):
    images, _ = digits
    records = [
        {"image": [images[0], str(image_dir / "digit_1.png")], "question": "Which image shows the larger digit ?",
         "answer": "The second one ."},
        {"image": [images[2]], "question": "What digit ?", "answer": "two"},
        {"image": None, "question": "What color is the sky ?", "answer": "blue ."},
    ]
    batch = collator(records)
    assert batch["pixel_values"].shape == (3, 2, 3, IMAGE_SIDE, IMAGE_SIDE)
    assert batch["image_mask"].shape == (3, 2)
    assert batch["image_mask"].tolist() == [[True, True], [True, False], [False, False]]
    assert (batch["pixel_values"][1, 1] == 0).all() and (batch["pixel_values"][2] == 0).all()
    assert not torch.equal(batch["pixel_values"][0, 0], batch["pixel_values"][0, 1])
    single = collator([{"image": images[2], "question": "q", "answer": "two"}])["pixel_values"][0]
    assert torch.equal(batch["pixel_values"][1, 0], single)

    fixed = MemVPDataCollator(tokenizer, image_processor, num_images=3)
    out = fixed([records[1], {"image": images[5], "question": "q", "answer": "five"}])
    assert out["pixel_values"].shape == (2, 3, 3, IMAGE_SIDE, IMAGE_SIDE)
    assert out["image_mask"].tolist() == [[True, False, False], [True, False, False]]
    with pytest.raises(ValueError, match=r"record 0.*3 images but num_images=2"):
        MemVPDataCollator(tokenizer, image_processor, num_images=2)(
            [{"image": [images[0]] * 3, "question": "q", "answer": "a"}]
        )


# ---------------------------------------------------------------------------------------------------------- errors
GOOD = {"question": "What digit ?", "answer": "two"}


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"image": "/definitely/not/here.png", "question": "q", "answer": "a"}, r"record 1: missing image file"),
        ({"image": "BROKEN", "question": "q", "answer": "a"}, r"record 1: unreadable image"),
        ({"image": 12345, "question": "q", "answer": "a"}, r"record 1: unreadable image"),
        ({"question": "q", "answer": ""}, r"record 1: empty answer"),
        ({"question": "q", "answer": "   "}, r"record 1: empty answer"),
        ({"question": "q"}, r"record 1: empty answer"),
        ({"conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": ""}]},
         r"record 1: empty answer"),
        ({"image": None, "answer": "a"}, r"record 1: the record has none of the text layouts 'question'/'prompt'.*'conversations', 'messages', 'texts'"),
        ({"conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "q2"}]},
         r"record 1: conversation must alternate human/gpt.*turn 1"),
        ({"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]},
         r"record 1: conversation must alternate human/gpt.*turn 0"),
        ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"},
                            {"from": "human", "value": "q2"}]},
         r"record 1: conversation must alternate human/gpt and end with a gpt turn"),
        ({"conversations": []}, r"record 1: 'conversations' must be a non-empty list"),
        ("not a dict", r"record 1: a record must be a dict"),
    ],
)
def test_collator_errors(collator, image_dir, bad, message):
    if isinstance(bad, dict) and bad.get("image") == "BROKEN":
        bad = dict(bad, image=str(image_dir / "broken.png"))
    with pytest.raises(ValueError, match=message):
        collator([GOOD, bad])


def test_error_names_record_id_and_image_folder(tokenizer, image_processor, image_dir):
    collator = MemVPDataCollator(tokenizer, image_processor, image_folder=image_dir)
    bad = {"id": "sqa-17", "image": "gone.png", "conversations": [{"from": "human", "value": "q"},
                                                                  {"from": "gpt", "value": "a"}]}
    with pytest.raises(ValueError, match=r"record 0 \(id='sqa-17'\): missing image file.*gone\.png.*image_folder"):
        collator([bad])


def test_constructor_errors(tokenizer, image_processor):
    import copy

    no_pad = copy.deepcopy(tokenizer)
    no_pad.pad_token = None
    with pytest.raises(ValueError, match="pad_token_id"):
        MemVPDataCollator(no_pad, image_processor)
    with pytest.raises(ValueError, match="question"):
        MemVPDataCollator(tokenizer, image_processor, prompt_template="Q: {q}")
    with pytest.raises(ValueError, match="no image_processor"):
        MemVPDataCollator(tokenizer, None)([{"image": np.zeros((4, 4)), "question": "q", "answer": "a"}])


# ---------------------------------------------------------------------------------------------------------- Trainer
class TinyVisualLM(torch.nn.Module):
    """A toy causal LM whose loss depends on `pixel_values` and `image_mask`: it only proves the columns flow."""

    def __init__(self, vocab_size: int, hidden: int = 16):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab_size, hidden)
        self.vision = torch.nn.Linear(3, hidden)
        self.head = torch.nn.Linear(hidden, vocab_size)
        self.seen: list[dict[str, tuple]] = []

    def forward(self, input_ids, attention_mask=None, labels=None, pixel_values=None, image_mask=None, **kwargs):
        assert pixel_values is not None and image_mask is not None, "the visual columns did not reach the model"
        self.seen.append({"pixel_values": tuple(pixel_values.shape), "image_mask": tuple(image_mask.shape),
                          "input_ids": tuple(input_ids.shape)})
        pooled = self.vision(pixel_values.mean(dim=(-2, -1)))  # (B, 3) -> (B, hidden)
        pooled = pooled * image_mask.unsqueeze(-1).to(pooled.dtype)
        hidden = self.embed(input_ids) + pooled.unsqueeze(1)
        logits = self.head(hidden)
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
        )
        return {"loss": loss, "logits": logits}


def test_works_as_trainer_data_collator(tmp_path, tokenizer, image_processor, digits, image_dir):
    from transformers import Trainer, TrainingArguments

    images, targets = digits
    train = [
        {"image": str(image_dir / f"digit_{i}.png") if i % 3 else None,
         "question": "What digit is shown in the image ?", "answer": DIGIT_NAMES[targets[i]]}
        for i in range(8)
    ]
    model = TinyVisualLM(len(tokenizer))
    before = model.vision.weight.detach().clone()
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        max_steps=2,
        learning_rate=1e-2,
        remove_unused_columns=False,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=train,
        data_collator=MemVPDataCollator(tokenizer, image_processor, max_length=32),
    )
    result = trainer.train()
    assert result.global_step == 2 and np.isfinite(result.training_loss)
    assert len(model.seen) == 2
    for shapes in model.seen:
        assert shapes["pixel_values"] == (4, 3, IMAGE_SIDE, IMAGE_SIDE) and shapes["image_mask"] == (4,)
    assert not torch.equal(before, model.vision.weight.detach())  # gradients reached the image path
