"""Rows with different numbers of visual tokens (the variable form of `image_features`): each row's memory holds its
own tokens and nothing else -- its slots past them are empty and read exactly nothing -- so a row reads in a padded
batch what it reads alone; a row longer than the memory is refused, at the call or over a dataset before training.

Each row is compared with tests/reference_memvp.py's memory of exactly that row's tokens (`own_slots=True`, computed
one row at a time), ADEM-VL's read and drop with tests/reference_adem.py's; fp32, eval mode, randomised adapters.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import VISUAL_DIM, VOCAB, memvp_config, randomize_memory, tiny_llama
from host_syncs import SyncCounter
from peft import get_peft_model
from reference_adem import adem_drop, compress, reference_form_logits, reference_gpt2_drop_logits
from reference_memvp import adapter_state, reference_logits
from transformers import GPT2Config, GPT2LMHeadModel

from memvp_peft.tuner.layer import drop_lowest_scores
from memvp_peft.tuner.memory import MemoryState
from memvp_peft.tuner.visual_inputs import (
    VisualTokens,
    check_memory_slots,
    group_images_by_row,
    required_memory_slots,
)

TOL = dict(rtol=1e-5, atol=1e-6)
SLOTS = 8
LENGTHS = (5, 0, 4)  # row 0: two images (3 + 2 tokens), row 1: no image, row 2: one image of 4 tokens


def _gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_inner=64, n_positions=64,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2)).eval()


BASES = {"llama": tiny_llama, "gpt2": _gpt2}


def adapted(base, **overrides):
    pm = get_peft_model(copy.deepcopy(base), memvp_config(num_memory_slots=SLOTS, **overrides))
    randomize_memory(pm)
    return pm.eval()


def images(*tokens, seed=7):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(count, VISUAL_DIM, generator=generator) for count in tokens]


def rows():
    first, second, third = images(3, 2, 4)
    return [[first, second], [], [third]]


def ids(batch=3, length=7, seed=3):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def row_tokens(row):
    """A row's tokens as one (1, N, D) tensor, None for a row without image."""
    return torch.cat(row)[None] if row else None


def padded_with(fill):
    """The rows as VisualTokens.from_padded: (3, 2 images, 4 tokens, D), every image padded on its own with `fill`."""
    features = torch.full((3, 2, 4, VISUAL_DIM), fill)
    mask = torch.zeros(3, 2, 4, dtype=torch.bool)
    for row, row_images in enumerate(rows()):
        for index, image in enumerate(row_images):
            features[row, index, : len(image)] = image
            mask[row, index, : len(image)] = True
    return VisualTokens.from_padded(features, mask)


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.fixture(scope="module")
def pm(llama):
    return adapted(llama)


def logits(model, **inputs):
    with torch.no_grad():
        return model(**inputs).logits


# ------------------------------------------------------------------------------------------- what a row reads


@pytest.mark.parametrize("name", BASES)
def test_each_row_reads_a_memory_of_exactly_its_own_tokens(name):
    base = BASES[name]()
    model, text = adapted(base), ids()
    batched = logits(model, input_ids=text, image_features=rows())
    state = adapter_state(model)
    for row, row_images in enumerate(rows()):
        expected = reference_logits(base, state, model.peft_config["default"], text[row : row + 1],
                                    image_features=row_tokens(row_images), own_slots=True)
        torch.testing.assert_close(batched[row : row + 1], expected, **TOL)


def test_a_row_reads_the_same_alone_as_in_a_padded_batch(pm):
    text, batch = ids(), rows()
    batched = logits(pm, input_ids=text, image_features=batch)
    for row in range(len(batch)):
        alone = logits(pm, input_ids=text[row : row + 1], image_features=batch[row : row + 1])
        torch.testing.assert_close(batched[row : row + 1], alone, **TOL)


def test_a_row_without_image_reads_the_learned_memory_as_a_text_only_row_of_the_fixed_form(pm):
    text = ids()
    variable = logits(pm, input_ids=text, image_features=rows())
    fixed = logits(pm, input_ids=text, image_features=torch.randn(3, 4, VISUAL_DIM),
                   image_mask=torch.tensor([True, False, True]))
    torch.testing.assert_close(variable[1], fixed[1], rtol=0, atol=0)


