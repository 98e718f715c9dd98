"""`load_scienceqa`: both ScienceQA layouts become the same checked multiple-choice records."""

from __future__ import annotations

import json

import pytest

from memvp_peft.tasks.scienceqa import is_scienceqa_dataset, load_scienceqa
from scienceqa_fixture import problems, repository, write_hub_layout  # noqa: F401  (fixtures, found by name)


def test_the_repository_layout_gives_one_record_per_problem_of_the_split(repository, problems):
    records = load_scienceqa(repository, "test")
    expected = [pid for pid, p in problems.items() if p["split"] == "test"]
    assert [r["id"] for r in records] == expected
    first = records[0]
    assert first["question"] == problems[first["id"]]["question"]
    assert first["choices"] == problems[first["id"]]["choices"] and first["answer"] == problems[first["id"]]["answer"]


def test_image_problems_point_at_their_image_file_and_text_problems_have_none(repository):
    records = load_scienceqa(repository, "train")
    with_image = [r for r in records if r["has_image"]]
    without = [r for r in records if not r["has_image"]]
    assert with_image and without
    assert all(r["image"].endswith(f"images/train/{r['id']}/image.png") for r in with_image)
    assert all("image" not in r for r in without)


def test_captions_join_the_record_only_when_asked(repository):
    assert all("caption" not in r for r in load_scienceqa(repository, "test"))
    captioned = load_scienceqa(repository, "test", use_caption=True)
    assert {r["caption"] for r in captioned if r["has_image"]} == {"A handwritten digit."}
    assert {r["caption"] for r in captioned if not r["has_image"]} == {""}


def test_the_hub_layout_gives_the_same_problems_as_the_repository_layout(tmp_path, repository, problems):
    hub = write_hub_layout(tmp_path / "hub", problems)
    for split in ("train", "val", "test"):
        ours = load_scienceqa(hub, split)
        theirs = load_scienceqa(repository, split)
        keys = ("question", "choices", "answer", "hint", "subject", "grade", "has_image", "has_hint")
        assert [{k: r[k] for k in keys} for r in ours] == [{k: r[k] for k in keys} for r in theirs]
        assert all(isinstance(r["image"], dict) and r["image"]["bytes"] for r in ours if r["has_image"])


def test_the_scienceqa_prefix_is_recognised_and_accepted(repository):
    assert is_scienceqa_dataset(f"scienceqa:{repository}") and not is_scienceqa_dataset(str(repository))
    assert len(load_scienceqa(f"scienceqa:{repository}", "val")) == len(load_scienceqa(repository, "val"))


def test_an_unknown_split_is_refused_with_the_splits_there_are(repository):
    with pytest.raises(ValueError, match=r"unknown split 'dev'; pid_splits.json has \['test', 'train', 'trainval', 'val'\]"):
        load_scienceqa(repository, "dev")


def test_a_missing_image_file_is_refused_naming_the_problem(repository, problems):
    pid = next(pid for pid, p in problems.items() if p["split"] == "test" and p["image"])
    (repository / "images" / "test" / pid / "image.png").unlink()
    with pytest.raises(ValueError, match=rf"problem '{pid}': its image file .* is missing"):
        load_scienceqa(repository, "test")


