"""A Qwen2 base (q/k/v biases, its own vLLM class `MemVPQwen2ForCausalLM`) serving a MemVP adapter: vLLM's offline
`LLM` answers exactly as memvp-peft's HF `generate()` for requests with different images and a text-only one, in
one batch. The Llama path is tested in depth by test_offline.py; this checks the Qwen2 class end to end."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("vllm")

from serving_fixtures import (Reference, build_models, engine_request, greedy_answers, prompt_ids,  # noqa: E402
                              qwen2_base, random_features, shut_down)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    paths = build_models(str(tmp_path_factory.mktemp("served_qwen2")), base=qwen2_base)
    return paths, Reference(paths)


@pytest.fixture(scope="module")
def llm(models):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM

    paths, _ = models
    engine = LLM(model=paths["base"], dtype="float32", enforce_eager=True, max_model_len=256, max_num_seqs=4,
                 block_size=32, enable_mm_embeds=True,
                 hf_overrides={"architectures": ["MemVPQwen2ForCausalLM"], "memvp_adapter": paths["adapter"]})
    yield engine
    shut_down(engine)


def test_qwen2_answers_different_images_and_text_only_as_hf(models, llm):
    _, reference = models
    prompts = [prompt_ids(reference, 1, 9), prompt_ids(reference, 2, 21), prompt_ids(reference, 2, 21)]
    images = [[random_features(1, 16)], [random_features(2, 30)], []]
    answers = greedy_answers(llm, [engine_request(p, im) for p, im in zip(prompts, images)])
    assert answers == [reference.generate(p, im) for p, im in zip(prompts, images)]
    assert answers[1] != answers[2]  # the same prompt with and without an image: the memory matters
