"""memvp-train and memvp-infer on Hub ids, without network: a Hugging Face cache is written in the test, then the
programs run offline (`HF_HUB_OFFLINE=1`) in a fresh process and resolve `org/name` from it as transformers does.

Why a fresh process: huggingface_hub reads `HF_HOME` and `HF_HUB_OFFLINE` once, when it is imported, and this test
process imported it long ago (peft does). The cache has the layout huggingface_hub 2.x writes and reads:
`models--org--name/snapshots/<40-hex commit>/<files>` with `refs/main` holding the commit, `datasets--org--name/...`
for a dataset repo (here parquet files under `data/`, as the Hub's own parquet layout names them).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data"))  # tests/data
from data_fixtures import digit_scans  # noqa: E402

from memvp_peft.demo_models import build_word_tokenizer, clip_image_processor, tiny_clip, tiny_llama
from memvp_peft.hub import check_model_source, is_hub_id

LLM_COMMIT, CLIP_COMMIT, DATA_COMMIT, CUSTOM_COMMIT = "1" * 40, "2" * 40, "3" * 40, "4" * 40
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
    os.makedirs(os.path.dirname(path))
    digit_scans(count, QUESTION, str).to_parquet(path)


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory):
    """A Hugging Face cache holding org/llm (a tiny Llama + tokenizer), org/clip (a tiny CLIP + its image processor),
    org/custom (a config that is the repo's own code) and the dataset org/digits."""
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
    custom = _snapshot(home, "org/custom", CUSTOM_COMMIT)  # a repo whose config class is its own code
    with open(os.path.join(custom, "config.json"), "w") as handle:
        json.dump({"model_type": "custom-x", "auto_map": {"AutoConfig": "configuration_custom.CustomConfig"}}, handle)
    with open(os.path.join(custom, "configuration_custom.py"), "w") as handle:
        handle.write("from transformers import PretrainedConfig\n\n\nclass CustomConfig(PretrainedConfig):\n"
                     "    model_type = 'custom-x'\n")
    return home


def run_offline_python(hf_home: str, cwd, body: str) -> dict:
    """Run `body` in a fresh offline process; it fills the dict `results`, which comes back."""
    script = "import json\nresults = {}\n" + textwrap.dedent(body) + "\nprint('RESULTS=' + json.dumps(results))\n"
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("HF_", "HUGGINGFACE_")) and key != "TRANSFORMERS_CACHE"}
    env.update(HF_HOME=hf_home, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONWARNINGS="ignore")
    done = subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULTS="))
    return json.loads(line[len("RESULTS="):])


def run_offline(hf_home: str, cwd, calls: list[tuple[str, list[str]]]) -> list[dict]:
    """Run each `(program, argv)` -- "train" or "infer" -- in ONE fresh offline process (imports cost seconds):
    for each, the exit status and what it printed to stdout and stderr."""
    return run_offline_python(hf_home, cwd, f"""
        import contextlib, io
        from memvp_peft.cli.infer import main as infer
        from memvp_peft.cli.train import main as train
        results["runs"] = []
        for program, argv in {calls!r}:
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = (train if program == "train" else infer)(argv)
            results["runs"].append({{"code": code, "out": out.getvalue(), "err": err.getvalue()}})
    """)["runs"]


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
def hub_adapter(hub_run, hf_home, tmp_path_factory):
    """The trained adapter pushed, as it were, to the Hub repo org/adapter (written into the cache), then memvp-infer
    on that id and on one the cache does not hold."""
    folder = hub_run[0]
    snapshot = _snapshot(hf_home, "org/adapter", "5" * 40)
    for name in ("adapter_config.json", "adapter_model.safetensors", "memvp_cli.json"):
        shutil.copy(folder / "run" / name, snapshot)
    return run_offline(hf_home, tmp_path_factory.mktemp("hub_adapter"), [
        ("infer", ["--adapter", "org/adapter", "--image", str(folder / "zero.png")]),
        ("infer", ["--adapter", "org/no-adapter", "--image", str(folder / "zero.png")]),
    ])


@pytest.mark.slow
def test_infer_takes_the_adapter_as_a_hub_id(hub_adapter):
    found, _ = hub_adapter
    assert found["code"] == 0, found["err"][-3000:]
    assert f"zero.png: {QUESTION} ->" in found["out"]


