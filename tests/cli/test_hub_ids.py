"""memvp-train and memvp-infer on Hub ids, without network: a Hugging Face cache is written in the test, then the
programs run offline (`HF_HUB_OFFLINE=1`) in a fresh process and resolve `org/name` from it as transformers does.

Why a fresh process: huggingface_hub reads `HF_HOME` and `HF_HUB_OFFLINE` once, when it is imported, and this test
process imported it long ago (peft does). The cache has the layout huggingface_hub 2.x writes and reads:
`models--org--name/snapshots/<40-hex commit>/<files>` with `refs/main` holding the commit, `datasets--org--name/...`
for a dataset repo (here parquet files under `data/`, as the Hub's own parquet layout names them).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from memvp_peft.local_models import build_word_tokenizer, clip_image_processor, tiny_clip, tiny_llama

LLM_COMMIT, CLIP_COMMIT, DATA_COMMIT = "1" * 40, "2" * 40, "3" * 40
QUESTION = "What digit is shown ?"


def _snapshot(hf_home, repo: str, commit: str, kind: str = "models") -> str:
    """An empty snapshot folder of `repo` at `commit`, made the default branch (`refs/main`)."""
    repo_folder = os.path.join(hf_home, "hub", f"{kind}--{repo.replace('/', '--')}")
    snapshot = os.path.join(repo_folder, "snapshots", commit)
    os.makedirs(snapshot)
    os.makedirs(os.path.join(repo_folder, "refs"))
    with open(os.path.join(repo_folder, "refs", "main"), "w") as handle:
        handle.write(commit)
    return snapshot


def _digits_table(path: str, count: int = 24) -> None:
    """`count` digit scans as a parquet file with a `datasets.Image` column (PNG bytes), as Hub datasets store them."""
    import datasets
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    rows = []
    for i in range(count):
        buffer = io.BytesIO()
        Image.fromarray((digits.images[i] * 15).astype(np.uint8)).save(buffer, format="PNG")
        rows.append({"image": {"bytes": buffer.getvalue(), "path": None}, "question": QUESTION,
                     "answer": str(digits.target[i])})
    features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string")})
    os.makedirs(os.path.dirname(path))
    datasets.Dataset.from_list(rows, features=features).to_parquet(path)


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory):
    """A Hugging Face cache holding org/llm (a tiny Llama + tokenizer), org/clip (a tiny CLIP + its image processor)
    and the dataset org/digits."""
    home = str(tmp_path_factory.mktemp("hf_home"))
    tokenizer = build_word_tokenizer([f"Question: {QUESTION}\nAnswer:"], [str(d) for d in range(10)])
    llm = _snapshot(home, "org/llm", LLM_COMMIT)
    tiny_llama(tokenizer, hidden_size=64).save_pretrained(llm)
    tokenizer.save_pretrained(llm)
    clip = _snapshot(home, "org/clip", CLIP_COMMIT)
    tiny_clip(hidden_size=32).save_pretrained(clip)
    clip_image_processor(32).save_pretrained(clip)
    _digits_table(os.path.join(_snapshot(home, "org/digits", DATA_COMMIT, kind="datasets"), "data",
                               "train-00000-of-00001.parquet"))
    return home


def run_offline(hf_home: str, cwd, calls: list[tuple[str, list[str]]]) -> list[dict]:
    """Run each `(program, argv)` -- "train" or "infer" -- in ONE fresh offline process (imports cost seconds):
    for each, the exit status and what it printed to stdout and stderr."""
    script = textwrap.dedent(f"""
        import contextlib, io, json, sys
        from memvp_peft.cli.infer import main as infer
        from memvp_peft.cli.train import main as train
        results = []
        for program, argv in {calls!r}:
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = (train if program == "train" else infer)(argv)
            results.append({{"code": code, "out": out.getvalue(), "err": err.getvalue()}})
        print("RESULTS=" + json.dumps(results))
    """)
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("HF_", "HUGGINGFACE_")) and key != "TRANSFORMERS_CACHE"}
    env.update(HF_HOME=hf_home, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONWARNINGS="ignore")
    done = subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULTS="))
    return json.loads(line[len("RESULTS="):])


def _error_line(result: dict, program: str) -> str:
    lines = [line for line in result["err"].splitlines() if line.startswith(f"memvp-{program}: error:")]
    assert result["code"] == 2 and len(lines) == 1 and "Traceback" not in result["err"], result
    return lines[0]


@pytest.fixture(scope="module")
def hub_run(hf_home, tmp_path_factory):
    """memvp-train on three Hub ids (base, encoder, dataset), then memvp-infer on its adapter, offline."""
    folder = tmp_path_factory.mktemp("hub_run")
    from PIL import Image
    from sklearn.datasets import load_digits

    Image.fromarray((load_digits().images[0] * 15).astype(np.uint8)).save(folder / "zero.png")
    train, infer, other_revision = run_offline(hf_home, folder, [
        ("train", ["--model_name_or_path", "org/llm", "--revision", LLM_COMMIT, "--vision_model_name_or_path",
                   "org/clip", "--dataset", "org/digits", "--output_dir", "run", "--max_steps", "2",
                   "--per_device_train_batch_size", "4", "--eval_fraction", "0.25", "--max_eval_samples", "2"]),
        ("infer", ["--adapter", "run", "--image", "zero.png"]),
        ("infer", ["--adapter", "run", "--image", "zero.png", "--revision", "v2"]),
    ])
    return folder, train, infer, other_revision


@pytest.mark.slow
def test_train_on_hub_ids_runs_offline_from_the_cache(hub_run):
    folder, train, _, _ = hub_run
    assert train["code"] == 0, train["err"][-3000:]
    metrics = json.loads((folder / "run" / "metrics.json").read_text())
    assert metrics["dataset"] == "org/digits" and metrics["train_samples"] == 18 and metrics["eval_samples"] == 2


@pytest.mark.slow
def test_the_adapter_records_the_ids_as_given_not_cache_paths(hub_run):
    folder, _, _, _ = hub_run
    config = json.loads((folder / "run" / "adapter_config.json").read_text())
    record = json.loads((folder / "run" / "memvp_cli.json").read_text())
    assert config["base_model_name_or_path"] == "org/llm" and config["vision_encoder"] == "org/clip"
    assert config["revision"] == LLM_COMMIT
    assert record["vision_model_name_or_path"] == "org/clip"


@pytest.mark.slow
def test_infer_resolves_the_recorded_ids_from_the_cache(hub_run):
    _, _, infer, _ = hub_run
    assert infer["code"] == 0, infer["err"][-3000:]
    assert f"zero.png: {QUESTION} ->" in infer["out"]


@pytest.mark.slow
def test_infer_loads_the_base_at_the_revision_asked_for(hub_run):
    _, _, _, other_revision = hub_run
    error = _error_line(other_revision, "infer")
    assert "the base model the adapter records, 'org/llm'" in error and "at revision 'v2'" in error


@pytest.fixture(scope="module")
def offline_refusals(hf_home, tmp_path_factory):
    """Names the offline cache cannot resolve, one run each (all refused before anything is written)."""
    folder = tmp_path_factory.mktemp("refusals")
    common = ["--max_steps", "1", "--per_device_train_batch_size", "4"]
    names = ["base", "base_revision", "encoder", "dataset", "bare_dataset"]
    calls = [
        ("train", ["--model_name_or_path", "org/missing", "--output_dir", "a", *common]),
        ("train", ["--model_name_or_path", "org/llm", "--revision", "v2", "--output_dir", "b", *common]),
        ("train", ["--model_name_or_path", "org/llm", "--vision_model_name_or_path", "org/no-clip",
                   "--dataset", "org/digits", "--output_dir", "c", *common]),
        ("train", ["--model_name_or_path", "org/llm", "--vision_model_name_or_path", "org/clip",
                   "--dataset", "org/no-data", "--output_dir", "d", *common]),
        ("train", ["--model_name_or_path", "org/llm", "--vision_model_name_or_path", "org/clip",
                   "--dataset", "imagenet", "--output_dir", "e", *common]),
    ]
    results = dict(zip(names, run_offline(hf_home, folder, calls)))
    assert not any((folder / name).exists() for name in "abcde")
    return results


@pytest.mark.slow
@pytest.mark.parametrize("case, name, what", [
    ("base", "org/missing", "model_name_or_path"),
    ("encoder", "org/no-clip", "vision_model_name_or_path"),
    ("dataset", "org/no-data", "dataset"),
    ("bare_dataset", "imagenet", "dataset"),
])
def test_an_id_missing_from_the_cache_offline_is_one_error_naming_it(offline_refusals, case, name, what):
    error = _error_line(offline_refusals[case], "train")
    assert f"{what} {name!r} is not a local folder" in error
    assert "not in the Hugging Face cache" in error and "HF_HUB_OFFLINE=1" in error and "hf download" in error


@pytest.mark.slow
def test_a_revision_missing_from_the_cache_is_named(offline_refusals):
    error = _error_line(offline_refusals["base_revision"], "train")
    assert "'org/llm'" in error and "at revision 'v2'" in error and "not in the Hugging Face cache" in error


@pytest.mark.slow
def test_the_embedded_default_needs_no_download(hf_home, tmp_path):
    """`memvp-train --quick` offline with an empty cache: the demo base and digits are built locally."""
    empty = tmp_path / "empty_hf_home"
    empty.mkdir()
    (result,) = run_offline(str(empty), tmp_path, [("train", ["--quick", "--output_dir", "run"])])
    assert result["code"] == 0, result["err"][-3000:]
    assert (tmp_path / "run" / "adapter_model.safetensors").exists()