def test_an_answer_outside_the_choices_is_refused_naming_the_problem(repository):
    data = json.loads((repository / "problems.json").read_text())
    pid = json.loads((repository / "pid_splits.json").read_text())["test"][0]
    data[pid]["answer"] = len(data[pid]["choices"])
    (repository / "problems.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=rf"problem '{pid}': 'answer' must be the index of one of its"):
        load_scienceqa(repository, "test")


def test_a_folder_of_neither_layout_is_refused(tmp_path):
    with pytest.raises(ValueError, match="neither problems.json .* nor parquet files"):
        load_scienceqa(tmp_path, "test")


@pytest.mark.parametrize("content, held", [
    ({"A handwritten digit.": "x"}, r"it holds an object with the keys \['A handwritten digit.'\]"),
    (["A handwritten digit."], "it holds a JSON list"),
    ({"captions": ["A handwritten digit."]}, r"it holds an object with the keys \['captions'\]"),
], ids=["no-captions-key", "a-list", "captions-not-an-object"])
def test_captions_json_of_another_layout_is_refused_naming_the_file(repository, content, held):
    """It gave every problem an empty caption: a run 'with captions' trained and scored without them."""
    (repository / "captions.json").write_text(json.dumps(content))
    layout = r'captions.json must hold {"captions": {problem id: caption text}}'
    with pytest.raises(ValueError, match=rf"{layout}.*{held}"):
        load_scienceqa(repository, "test", use_caption=True)


def test_captions_json_missing_image_problems_is_refused_naming_them(repository):
    data, pid = _first_image_problem(repository)
    captions = json.loads((repository / "captions.json").read_text())
    del captions["captions"][pid]
    (repository / "captions.json").write_text(json.dumps(captions))
    expected = rf"has no caption for 1 of the \d+ image problems of split 'test' \(e.g. \['{pid}'\]\)"
    with pytest.raises(ValueError, match=expected):
        load_scienceqa(repository, "test", use_caption=True)


def test_a_missing_captions_json_is_refused_naming_it(repository):
    (repository / "captions.json").unlink()
    with pytest.raises(ValueError, match=r"use_caption reads the image captions from .*captions.json, which is"):
        load_scienceqa(repository, "test", use_caption=True)


def test_captions_with_the_hub_layout_are_refused(tmp_path, problems):
    hub = write_hub_layout(tmp_path / "hub", problems)
    with pytest.raises(ValueError, match="use_caption needs captions.json"):
        load_scienceqa(hub, "test", use_caption=True)


def test_trainval_reads_each_problems_image_from_its_own_split_folder(repository):
    records = load_scienceqa(repository, "trainval")
    folders = {r["image"].split("/images/")[1].split("/")[0] for r in records if r["has_image"]}
    assert folders == {"train", "val"}


def _first_image_problem(repository, split="test"):
    data = json.loads((repository / "problems.json").read_text())
    pid = next(pid for pid in json.loads((repository / "pid_splits.json").read_text())[split] if data[pid]["image"])
    return data, pid


@pytest.mark.parametrize("name", ["../../../../etc/passwd", "/etc/passwd", "../{other}/image.png"])
def test_a_problem_image_leading_outside_its_folder_is_refused(name, repository):
    data, pid = _first_image_problem(repository)
    other = next(p for p in json.loads((repository / "pid_splits.json").read_text())["test"] if p != pid)
    data[pid]["image"] = name.format(other=other)
    (repository / "problems.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=rf"problem '{pid}': image path .* outside image_folder .*"
                                         r"allow_outside_image_folder"):
        load_scienceqa(repository, "test")


def test_allow_outside_image_folder_accepts_a_problem_image_elsewhere(repository):
    data, pid = _first_image_problem(repository)
    elsewhere = repository / "shared.png"
    (repository / "images" / "test" / pid / "image.png").rename(elsewhere)
    data[pid]["image"] = str(elsewhere)
    (repository / "problems.json").write_text(json.dumps(data))
    records = load_scienceqa(repository, "test", allow_outside_image_folder=True)
    assert next(r for r in records if r["id"] == pid)["image"] == str(elsewhere)


def test_a_hub_row_image_given_by_path_resolves_against_its_parquet_folder(tmp_path, problems):
    import pyarrow as pa
    import pyarrow.parquet as pq

    hub = write_hub_layout(tmp_path / "hub", problems)
    table = pq.read_table(hub / "data" / "test-00000-of-00001.parquet").to_pylist()
    first = next(i for i, row in enumerate(table) if row["image"])
    (hub / "data" / "scan.png").write_bytes(table[first]["image"]["bytes"])
    for path, expected in (("scan.png", None), ("../../outside.png", "outside image_folder")):
        table[first]["image"] = {"bytes": None, "path": path}
        pq.write_table(pa.Table.from_pylist(table), hub / "data" / "test-00000-of-00001.parquet")
        if expected is None:
            assert load_scienceqa(hub, "test")[first]["image"]["path"] == str(hub / "data" / "scan.png")
        else:
            with pytest.raises(ValueError, match=rf"test-00000-of-00001\.parquet: row {first}: .*{expected}"):
                load_scienceqa(hub, "test")
