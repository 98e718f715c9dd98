"""An interrupted or bad save never replaces a good adapter; bad adapter files fail loudly, naming the file.

`memvp_peft.save_adapter` (and a model made `atomic_saves`) stages the save; plain `PeftModel.save_pretrained` is
peft's own, but MemVP's tuner hooks still refuse partitioned tensors before it writes and strict shapes on load."""

import json
import multiprocessing
import os

import pytest
import torch
from conftest import memvp_config, randomize_memory, tiny_llama
from peft import PeftModel, get_peft_model

from memvp_peft import save_adapter
from memvp_peft.tuner.save_load import atomic_saves, check_adapter_folder


@pytest.fixture
def good(tmp_path, batch):
    pm = get_peft_model(tiny_llama(), memvp_config())
    randomize_memory(pm, seed=1)
    save_adapter(pm, tmp_path)
    with torch.no_grad():
        logits = pm.eval()(**batch).logits
    return tmp_path, logits


def _reload_logits(path, batch):
    with torch.no_grad():
        return PeftModel.from_pretrained(tiny_llama(), path).eval()(**batch).logits


def test_save_leaves_no_staging_folder(good):
    path, _ = good
    assert sorted(os.listdir(path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]


def test_crash_mid_save_keeps_previous_adapter(good, batch, monkeypatch):
    path, logits = good
    pm = get_peft_model(tiny_llama(), memvp_config())
    randomize_memory(pm, seed=2)
    import peft.peft_model

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"\x00partial")
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(peft.peft_model, "safe_save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(pm, path)
    monkeypatch.undo()
    assert not [n for n in os.listdir(path) if n.startswith(".memvp-saving-")]
    torch.testing.assert_close(_reload_logits(path, batch), logits, rtol=0, atol=0)


def test_overwriting_save_replaces_the_adapter(good, batch):
    path, old = good
    pm = get_peft_model(tiny_llama(), memvp_config())
    randomize_memory(pm, seed=3)
    save_adapter(pm, path)
    with torch.no_grad():
        expected = pm.eval()(**batch).logits
    new = _reload_logits(path, batch)
    torch.testing.assert_close(new, expected, rtol=0, atol=0)
    assert not torch.equal(new, old)


def test_partitioned_empty_tensors_are_refused_and_previous_adapter_kept(good, batch):
    path, logits = good
    pm = get_peft_model(tiny_llama(), memvp_config())
    memory = pm.base_model.memvp_memory["default"]
    memory.key_pos.data = torch.empty(0)  # what an unconsolidated ZeRO-3 rank holds
    with pytest.raises(ValueError, match="0 elements"):
        pm.save_pretrained(path)
    torch.testing.assert_close(_reload_logits(path, batch), logits, rtol=0, atol=0)


def test_saving_into_a_file_is_refused_and_the_file_kept(tmp_path):
    (tmp_path / "adapter").write_text("not a folder")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        save_adapter(get_peft_model(tiny_llama(), memvp_config()), tmp_path / "adapter")
    assert (tmp_path / "adapter").read_text() == "not a folder" and sorted(os.listdir(tmp_path)) == ["adapter"]


def _save_as_rank(rank, store, model, folder):
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        save_adapter(model, f"{folder}/rank{rank}")
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_only_rank_zero_of_the_process_group_writes(tmp_path):
    pm = get_peft_model(tiny_llama(), memvp_config())
    context = multiprocessing.get_context("fork")  # the model is built once, here, and inherited by both ranks
    ranks = [context.Process(target=_save_as_rank, args=(r, tmp_path / "store", pm, tmp_path)) for r in (0, 1)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(120)
    assert [p.exitcode for p in ranks] == [0, 0]
    check_adapter_folder(str(tmp_path / "rank0"))
    assert not (tmp_path / "rank1").exists()


def test_a_stray_rank_variable_without_a_process_group_still_saves(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")  # e.g. left over from a torchrun shell; no process group in this process
    save_adapter(get_peft_model(tiny_llama(), memvp_config()), tmp_path / "adapter")
    check_adapter_folder(str(tmp_path / "adapter"))


def test_is_main_process_false_skips_the_save(tmp_path):
    save_adapter(get_peft_model(tiny_llama(), memvp_config()), tmp_path / "adapter", is_main_process=False)
    assert not (tmp_path / "adapter").exists()


@pytest.mark.slow
def test_memvp_train_with_a_stray_rank_variable_saves_its_adapter(tmp_path, monkeypatch):
    from memvp_peft.cli.train import main as train_main

    monkeypatch.setenv("RANK", "1")
    out = tmp_path / "run"
    assert train_main(["--output_dir", str(out), "--max_steps", "2", "--max_eval_samples", "4",
                       "--num_memory_slots", "24", "--per_device_train_batch_size", "4"]) == 0
    check_adapter_folder(str(out))
    assert json.loads((out / "adapter_config.json").read_text())["num_memory_slots"] == 24
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_steps"] == 2 and metrics["reloaded_heldout_accuracy"] == metrics["heldout_accuracy"]


def test_truncated_adapter_file_is_named_in_the_error(good):
    path, _ = good
    weights = path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors is truncated"):
        check_adapter_folder(str(path))


def test_truncated_adapter_file_fails_to_load(good):
    path, _ = good
    weights = path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(Exception, match="(?i)header|deserializ"):
        PeftModel.from_pretrained(tiny_llama(), path)


def test_missing_weights_file_is_reported(good):
    path, _ = good
    (path / "adapter_model.safetensors").unlink()
    with pytest.raises(ValueError, match="has no adapter_model.safetensors"):
        check_adapter_folder(str(path))


def test_atomic_saves_stages_the_save_of_that_instance_only(good, batch, monkeypatch):
    path, logits = good
    pm = atomic_saves(get_peft_model(tiny_llama(), memvp_config()))
    other = get_peft_model(tiny_llama(), memvp_config())
    assert "save_pretrained" in vars(pm) and "save_pretrained" not in vars(other)
    import peft.peft_model

    def crash(tensors, filename, metadata=None):
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(peft.peft_model, "safe_save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        pm.save_pretrained(path)
    monkeypatch.undo()
    assert not [n for n in os.listdir(path) if n.startswith(".memvp-saving-")]
    torch.testing.assert_close(_reload_logits(path, batch), logits, rtol=0, atol=0)


def test_adapter_for_another_base_is_rejected_with_shapes(good):
    path, _ = good
    with pytest.raises(ValueError, match=r"shape \(8, 32\).*expects \(8, 48\)"):
        PeftModel.from_pretrained(tiny_llama(hidden_size=48), path)


def test_checkpoint_missing_a_tensor_is_rejected(good):
    from safetensors.torch import load_file, save_file

    path, _ = good
    weights = path / "adapter_model.safetensors"
    state = load_file(weights)
    state.pop(next(k for k in state if k.endswith("value_pos")))
    save_file(state, weights)
    with pytest.raises(ValueError, match="lacks 1 tensor"):
        PeftModel.from_pretrained(tiny_llama(), path)


def test_crash_mid_cli_record_write_keeps_the_previous_record(tmp_path):
    from memvp_peft.cli.model_loading import read_run_manifest, write_run_manifest

    write_run_manifest(str(tmp_path), {"featurizer": "digit_patches", "kind": "causal"})
    with pytest.raises(TypeError):  # json.dump fails half-way through: an object it cannot serialise
        write_run_manifest(str(tmp_path), {"kind": "causal", "vision_model_name_or_path": object()})
    assert read_run_manifest(str(tmp_path)) == {"featurizer": "digit_patches", "kind": "causal"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memvp_cli.json"]  # no partial file left behind


# ------------------------------------------------------------------------- adapter_model.bin (safe_serialization=False)


@pytest.mark.parametrize("how", ["save_adapter", "plain_save_pretrained"])
def test_bin_adapter_passes_the_folder_check_and_reloads(tmp_path, batch, how):
    pm = get_peft_model(tiny_llama(), memvp_config())
    randomize_memory(pm, seed=4)
    if how == "save_adapter":
        save_adapter(pm, tmp_path, safe_serialization=False)
    else:
        pm.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").exists() and not (tmp_path / "adapter_model.safetensors").exists()
    check_adapter_folder(str(tmp_path))
    with torch.no_grad():
        expected = pm.eval()(**batch).logits
    torch.testing.assert_close(_reload_logits(tmp_path, batch), expected, rtol=0, atol=0)


def test_truncated_bin_adapter_is_named_in_the_error(tmp_path):
    save_adapter(get_peft_model(tiny_llama(), memvp_config()), tmp_path, safe_serialization=False)
    weights = tmp_path / "adapter_model.bin"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"adapter_model\.bin is truncated or not"):
        check_adapter_folder(str(tmp_path))


class _NotATensor:
    pass


def test_bin_adapter_holding_arbitrary_objects_is_refused_without_unpickling_them(tmp_path):
    save_adapter(get_peft_model(tiny_llama(), memvp_config()), tmp_path, safe_serialization=False)
    torch.save({"base_model.memvp_memory.key_pos": _NotATensor()}, tmp_path / "adapter_model.bin")
    with pytest.raises(ValueError, match=r"adapter_model\.bin .*weights_only"):
        check_adapter_folder(str(tmp_path))


def test_saving_safetensors_over_a_bin_adapter_leaves_one_weights_file(tmp_path, batch):
    save_adapter(get_peft_model(tiny_llama(), memvp_config()), tmp_path, safe_serialization=False)
    pm = get_peft_model(tiny_llama(), memvp_config())
    randomize_memory(pm, seed=5)
    save_adapter(pm, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    with torch.no_grad():
        expected = pm.eval()(**batch).logits
    torch.testing.assert_close(_reload_logits(tmp_path, batch), expected, rtol=0, atol=0)


def test_memvp_infer_answers_with_a_bin_adapter(tmp_path, capsys):
    from memvp_peft import MemVPConfig
    from memvp_peft.cli.infer import main as infer_main
    from memvp_peft.cli.model_loading import write_run_manifest
    from memvp_peft.tasks.digits import DIGIT_PATCH_DIM
    from memvp_peft.demo_models import build_word_tokenizer
    from memvp_peft.demo_models import tiny_llama as word_llama

    tokenizer = build_word_tokenizer(["Question: What digit is shown ?\nAnswer:"], [str(d) for d in range(10)])
    base = word_llama(tokenizer, hidden_size=32)
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    base.name_or_path = str(tmp_path / "base")
    pm = get_peft_model(base, MemVPConfig(visual_dim=DIGIT_PATCH_DIM, num_memory_slots=24))
    save_adapter(pm, tmp_path / "adapter", safe_serialization=False)
    write_run_manifest(str(tmp_path / "adapter"), {"featurizer": "digit_patches", "kind": "causal"})
    capsys.readouterr()
    assert infer_main(["--adapter", str(tmp_path / "adapter"), "--image", "digits:0", "--max_new_tokens", "1"]) == 0
    assert "digits:0" in capsys.readouterr().out


def test_fsdp2_sharded_tensors_are_refused_with_the_way_out(tmp_path):
    """A plain save of an FSDP2-sharded model hands peft DTensors; MemVP names them instead of failing in safetensors."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        import sys, torch, torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor
        from memvp_peft.tuner.save_load import refuse_partitioned_tensors
        port = int(sys.argv[1])
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        mesh = init_device_mesh("cpu", (1,))
        sharded = {"memvp_memory.key_pos": distribute_tensor(torch.ones(4, 2), mesh, [Shard(0)])}
        try:
            refuse_partitioned_tensors(sharded)
        except ValueError as error:
            print(error)
        refuse_partitioned_tensors({"memvp_memory.key_pos": sharded["memvp_memory.key_pos"].full_tensor()})
        dist.destroy_process_group()
        """
    )
    from process_launch import free_port

    done = subprocess.run([sys.executable, "-c", code, str(free_port())], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "FSDP2-sharded DTensors" in done.stdout and "full_tensor()" in done.stdout
