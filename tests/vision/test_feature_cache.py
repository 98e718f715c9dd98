"""The feature cache of a frozen encoder (`memvp_peft.vision.feature_cache`, `memvp-train --cache_image_features`).

Real pieces throughout: scikit-learn digits through the run's collator, a tiny CLIP built from a config, a MemVP
adapter on a tiny Llama; the encoder's work is counted by a forward hook on the CLIP model itself.
"""

import json
import os

import pytest
import torch
from peft import get_peft_model

from memvp_peft import MemVPConfig
from memvp_peft.cli.options import TrainOptions, parse_options
from memvp_peft.cli.train import main as train_main
from memvp_peft.data import MemVPDataCollator
from memvp_peft.demo_models import build_word_tokenizer, clip_image_processor, tiny_clip, tiny_llama
from memvp_peft.vision import VisionEncoder, imagenet_image_processor
from memvp_peft.vision.feature_cache import CachedFeatureCollator, FeatureCache, encoder_settings, tensor_digest

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _records(count=12):
    from sklearn.datasets import load_digits

    digits = load_digits()
    return [{"image": digits.images[i], "question": "What digit is shown ?", "answer": NAMES[digits.target[i]]}
            for i in range(count)]  # fmt: skip


def _collator(tokenizer, processor=None):
    return MemVPDataCollator(tokenizer, processor or clip_image_processor(32), max_length=32,
                             array_value_range=(0, 16))


def _model(encoder):
    tokenizer = build_word_tokenizer(["Question: What digit is shown ?\nAnswer:"], NAMES)
    config = MemVPConfig(visual_dim=32, num_memory_slots=20, projector_hidden_dim=16, memory_scale=1.0,
                         memory_dropout=0.0, vision_encoder=encoder)
    model = get_peft_model(tiny_llama(tokenizer, hidden_size=64), config).eval()
    with torch.no_grad():  # p_v starts at zero: without this the memory would not reach the loss at all
        for name, param in model.named_parameters():
            if "memvp" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(1)) * 0.5)
    return model, tokenizer


def _cache(folder, vision, **overrides):
    settings = encoder_settings(vision, image_processor=clip_image_processor(32), image_normalization="encoder")
    settings.update(overrides)
    return FeatureCache(str(folder), vision, settings)


class EncodedImages:
    """Counts the images the CLIP model encodes, with a real forward hook on it."""

    def __init__(self, encoder):
        self.count = 0
        self.handle = encoder.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output):
        self.count += kwargs["pixel_values"].shape[0]


@pytest.fixture
def encoder():
    return tiny_clip(hidden_size=32)


def test_cached_batches_give_the_uncached_loss(tmp_path, encoder):
    model, tokenizer = _model(encoder)
    collator = _collator(tokenizer)
    cached = CachedFeatureCollator(collator, _cache(tmp_path, model.base_model.vision_encoder),
                                   model.peft_config["default"])
    records = _records(8)
    with torch.no_grad():
        plain = model(**collator(records)).loss
        first = model(**cached(records)).loss  # encodes and stores
        again = model(**cached(records)).loss  # read back from the shard
    torch.testing.assert_close(first, plain)
    torch.testing.assert_close(again, plain)


def test_cached_batch_carries_image_features_instead_of_pixels(tmp_path, encoder):
    model, tokenizer = _model(encoder)
    cached = CachedFeatureCollator(_collator(tokenizer), _cache(tmp_path, model.base_model.vision_encoder),
                                   model.peft_config["default"])
    batch = cached(_records(4))
    assert "pixel_values" not in batch and batch["image_features"].shape == (4, 16, 32)


def test_second_epoch_reads_from_the_cache(tmp_path, encoder):
    vision = VisionEncoder(encoder)
    counter = EncodedImages(encoder)
    pixels = _collator(build_word_tokenizer(["a"], NAMES))(_records(6))["pixel_values"]
    cache = _cache(tmp_path, vision)
    first = cache.features(pixels)
    assert counter.count == 6
    second = cache.features(pixels)
    assert counter.count == 6 and cache.reused == 6
    later_run = _cache(tmp_path, vision)  # a later run on the same folder
    reopened = later_run.features(pixels)
    assert counter.count == 7 and later_run.reused == 5  # one image encoded to learn the encoder's output shape
    assert torch.equal(second, first) and torch.equal(reopened, first)


def test_an_image_repeated_in_a_batch_is_encoded_once(tmp_path, encoder):
    vision = VisionEncoder(encoder)
    counter = EncodedImages(encoder)
    pixels = _collator(build_word_tokenizer(["a"], NAMES))(_records(1) * 3)["pixel_values"]
    features = _cache(tmp_path, vision).features(pixels)
    assert counter.count == 1 and torch.equal(features[0], features[2])


