"""MemVP under DeepSpeed ZeRO with the HF Trainer: real 2-process runs on the CPU (gloo), nothing mocked.

Every test launches `integrations/train_trainer.py` (the documented recipe) as a subprocess with a launcher
(`torchrun`, `deepspeed`, `accelerate launch`), then checks what the run wrote:

* `rank_<r>.json` per rank: world size, the dataset indices that rank read, the steps it ran, the losses;
* `adapter_model.safetensors` from `trainer.save_model` and from the intermediate `checkpoint-N/`;
* `reference.pt`: the trained model's logits on a fixed batch, computed on all ranks (ZeRO-3 gathers the weights)
  and written by rank 0 -- the test reloads the adapter in this process with `PeftModel.from_pretrained` onto the
  plain base model and must get the same logits.

The runs are forced onto the CPU (`--use_cpu always`, `DS_ACCELERATOR=cpu`, no visible CUDA device) so the file
behaves the same on a GPU runner. The DeepSpeed C++ ops are JIT-compiled once by the `deepspeed_ops` session fixture
of tests/conftest.py (tests/integrations/distributed/build_deepspeed_ops.py; minutes the very first time, cached
afterwards).

Runtime on 2 CPU cores with the ops cached: about 4 minutes (15 launches of 15-25 s each).

Launches and what they cover:
* torchrun, zero2.json and zero3.json (+LoRA): train 32 steps, checkpoint every 16, resume from checkpoint-16; the
  loss must go clearly below chance, which only reading the images allows;
* `deepspeed --num_gpus 2` (zero2.json); two emulated nodes via `deepspeed --hostfile --no_ssh` and via
  `accelerate launch --config_file multi_node.yaml`; `accelerate launch --config_file single_machine.yaml`;
* zero3_offload.json (+LoRA); ZeRO-3 with a 4-bit NF4 base (+LoRA);
* ZeRO-2/ZeRO-3 with text-only batches on one rank and image batches on the other in the same step;
* the `use_cpu` pitfall: "auto" batch sizes (fails loudly) and explicit ones (must still save a complete adapter).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")
pytest.importorskip("accelerate")

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "integrations" / "train_trainer.py"
DS_CONFIGS = ROOT / "integrations" / "deepspeed"
ACCELERATE_CONFIGS = ROOT / "integrations" / "accelerate"

sys.path.insert(0, str(RECIPE.parent))
import train_trainer as recipe  # noqa: E402  (the recipe's data, model and adapter builders)
from process_launch import free_port, launcher_env  # noqa: E402

pytestmark = pytest.mark.slow

RUN_TIMEOUT = 300  # seconds per launch (a run takes ~15 s once the DeepSpeed ops are cached)
SIBLING_GRACE = 30  # seconds the other launchers of a multi-node launch get after one of them failed
BATCH = 4  # --per_device_train_batch_size of every run
STEPS, SAVE_EVERY = 32, 16  # train-then-resume runs: one epoch of the recipe's 256 samples on 2 ranks
LM_HEAD_SCALE = 10.0  # see the `checkpoint` fixture


# ------------------------------------------------------------------------------------------------------- launching


def _launch(launcher: str, args: list[str], expect_success: bool = True) -> subprocess.CompletedProcess:
    port = str(free_port())
    if launcher == "torchrun":
        prefix = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    elif launcher == "deepspeed":
        deepspeed_cli = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or shutil.which("deepspeed")
        assert deepspeed_cli, "the `deepspeed` launcher is not on PATH"
        prefix = [deepspeed_cli, "--num_gpus", "2", "--master_port", port]
    elif launcher == "accelerate":
        prefix = [
            sys.executable, "-m", "accelerate.commands.launch",
            "--config_file", str(ACCELERATE_CONFIGS / "single_machine.yaml"),
            "--main_process_port", port,
        ]  # fmt: skip
    else:
        raise ValueError(launcher)
    command = [*prefix, str(RECIPE), "--use_cpu", "always", *args]
    ((returncode, output),) = _run_together([command], launcher)
    if expect_success and returncode != 0:
        pytest.fail(
            f"{launcher} run failed (exit {returncode}): {' '.join(command)}\n"
            + _error_lines(output)
            + "\n--- last output ---\n"
            + output[-5000:]
        )
    return subprocess.CompletedProcess(command, returncode, output)


def _run_together(commands: list[list[str]], what: str) -> list[tuple[int, str]]:
    """Start every command (each in its own process group) and wait for all of them.

    Output goes to files, not pipes: with two launchers, a full pipe of one would block it while we wait on the
    other, and its ranks are in the same collective. On timeout the whole process groups are killed -- launchers
    spawn the ranks as grandchildren, which a plain kill of the launcher would leave running."""
    with tempfile.TemporaryDirectory(prefix="memvp-ds-") as logs:
        files = [open(Path(logs) / f"{n}.log", "w+") for n in range(len(commands))]
        procs = [
            subprocess.Popen(
                command, cwd=ROOT, env=launcher_env(), stdout=log, stderr=subprocess.STDOUT, text=True,
                start_new_session=True,
            )  # fmt: skip
            for command, log in zip(commands, files)
        ]

        def read(n: int) -> str:
            files[n].seek(0)
            return files[n].read()

        started, failed_at = time.monotonic(), None
        try:
            while any(proc.poll() is None for proc in procs):
                now = time.monotonic()
                if failed_at is None and any(proc.returncode not in (None, 0) for proc in procs):
                    failed_at = now  # a launcher failed: its peers will not finish, give them a short grace
                if now - started > RUN_TIMEOUT or (failed_at is not None and now - failed_at > SIBLING_GRACE):
                    raise subprocess.TimeoutExpired(what, RUN_TIMEOUT)
                time.sleep(0.2)
        except subprocess.TimeoutExpired:
            for proc in procs:
                if proc.poll() is None:
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    proc.wait()
            tails = "\n".join(
                f"--- process {n} (exit {proc.returncode}) ---\n{read(n)[-3000:]}" for n, proc in enumerate(procs)
            )
            reason = "a sibling failed and the rest did not finish" if failed_at is not None else "timed out"
            pytest.fail(f"{what}: {reason} (limit {RUN_TIMEOUT}s)\n{tails}")
        finally:
            results = [(proc.returncode, read(n)) for n, proc in enumerate(procs)]
            for log in files:
                log.close()
    return results


def _error_lines(output: str) -> str:
    keys = ("Error", "error:", "terminate called", "Traceback")
    lines = [line for line in output.splitlines() if any(key in line for key in keys)]
    return "\n".join(lines[-10:])


def _common(output_dir: Path, checkpoint: Path, *extra: str) -> list[str]:
    return [
        "--output_dir", str(output_dir),
        "--model_name_or_path", str(checkpoint),
        "--per_device_train_batch_size", str(BATCH),
        *extra,
    ]  # fmt: skip


# ------------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """A tiny random Llama saved to disk, loaded by every run through `--model_name_or_path` (ZeRO-3: zero.Init).

    Its LM head is scaled up: at the default init (std 0.02, hidden size 32) every logit stays within +-0.82 (the
    largest row norm times sqrt(32), the size of a normalised hidden state), so no adapter can make the frozen model
    sure of an answer and the loss never comes near the recipe's chance level log(num_classes) (it stays around 3.9).
    With the larger head, training with the images gets far below chance while the same run without them stays above
    it (measured: ~0.35 vs ~2.2 after 32 steps)."""
    from transformers import LlamaForCausalLM

    from memvp_peft.demo_models import tiny_llama_config

    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    with torch.no_grad():
        model.lm_head.weight.mul_(LM_HEAD_SCALE)
    model.save_pretrained(path)
    return path


def _train_then_resume(stage: int, root: Path, checkpoint: Path) -> dict:
    """Run A: STEPS steps, checkpoints every SAVE_EVERY. Run B: resume A's checkpoint-SAVE_EVERY up to STEPS."""
    config = str(DS_CONFIGS / f"zero{stage}.json")
    extra = ["--deepspeed", config, "--max_steps", str(STEPS), "--save_steps", str(SAVE_EVERY)]
    extra += ["--learning_rate", "0.1", "--reference_logits"]
    if stage == 3:
        extra += ["--lora"]  # MemVP + LoRA on a base that zero.Init partitioned while loading
    first, resumed = root / "run", root / "resumed"
    _launch("torchrun", _common(first, checkpoint, *extra))
    resume = ["--resume_from_checkpoint", str(first / f"checkpoint-{SAVE_EVERY}")]
    _launch("torchrun", _common(resumed, checkpoint, *extra, *resume))
    return {"stage": stage, "lora": stage == 3, "run": first, "resumed": resumed}


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2", "zero3"])
def zero_run(request, tmp_path_factory, deepspeed_ops, checkpoint):
    return _train_then_resume(request.param, tmp_path_factory.mktemp(f"zero{request.param}"), checkpoint)


