"""The authors' released checkpoint layout converts to an adapter whose logits match the formula."""

import pytest
import torch
from conftest import VISUAL_DIM, tiny_llama
from peft import PeftModel
from reference_memvp import reference_logits

import memvp_peft
from memvp_peft.convert import convert_authors_checkpoint, main


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
