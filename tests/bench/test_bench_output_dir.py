"""Where memvp-bench writes: never over the shipped docs/benchmarks results unless asked to."""

import os
import re
import shlex

from memvp_peft.bench.cli import parse_args

DOCS = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "benchmarks.md")


def test_default_output_dir_is_a_neutral_folder_not_the_shipped_results():
    """Run from the repository root, the old default `docs/benchmarks` overwrote the results the docs cite."""
    output_dir = os.path.normpath(parse_args([]).output_dir)
    assert output_dir == os.path.join("outputs", "memvp-bench")
    assert not output_dir.startswith("docs")


def test_documented_commands_that_write_docs_benchmarks_say_so_explicitly():
    """The reproduction commands in docs/benchmarks.md write where the page says because they pass --output_dir;
    every command that runs a measurement names its folder, so changing the default moved none of them."""
    text = open(DOCS).read().replace("\\\n", " ")
    commands = [line.split("#")[0] for line in text.splitlines()
                if re.match(r"\s*(python -m memvp_peft\.bench|memvp-bench)\b", line)]
    assert commands
    for command in commands:
        words = shlex.split(command)
        if "--help" in words or "..." in words:
            continue
        assert "--output_dir" in words, command


def test_abbreviated_flags_are_refused():
    """`--repeat 3` must not be taken for `--repeats 3` (argparse's prefix matching is off)."""
    import pytest

    from memvp_peft.bench.cli import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--repeat", "3"])
    assert parse_args(["--repeats", "3"]).repeats == 3
