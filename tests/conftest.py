"""Shared builders of tiny, randomly initialised models (nothing is downloaded)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# tests/ and its package-mirror folders: a test imports the helpers of any of them by name (tests/tasks uses
# tests/data's `data_fixtures`, tests/cli tests/tasks' `scienceqa_fixture`), and so do fresh-process checks
_TEST_DIRS = [os.path.dirname(__file__)] + sorted(
    entry.path for entry in os.scandir(os.path.dirname(__file__)) if entry.is_dir() and not entry.name.startswith((".", "_"))
)
sys.path[:0] = [folder for folder in _TEST_DIRS if folder not in sys.path]

import memvp_peft  # noqa: E402,F401  (registers the MEMVP peft type)
from memvp_peft.demo_models import tiny_llama_config  # noqa: E402
from process_launch import launcher_env  # noqa: E402

# Under pytest-xdist (pyproject.toml's addopts) every worker gets an equal share of the cores. Left alone, torch starts
# one thread per core in every worker, and N workers x N threads on N cores spend their time waiting for each other;
# processes a test starts inherit the share through OMP_NUM_THREADS.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _THREADS = max(1, (os.cpu_count() or 1) // _WORKERS)
    os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))
    torch.set_num_threads(_THREADS)

BUILD_DEEPSPEED_OPS = os.path.join(os.path.dirname(__file__), "integrations", "distributed", "build_deepspeed_ops.py")


@pytest.fixture(scope="session")
def deepspeed_ops():
    """JIT-build DeepSpeed's CPU ops once (shm comm, fused_adam, cpu_adam) before any run that starts DeepSpeed.

    Every test that launches a DeepSpeed run asks for it, so the build happens before the first launch, never inside
    a launch's own timeout nor by two ranks of one launch at once. Two xdist workers that both need it wait for each
    other through torch's lock file in the extensions folder; the second then loads the first one's build."""
    pytest.importorskip("deepspeed")  # without DeepSpeed its tests skip, not error in this fixture
    result = subprocess.run([sys.executable, BUILD_DEEPSPEED_OPS], cwd=os.path.dirname(os.path.dirname(__file__)),
                            env=launcher_env(), capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, f"building the DeepSpeed ops failed:\n{(result.stdout + result.stderr)[-4000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


VOCAB = 64
HIDDEN = 32
VISUAL_DIM = 16


def tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**{"vocab_size": VOCAB, "hidden_size": HIDDEN, **overrides})).eval()


def memvp_config(**overrides):
    from memvp_peft import MemVPConfig

    kwargs = dict(visual_dim=VISUAL_DIM, num_memory_slots=8, projector_hidden_dim=8, memory_dropout=0.0)
    kwargs.update(overrides)
    return MemVPConfig(**kwargs)


def randomize_memory(peft_model, seed: int = 1, scale: float = 0.5) -> None:
    """Give the adapter non-trivial weights (p_v starts at zero, which would hide a broken value path)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "memvp" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def batch():
    torch.manual_seed(123)
    input_ids = torch.randint(3, VOCAB, (3, 7))
    attention_mask = torch.ones_like(input_ids)
    features = torch.randn(3, 5, VISUAL_DIM)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "image_features": features}


def assert_fresh_process_reproduces(tmp_path, imports: str, base_expr: str, adapter_dir, inputs: dict,
                                    expected: torch.Tensor, adapter_name: str = "default") -> None:
    """Reload `adapter_dir` onto `base_expr` in a new Python process and require bit-identical logits."""
    import subprocess
    import sys
    import textwrap

    data = tmp_path / "fresh_process_expected.pt"
    torch.save({"inputs": inputs, "logits": expected}, data)
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.path[:0] = {_TEST_DIRS!r}
        import memvp_peft
        from peft import PeftModel
        {imports}
        data = torch.load({str(data)!r})
        model = PeftModel.from_pretrained({base_expr}, {str(adapter_dir)!r}, adapter_name={adapter_name!r}).eval()
        with torch.no_grad():
            logits = model(**data["inputs"]).logits
        assert torch.equal(logits, data["logits"]), (logits - data["logits"]).abs().max()
        print("IDENTICAL")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "IDENTICAL" in result.stdout