@pytest.mark.parametrize("change", ["weights", "feature_layer", "normalization"])
def test_a_different_encoder_or_normalization_misses_the_cache(tmp_path, encoder, change):
    pixels = _collator(build_word_tokenizer(["a"], NAMES))(_records(3))["pixel_values"]
    first = _cache(tmp_path, VisionEncoder(encoder))
    first.features(pixels)
    other_encoder = tiny_clip(hidden_size=32, seed=1) if change == "weights" else encoder
    vision = VisionEncoder(other_encoder, feature_layer=-1 if change == "feature_layer" else -2)
    overrides = {"image_normalization": "imagenet"} if change == "normalization" else {}
    second = _cache(tmp_path, vision, **overrides)
    counter = EncodedImages(other_encoder)
    second.features(pixels)
    assert second.folder != first.folder and len(second) == 3 and counter.count == 3


def test_other_processor_settings_give_other_image_keys(tmp_path, encoder):
    tokenizer = build_word_tokenizer(["a"], NAMES)
    imagenet = _collator(tokenizer, imagenet_image_processor(32))
    cache = _cache(tmp_path, VisionEncoder(encoder))
    cache.features(_collator(tokenizer)(_records(2))["pixel_values"])
    cache.features(imagenet(_records(2))["pixel_values"])
    assert cache.encoded == 4


def _one_written_shard(tmp_path, encoder):
    """A cache that has encoded 4 images into one shard: (vision, pixels, the features it gave, the shard's path)."""
    vision = VisionEncoder(encoder)
    pixels = _collator(build_word_tokenizer(["a"], NAMES))(_records(4))["pixel_values"]
    cache = _cache(tmp_path, vision)
    expected = cache.features(pixels)
    [name] = [n for n in os.listdir(cache.folder) if n.endswith(".safetensors")]
    return vision, pixels, expected, os.path.join(cache.folder, name)


