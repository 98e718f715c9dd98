"""Tests of memvp_peft.data: the MemVP collator and the dataset loaders.

Everything is local: the tokenizer is trained in-test (`local_models.build_word_tokenizer`), the image processor is a
`CLIPImageProcessor` built from arguments, the images are scikit-learn digits written to PNG files.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from memvp_peft.data import (
    DEFAULT_PROMPT_TEMPLATE,
    IGNORE_INDEX,
    MemVPDataCollator,
    build_prompt,
    load_jsonl,
    load_llava_json,
    strip_image_placeholder,
    to_rgb_image,
)
from memvp_peft.local_models import build_word_tokenizer, clip_image_processor

IMAGE_SIDE = 32
DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


# ---------------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tokenizer():
    """Word-level, and it prepends BOS like Llama does, to check that BOS is kept and never supervised."""
    return build_word_tokenizer([
        "Question: What digit is shown in the image ?\nAnswer: " + " ".join(DIGIT_NAMES),
        "Is the digit odd or even ? It is odd . It is even . yes no",
        "Which image shows the larger digit ? The first one . The second one .",
        "What color is the sky ? blue . Describe it . A handwritten digit on a dark background .",
    ])


@pytest.fixture(scope="module")
def image_processor():
    return clip_image_processor(IMAGE_SIDE)


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.images[:12], data.target[:12]


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory, digits):
    """Digits as 8-bit grayscale PNG files: digit_0.png ... digit_11.png."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")
    images, _ = digits
    for i, image in enumerate(images):
        Image.fromarray(np.rint(image * (255.0 / 16.0)).astype(np.uint8), mode="L").save(folder / f"digit_{i}.png")
    (folder / "broken.png").write_bytes(b"this is not a png file at all")
    return folder


@pytest.fixture
def collator(tokenizer, image_processor):
    return MemVPDataCollator(tokenizer, image_processor, max_length=64)


def supervised_ids(batch, row):
    labels = batch["labels"][row]
    return labels[labels != IGNORE_INDEX].tolist()


def answer_ids(tokenizer, answer):
    return tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


# ---------------------------------------------------------------------------------------------------------- helpers
def test_build_prompt():
    assert build_prompt("What digit?") == "Question: What digit?\nAnswer:"
    assert build_prompt("What digit?", "seven") == "Question: What digit?\nAnswer: seven"
    assert build_prompt("Q", template="USER: {question} ASSISTANT:") == "USER: Q ASSISTANT:"
    assert DEFAULT_PROMPT_TEMPLATE.format(question="x") == build_prompt("x")
    with pytest.raises(ValueError, match="question"):
        build_prompt("Q", template="no field here")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<image>\nWhat digit is shown?", "What digit is shown?"),
        ("What digit is shown?\n<image>", "What digit is shown?"),
        ("Compare <image> and <image> please", "Compare and please"),
        ("<image>", ""),
        ("no placeholder", "no placeholder"),
    ],
)
def test_strip_image_placeholder(text, expected):
    assert strip_image_placeholder(text) == expected


def test_to_rgb_image(digits, image_dir):
    images, _ = digits
    gray = images[0]  # 8x8 float64 in 0..16
    auto = np.asarray(to_rgb_image(gray))
    assert auto.shape == (8, 8, 3) and auto.dtype == np.uint8
    assert auto.max() == 255 and (auto[..., 0] == auto[..., 1]).all()
    fixed = np.asarray(to_rgb_image(gray, array_value_range=(0, 16)))
    np.testing.assert_array_equal(fixed[..., 0], np.rint(gray / 16 * 255).astype(np.uint8))
    assert np.asarray(to_rgb_image(np.zeros((4, 4)))).max() == 0
    chw = np.asarray(to_rgb_image(np.random.default_rng(0).random((3, 5, 6))))
    assert chw.shape == (5, 6, 3)
    png = (image_dir / "digit_3.png").read_bytes()
    from_file = np.asarray(to_rgb_image(str(image_dir / "digit_3.png")))
    np.testing.assert_array_equal(np.asarray(to_rgb_image(png)), from_file)
    np.testing.assert_array_equal(np.asarray(to_rgb_image({"bytes": png, "path": None})), from_file)
    np.testing.assert_array_equal(np.asarray(to_rgb_image({"bytes": None, "path": "digit_3.png"}, image_dir)), from_file)
    with pytest.raises(ValueError, match="cannot decode"):
        to_rgb_image(b"garbage")
    with pytest.raises(FileNotFoundError):
        to_rgb_image("nope.png", image_dir)
    with pytest.raises(ValueError, match="NaN"):
        to_rgb_image(np.full((4, 4), np.nan))
    with pytest.raises(ValueError, match="shape"):
        to_rgb_image(np.zeros((2, 4, 4, 4)))


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


# ---------------------------------------------------------------------------------------------------------- LLaVA
def _write_llava(tmp_path, records):
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(records))
    return path


def test_llava_json_single_turn(tmp_path, image_dir, collator, tokenizer):
    path = _write_llava(
        tmp_path,
        [
            {"id": "a", "image": "digit_4.png",
             "conversations": [{"from": "human", "value": "<image>\nWhat digit is shown in the image ?"},
                               {"from": "gpt", "value": "four"}]},
            {"id": "b", "conversations": [{"from": "human", "value": "What color is the sky ?"},
                                          {"from": "gpt", "value": "blue ."}]},
        ],
    )
    records = load_llava_json(path, image_dir)
    assert records[0]["image"] == str(image_dir / "digit_4.png") and records[1]["image"] is None
    batch = collator(records)
    assert batch["image_mask"].tolist() == [True, False]
    # "<image>" is gone: the row is exactly the plain prompt (no "<", "image", ">" tokens).
    expected = tokenizer(build_prompt("What digit is shown in the image ?", "four"))["input_ids"]
    expected += [tokenizer.eos_token_id]
    assert batch["input_ids"][0, : len(expected)].tolist() == expected
    assert int(batch["attention_mask"][0].sum()) == len(expected)
    assert tokenizer.unk_token_id not in batch["input_ids"][0].tolist()
    assert supervised_ids(batch, 0) == answer_ids(tokenizer, "four")

    # Unresolved LLaVA records (relative path) work when the collator is given the image folder.
    raw = json.loads(path.read_text())
    via_folder = MemVPDataCollator(tokenizer, collator.image_processor, image_folder=image_dir)(raw)
    assert torch.equal(via_folder["pixel_values"], batch["pixel_values"])


