"""vLLM's offline `LLM` serving a MemVP adapter answers exactly as memvp-peft's HF `generate()` does, token by token:
requests with different images in one batch, text-only and two-image requests, pixels through the adapter's own
vision encoder, chunked prefill, prefix caching (no KV shared across different images) and preemption. One engine
(a 32-token prefill budget and a 12-block KV cache, so every batch is chunked and long runs preempt) serves them all.
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402

from serving_fixtures import NUM_SLOTS, VISUAL_DIM, Reference, build_models, digit_image, random_features  # noqa: E402

pytestmark = pytest.mark.slow

MAX_TOKENS = 8


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    paths = build_models(str(tmp_path_factory.mktemp("served")))
    return paths, Reference(paths)


@pytest.fixture(scope="module")
def llm(models):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM

    paths, _ = models
    engine = LLM(model=paths["base"], dtype="float32", enforce_eager=True, max_model_len=256, max_num_seqs=8,
                 block_size=32, max_num_batched_tokens=32, num_gpu_blocks_override=12, enable_prefix_caching=True,
                 enable_mm_embeds=True, limit_mm_per_prompt={"image": 3}, disable_log_stats=False,
                 hf_overrides={"architectures": ["MemVPLlamaForCausalLM"], "memvp_adapter": paths["adapter"]})
    yield engine
    del engine


def _sampling(max_tokens: int = MAX_TOKENS):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def _prompt(reference: Reference, seed: int, length: int) -> list[int]:
    ids = reference.tokenizer.encode(" ".join(f"w{(seed * 13 + 7 * j) % 120}" for j in range(length - 1)))
    assert len(ids) == length
    return ids


def _request(prompt: list[int], images: list) -> dict:
    return {"prompt_token_ids": prompt, "multi_modal_data": {"image": images}} if images else \
        {"prompt_token_ids": prompt}


def _answers(llm, requests, max_tokens: int = MAX_TOKENS):
    outputs = llm.generate(requests, _sampling(max_tokens), use_tqdm=False)
    return [list(output.outputs[0].token_ids) for output in outputs], outputs


def test_one_batch_of_different_images_text_only_and_two_images_matches_hf(models, llm):
    _, reference = models
    lengths = [6, 11, 23, 40]
    prompts = [_prompt(reference, i, n) for i, n in enumerate(lengths)] + [_prompt(reference, 9, 17)] * 2
    images = [[random_features(i, 16)] for i in range(4)] + [[], [random_features(20, 12), random_features(21, 20)]]
    answers, _ = _answers(llm, [_request(p, im) for p, im in zip(prompts, images)])
    expected = [reference.generate(p, im) for p, im in zip(prompts, images)]
    assert answers == expected
    assert answers[4] != answers[5]  # the same prompt without and with images: the memory matters
    # the same prompts with the images swapped: the answers change with their images and still match HF
    swapped = images[1:4] + images[:1]
    answers_swapped, _ = _answers(llm, [_request(p, im) for p, im in zip(prompts[:4], swapped)])
    assert answers_swapped == [reference.generate(p, im) for p, im in zip(prompts[:4], swapped)]
    assert sum(a != b for a, b in zip(answers_swapped, answers[:4])) >= 2


def test_pixels_through_the_adapters_encoder_match_hf_on_its_features(models, llm):
    _, reference = models
    prompt = _prompt(reference, 3, 14)
    images = [digit_image(1), digit_image(7)]
    answers, _ = _answers(llm, [_request(prompt, [image]) for image in images])
    assert answers == [reference.generate(prompt, [reference.pixel_features(image)]) for image in images]
    assert answers[0] != answers[1]


def test_chunked_prefill_of_long_prompts_matches_hf(models, llm):
    _, reference = models
    prompts = [_prompt(reference, 30, 40), _prompt(reference, 31, 72), _prompt(reference, 32, 72)]
    images = [[random_features(30, 24)], [random_features(31, NUM_SLOTS)], []]
    answers, _ = _answers(llm, [_request(p, im) for p, im in zip(prompts, images)])
    assert answers == [reference.generate(p, im) for p, im in zip(prompts, images)]


def test_prefix_cache_never_shares_kv_across_images_and_hits_its_own(models, llm):
    _, reference = models
    prompt = _prompt(reference, 40, 72)
    images = [[random_features(40, 16)], [random_features(41, 16)], []]
    first = [_answers(llm, [_request(prompt, im)]) for im in images]  # one at a time: each could hit the one before
    assert [outputs[0].num_cached_tokens for _, outputs in first] == [0, 0, 0]
    again = [_answers(llm, [_request(prompt, im)]) for im in images]
    assert [outputs[0].num_cached_tokens for _, outputs in again] == [64, 64, 64]
    expected = [reference.generate(prompt, im) for im in images]
    assert [answers[0] for answers, _ in first] == expected
    assert [answers[0] for answers, _ in again] == expected


def test_preempted_requests_are_recomputed_with_their_own_images(models, llm):
    _, reference = models
    prompts = [_prompt(reference, 50 + i, 40) for i in range(10)]
    images = [[random_features(50 + i, 8 + i)] if i % 3 else [] for i in range(10)]
    before = _preemptions(llm)
    answers, _ = _answers(llm, [_request(p, im) for p, im in zip(prompts, images)], max_tokens=40)
    assert _preemptions(llm) > before  # 10 requests of 80 tokens do not fit 12 blocks of 32
    assert answers == [reference.generate(p, im, max_new_tokens=40) for p, im in zip(prompts, images)]


def _preemptions(llm) -> float:
    return sum(getattr(metric, "value", 0) for metric in llm.get_metrics() if metric.name == "vllm:num_preemptions")


@pytest.mark.parametrize("images, message", [
    ([torch.randn(8, VISUAL_DIM + 1)], "width"),
    ([torch.randn(NUM_SLOTS + 1, VISUAL_DIM)], "slots"),
    ([torch.randn(30, VISUAL_DIM), torch.randn(11, VISUAL_DIM)], "slots"),
    ([torch.full((4, VISUAL_DIM), float("nan"))], "finite"),
    ([torch.randn(4, VISUAL_DIM)] * 4, "(?i)at most 3"),
])
def test_unusable_images_are_refused_in_the_front_end_and_the_engine_keeps_serving(models, llm, images, message):
    _, reference = models
    prompt = _prompt(reference, 60, 9)
    from vllm.exceptions import VLLMValidationError  # vLLM's own count check comes first; a 400 on the server

    with pytest.raises((ValueError, VLLMValidationError), match=message):
        llm.generate([_request(prompt, images)], _sampling(), use_tqdm=False)
    answers, _ = _answers(llm, [_request(prompt, [random_features(60, 8)])])
    assert answers == [reference.generate(prompt, [random_features(60, 8)])]
