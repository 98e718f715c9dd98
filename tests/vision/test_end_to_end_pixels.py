"""End to end from real pixels: scikit-learn digits -> collator -> CLIP -> MemVP memory -> the right digit name.

Every record asks the same question, so the text alone cannot tell the answer: a model trained without its
`pixel_values` can at best name the most frequent digit of the held-out set (12.5% of it here). A falling training
loss proves nothing (learning the ten answer words and EOS already lowers it); only answering digits the model never
saw, from their pixels, does.
"""

import pytest
import torch
from peft import get_peft_model

from memvp_peft import MemVPConfig
from memvp_peft.data import MemVPDataCollator
from memvp_peft.demo_models import build_word_tokenizer, clip_image_processor, tiny_clip, tiny_llama

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TRAIN, HELD_OUT = range(0, 96), range(96, 192)


def _records(indices):
    from sklearn.datasets import load_digits

    digits = load_digits()
    return [{"image": digits.images[i], "question": "What digit is shown ?", "answer": NAMES[digits.target[i]]}
            for i in indices]  # fmt: skip


def _answer_accuracy(model, batch) -> float:
    """Share of rows whose first supervised token (the digit name) is the argmax of the logits before it."""
    with torch.no_grad():
        logits = model(**batch).logits
    labels = batch["labels"]
    answer_at = (labels != -100).int().argmax(dim=1)  # first supervised position of each row
    rows = torch.arange(len(labels))
    predicted = logits[rows, answer_at - 1].argmax(dim=-1)
    return (predicted == labels[rows, answer_at]).float().mean().item()


@pytest.mark.slow
def test_training_from_digit_pixels_answers_held_out_digits():
    train, held_out = _records(TRAIN), _records(HELD_OUT)
    tokenizer = build_word_tokenizer(["Question: What digit is shown ?\nAnswer:"], NAMES)
    collator = MemVPDataCollator(tokenizer, clip_image_processor(32), max_length=32, array_value_range=(0, 16))
    config = MemVPConfig(visual_dim=32, num_memory_slots=20, projector_hidden_dim=32, memory_scale=1.0,
                         memory_dropout=0.0, vision_encoder=tiny_clip(hidden_size=32))  # fmt: skip
    model = get_peft_model(tiny_llama(tokenizer, hidden_size=64), config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, betas=(0.9, 0.95))
    model.train()
    torch.manual_seed(0)
    for step in range(60):
        batch = collator([train[(step * 16 + j) % len(train)] for j in range(16)])
        assert batch["pixel_values"].shape == (16, 3, 32, 32)
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    answers = [r["answer"] for r in held_out]
    without_pixels = max(answers.count(name) for name in NAMES) / len(answers)  # always naming the commonest digit
    accuracy = _answer_accuracy(model, collator(held_out))
    assert accuracy > without_pixels + 0.25, f"held-out accuracy {accuracy:.3f}, text alone reaches {without_pixels}"