def test_rows_that_fill_every_slot_read_as_the_fixed_form(pm):
    text, features = ids(), torch.randn(3, SLOTS, VISUAL_DIM)
    variable = logits(pm, input_ids=text, image_features=list(features))
    assert torch.equal(variable, logits(pm, input_ids=text, image_features=features))


def test_a_row_given_as_one_tensor_is_a_row_of_one_image(pm):
    text, (first, second) = ids(2), images(4, 6)
    assert torch.equal(logits(pm, input_ids=text, image_features=[first, second]),
                       logits(pm, input_ids=text, image_features=[[first], [second]]))


# ------------------------------------------------------------------------------------- padded slots read nothing


@pytest.mark.parametrize("garbage", [1e30, -3e38, float("nan"), float("inf")])
def test_what_the_padding_holds_never_reaches_any_row(pm, garbage):
    text = ids()
    clean = logits(pm, input_ids=text, image_features=padded_with(0.0))
    assert torch.equal(logits(pm, input_ids=text, image_features=padded_with(garbage)), clean)


def test_the_learned_slots_past_a_rows_tokens_never_reach_it(llama):
    model, text = adapted(llama), ids()
    before = logits(model, input_ids=text, image_features=rows())
    memory = model.base_model.memvp_memory["default"]
    with torch.no_grad():  # slots 5.. lie past the tokens of both rows with images
        memory.key_pos[5:] += 3.0
        memory.value_pos[5:] -= 3.0
    after = logits(model, input_ids=text, image_features=rows())
    assert torch.equal(after[0], before[0]) and torch.equal(after[2], before[2])
    assert not torch.allclose(after[1], before[1])  # the row without image reads every learned slot


def test_empty_slots_hold_zero_keys_and_values_and_are_marked_in_the_slot_mask(pm):
    runtime, memories = pm.base_model._memvp_runtime, pm.base_model.memvp_memory
    with torch.no_grad():
        state = runtime.build(memories, rows(), None, None, 3).states["default"]
    memory = memories["default"]
    assert state.slots.tolist() == [[True] * 5 + [False] * 3, [True] * SLOTS, [True] * 4 + [False] * 4]
    assert not state.keys[0, 5:].any() and not state.values[0, 5:].any()
    assert not state.keys[2, 4:].any() and not state.values[2, 4:].any()
    assert torch.equal(state.keys[1], memory.key_pos) and torch.equal(state.values[1], memory.value_pos)


def test_rows_of_images_and_padded_visual_tokens_build_the_same_memory(pm):
    runtime, memories = pm.base_model._memvp_runtime, pm.base_model.memvp_memory
    with torch.no_grad():
        from_rows = runtime.build(memories, rows(), None, None, 3).states["default"]
        from_padded = runtime.build(memories, padded_with(0.5), None, None, 3).states["default"]
    assert torch.equal(from_rows.keys, from_padded.keys) and torch.equal(from_rows.values, from_padded.values)
    assert torch.equal(from_rows.slots, from_padded.slots)


def test_each_image_of_a_row_is_compressed_on_its_own_grid(llama):
    model, text = adapted(llama, pool_kernel=2), ids(2)
    large, small, single = images(16, 4, 16)
    batched = logits(model, input_ids=text, image_features=[[large, small], [single]])
    config, state = model.peft_config["default"], adapter_state(model)
    for row, row_images in enumerate([[large, small], [single]]):
        pooled = torch.cat([compress(image[None], config) for image in row_images], dim=1)  # 4 + 1 and 4 slots
        expected = reference_logits(llama, state, config, text[row : row + 1], image_features=pooled, own_slots=True)
        torch.testing.assert_close(batched[row : row + 1], expected, **TOL)


# ----------------------------------------------------------------------------------------------- ADEM-VL's drop


def test_the_drop_ranks_only_a_rows_own_slots():
    scores = torch.randn(2, 3, 10)
    slots = torch.arange(10) < torch.tensor([10, 5])[:, None]
    dropped = drop_lowest_scores(scores, 0.2, slots)
    assert torch.equal(dropped[0], adem_drop(scores[0], 0.2))  # 2 of its 10 slots
    assert torch.equal(dropped[1, :, :5], adem_drop(scores[1, :, :5], 0.2))  # 1 of its 5 slots
    assert not dropped[1, :, 5:].any()


