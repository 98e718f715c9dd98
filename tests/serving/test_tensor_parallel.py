"""Tensor parallelism: vLLM's offline `LLM` with `tensor_parallel_size=2` serving a MemVP adapter answers exactly as
memvp-peft's HF `generate()` -- one batch of requests holding different images (prefill chunks and decode steps of
several requests at once) and a text-only one. Each of the two ranks holds half of the memory slots and adds its
partial read to `down_proj`'s partial sum before the layer's one all-reduce (memvp_peft/serving/model.py)."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("vllm")

from serving_fixtures import (NUM_SLOTS, Reference, build_models, engine_request, greedy_answers,  # noqa: E402
                              prompt_ids, random_features, shut_down)

pytestmark = pytest.mark.slow

BIND = "VLLM_CPU_OMP_THREADS_BIND"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    # a memory of moderate size (std 0.3): the answers still change with the image, and they also change when the
    # read is doubled or halved (a rank reading every slot, or a rank's part lost), which a dominant memory would hide
    paths = build_models(str(tmp_path_factory.mktemp("served_tp")), memory_std=0.3)
    return paths, Reference(paths)


@pytest.fixture(scope="module")
def llm(models):
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("tensor_parallel_size=2 on vLLM's CPU build needs two CPUs, one per rank")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # the CPU build binds each rank's threads to one NUMA node by default and refuses two ranks on one node:
    # one CPU per rank, for the workers this call starts (they inherit the environment)
    saved = os.environ.get(BIND)
    os.environ[BIND] = f"{cpus[0]}|{cpus[1]}"
    from vllm import LLM

    paths, _ = models
    try:
        engine = LLM(model=paths["base"], dtype="float32", enforce_eager=True, max_model_len=256, max_num_seqs=8,
                     block_size=32, max_num_batched_tokens=48, tensor_parallel_size=2,
                     distributed_executor_backend="mp", enable_mm_embeds=True, limit_mm_per_prompt={"image": 2},
                     hf_overrides={"architectures": ["MemVPLlamaForCausalLM"], "memvp_adapter": paths["adapter"]})
    finally:
        if saved is None:
            os.environ.pop(BIND, None)
        else:
            os.environ[BIND] = saved
    yield engine
    shut_down(engine)


def test_two_ranks_answer_a_batch_of_different_images_and_text_only_as_hf(models, llm):
    _, reference = models
    lengths = [6, 11, 23, 40, 17, 17]
    prompts = [prompt_ids(reference, i, n) for i, n in enumerate(lengths)]
    prompts[5] = prompts[4]
    # 16 tokens live on rank 0 only, NUM_SLOTS on both, 12 + 20 across the boundary
    images = [[random_features(0, 16)], [random_features(1, NUM_SLOTS)], [random_features(2, 25)],
              [random_features(3, 8)], [], [random_features(20, 12), random_features(21, 20)]]
    answers = greedy_answers(llm, [engine_request(p, im) for p, im in zip(prompts, images)])
    assert answers == [reference.generate(p, im) for p, im in zip(prompts, images)]
    assert answers[4] != answers[5]  # the same prompt without and with images: the memory matters
