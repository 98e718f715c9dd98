"""`memvp-infer --explain DIR`: read maps of every answered image and the page that shows them; refusals before any
model loads."""

from __future__ import annotations

import os

import pytest

from memvp_peft.cli.infer import main as infer_main
from memvp_peft.cli.train import main as train_main


@pytest.mark.slow
def test_explain_writes_a_map_per_answer_token_and_the_page(tmp_path, capsys):
    run = tmp_path / "run"
    assert train_main(["--quick", "--output_dir", str(run)]) == 0
    maps = tmp_path / "maps"
    assert infer_main(["--adapter", str(run), "--image", "digits:0", "digits:7", "--explain", str(maps),
                       "--explain_layers", "1"]) == 0
    files = sorted(os.listdir(maps))
    assert "index.html" in files and {"answer0000-image.png", "answer0001-mean.png"} <= set(files)
    assert any(name.startswith("answer0001-token") for name in files)
    page = (maps / "index.html").read_text()
    assert page.count('<section class="answer"') == 2 and "layers [1]" in page
    assert "wrote the read maps" in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [
    (["--explain", "{full}"], "not empty"),
    (["--explain", "{file}"], "is a file"),
    (["--explain_layers", "0"], "pass --explain DIR too"),
    (["--explain", "{new}", "--explain_layers", "a,b"], "comma-separated"),
    (["--explain", "{new}", "--dataset", "scienceqa:x"], "one or the other"),
])
def test_an_explain_request_that_cannot_be_met_is_refused_before_loading(tmp_path, capsys, flags, message):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "old.png").write_bytes(b"x")
    (tmp_path / "file").write_text("x")
    paths = {"full": tmp_path / "full", "file": tmp_path / "file", "new": tmp_path / "new"}
    flags = [flag.format(**paths) for flag in flags]
    image = [] if "--dataset" in flags else ["--image", "digits:0"]
    assert infer_main(["--adapter", str(tmp_path / "no-adapter"), *image, *flags]) == 2
    assert message in capsys.readouterr().err
    assert os.listdir(tmp_path / "full") == ["old.png"] and not (tmp_path / "new").exists()