@pytest.mark.slow
def test_an_adapter_id_missing_from_the_cache_is_one_error_naming_it(hub_adapter):
    error = _error_line(hub_adapter[1], "infer")
    assert "--adapter 'org/no-adapter' is not an adapter folder here, and as a Hub id it is not in the Hugging Face " \
           "cache" in error and "hf download org/no-adapter" in error


@pytest.fixture(scope="module")
def offline_refusals(hf_home, tmp_path_factory):
    """Names the offline cache cannot resolve, one run each (all refused before anything is written)."""
    folder = tmp_path_factory.mktemp("refusals")
    common = ["--max_steps", "1", "--per_device_train_batch_size", "4"]
    names = ["base", "base_revision", "encoder", "dataset", "bare_dataset", "custom_code"]
    calls = [
        ("train", ["--model_name_or_path", "org/missing", "--output_dir", "a", *common]),
        ("train", ["--model_name_or_path", "org/llm", "--revision", "v2", "--output_dir", "b", *common]),
        ("train", ["--model_name_or_path", "org/llm", "--vision_model_name_or_path", "org/no-clip",
                   "--dataset", "org/digits", "--output_dir", "c", *common]),
        ("train", ["--model_name_or_path", "org/llm", "--vision_model_name_or_path", "org/clip",
                   "--dataset", "org/no-data", "--output_dir", "d", *common]),
        ("train", ["--model_name_or_path", "org/llm", "--vision_model_name_or_path", "org/clip",
                   "--dataset", "imagenet", "--output_dir", "e", *common]),
        ("train", ["--model_name_or_path", "org/custom", "--output_dir", "f", *common]),
    ]
    results = dict(zip(names, run_offline(hf_home, folder, calls)))
    assert not any((folder / name).exists() for name in "abcdef")
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


@pytest.mark.slow
def test_a_repo_with_its_own_code_needs_trust_remote_code(offline_refusals):
    error = _error_line(offline_refusals["custom_code"], "train")
    assert "model_name_or_path 'org/custom' needs its own code to load: pass --trust_remote_code" in error


@pytest.mark.slow
def test_infer_names_a_recorded_encoder_id_missing_from_the_cache_before_loading(hub_run, hf_home, tmp_path):
    folder = hub_run[0]
    adapter = tmp_path / "adapter"
    shutil.copytree(folder / "run", adapter, ignore=shutil.ignore_patterns("checkpoint-*"))
    for name, key in (("adapter_config.json", "vision_encoder"), ("memvp_cli.json", "vision_model_name_or_path")):
        data = json.loads((adapter / name).read_text())
        data[key] = "org/gone-clip"
        (adapter / name).write_text(json.dumps(data))
    (result,) = run_offline(hf_home, tmp_path, [("infer", ["--adapter", str(adapter), "--image", "digits:0"])])
    error = _error_line(result, "infer")
    assert "the vision encoder the adapter was trained with, 'org/gone-clip' is not a local folder" in error
    assert "not in the Hugging Face cache" in error and "Loading weights" not in result["err"]


@pytest.fixture(scope="module")
def python_api(hf_home, tmp_path_factory):
    """MemVPConfig.vision_encoder and load_vision_encoder on Hub ids, offline, in one process."""
    return run_offline_python(hf_home, tmp_path_factory.mktemp("python_api"), f"""
        import warnings
        import torch
        import memvp_peft
        from memvp_peft import MemVPConfig
        from memvp_peft.demo_models import tiny_llama
        from memvp_peft.vision import describe_encoder, load_vision_encoder
        from peft import PeftModel, get_peft_model

        def base():
            return tiny_llama(vocab_size=64, hidden_size=64)

        pm = get_peft_model(base(), MemVPConfig(visual_dim=32, num_memory_slots=24, vision_encoder="org/clip"))
        results["attached"] = describe_encoder(pm.base_model.vision_encoder.model)
        out = pm(input_ids=torch.randint(3, 64, (1, 5)), pixel_values=torch.randn(1, 3, 32, 32))
        results["forward"] = list(out.logits.shape)
        pm.save_pretrained("adapter")
        results["recorded_revision"] = json.load(open("adapter/adapter_config.json"))["vision_encoder_revision"]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            reloaded = PeftModel.from_pretrained(base(), "adapter")
        results["reloaded"] = describe_encoder(reloaded.base_model.vision_encoder.model)
        results["reload_warnings"] = [str(w.message) for w in caught if "vision encoder" in str(w.message)]
        try:
            get_peft_model(base(), MemVPConfig(visual_dim=32, num_memory_slots=24, vision_encoder="org/no-clip"))
        except ValueError as error:
            results["missing"] = str(error)
        config = json.load(open("adapter/adapter_config.json"))
        config["vision_encoder"] = "org/no-clip"
        json.dump(config, open("adapter/adapter_config.json", "w"))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            gone = PeftModel.from_pretrained(base(), "adapter")
        results["recorded_missing_attached"] = gone.base_model.vision_encoder is not None
        results["recorded_missing_warnings"] = [str(w.message) for w in caught if "org/no-clip" in str(w.message)]
        from transformers import CLIPVisionConfig
        from memvp_peft.cli.model_loading import image_processor_for
        processor = image_processor_for("org/clip", CLIPVisionConfig(image_size=48))
        results["repo_processor_size"] = processor.crop_size["height"]
        try:
            image_processor_for("org/llm", CLIPVisionConfig(image_size=48))
        except ValueError as error:
            results["processor_not_cached"] = str(error)
        results["pinned"] = describe_encoder(load_vision_encoder("org/clip", revision="{CLIP_COMMIT}"))
        try:
            load_vision_encoder("org/clip", revision="v2")
        except ValueError as error:
            results["unknown_revision"] = str(error)
    """)


