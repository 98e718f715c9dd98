"""The authors' released checkpoint layout converts to an adapter whose logits match the formula."""

import pytest
import torch
from conftest import VISUAL_DIM, tiny_llama
from peft import PeftModel
from reference_memvp import reference_logits

import memvp_peft
from memvp_peft.cli.convert import convert_authors_checkpoint, main


def synthetic_checkpoint(path, n=8, d=32, h=8, dv=VISUAL_DIM, blocks=2, adapter_dim=3, half=True):
    torch.manual_seed(0)
    dtype = torch.float16 if half else torch.float32
    model = {
        "adapter_proj.fc1.weight": torch.randn(h, dv),
        "adapter_proj.fc1.bias": torch.randn(h),
        "adapter_proj.fc2.weight": torch.randn(d, h),
        "adapter_proj.fc2.bias": torch.randn(d),
        "adapter_emb1": torch.randn(1, n, d) * 0.5,
        "adapter_emb2": torch.randn(1, n, d) * 0.5,
        "layers.0.attention.wq.weight": torch.randn(4, 4),  # frozen LLaMA weights are ignored
    }
    for i in range(blocks):
        model[f"backbone.visual.transformer.resblocks.{i}.adapter_mlp.fc1.weight"] = torch.randn(adapter_dim, dv)
        model[f"backbone.visual.transformer.resblocks.{i}.adapter_mlp.fc2.weight"] = torch.randn(dv, adapter_dim)
    model = {k: v.to(dtype) for k, v in model.items()}
    torch.save({"model": model, "optimizer": {}, "epoch": 19}, path)
    return model


def test_converted_checkpoint_reproduces_the_formula(tmp_path):
    raw = synthetic_checkpoint(tmp_path / "memvp.pth", blocks=0)
    config = convert_authors_checkpoint(str(tmp_path / "memvp.pth"), str(tmp_path / "adapter"))
    assert (config.visual_dim, config.num_memory_slots, config.projector_hidden_dim) == (VISUAL_DIM, 8, 8)
    model = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter").eval()
    torch.manual_seed(1)
    ids = torch.randint(3, 64, (2, 5))
    feats = torch.randn(2, 6, VISUAL_DIM)
    state = {
        "projector.0.weight": raw["adapter_proj.fc1.weight"].float(),
        "projector.0.bias": raw["adapter_proj.fc1.bias"].float(),
        "projector.2.weight": raw["adapter_proj.fc2.weight"].float(),
        "projector.2.bias": raw["adapter_proj.fc2.bias"].float(),
        "key_pos": raw["adapter_emb1"][0].float(),
        "value_pos": raw["adapter_emb2"][0].float(),
    }
    want = reference_logits(tiny_llama(), state, config, ids, torch.ones_like(ids), image_features=feats)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=torch.ones_like(ids), image_features=feats).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_clip_block_adapters_are_converted(tmp_path):
    raw = synthetic_checkpoint(tmp_path / "memvp.pth", blocks=2, adapter_dim=3)
    config = convert_authors_checkpoint(str(tmp_path / "memvp.pth"), str(tmp_path / "adapter"))
    assert config.vision_adapter_dim == 3 and config.vision_num_layers == 2
    model = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter")
    adapters = model.base_model.memvp_memory["default"].vision_adapters
    key = "backbone.visual.transformer.resblocks.1.adapter_mlp.fc2.weight"
    torch.testing.assert_close(adapters[1].fc2.weight.detach(), raw[key].float())


def test_cli_converts(tmp_path, capsys):
    synthetic_checkpoint(tmp_path / "memvp.pth", blocks=0)
    main([str(tmp_path / "memvp.pth"), str(tmp_path / "out"), "--base_model_name_or_path", "llama-7b"])
    assert "slots=8" in capsys.readouterr().out
    assert memvp_peft.MemVPConfig.from_pretrained(tmp_path / "out").base_model_name_or_path == "llama-7b"