# --------------------------------------------------------------------------------------------------------- checks


def _rank_info(output_dir: Path) -> list[dict]:
    infos = [json.loads((output_dir / f"rank_{r}.json").read_text()) for r in (0, 1)]
    assert [i["rank"] for i in infos] == [0, 1]
    return infos


def _reference_model(checkpoint: Path, lora: bool, load_in_4bit: bool = False):
    """The same PeftModel built in this single process (what a complete adapter must match key for key)."""
    argv = ["--output_dir", "unused", "--model_name_or_path", str(checkpoint)] + (["--lora"] if lora else [])
    args = recipe.parse_args(argv)
    args.load_in_4bit = load_in_4bit
    return recipe.attach_memvp(recipe.load_base_model(args), args)


def _expected_shapes(checkpoint: Path, lora: bool) -> dict[str, tuple]:
    from peft import get_peft_model_state_dict

    return {k: tuple(v.shape) for k, v in get_peft_model_state_dict(_reference_model(checkpoint, lora)).items()}


def assert_complete_adapter(folder: Path, expected: dict[str, tuple]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    weights = folder / "adapter_model.safetensors"
    assert weights.is_file(), f"{weights} is missing; folder holds {sorted(p.name for p in folder.iterdir())}"
    assert (folder / "adapter_config.json").is_file()
    state = load_file(weights)
    empty = sorted(k for k, v in state.items() if v.numel() == 0)
    assert not empty, f"{weights}: 0-element (unconsolidated ZeRO-3 partition) tensors {empty}"
    assert set(state) == set(expected), (
        f"{weights}: missing {sorted(set(expected) - set(state))}, unexpected {sorted(set(state) - set(expected))}"
    )
    wrong = {k: (tuple(v.shape), expected[k]) for k, v in state.items() if tuple(v.shape) != expected[k]}
    assert not wrong, f"{weights}: wrong shapes (saved, expected) {wrong}"
    assert any("memvp_memory" in k and "key_pos" in k for k in state) and any("value_pos" in k for k in state)
    assert all(torch.isfinite(v).all() for v in state.values())
    return state


def assert_reload_matches(folder: Path, checkpoint: Path, load_in_4bit: bool = False) -> None:
    """PeftModel.from_pretrained onto a plain single-process base gives the trained model's logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    reference = torch.load(folder / "reference.pt")
    kwargs = {}
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs = dict(
            quantization_config=BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
            ),
            device_map="cpu",
        )
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(checkpoint, **kwargs), folder)
    model.train(reference["mode"] == "train")
    inputs = {k: reference[k] for k in ("input_ids", "attention_mask", "image_features")}
    with torch.no_grad():
        logits = model(**inputs).logits
        with model.disable_adapter():
            base_logits = model(**inputs).logits
        text_only = model(**{k: v for k, v in inputs.items() if k != "image_features"}).logits
    torch.testing.assert_close(logits, reference["logits"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(text_only, reference["text_only_logits"], rtol=1e-5, atol=1e-5)
    assert (base_logits - reference["logits"]).abs().max() > 1e-3, "the adapter changed nothing: was it trained/saved?"


def assert_disjoint_shards(infos: list[dict], steps: int) -> None:
    for info in infos:
        assert info["world_size"] == 2 and info["args_world_size"] == 2, info
        assert len(info["seen_indices"]) >= steps * BATCH, (info["rank"], len(info["seen_indices"]))
        assert len(set(info["seen_indices"])) == len(info["seen_indices"]), "a rank read a sample twice in one epoch"
    assert [i["should_save"] for i in infos] == [True, False]
    overlap = set(infos[0]["seen_indices"]) & set(infos[1]["seen_indices"])
    assert not overlap, f"ranks 0 and 1 read the same samples {sorted(overlap)[:10]}"


# ---------------------------------------------------------------------------------------- ZeRO-2 / ZeRO-3 (torchrun)


def test_every_rank_runs_every_step_at_the_requested_stage(zero_run):
    infos = _rank_info(zero_run["run"])
    assert [i["zero_stage"] for i in infos] == [zero_run["stage"]] * 2
    assert infos[0]["steps"] == infos[1]["steps"] == list(range(1, STEPS + 1))


def test_loss_goes_clearly_below_chance(zero_run):
    """Every sample has the same prompt; only its `image_features` tell the answer. A model that ignores them can at
    best spread its guess over the classes, a loss of log(num_classes) (the recipe's `chance_loss`); a falling loss
    alone proves nothing (learning which tokens answer lowers it from ~4.9 without any image)."""
    info = _rank_info(zero_run["run"])[0]
    losses = info["losses"]
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses)
    final = sum(losses[-3:]) / 3
    assert final < 0.5 * info["chance_loss"], f"final loss {final:.3f}, chance {info['chance_loss']:.3f}: {losses}"


def test_ranks_read_disjoint_shards(zero_run):
    assert_disjoint_shards(_rank_info(zero_run["run"]), steps=STEPS)


def test_save_model_and_checkpoints_hold_the_complete_adapter(zero_run, checkpoint):
    expected = _expected_shapes(checkpoint, zero_run["lora"])
    if zero_run["lora"]:
        assert any("lora_A" in k for k in expected) and any("lora_B" in k for k in expected)
    run = zero_run["run"]
    final = assert_complete_adapter(run, expected)
    middle = assert_complete_adapter(run / f"checkpoint-{SAVE_EVERY}", expected)
    last = assert_complete_adapter(run / f"checkpoint-{STEPS}", expected)
    for key in final:
        torch.testing.assert_close(last[key], final[key])
    assert any(not torch.equal(middle[k], final[k]) for k in final), "the middle checkpoint holds the final weights"
    # the ZeRO optimizer state of both ranks is in the checkpoint (what resuming needs)
    shards = sorted(p.name for p in (run / f"checkpoint-{SAVE_EVERY}" / f"global_step{SAVE_EVERY}").iterdir())
    assert any("rank_0" in s and "optim" in s for s in shards) and any("rank_1" in s and "optim" in s for s in shards)


def test_resume_continues_at_the_right_step(zero_run, checkpoint):
    first, resumed = _rank_info(zero_run["run"]), _rank_info(zero_run["resumed"])
    for a, b in zip(first, resumed):
        assert b["steps"] == list(range(SAVE_EVERY + 1, STEPS + 1)), b["steps"]
        assert b["global_step"] == STEPS
        # the data order is restored: the resumed run reads exactly what the first run read after the checkpoint
        assert b["seen_indices"] == a["seen_indices"][SAVE_EVERY * BATCH :]
    expected = _expected_shapes(checkpoint, zero_run["lora"])
    final = assert_complete_adapter(zero_run["run"], expected)
    again = assert_complete_adapter(zero_run["resumed"], expected)
    for key in final:  # optimizer state and schedule were restored too
        torch.testing.assert_close(again[key], final[key], rtol=1e-4, atol=1e-5, msg=key)


def test_saved_adapter_reloads_in_one_process_with_the_same_logits(zero_run, checkpoint):
    assert_reload_matches(zero_run["run"], checkpoint)


@pytest.mark.parametrize("stage", [2, 3], ids=["zero2", "zero3"])
def test_ranks_may_disagree_on_having_images(stage, tmp_path, deepspeed_ops, checkpoint):
    """Image-text data mixed with text-only data: in the same step one rank's batch has `image_features` and the
    other's has none. Every rank must still call the same modules (ZeRO-3 all-gathers parameters per module call)
    and produce gradients for the same parameters (ZeRO-2/3 reduce them in buckets), or the collectives fall out of
    step: gloo aborts with `terminate called after throwing an instance of 'gloo::EnforceNotMet'` (NCCL may hang).
    Needs memvp_peft to run the projector (times 0) for text-only batches."""
    out = tmp_path / "out"
    args = ["--deepspeed", str(DS_CONFIGS / f"zero{stage}.json"), "--max_steps", "8", "--learning_rate", "0.05"]
    _launch("torchrun", _common(out, checkpoint, *args, "--text_only_every", "3", "--reference_logits"))
    infos = _rank_info(out)
    counts = [i["text_only_batches"] for i in infos]
    assert counts[0] != counts[1], f"the ranks never disagreed (text-only batches per rank: {counts}); change the data"
    assert infos[0]["steps"] == list(range(1, 9)) and all(math.isfinite(x) for x in infos[0]["losses"])
    assert_complete_adapter(out, _expected_shapes(checkpoint, lora=False))
    assert_reload_matches(out, checkpoint)


# -------------------------------------------------------------------------------------------------- other launchers


def test_deepspeed_launcher(tmp_path, deepspeed_ops, checkpoint):
    """`deepspeed --num_gpus 2` works on a CPU-only machine: the launcher only sets CUDA_VISIBLE_DEVICES=0,1 (unused)
    and passes --local_rank, which the recipe accepts."""
    out = tmp_path / "out"
    args = ["--deepspeed", str(DS_CONFIGS / "zero2.json"), "--max_steps", "3", "--reference_logits"]
    result = _launch("deepspeed", _common(out, checkpoint, *args))
    assert "deepspeed.launcher.launch" in result.stdout
    assert_disjoint_shards(_rank_info(out), steps=3)
    assert_complete_adapter(out, _expected_shapes(checkpoint, lora=False))
    assert_reload_matches(out, checkpoint)


@pytest.mark.parametrize(
    "launcher", ["deepspeed-hostfile", "accelerate-multi_node"]
)  # only the accelerate line runs ZeRO-3 (multi_node.yaml); the deepspeed one uses zero2.json
def test_two_node_launch_lines(launcher, tmp_path, deepspeed_ops, checkpoint):
    """The multi-node launch lines of integrations/README.md, emulated on one machine with two "nodes" of one
    process each, one launcher per node (node_rank/machine_rank 0 and 1, master 127.0.0.1):

    * `deepspeed --hostfile H --no_ssh --node_rank N --master_addr A` with zero2.json;
    * `accelerate launch --config_file integrations/accelerate/multi_node.yaml --machine_rank N ...` (ZeRO-3 from
      the shipped yaml; num_processes/main_process_ip overridden on the command line as the yaml explains)."""
    out = tmp_path / "out"
    port = str(free_port())
    if launcher == "deepspeed-hostfile":
        hostfile = tmp_path / "hostfile"
        hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
        deepspeed_cli = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or shutil.which("deepspeed")
        recipe_args = _common(out, checkpoint, "--deepspeed", str(DS_CONFIGS / "zero2.json"), "--max_steps", "3")

        def command(node):
            return [deepspeed_cli, "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node),
                    "--master_addr", "127.0.0.1", "--master_port", port]  # fmt: skip

        stage, marker = 2, "nnodes=2, num_local_procs=1, node_rank={node}"
    else:
        recipe_args = _common(out, checkpoint, "--max_steps", "3")

        def command(node):
            return [sys.executable, "-m", "accelerate.commands.launch",
                    "--config_file", str(ACCELERATE_CONFIGS / "multi_node.yaml"), "--machine_rank", str(node),
                    "--num_processes", "2", "--main_process_ip", "127.0.0.1", "--main_process_port", port]  # fmt: skip

        stage, marker = 3, None
    commands = [[*command(node), str(RECIPE), "--use_cpu", "always", *recipe_args] for node in (0, 1)]
    for node, (returncode, output) in enumerate(_run_together(commands, f"two-node {launcher} launch")):
        assert returncode == 0, f"node {node} failed:\n{_error_lines(output)}\n{output[-4000:]}"
        if marker:
            assert marker.format(node=node) in output
    infos = _rank_info(out)
    assert infos[0]["zero_stage"] == stage
    assert_disjoint_shards(infos, steps=3)
    assert_complete_adapter(out, _expected_shapes(checkpoint, lora=False))


def test_accelerate_launch_with_the_shipped_config(tmp_path, deepspeed_ops, checkpoint):
    """`accelerate launch --config_file integrations/accelerate/single_machine.yaml` (ZeRO-3 from zero3.json); the
    recipe gets no --deepspeed flag: the Trainer takes DeepSpeed from accelerate's plugin."""
    out = tmp_path / "out"
    _launch("accelerate", _common(out, checkpoint, "--max_steps", "3", "--reference_logits"))
    infos = _rank_info(out)
    assert infos[0]["deepspeed"] is None and infos[0]["zero_stage"] == 3
    assert_disjoint_shards(infos, steps=3)
    assert_complete_adapter(out, _expected_shapes(checkpoint, lora=False))
    assert_reload_matches(out, checkpoint)


def test_zero3_cpu_offload(tmp_path, deepspeed_ops, checkpoint):
    """zero3_offload.json: optimizer and parameters offloaded to the CPU (DeepSpeedCPUAdam), MemVP + LoRA."""
    out = tmp_path / "out"
    args = ["--deepspeed", str(DS_CONFIGS / "zero3_offload.json"), "--max_steps", "3", "--lora", "--reference_logits"]
    _launch("torchrun", _common(out, checkpoint, *args))
    assert _rank_info(out)[0]["zero_stage"] == 3
    assert_complete_adapter(out, _expected_shapes(checkpoint, lora=True))
    assert_reload_matches(out, checkpoint)


def test_memvp_train_under_zero3_trains_saves_and_answers(tmp_path, deepspeed_ops):
    """The documented `memvp-train --deepspeed integrations/deepspeed/zero3.json` under torchrun. After training, the
    model's weights are still partitioned across the ranks, so rank 0 must not generate with it alone (gloo aborts with
    "Connection closed by peer", NCCL hangs): the held-out answers come from the saved adapter, reloaded onto a
    single-process base."""
    from memvp_peft.tuner.save_load import check_adapter_file_complete
    from memvp_peft.cli.infer import main as infer_main

    out = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "-m", "memvp_peft.train", "--quick", "--deepspeed", str(DS_CONFIGS / "zero3.json"),
               "--output_dir", str(out), "--per_device_train_batch_size", str(BATCH)]  # fmt: skip
    ((returncode, output),) = _run_together([command], "memvp-train under ZeRO-3")
    assert returncode == 0, f"{_error_lines(output)}\n{output[-4000:]}"
    assert output.count("DeepSpeed's schedule runs, not --lr_scheduler_type cosine") == 1  # said once, by rank 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_steps"] == 20 and all(math.isfinite(x) for x in metrics["loss_history"]["loss"])
    assert metrics["heldout_accuracy"] == metrics["reloaded_heldout_accuracy"]
    check_adapter_file_complete(str(out / "adapter_model.safetensors"))  # no 0-element ZeRO-3 partitions
    assert infer_main(["--adapter", str(out), "--image", "digits:0"]) == 0


# ------------------------------------------------------------------------------------------------ 4-bit base, pitfalls


def test_zero3_with_a_4bit_base_trains_and_reloads(tmp_path, deepspeed_ops, checkpoint):
    """ZeRO-3 + bitsandbytes NF4 base + MemVP + LoRA works when no device_map is passed (transformers refuses a
    device_map under ZeRO-3 with "DeepSpeed Zero-3 is not compatible with passing a `device_map`"; the recipe omits
    it). The adapter reloads onto a freshly quantised single-process base with identical logits (train-mode forward,
    see `train_trainer.reference_mode`)."""
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "out"
    args = ["--deepspeed", str(DS_CONFIGS / "zero3.json"), "--max_steps", "3", "--lora", "--load_in_4bit"]
    _launch("torchrun", _common(out, checkpoint, *args, "--reference_logits"))
    infos = _rank_info(out)
    assert infos[0]["zero_stage"] == 3 and all(math.isfinite(x) for x in infos[0]["losses"])
    assert_complete_adapter(out, _expected_shapes(checkpoint, lora=True))
    assert_reload_matches(out, checkpoint, load_in_4bit=True)


def _explicit_batch_config(tmp_path: Path, stage: int) -> Path:
    """zero<stage>.json with explicit batch sizes: the only way a run without use_cpu=True gets past DeepSpeed's
    batch assertion on a CPU-only machine."""
    config = json.loads((DS_CONFIGS / f"zero{stage}.json").read_text())
    config.pop("train_batch_size")
    config["train_micro_batch_size_per_gpu"] = BATCH
    config["gradient_accumulation_steps"] = 1
    path = tmp_path / f"zero{stage}_explicit_batch.json"
    path.write_text(json.dumps(config))
    return path


def test_forgetting_use_cpu_with_auto_batch_sizes_fails_loudly(tmp_path, deepspeed_ops, checkpoint):
    """Without use_cpu=True on a CPU-only machine every rank reports world size 1, so DeepSpeed's "auto" batch
    arithmetic fails at start-up -- before anything is written."""
    out = tmp_path / "out"
    args = ["--deepspeed", str(DS_CONFIGS / "zero3.json"), "--max_steps", "2"]
    # _launch passes "--use_cpu always" first; argparse keeps the last value
    result = _launch("torchrun", [*_common(out, checkpoint, *args), "--use_cpu", "never"], expect_success=False)
    assert result.returncode != 0
    assert "train_batch_size is not equal to micro_batch_per_gpu * gradient_acc_step * world_size" in result.stdout
    assert not (out / "adapter_model.safetensors").exists()


def test_forgetting_use_cpu_does_not_corrupt_the_saved_adapter(tmp_path, deepspeed_ops, checkpoint):
    """The trap from PEFT_NOTES: ZeRO-3 on CPU without use_cpu=True (explicit batch sizes, so it starts). Every rank
    then believes it is the main process and calls save_pretrained; rank 1 holds only 0-element ZeRO-3 partitions
    and, without a guard, wrote them over rank 0's adapter (verified: `projector.2.weight` saved with shape (0,)).

    This test EXPECTS A COMPLETE ADAPTER everywhere it is written -- it depends on memvp_peft's save guard
    (memvp_peft/tuner/save_load.py: only global rank 0 writes, 0-element tensors are refused)."""
    out = tmp_path / "out"
    config = _explicit_batch_config(tmp_path, stage=3)
    args = ["--deepspeed", str(config), "--max_steps", "2", "--save_steps", "2", "--save_copy_per_rank"]
    _launch("torchrun", [*_common(out, checkpoint, *args), "--use_cpu", "never"])
    infos = _rank_info(out)
    # the misconfiguration really happened: both ranks think they are alone (documents the failure mode)
    assert [i["args_world_size"] for i in infos] == [1, 1] and [i["should_save"] for i in infos] == [True, True]
    expected = _expected_shapes(checkpoint, lora=False)
    assert_complete_adapter(out, expected)
    assert_complete_adapter(out / "checkpoint-2", expected)
    assert_complete_adapter(out / "per_rank" / "rank0", expected)
    rank1 = out / "per_rank" / "rank1" / "adapter_model.safetensors"
    if rank1.exists():  # a guard may also make rank 1 gather and write a complete copy
        assert_complete_adapter(rank1.parent, expected)