@pytest.mark.slow
def test_memvp_config_vision_encoder_takes_a_hub_id(python_api):
    assert python_api["attached"] == "org/clip" and python_api["forward"] == [1, 5, 64]


@pytest.mark.slow
def test_an_adapter_recording_an_encoder_id_loads_it_again_from_the_cache(python_api):
    assert python_api["reloaded"] == "org/clip" and python_api["reload_warnings"] == []


@pytest.mark.slow
def test_an_encoder_id_is_recorded_with_the_commit_it_was_loaded_from(python_api):
    """A later upload under the same id is then not used silently: the reload above loaded that commit."""
    assert python_api["recorded_revision"] == CLIP_COMMIT


@pytest.mark.slow
def test_a_new_config_naming_an_id_missing_from_the_cache_is_refused(python_api):
    assert python_api["missing"].startswith("MemVP: vision encoder 'org/no-clip' is not a local folder")
    assert "not in the Hugging Face cache" in python_api["missing"]


@pytest.mark.slow
def test_a_recorded_encoder_id_missing_from_the_cache_warns_and_the_adapter_still_loads(python_api):
    assert python_api["recorded_missing_attached"] is False
    (warning,) = python_api["recorded_missing_warnings"]
    assert "not in the Hugging Face cache" in warning and "attach_vision_encoder" in warning


@pytest.mark.slow
def test_load_vision_encoder_passes_the_revision(python_api):
    assert python_api["pinned"] == "org/clip"
    assert "at revision 'v2'" in python_api["unknown_revision"]


@pytest.mark.slow
def test_a_hub_ids_image_processor_is_the_repos_own(python_api):
    assert python_api["repo_processor_size"] == 32  # the repo's own, not CLIP defaults sized to the encoder's 48


@pytest.mark.slow
def test_processor_files_missing_from_the_cache_offline_are_an_error_not_clip_defaults(python_api):
    error = python_api["processor_not_cached"]
    assert error.startswith("the image processor of 'org/llm' is not in the Hugging Face cache")
    assert "would silently replace" in error and "hf download org/llm" in error


def test_a_name_that_is_neither_a_folder_nor_a_hub_id_says_what_to_pass():
    with pytest.raises(ValueError, match=r"model_name_or_path './nope' is not a local folder, nor a Hub id of the "
                                         r"form 'org/name'; pass a local Hugging Face model folder .* or a Hub"):
        check_model_source("./nope")


def test_a_file_is_not_a_model_source(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"'.*weights\.bin' is a file, not a model folder"):
        check_model_source(str(tmp_path / "weights.bin"))


@pytest.mark.parametrize("name, expected", [("org/name", True), ("name", True), ("./name", False),
                                            ("/abs/org/name", False), ("a/b/c", False), ("org/..x", False)])
def test_what_counts_as_a_hub_id(name, expected):
    assert is_hub_id(name) is expected


def test_an_existing_folder_is_never_a_hub_id(tmp_path, monkeypatch):
    """As transformers: a folder `org/name` under the working folder is read, not looked up on the Hub."""
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert is_hub_id("org/name") is False