def test_not_a_memvp_checkpoint_is_rejected(tmp_path):
    torch.save({"model": {"layers.0.weight": torch.zeros(2)}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a MemVP checkpoint"):
        convert_authors_checkpoint(str(tmp_path / "other.pth"), str(tmp_path / "out"))
    with pytest.raises(ValueError, match="does not exist"):
        convert_authors_checkpoint(str(tmp_path / "missing.pth"), str(tmp_path / "out"))


def _convert_error(tmp_path, capsys, checkpoint) -> str:
    """`python -m memvp_peft.convert` on `checkpoint`: exit 2, one error line, no traceback, nothing written."""
    assert main([str(checkpoint), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("python -m memvp_peft.convert: error: ") and "\n" not in err, err
    assert not (tmp_path / "out").exists()
    return err


def test_zero_byte_checkpoint_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "empty.pth").write_bytes(b"")
    assert "empty.pth" in _convert_error(tmp_path, capsys, tmp_path / "empty.pth")


def test_garbage_checkpoint_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "garbage.pth").write_bytes(b"this is not a checkpoint" * 100)
    assert "not a PyTorch checkpoint" in _convert_error(tmp_path, capsys, tmp_path / "garbage.pth")


def test_checkpoint_that_is_not_a_dict_is_one_line_exit_2(tmp_path, capsys):
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    assert "expected a dict" in _convert_error(tmp_path, capsys, tmp_path / "list.pth")


def test_non_memvp_checkpoint_is_one_line_exit_2(tmp_path, capsys):
    torch.save({"model": {"layers.0.weight": torch.zeros(2)}}, tmp_path / "other.pth")
    assert "not a MemVP checkpoint" in _convert_error(tmp_path, capsys, tmp_path / "other.pth")


def test_missing_checkpoint_is_one_line_exit_2(tmp_path, capsys):
    assert "does not exist" in _convert_error(tmp_path, capsys, tmp_path / "missing.pth")


def _edited_checkpoint(path, key, change):
    model = synthetic_checkpoint(path, blocks=1)
    model[key] = change(model[key])
    torch.save({"model": model}, path)


@pytest.mark.parametrize("key", ["adapter_emb1", "adapter_proj.fc2.bias",
                                 "backbone.visual.transformer.resblocks.0.adapter_mlp.fc1.weight"])
def test_non_finite_tensor_is_refused_naming_it(tmp_path, capsys, key):
    def poison(tensor):
        tensor = tensor.clone()
        tensor.view(-1)[0] = float("nan")
        return tensor

    _edited_checkpoint(tmp_path / "nan.pth", key, poison)
    error = _convert_error(tmp_path, capsys, tmp_path / "nan.pth")
    assert key in error and "NaN or inf" in error


@pytest.mark.parametrize("key", ["adapter_emb2", "adapter_proj.fc1.weight"])
def test_integer_tensor_is_refused_naming_it(tmp_path, capsys, key):
    _edited_checkpoint(tmp_path / "int.pth", key, lambda tensor: tensor.round().to(torch.int64))
    error = _convert_error(tmp_path, capsys, tmp_path / "int.pth")
    assert key in error and "torch.int64" in error and "floating-point" in error


def test_checkpoint_with_the_authors_args_namespace_converts(tmp_path):
    """The authors' `save_model` stores `'args': argparse.Namespace(...)`, which weights_only loading refuses unless
    allowed; the converter allows that one class (and still no code runs)."""
    import argparse

    model = synthetic_checkpoint(tmp_path / "memvp.pth", blocks=0)
    torch.save({"model": model, "epoch": 19, "args": argparse.Namespace(lr=9e-3, adapter_dim=12, llm_model="7B")},
               tmp_path / "memvp.pth")
    assert convert_authors_checkpoint(str(tmp_path / "memvp.pth"), str(tmp_path / "out")).num_memory_slots == 8


def test_output_dir_that_is_a_file_is_refused_and_kept(tmp_path, capsys):
    synthetic_checkpoint(tmp_path / "memvp.pth", blocks=0)
    (tmp_path / "out").write_text("my notes")
    assert main([str(tmp_path / "memvp.pth"), str(tmp_path / "out")]) == 2
    assert "is a file" in capsys.readouterr().err
    assert (tmp_path / "out").read_text() == "my notes"


# ---------------------------------------------------------------------------------------------------------- ADEM-VL

LLAMA_VOCAB = 32000  # the prefix ids the converter records are the LLaMA tokenizer's
ADEM_SLOTS = (16, 4)  # a tiny CLIP's 4x4 patch grid plus its 2x2 pool (their [256, 64] on CLIP-L)


def adem_args(**overrides):
    """The `args` ADEM-VL's train.py saves in every checkpoint (their README's ScienceQA command; slots scaled)."""
    import argparse

    values = dict(down_sample_num=list(ADEM_SLOTS), alpha=0.1, beta=0.01, drop_ratio=0.1, no_cls=False,
                  adapter_dim=12, hidden_proj=8, max_seq_len=512, llm_model="7B", clip="ViT-L/14", dataset="sqa")
    values.update(overrides)
    return argparse.Namespace(**values)


def adem_checkpoint(path, d=32, dv=VISUAL_DIM, h=8, blocks=2, adapter_dim=12, with_cls=True, args=True, **arg_values):
    """A checkpoint laid out as ADEM-VL's `save_model` writes it (DDP's `module.` prefix, fp16), random values."""
    torch.manual_seed(3)
    slots = sum(ADEM_SLOTS)
    model = {
        "adapter_proj.fc1.weight": torch.randn(h, dv) * 0.5, "adapter_proj.fc1.bias": torch.randn(h) * 0.1,
        "adapter_proj.fc2.weight": torch.randn(d, h) * 0.5, "adapter_proj.fc2.bias": torch.randn(d) * 0.1,
        "adapter_emb1": torch.randn(1, slots, d) * 0.5, "adapter_emb2": torch.randn(1, slots, d) * 0.5,
    }
    if with_cls:
        model.update({"adapter_proj_cls.fc1.weight": torch.randn(h, dv) * 0.5,
                      "adapter_proj_cls.fc1.bias": torch.randn(h) * 0.1,
                      "adapter_proj_cls.fc2.weight": torch.randn(d, h) * 0.5,
                      "adapter_proj_cls.fc2.bias": torch.randn(d) * 0.1})
    for i in range(blocks):  # their set_Clip_Adapter puts one in every block (the last one never runs)
        model[f"backbone.visual.transformer.resblocks.{i}.adapter_mlp.fc1.weight"] = torch.randn(adapter_dim, dv) * 0.3
        model[f"backbone.visual.transformer.resblocks.{i}.adapter_mlp.fc2.weight"] = torch.randn(dv, adapter_dim) * 0.3
    model = {f"module.{k}": v.half() for k, v in model.items()}
    checkpoint = {"model": model, "optimizer": {}, "epoch": 19, "scaler": None}
    if args:
        checkpoint["args"] = adem_args(adapter_dim=adapter_dim, hidden_proj=h, no_cls=not with_cls, **arg_values)
    torch.save(checkpoint, path)
    return {"model": {k: v.float() for k, v in model.items()}, "args": checkpoint.get("args")}


def adem_inputs():
    """Three rows as their dataset pads them (BOS first, 0 after the text): two with an image, one without."""
    generator = torch.Generator().manual_seed(11)
    lengths = [9, 7, 5]
    ids = torch.zeros(3, 9, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, 0] = 1
        ids[row, 1:length] = torch.randint(3, 64, (length - 1,), generator=generator)
    indicators = [1, 0, 1]
    images = torch.randn(3, 3, 32, 32, generator=generator) * torch.tensor(indicators).view(-1, 1, 1, 1)
    return ids, lengths, indicators, images


def test_adem_vl_checkpoint_converts_to_their_model_with_no_options(tmp_path):
    """Their default model (CLS token, multiscale slots, drop, CLIP adapters), converted by the command line without
    options, gives the logits and the loss of their forward (tests/reference_adem.py: written from their code)."""
    from reference_adem import their_forward, their_loss

    from memvp_peft import attach_vision_encoder
    from memvp_peft.demo_models import tiny_clip

    checkpoint = adem_checkpoint(tmp_path / "adem.pth")
    assert main([str(tmp_path / "adem.pth"), str(tmp_path / "out")]) == 0
    config = memvp_peft.MemVPConfig.from_pretrained(tmp_path / "out")
    assert (config.memory_read, config.multiscale_tokens, config.drop_ratio, config.memory_dropout) == (
        "adem", list(ADEM_SLOTS), 0.1, 0.0)
    assert (config.memory_scale, config.visual_scale, config.cls_token, config.vision_adapter_dim) == (0.1, 0.01, True, 12)

    base, clip = tiny_llama(vocab_size=LLAMA_VOCAB), tiny_clip(hidden_size=VISUAL_DIM)
    model = PeftModel.from_pretrained(tiny_llama(vocab_size=LLAMA_VOCAB), tmp_path / "out").eval()
    attach_vision_encoder(model, clip)
    ids, lengths, indicators, images = adem_inputs()
    mask = (torch.arange(ids.shape[1])[None] < torch.tensor(lengths)[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels, pixel_values=images,
                    image_mask=torch.tensor(indicators, dtype=torch.bool))

    prefix_img, prefix_nonimg = torch.tensor([7084, 29901, 29871]), torch.tensor([7084, 29901, 405, 29914, 29909])
    padded = torch.nn.functional.pad(ids, (0, 8))  # their rows: padded with 0 to a fixed length
    want, their_labels = their_forward(base, clip, checkpoint, padded, padded.clone(), images, indicators,
                                       prefix_img, prefix_nonimg)
    width = out.logits.shape[1] - ids.shape[1]
    for row, length in enumerate(lengths):
        grown = length + (len(prefix_img) + 1 if indicators[row] else len(prefix_nonimg))
        extra = width - (grown - length)  # the shorter insertion is padded on the left
        torch.testing.assert_close(out.logits[row, extra:extra + grown], want[row, :grown], rtol=0, atol=1e-4)
    torch.testing.assert_close(out.loss, their_loss(want, their_labels), rtol=0, atol=1e-4)


@pytest.mark.parametrize("no_cls", [False, True])
def test_adem_vl_settings_come_from_the_saved_args(tmp_path, no_cls):
    adem_checkpoint(tmp_path / "adem.pth", with_cls=not no_cls, alpha=0.2, beta=0.05, drop_ratio=0.25)
    config = convert_authors_checkpoint(str(tmp_path / "adem.pth"), str(tmp_path / "out"))
    assert (config.memory_scale, config.visual_scale, config.drop_ratio, config.cls_token) == (0.2, 0.05, 0.25, not no_cls)
    assert (config.cls_token_prefix_ids is None) == no_cls


def test_adem_vl_checkpoint_without_its_args_is_refused(tmp_path, capsys):
    adem_checkpoint(tmp_path / "adem.pth", args=False)
    error = _convert_error(tmp_path, capsys, tmp_path / "adem.pth")
    assert "ADEM-VL" in error and "drop_ratio" in error


def test_adem_vl_flags_that_contradict_the_tensors_are_refused(tmp_path, capsys):
    adem_checkpoint(tmp_path / "adem.pth", with_cls=True)
    checkpoint = torch.load(tmp_path / "adem.pth", weights_only=False)
    checkpoint["args"].no_cls = True
    torch.save(checkpoint, tmp_path / "adem.pth")
    assert "adapter_proj_cls" in _convert_error(tmp_path, capsys, tmp_path / "adem.pth")


def test_trained_tensor_without_a_place_is_refused_not_dropped(tmp_path, capsys):
    model = synthetic_checkpoint(tmp_path / "memvp.pth", blocks=0)
    model["adapter_gate"] = torch.zeros(3)
    torch.save({"model": model}, tmp_path / "memvp.pth")
    assert "adapter_gate" in _convert_error(tmp_path, capsys, tmp_path / "memvp.pth")


@pytest.mark.parametrize("key, shape", [
    ("adapter_proj.fc1.bias", (5,)),  # the projector's hidden width is 8
    ("backbone.visual.transformer.resblocks.1.adapter_mlp.fc1.weight", (4, VISUAL_DIM)),  # block 0's width is 3
    ("backbone.visual.transformer.resblocks.1.adapter_mlp.fc2.weight", (VISUAL_DIM, 4)),
])
def test_tensor_that_would_not_load_is_refused_before_writing(tmp_path, capsys, key, shape):
    model = synthetic_checkpoint(tmp_path / "bad.pth", blocks=2, adapter_dim=3)
    model[key] = torch.zeros(shape)
    torch.save({"model": model}, tmp_path / "bad.pth")
    error = _convert_error(tmp_path, capsys, tmp_path / "bad.pth")
    assert key in error and "would not load" in error


@pytest.mark.parametrize("held", ["adapter_config.json", "memvp_cli.json", "checkpoint-100"])
def test_folder_holding_a_run_is_refused_and_kept(tmp_path, capsys, held):
    synthetic_checkpoint(tmp_path / "memvp.pth", blocks=0)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / held).write_text("a previous run")
    assert main([str(tmp_path / "memvp.pth"), str(tmp_path / "out")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [held]
    assert (tmp_path / "out" / held).read_text() == "a previous run"


def test_empty_folder_is_converted_into(tmp_path):
    synthetic_checkpoint(tmp_path / "memvp.pth", blocks=0)
    (tmp_path / "out").mkdir()
    convert_authors_checkpoint(str(tmp_path / "memvp.pth"), str(tmp_path / "out"))
    assert PeftModel.from_pretrained(tiny_llama(), tmp_path / "out") is not None
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".memvp-converting-")]
