"""The shell commands of README.md and docs/*.md run as written, one page at a time, in the order a reader meets them.

Each page runs in an empty folder. What the docs say the reader brings -- `my_digit.png`, a `questions.jsonl`, a
local `./llama` or `./t5`, a `./clip` encoder, LLaVA data under `data/` -- is made there, tiny, when a command first
names it. Every `memvp-train` gets `--max_steps 2 --max_eval_samples 4` appended (flags given later win), so a page
takes seconds; everything else is the command as printed. A documented command that does not run here is listed in
`NOT_RUN` with the reason, and a listing that matches no documented command any more fails, so the list stays honest.
"""

from __future__ import annotations

import json
import pathlib
import re
import shlex

import numpy as np
import pytest
import torch

from memvp_peft.bench import main as bench_main
from memvp_peft.cli.infer import main as infer_main
from memvp_peft.cli.seeds import main as seeds_main
from memvp_peft.cli.train import main as train_main
from memvp_peft.demo_models import build_word_tokenizer, tiny_clip, tiny_llama

ROOT = pathlib.Path(__file__).resolve().parents[2]
PAGES = ["README.md", *(f"docs/{path.name}" for path in sorted((ROOT / "docs").glob("*.md")))]
PROGRAMS = {"memvp-train": train_main, "python -m memvp_peft.train": train_main, "memvp-infer": infer_main,
            "python -m memvp_peft.infer": infer_main, "memvp-bench": bench_main,
            "python -m memvp_peft.bench": bench_main, "python -m memvp_peft.cli.seeds": seeds_main}
TRAINING = (train_main, seeds_main)
MENTION = re.compile(r"memvp-(train|infer|bench)|python -m memvp_peft")
STEP_CAP = ["--max_steps", "2", "--max_eval_samples", "4"]

#: a documented command that does not run here (the first pattern found in it) -> why
NOT_RUN = {
    "pip install": "installs the package; the test runs in the installed environment",
    "my_run.yaml": "the reader's own YAML file: what it trains is theirs to choose",
    "run.yaml": "the reader's own YAML file: what it trains is theirs to choose",
    "infer.yaml": "the reader's own YAML file",
    "meta-llama/": "Hub ids: no download in tests (tests/cli/test_hub_ids.py covers Hub ids from a cache)",
    "org/memvp-adapter": "a Hub id: no download in tests (tests/cli/test_hub_ids.py)",
    "runs/llava-memvp": "an adapter trained on the reader's own LLaVA data, made by no command of the page",
    "memvp_peft.cli.token_budget": "reads the ScienceQA fixture the line before writes to /tmp "
                                   "(tests/cli/test_token_budget.py runs it)",
    "scienceqa": "ScienceQA's 7B recipe and its data (tests/cli/test_scienceqa_*.py run it on a fixture)",
    "/path/to/": "a placeholder path",
    "python -m memvp_peft.bench --": "minutes-long measurements that write docs/benchmarks (tests/bench runs them "
                                     "with --quick)",
    "memvp_peft/bench/gpu.sh": "the prepared GPU run: needs a CUDA GPU",
    "/tmp/fc/": "the feature-cache timings: a CLIP folder the section's text makes, absolute /tmp paths",
    "memvp-bench --ablations --output_dir": "the full ablations (3 tasks x 11 variants x 3 seeds, ~6 min on two idle "
                                            "cores) that write docs/benchmarks/ablations; the page's --quick line runs",
    "--seeds 0 1 2 3 4": "a minutes-long ablation over five seeds (tests/bench/test_ablations.py runs the same code "
                         "with --quick)",
    "memvp_peft.cli.faithfulness": "a minutes-long measurement that writes docs/explain on fully trained adapters "
                                   "(tests/explain/test_faithfulness.py checks the read maps' faithfulness on a small one)",
}
#: pages whose commands use an adapter a command on another page made -> that command, run first
PAGE_SETUP = {"docs/inference.md": ["memvp-train"]}
QUESTION = "What digit is shown ?"


def documented_commands(page: str) -> list[str]:
    """The lines of the page's bash blocks that name one of the programs, continuation lines joined, in order."""
    text = (ROOT / page).read_text()
    lines = []
    for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if MENTION.search(line) and not line.lstrip().startswith("#"):
                lines.append(" ".join(line.split()))
    return lines


def _not_run_reason(line: str):
    return next((why for pattern, why in NOT_RUN.items() if pattern in line), None)


def _program(words: list[str]):
    for prefix, main in sorted(PROGRAMS.items(), key=lambda item: -len(item[0])):
        if words[: len(prefix.split())] == prefix.split():
            return main, words[len(prefix.split()):]
    return None, words