def test_a_truncated_shard_is_detected_and_recomputed(tmp_path, encoder):
    vision, pixels, expected, path = _one_written_shard(tmp_path, encoder)
    with open(path, "r+b") as handle:
        handle.truncate(os.path.getsize(path) // 2)  # a run killed while copying the folder
    with pytest.warns(UserWarning, match="cannot be read"):
        reopened = _cache(tmp_path, vision)
    counter = EncodedImages(encoder)
    torch.testing.assert_close(reopened.features(pixels), expected)
    assert counter.count == 4 and not os.path.exists(path)


def test_a_shard_with_altered_bytes_is_detected_and_recomputed(tmp_path, encoder):
    vision, pixels, expected, path = _one_written_shard(tmp_path, encoder)
    with open(path, "r+b") as handle:  # the last bytes are feature values: the header still parses
        handle.seek(-8, os.SEEK_END)
        handle.write(b"\x7f" * 8)
    reopened = _cache(tmp_path, vision)
    counter = EncodedImages(encoder)
    with pytest.warns(UserWarning, match="differ from their recorded sha256"):
        features = reopened.features(pixels)
    torch.testing.assert_close(features, expected)
    assert counter.count == 4


def _rewrite_shard(path, change):
    """Rewrite a shard through safetensors itself: `change(tensors, metadata)` edits both dicts in place."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(path, framework="pt") as shard:
        tensors = {key: shard.get_tensor(key) for key in shard.keys()}
        metadata = dict(shard.metadata())
    change(tensors, metadata)
    save_file(tensors, path, metadata=metadata)


def test_features_rewritten_with_a_digest_of_their_own_are_not_served(tmp_path, encoder):
    vision, pixels, expected, path = _one_written_shard(tmp_path, encoder)

    def zero_the_first(tensors, metadata):  # as a tool that knows safetensors and sha256, but not the cache, would
        key = sorted(tensors)[0]
        tensors[key] = torch.zeros_like(tensors[key])
        metadata[key] = tensor_digest(tensors[key])

    _rewrite_shard(path, zero_the_first)
    with pytest.warns(UserWarning, match="differ from their recorded sha256"):
        features = _cache(tmp_path, vision).features(pixels)
    torch.testing.assert_close(features, expected)


def test_two_images_features_swapped_under_each_others_keys_are_not_served(tmp_path, encoder):
    vision, pixels, expected, path = _one_written_shard(tmp_path, encoder)

    def swap(tensors, metadata):  # each tensor moves with its own digest
        a, b = sorted(tensors)[:2]
        tensors[a], tensors[b] = tensors[b], tensors[a]
        metadata[a], metadata[b] = metadata[b], metadata[a]

    _rewrite_shard(path, swap)
    with pytest.warns(UserWarning, match="differ from their recorded sha256"):
        features = _cache(tmp_path, vision).features(pixels)
    torch.testing.assert_close(features, expected)


def test_features_of_another_token_count_are_not_served_even_with_valid_digests(tmp_path, encoder):
    from safetensors import safe_open

    vision, pixels, expected, path = _one_written_shard(tmp_path, encoder)
    with safe_open(path, framework="pt") as shard:
        keys = list(shard.keys())
    writer = _cache(tmp_path, vision)  # the cache's own writer: the digests are right, the tensors are not
    writer._store({key: torch.zeros(expected.shape[1] - 1, expected.shape[2]) for key in keys})
    os.remove(path)
    with pytest.warns(UserWarning, match=r"holds features of shape \(15, 32\) .* where this encoder gives \(16, 32\)"):
        features = _cache(tmp_path, vision).features(pixels)
    torch.testing.assert_close(features, expected)


@pytest.mark.parametrize("kind", ["symlink", "folder"])
def test_a_symlink_or_folder_named_like_a_shard_is_refused(tmp_path, encoder, kind):
    vision, _, _, path = _one_written_shard(tmp_path, encoder)
    outside = tmp_path / "elsewhere.safetensors"
    os.replace(path, outside)
    if kind == "symlink":  # features from outside the cache's folder
        os.symlink(outside, path)
    else:
        os.mkdir(path)
    with pytest.raises(ValueError, match="is a symlink" if kind == "symlink" else "is not a regular file"):
        _cache(tmp_path, vision)


def _bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def test_cached_features_under_bf16_autocast_give_the_uncached_loss(tmp_path, encoder):
    model, tokenizer = _model(encoder)
    collator = _collator(tokenizer)
    cached = CachedFeatureCollator(collator, _cache(tmp_path, model.base_model.vision_encoder),
                                   model.peft_config["default"], precision=_bf16)  # what the model's forward runs in
    records = _records(8)
    with torch.no_grad(), _bf16():
        plain = model(**collator(records)).loss
    with torch.no_grad(), _bf16():
        first = model(**cached(records)).loss
        again = model(**cached(records)).loss
    torch.testing.assert_close(first, plain, rtol=0, atol=0)
    torch.testing.assert_close(again, plain, rtol=0, atol=0)


def test_features_cached_without_autocast_are_not_served_under_bf16(tmp_path, encoder):
    vision = VisionEncoder(encoder)
    pixels = _collator(build_word_tokenizer(["a"], NAMES))(_records(3))["pixel_values"]
    cache = _cache(tmp_path, vision)
    full_precision = cache.features(pixels)
    counter = EncodedImages(encoder)
    under_bf16 = cache.features(pixels, precision=_bf16)
    assert counter.count == 3 and not torch.equal(under_bf16.float(), full_precision)


def _train(tmp_path, *extra):
    clip = tmp_path / "clip"
    if not clip.exists():
        tiny_clip(hidden_size=32).save_pretrained(clip)
    out = tmp_path / ("out" + "".join(e.strip("-")[:1] for e in extra))
    code = train_main(["--vision_model_name_or_path", str(clip), "--output_dir", str(out), "--max_steps", "8",
                       "--per_device_train_batch_size", "8", "--max_eval_samples", "4", "--logging_steps", "2",
                       *extra])
    return code, out


@pytest.mark.parametrize("precision", [(), ("--bf16",)], ids=["fp32", "bf16"])
def test_memvp_train_with_the_cache_logs_the_uncached_losses(tmp_path, precision):
    code, plain = _train(tmp_path, *precision)
    assert code == 0
    code, cached = _train(tmp_path, *precision, "--cache_image_features", str(tmp_path / "cache"))
    assert code == 0
    plain_metrics = json.loads((plain / "metrics.json").read_text())
    cached_metrics = json.loads((cached / "metrics.json").read_text())
    assert cached_metrics["loss_history"]["steps"] == plain_metrics["loss_history"]["steps"]
    assert cached_metrics["loss_history"]["loss"] == pytest.approx(plain_metrics["loss_history"]["loss"], rel=1e-5)
    assert cached_metrics["feature_cache"]["encoded"] > 0 and "feature_cache" not in plain_metrics


def test_memvp_train_refuses_the_cache_with_vision_adapters(tmp_path, capsys):
    code, out = _train(tmp_path, "--vision_adapter_dim", "4", "--cache_image_features", str(tmp_path / "cache"))
    assert code == 2 and "--vision_adapter_dim 4 trains adapters inside the encoder" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_memvp_train_refuses_the_cache_without_an_encoder(tmp_path, capsys):
    code = train_main(["--output_dir", str(tmp_path / "out"), "--cache_image_features", str(tmp_path / "cache")])
    assert code == 2 and "this run has none" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_flag_alone_means_the_user_cache_and_a_value_is_the_folder():
    assert parse_options(TrainOptions, ["--cache_image_features"], "").cache_image_features == "auto"
    assert parse_options(TrainOptions, ["--cache_image_features", "d"], "").cache_image_features == "d"
    assert parse_options(TrainOptions, [], "").cache_image_features is None