@pytest.mark.parametrize("name", BASES)
def test_rows_with_the_drop_read_as_the_reference_reads_each_row_alone(name):
    base = BASES[name]()
    read = {"memory_read": "adem"} if name == "llama" else {}  # silu(x) silu(K)^T needs the whole FFN
    model, text = adapted(base, drop_ratio=0.25, **read), ids()
    batched = logits(model, input_ids=text, image_features=rows())
    config, state = model.peft_config["default"], adapter_state(model)
    for row, row_images in enumerate(rows()):
        features = row_tokens(row_images)
        expected = (reference_form_logits(base, state, config, text[row : row + 1], features, own_slots=True)
                    if name == "llama" else
                    reference_gpt2_drop_logits(base, state, config, text[row : row + 1], features, own_slots=True))
        torch.testing.assert_close(batched[row : row + 1], expected, **TOL)


# -------------------------------------------------------------------------------- generate, training, checkpoints


@pytest.mark.parametrize("read", [{}, {"memory_read": "adem", "drop_ratio": 0.25}], ids=["memvp", "adem-drop"])
def test_beam_search_gives_every_row_what_it_generates_alone(llama, read):
    pm, text, batch = adapted(llama, **read), ids(), rows()
    settings = dict(max_new_tokens=4, min_new_tokens=4, num_beams=2, num_return_sequences=2, do_sample=False,
                    pad_token_id=0)
    with torch.no_grad():
        together = pm.generate(input_ids=text, image_features=batch, **settings)
        for row in range(len(batch)):
            alone = pm.generate(input_ids=text[row : row + 1], image_features=batch[row : row + 1], **settings)
            assert torch.equal(together[2 * row : 2 * row + 2], alone)


def test_the_slot_mask_follows_the_samples_a_generate_repeats():
    slots = torch.tensor([[True, False], [True, True]])
    state = MemoryState(torch.zeros(2, 2, 4), torch.zeros(2, 2, 4), slots=slots)
    assert torch.equal(state.slots_for_input(4, torch.device("cpu")), slots.repeat_interleave(2, dim=0))
    assert MemoryState(torch.zeros(2, 4), torch.zeros(2, 4)).slots_for_input(4, torch.device("cpu")) is None


def test_a_memory_of_rows_keeps_its_slot_mask_through_deepspeeds_output_hooks(pm):
    """ZeRO-3 passes every tensor of the memory's output through an autograd function that detaches it, and rebuilds
    the tuple: the slot mask comes back as the same bool mask, beside the keys and values."""
    zero_utils = pytest.importorskip("deepspeed.runtime.zero.utils")
    runtime, memories = pm.base_model._memvp_runtime, pm.base_model.memvp_memory
    state = runtime.build(memories, rows(), None, None, 3).states["default"]
    rebuilt = zero_utils.apply_to_tensors_only(lambda tensor: tensor.detach(), state)
    assert isinstance(rebuilt, MemoryState) and torch.equal(rebuilt.slots, state.slots)
    assert torch.equal(rebuilt.slots_for_input(6, torch.device("cpu")), state.slots.repeat_interleave(2, dim=0))


def test_learned_slots_no_row_reads_get_no_gradient(llama):
    model = adapted(llama)
    model.train()
    text, (first, second) = ids(2), images(3, 5)
    model(input_ids=text, labels=text, image_features=[[first], [second]]).loss.backward()
    key_pos = model.base_model.memvp_memory["default"].key_pos
    assert key_pos.grad[:5].abs().sum() > 0 and not key_pos.grad[5:].any()


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_replays_each_rows_slots(llama, reentrant):
    """The drop reads the slot mask: a replay without it would rank the empty slots too and give other gradients."""

    def projector_gradient(checkpointing):
        model = adapted(llama, memory_read="adem", drop_ratio=0.25)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.train()
        text = ids()
        model(input_ids=text, labels=text, image_features=rows()).loss.backward()
        return model.base_model.memvp_memory["default"].projector[0].weight.grad

    plain = projector_gradient(False)
    assert plain.abs().sum() > 0
    torch.testing.assert_close(projector_gradient(True), plain)