# ------------------------------------------------------------------------------------------------ what readers bring


def _digit_pngs(folder: pathlib.Path, names: list[str]) -> list[dict]:
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, name in enumerate(names):
        Image.fromarray((digits.images[index] * 15).astype(np.uint8)).save(folder / name)
        rows.append({"image": name, "question": QUESTION, "answer": str(digits.target[index])})
    return rows


def _word_tokenizer():
    return build_word_tokenizer([f"Question: {QUESTION}\nAnswer:"], [str(d) for d in range(10)])


def _llama(path: pathlib.Path) -> None:
    tokenizer = _word_tokenizer()
    tiny_llama(tokenizer, hidden_size=64).save_pretrained(path)
    tokenizer.save_pretrained(path)


def _t5(path: pathlib.Path) -> None:
    from transformers import T5Config, T5ForConditionalGeneration

    tokenizer = _word_tokenizer()
    torch.manual_seed(0)
    T5ForConditionalGeneration(T5Config(
        vocab_size=len(tokenizer), d_model=64, d_ff=128, num_layers=2, num_heads=2, d_kv=32,
        decoder_start_token_id=tokenizer.pad_token_id, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id)).save_pretrained(path)
    tokenizer.save_pretrained(path)


def _llava_json(path: pathlib.Path) -> None:
    rows = _digit_pngs(path.parent / "images", [f"d{i}.png" for i in range(16)])
    path.write_text(json.dumps([{"image": row["image"], "conversations": [
        {"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": row["answer"]}]} for row in rows]))


def _vqa_jsonl(path: pathlib.Path) -> None:
    rows = _digit_pngs(path.parent / "images", [f"d{i}.png" for i in range(16)])
    path.write_text("\n".join(json.dumps(row) for row in rows))


def _questions(path: pathlib.Path) -> None:
    _digit_pngs(path.parent, ["my_digit.png"])
    path.write_text(json.dumps({"image": "my_digit.png", "question": QUESTION}) + "\n"
                    + json.dumps({"image": "digits:3", "question": QUESTION}) + "\n")


USER_FILES = {
    "my_digit.png": lambda path: _digit_pngs(path.parent, [path.name]),
    "photo.png": lambda path: _digit_pngs(path.parent, [path.name]),
    "questions.jsonl": _questions,
    "./llama": _llama, "./llama-7b": _llama, "./t5": _t5, "./flan-t5-base": _t5,
    "./clip": lambda path: tiny_clip(hidden_size=32).save_pretrained(path),
    "./clip-vit-l14": lambda path: tiny_clip(hidden_size=32).save_pretrained(path),
    "./clip-vit-large-patch14": lambda path: tiny_clip(hidden_size=32).save_pretrained(path),
    "data/llava_instruct.json": _llava_json,
    "data/vqa.jsonl": _vqa_jsonl,
}


def _bring_user_files(words: list[str], folder: pathlib.Path) -> None:
    for word in words:
        if word in USER_FILES and not (folder / word).exists():
            USER_FILES[word](folder / word)


def _run(line: str, folder: pathlib.Path, capsys) -> None:
    main, argv = _program(shlex.split(line, comments=True))
    assert main is not None, f"{line!r} names a program the test does not know"
    _bring_user_files(argv, folder)
    if main in TRAINING and "--help" not in argv:
        argv = [*argv, *STEP_CAP]
    try:
        code = main(argv)
    except SystemExit as exit_info:  # --help
        code = exit_info.code
    output = capsys.readouterr()
    assert code in (0, None), f"{line!r} exited {code}:\n{output.err[-3000:]}"


# ---------------------------------------------------------------------------------------------------------- tests


def test_every_not_run_listing_matches_a_documented_command():
    documented = [line for page in PAGES for line in documented_commands(page)]
    stale = [pattern for pattern in NOT_RUN if not any(pattern in line for line in documented)]
    assert not stale, f"NOT_RUN lists commands no page documents any more: {stale}"


def test_every_documented_command_runs_here_or_says_why_not():
    unknown = [(page, line) for page in PAGES for line in documented_commands(page)
               if _not_run_reason(line) is None and _program(shlex.split(line, comments=True))[0] is None]
    assert not unknown, f"documented commands neither run nor listed in NOT_RUN: {unknown}"


@pytest.mark.slow
@pytest.mark.parametrize("page", [page for page in PAGES if any(
    _not_run_reason(line) is None for line in documented_commands(page))])
def test_a_pages_commands_run_in_order_as_written(page, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for line in PAGE_SETUP.get(page, []):
        _run(line, tmp_path, capsys)
    for line in documented_commands(page):
        if _not_run_reason(line) is None:
            _run(line, tmp_path, capsys)
