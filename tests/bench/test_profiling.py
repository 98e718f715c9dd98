"""`--decode_compare`: MemVP's decode step beside text-only + LoRA's, measured in one process, with the memory read's
products timed alone and a profiled generate per method."""

import json

import pytest

from memvp_peft import bench


@pytest.mark.slow
def test_decode_compare_writes_medians_paired_ratios_and_profiles(tmp_path):
    report = bench.run(["--decode_compare", "--quick", "--repeats", "2", "--profile_point", "16", "16",
                        "--output_dir", str(tmp_path), "--no_progress"])
    data = json.loads((tmp_path / "decode_compare.json").read_text())
    assert [r["method"] for r in data["results"]] == ["memvp", "text_lora"]
    assert all(len(r["samples_ms"]["decode"]) == 2 and r["decode_ms_per_token"] > 0 for r in data["results"])
    assert 0 < data["ratios"]["memvp_over_text"] < 10 and 0 < data["ratios"]["cpu_memvp_over_text"] < 10
    assert len(data["read_forms_us"]) == 3 and all(us > 0 for us in data["read_forms_us"].values())
    assert (tmp_path / "decode_profile_memvp.txt").read_text().count("aten::") > 5
    assert (tmp_path / "decode_profile_text_lora.txt").is_file()
    assert "MemVP / text-only" in (tmp_path / "decode_compare.md").read_text()
    assert report["paths"]["markdown"].endswith("decode_compare.md")