def test_rows_add_no_host_read_to_a_training_step_or_a_generate(llama):
    model = adapted(llama, memory_read="adem", drop_ratio=0.25)
    with SyncCounter() as counter:
        model.train()
        model(input_ids=ids(), labels=ids(), image_features=rows()).loss.backward()
        model.eval()
        with torch.no_grad():
            model.generate(input_ids=ids(), image_features=rows(), max_new_tokens=3, num_beams=2, do_sample=False,
                           pad_token_id=0)
    reads = counter.ours_outside_validation()
    assert reads == [], [f"{read.call} at {read.where}" for read in reads]


# ------------------------------------------------------------------------------------------- refused, and sizes


def test_a_row_needing_more_slots_than_configured_is_refused(pm):
    first, second = images(5, 4)
    with pytest.raises(ValueError, match=r"row 1 of the call needs 9 memory slots \(2 image\(s\): 5 \+ 4 tokens\), "
                                         r"but MemVPConfig.num_memory_slots=8.*num_memory_slots >= 9"):
        pm(input_ids=ids(2), image_features=[[first], [first, second]])
    assert pm.base_model._memvp_runtime.active() is None


def test_visual_tokens_longer_than_the_memory_are_refused(pm):
    tokens = VisualTokens.from_padded(torch.randn(2, 9, VISUAL_DIM), torch.arange(9) < torch.tensor([9, 2])[:, None])
    with pytest.raises(ValueError, match=r"row 0 of the call needs 9 memory slots.*num_memory_slots=8"):
        pm(input_ids=ids(2), image_features=tokens)


def test_visual_tokens_are_not_compressed_again():
    model = adapted(tiny_llama(), pool_kernel=2)
    with pytest.raises(ValueError, match=r"pool_kernel=2.*rows of per-image tensors"):
        model(input_ids=ids(3), image_features=padded_with(0.0))


@pytest.mark.parametrize("features, message", [
    (lambda: [images(4)], r"1 rows but the input batch has 2"),
    (lambda: [images(4), [torch.randn(3, VISUAL_DIM + 1)]], r"image 0 of row 1 .*width 17.*visual_dim=16"),
    (lambda: [images(4), [torch.randn(0, VISUAL_DIM)]], r"image 0 of row 1 .*0 visual tokens"),
    (lambda: [images(4), [torch.full((2, VISUAL_DIM), float("nan"))]], r"image 0 of row 1 .*NaN or inf"),
    (lambda: [images(4), "image"], r"row 1 of `image_features` must be a list of torch.Tensor"),
])
def test_bad_rows_are_refused_naming_the_row(pm, features, message):
    with pytest.raises(ValueError, match=message):
        pm(input_ids=ids(2), image_features=features())


def test_an_image_mask_does_not_go_with_rows(pm):
    with pytest.raises(ValueError, match="drop the mask"):
        pm(input_ids=ids(2), image_features=[images(4), []], image_mask=torch.tensor([True, False]))


def test_required_memory_slots_is_what_the_longest_row_needs():
    assert required_memory_slots([[4, 3], 5, []]) == 7
    assert required_memory_slots([[16, 4], [64]], memvp_config(pool_kernel=2)) == 16  # (4 + 1) and 16 pooled slots


def test_check_memory_slots_names_the_option_and_the_size_a_dataset_needs():
    assert check_memory_slots([[4, 3], [8]], memvp_config(num_memory_slots=8)) == 8
    with pytest.raises(ValueError, match=r"row 1 of the dataset needs 9 memory slots \(2 image\(s\): 4 \+ 5 tokens\)"
                                         r".*num_memory_slots=8.*num_memory_slots >= 9"):
        check_memory_slots([[4, 3], [4, 5], [2]], memvp_config(num_memory_slots=8))


def test_images_are_grouped_into_rows_by_their_counts():
    first, second, third = images(1, 2, 3)
    assert group_images_by_row([first, second, third], [2, 0, 1]) == [[first, second], [], [third]]
    with pytest.raises(ValueError, match="adding up to the 3 images"):
        group_images_by_row([first, second, third], [1, 1])
