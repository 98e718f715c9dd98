"""memvp-bench's device, dtype and model-shape options: what they build, and what they refuse before building."""

import argparse

import pytest
import torch

from memvp_peft.bench.cli import check_modes, parse_args
from memvp_peft.bench.methods import (
    DEFAULT_IMAGE_SIZE, MODEL_SHAPES, VLM_IMAGE_PROCESSORS, build_base_model, describe_model, instantiate, make_batch,
    shape_config, visual_tokens_per_image,
)

# (width, attention heads, KV heads, FFN, vocab, full depth) as the real models' config.json files give them
REAL_SHAPES = {
    "llama-7b": (4096, 32, 32, 11008, 32000, 32),
    "llama-13b": (5120, 40, 40, 13824, 32000, 40),
    "qwen2.5-7b": (3584, 28, 4, 18944, 152064, 28),
    "qwen2-vl-7b": (3584, 28, 4, 18944, 152064, 28),
}


def _refusal(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_is_refused_with_the_reason_and_the_way_out(capsys):
    err = _refusal(capsys, ["--device", "cuda", "--dtype", "bfloat16"])
    assert "--device cuda was asked for, but CUDA is not available" in err
    assert "CPU-only build" in err or "no GPU is visible" in err
    assert "Use --device cpu" in err


def test_cpu_only_modes_are_refused_on_cuda_before_anything_runs():
    for mode in ("profile", "accuracy"):
        args = argparse.Namespace(device="cuda", profile=mode == "profile", accuracy=mode == "accuracy")
        assert f"--{mode}" in check_modes(args) and "--device cpu only" in check_modes(args)
    assert check_modes(argparse.Namespace(device="cpu", profile=True, accuracy=False)) is None


@pytest.mark.parametrize("shape", REAL_SHAPES)
def test_model_shape_builds_the_real_models_exact_layer_shape(shape):
    """Built on the meta device: the shapes of every weight, without allocating the GBs."""
    width, heads, kv_heads, ffn, vocab, depth = REAL_SHAPES[shape]
    assert MODEL_SHAPES[shape]["num_hidden_layers"] == depth
    model = instantiate(shape_config(shape, layers=1), device="meta", dtype=torch.bfloat16)
    layers = model.model.layers
    assert len(layers) == 1 and model.config.num_hidden_layers == 1
    head_dim = width // heads
    attention, mlp = layers[0].self_attn, layers[0].mlp
    assert attention.q_proj.weight.shape == (heads * head_dim, width)
    assert attention.k_proj.weight.shape == attention.v_proj.weight.shape == (kv_heads * head_dim, width)
    assert attention.o_proj.weight.shape == (width, heads * head_dim)
    assert mlp.gate_proj.weight.shape == mlp.up_proj.weight.shape == (ffn, width)
    assert mlp.down_proj.weight.shape == (width, ffn)
    assert model.model.embed_tokens.weight.shape == model.lm_head.weight.shape == (vocab, width)
    assert model.config._attn_implementation == "sdpa"
    assert next(model.parameters()).dtype == torch.bfloat16 and next(model.parameters()).is_meta


def test_build_base_model_follows_the_shape_depth_and_dtype_asked_for():
    """The benchmark's own builder (on the meta device here): Qwen2.5-7B's biases on q/k/v, untied head, RoPE base."""
    args = parse_args(["--model_shape", "qwen2.5-7b", "--layers", "2", "--dtype", "bfloat16"])
    args.device = "meta"  # the CLI offers cpu and cuda; the builder takes any torch device
    info = describe_model(build_base_model(args, layers=2))
    width, ffn, vocab, kv = 3584, 18944, 152064, 4 * 128
    per_layer = (width * width + width) + 2 * (width * kv + kv) + width * width + 3 * width * ffn + 2 * width
    assert info["parameters"] == 2 * vocab * width + 2 * per_layer + width
    assert (info["num_layers"], info["num_key_value_heads"], info["dtype"]) == (2, 4, "bfloat16")


def test_model_shape_defaults_to_two_depths_and_refuses_flags_that_would_change_it(capsys):
    assert parse_args(["--model_shape", "llama-7b"]).num_layers == [1, 2]
    assert parse_args(["--model_shape", "llama-7b", "--layers", "1"]).num_layers == [1]
    assert parse_args(["--layers", "2", "4"]).num_layers == [2, 4]  # the built-in model at two depths
    assert "drop --hidden_size" in _refusal(capsys, ["--model_shape", "llama-7b", "--hidden_size", "512"])
    assert "distinct depths >= 1" in _refusal(capsys, ["--layers", "2", "2"])
    assert "keeps its own" in _refusal(capsys, ["--model_name_or_path", "/some/model", "--layers", "2"])


def test_cpu_defaults_are_the_cpu_benchmarks():
    args = parse_args([])
    assert (args.device, args.dtype, args.warmup) == ("cpu", "float32", 1)
    assert args.num_layers is None and args.model_shape is None


def test_batch_comes_in_the_compute_dtype_with_the_same_numbers_on_every_device():
    fp32 = make_batch(2, 5, 3, 8, 100, seed=0)
    bf16 = make_batch(2, 5, 3, 8, 100, seed=0, device="cpu", dtype=torch.bfloat16)
    assert bf16.image_features.dtype == torch.bfloat16 and bf16.input_ids.dtype == torch.int64
    assert torch.equal(bf16.input_ids, fp32.input_ids)
    torch.testing.assert_close(bf16.image_features.float(), fp32.image_features, rtol=1e-2, atol=1e-2)


def test_vlm_shape_visual_tokens_are_the_placeholders_its_own_processor_puts_in_the_text():
    """N of the Qwen2-VL-shaped run is exactly what Qwen2-VL's processor (its published resize settings) expands one
    image to in `input_ids`: the tokens input-space prompting adds to a sample and MemVP keeps out of it."""
    from PIL import Image
    from vlm_fixtures import chat_batch, qwen2_vl
    import transformers

    model, processor = qwen2_vl()
    class_name, _, kwargs = VLM_IMAGE_PROCESSORS["qwen2-vl-7b"]
    processor.image_processor = getattr(transformers, class_name)(**kwargs)
    for width, height in [(640, 480), (448, 448), (300, 700)]:
        batch = chat_batch(processor, [Image.new("RGB", (width, height), "white")])
        placeholders = int((batch["input_ids"] == model.config.image_token_id).sum())
        assert visual_tokens_per_image("qwen2-vl-7b", width, height) == placeholders
    assert visual_tokens_per_image("qwen2-vl-7b", 640, 480) == 391  # 476 x 644 pixels: 17 x 23 merged patches


def test_vlm_shape_takes_n_from_the_image_size_and_refuses_conflicting_flags(capsys):
    assert parse_args(["--model_shape", "qwen2-vl-7b"]).num_visual_tokens == [
        visual_tokens_per_image("qwen2-vl-7b", *DEFAULT_IMAGE_SIZE)]
    assert parse_args(["--model_shape", "qwen2-vl-7b", "--image_size", "448", "448"]).num_visual_tokens == [256]
    assert parse_args(["--model_shape", "qwen2-vl-7b", "-N", "100"]).num_visual_tokens == [100]
    assert "drop -N" in _refusal(capsys, ["--model_shape", "qwen2-vl-7b", "-N", "100", "--image_size", "64", "64"])
    assert "VLM shape" in _refusal(capsys, ["--model_shape", "llama-7b", "--image_size", "64", "64"])
    assert "positive width" in _refusal(capsys, ["--model_shape", "qwen2-vl-7b", "--image_size", "0", "64"])


@pytest.mark.parametrize("mode", ["--accuracy", "--long_context", "--decode_compare"])
def test_profile_is_refused_with_a_mode_that_would_not_profile(capsys, mode):
    assert f"{mode} is a mode of its own" in _refusal(capsys, ["--profile", mode])
