"""`memvp-serve` on 127.0.0.1: OpenAI chat completions (an image as a base64 data URL, text-only, streaming, 200 at
once) answer exactly as memvp-peft's HF `generate()` on the same prompt tokens and the same image features, and
unusable requests get HTTP 400 with a clear message while the server keeps serving. One server serves them all."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytest.importorskip("vllm")
pytest.importorskip("openai")

import torch  # noqa: E402

from serving_fixtures import NUM_SLOTS, VISUAL_DIM, Reference, build_models, digit_image  # noqa: E402

pytestmark = pytest.mark.slow

MAX_TOKENS = 8
STARTUP_S = 400


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    paths = build_models(str(tmp_path_factory.mktemp("served")))
    port = _free_port()
    log = open(tmp_path_factory.mktemp("log") / "server.log", "w+")
    command = [os.path.join(os.path.dirname(sys.executable), "memvp-serve"), "--adapter", paths["adapter"],
               "--base", paths["base"], "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
               "--max-model-len", "256", "--max-num-seqs", "16", "--block-size", "32", "--enable-mm-embeds",
               "--limit-mm-per-prompt", '{"image": 4}']
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + STARTUP_S
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                if answer.status == 200:
                    break
        except OSError:
            pass
        if process.poll() is not None or time.time() > deadline:
            process.kill()
            log.seek(0)
            pytest.fail(f"memvp-serve did not come up:\n{log.read()[-6000:]}")
        time.sleep(1)
    try:
        yield url, paths, Reference(paths)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def _data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _embeds(tensor: torch.Tensor) -> str:
    buffer = io.BytesIO()
    torch.save(tensor, buffer)
    return base64.b64encode(buffer.getvalue()).decode()


def _messages(text: str, images=(), embeds=()) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": _data_url(image)}} for image in images]
    parts += [{"type": "image_embeds", "image_embeds": _embeds(tensor)} for tensor in embeds]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def _client(url: str, asynchronous: bool = False):
    import openai

    kind = openai.AsyncOpenAI if asynchronous else openai.OpenAI
    return kind(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)


def _ask(client, paths, messages, **extra):
    return client.chat.completions.create(model=paths["base"], messages=messages, max_tokens=MAX_TOKENS,
                                          temperature=0.0, extra_body={"return_token_ids": True, "ignore_eos": True},
                                          **extra)


def _expected(reference: Reference, response, images=()) -> list[int]:
    features = [reference.pixel_features(image) for image in images]
    return reference.generate(list(response.prompt_token_ids), features, max_new_tokens=MAX_TOKENS)


def test_chat_with_an_image_text_only_and_streaming_match_hf(server):
    url, paths, reference = server
    client = _client(url)
    with_image = _ask(client, paths, _messages("w1 w2 w3 w4", [digit_image(3)]))
    text_only = _ask(client, paths, _messages("w1 w2 w3 w4"))
    assert list(with_image.choices[0].token_ids) == _expected(reference, with_image, [digit_image(3)])
    assert list(text_only.choices[0].token_ids) == _expected(reference, text_only)
    assert with_image.choices[0].token_ids != text_only.choices[0].token_ids
    stream = client.chat.completions.create(model=paths["base"], messages=_messages("w1 w2 w3 w4", [digit_image(3)]),
                                            max_tokens=MAX_TOKENS, temperature=0.0, stream=True,
                                            extra_body={"ignore_eos": True})
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert streamed == with_image.choices[0].message.content


def test_two_hundred_concurrent_mixed_requests_all_answer_as_hf(server):
    url, paths, reference = server
    variants = [((), "w5 w6 w7"), ((digit_image(0),), "w5 w6 w7"), ((digit_image(1),), "w8 w9"),
                ((digit_image(2), digit_image(5)), "w5 w6 w7"), ((digit_image(4),), "w10 w11 w12 w13 w14 w15")]
    requests = [variants[i % len(variants)] for i in range(200)]

    async def run_all():
        client = _client(url, asynchronous=True)
        calls = [client.chat.completions.create(
            model=paths["base"], messages=_messages(text, images), max_tokens=MAX_TOKENS, temperature=0.0,
            extra_body={"return_token_ids": True, "ignore_eos": True}) for images, text in requests]
        return await asyncio.gather(*calls, return_exceptions=True)

    responses = asyncio.run(run_all())
    errors = [r for r in responses if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    expected = {}
    for (images, text), response in zip(requests, responses):
        key = (tuple(id(image) for image in images), text)
        if key not in expected:
            expected[key] = _expected(reference, response, images)
        assert list(response.choices[0].token_ids) == expected[key]


@pytest.mark.parametrize("case, message", [
    ("too_many_tokens", "slots"),
    ("wrong_width", "width"),
    ("corrupt_image", "image"),
    ("too_many_images", "(?i)at most 4"),
])
def test_unusable_requests_get_400_with_a_clear_message_and_the_server_keeps_serving(server, case, message):
    import openai

    url, paths, reference = server
    client = _client(url)
    messages = {
        "too_many_tokens": _messages("w1 w2", [digit_image(i) for i in range(3)]),  # 3 x 16 patches > 40 slots
        "wrong_width": _messages("w1 w2", embeds=[torch.randn(8, VISUAL_DIM + 3)]),
        "corrupt_image": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"no png").decode()}},
            {"type": "text", "text": "w1 w2"}]}],
        "too_many_images": _messages("w1 w2", [digit_image(i) for i in range(5)]),
    }[case]
    with pytest.raises(openai.BadRequestError, match=message) as refused:
        _ask(client, paths, messages)
    assert refused.value.status_code == 400
    answer = _ask(client, paths, _messages("w1 w2", [digit_image(3)]))
    assert list(answer.choices[0].token_ids) == _expected(reference, answer, [digit_image(3)])
    assert NUM_SLOTS < 3 * 16
