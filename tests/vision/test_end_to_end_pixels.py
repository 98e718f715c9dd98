"""End to end from real pixels: scikit-learn digits -> collator -> CLIP -> MemVP memory; the loss falls."""

import pytest
import torch
from peft import get_peft_model

from memvp_peft import MemVPConfig
from memvp_peft.data import MemVPDataCollator
from memvp_peft.local_models import build_word_tokenizer, clip_image_processor, tiny_clip, tiny_llama

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.mark.slow
def test_training_from_digit_pixels_reduces_the_loss():
    from sklearn.datasets import load_digits

    digits = load_digits()
    records = [
        {"image": digits.images[i], "question": "What digit is shown ?", "answer": NAMES[digits.target[i]]}
        for i in range(96)
    ]
    tokenizer = build_word_tokenizer(["Question: What digit is shown ?\nAnswer:"], NAMES)
    collator = MemVPDataCollator(tokenizer, clip_image_processor(32), max_length=32, array_value_range=(0, 16))
    encoder = tiny_clip(hidden_size=32)
    model = tiny_llama(tokenizer, hidden_size=64)
    config = MemVPConfig(visual_dim=32, num_memory_slots=20, projector_hidden_dim=32, memory_scale=1.0,
                         memory_dropout=0.0, vision_encoder=encoder)
    pm = get_peft_model(model, config)
    optimizer = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2, betas=(0.9, 0.95))
    pm.train()
    torch.manual_seed(0)
    losses = []
    for step in range(40):
        batch = collator([records[(step * 16 + j) % len(records)] for j in range(16)])
        loss = pm(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.88 * first, (first, last)