def test_llava_json_multi_turn(tmp_path, image_dir, collator, tokenizer):
    path = _write_llava(
        tmp_path,
        [{"id": "mt", "image": "digit_7.png",
          "conversations": [{"from": "human", "value": "<image>\nWhat digit is shown in the image ?"},
                            {"from": "gpt", "value": "seven"},
                            {"from": "human", "value": "Is the digit odd or even ?"},
                            {"from": "gpt", "value": "It is odd ."}]}],
    )
    batch = collator(load_llava_json(path, image_dir))
    first = answer_ids(tokenizer, "seven")
    second = answer_ids(tokenizer, "It is odd .")
    assert supervised_ids(batch, 0) == first + second  # loss on every gpt turn
    # Both human turns use the template and are unsupervised.
    turn1 = tokenizer(build_prompt("What digit is shown in the image ?", "seven"))["input_ids"] + [2]
    turn2 = tokenizer(build_prompt("Is the digit odd or even ?", "It is odd ."), add_special_tokens=False)["input_ids"]
    assert batch["input_ids"][0].tolist() == turn1 + turn2 + [tokenizer.eos_token_id]
    labels = batch["labels"][0].tolist()
    n1 = len(tokenizer(build_prompt("What digit is shown in the image ?"))["input_ids"])
    assert labels[:n1] == [IGNORE_INDEX] * n1
    start2 = len(turn1)
    n2 = len(tokenizer(build_prompt("Is the digit odd or even ?"), add_special_tokens=False)["input_ids"])
    assert labels[start2 : start2 + n2] == [IGNORE_INDEX] * n2


def test_load_llava_json_errors(tmp_path, image_dir):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"conversations": [}]')
    with pytest.raises(ValueError, match=r"bad\.json: invalid JSON at line 1"):
        load_llava_json(bad, image_dir)
    missing = _write_llava(tmp_path, [{"image": "digit_0.png", "conversations": [{"from": "human", "value": "q"},
                                                                                 {"from": "gpt", "value": "a"}]},
                                      {"image": "nope.png", "conversations": [{"from": "human", "value": "q"},
                                                                              {"from": "gpt", "value": "a"}]}])
    with pytest.raises(ValueError, match=r"llava\.json: entry 1: missing image file .*nope\.png"):
        load_llava_json(missing, image_dir)
    assert len(load_llava_json(missing, image_dir, check_images=False)) == 2
    no_conv = _write_llava(tmp_path, [{"image": "digit_0.png"}])
    with pytest.raises(ValueError, match=r"entry 0: LLaVA record has no 'conversations'"):
        load_llava_json(no_conv, image_dir)


# ---------------------------------------------------------------------------------------------------------- JSONL
def test_load_jsonl(tmp_path, image_dir, collator, tokenizer):
    path = tmp_path / "data.jsonl"
    lines = [
        {"image": "digit_5.png", "question": "What digit is shown ?", "answer": "five"},
        {"image": None, "question": "What color is the sky ?", "answer": "blue ."},
        {"image": ["digit_1.png", "digit_2.png"], "prompt": "Which image shows the larger digit ?",
         "answer": "The second one .", "source": "synthetic"},
    ]
    path.write_text(json.dumps(lines[0]) + "\n\n" + "\n".join(json.dumps(x) for x in lines[1:]) + "\n")
    records = load_jsonl(path, image_dir)
    assert [r["answer"] for r in records] == ["five", "blue .", "The second one ."]
    assert records[0]["image"] == str(image_dir / "digit_5.png")
    assert records[2]["image"] == [str(image_dir / "digit_1.png"), str(image_dir / "digit_2.png")]
    assert records[2]["source"] == "synthetic"
    batch = collator(records)
    assert batch["image_mask"].tolist() == [[True, False], [False, False], [True, True]]
    assert supervised_ids(batch, 0) == answer_ids(tokenizer, "five")


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"image": "digit_0.png", "question": "q", "answer": "a"', r"line 3: invalid JSON"),
        ('["not", "an", "object"]', r"line 3: expected a JSON object"),
        ('{"image": "digit_0.png", "answer": "a"}', r"line 3: missing 'question'"),
        ('{"image": "digit_0.png", "question": "q", "answer": "  "}', r"line 3: missing or empty 'answer'"),
        ('{"image": "missing.png", "question": "q", "answer": "a"}', r"line 3: missing image file .*missing\.png"),
    ],
)
def test_load_jsonl_errors(tmp_path, image_dir, bad_line, message):
    path = tmp_path / "data.jsonl"
    good = json.dumps({"image": "digit_0.png", "question": "q", "answer": "a"})
    path.write_text(good + "\n" + good + "\n" + bad_line + "\n")
    with pytest.raises(ValueError, match=r"data\.jsonl: " + message):
        load_jsonl(path, image_dir)


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
        ({"image": None, "answer": "a"}, r"record 1: record has neither 'question'/'prompt' nor 'conversations'"),
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
