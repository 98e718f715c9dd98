"""`--decode_compare`: MemVP's read path before and after issue 16, beside text-only, measured in one process."""

import json

import pytest
import torch

from memvp_peft import MemVPConfig, bench
from memvp_peft.bench.decode import forward_before_issue16
from memvp_peft.local_models import tiny_llama
from memvp_peft.tuner.layer import FFNMemoryLayer
from peft import get_peft_model


def test_the_read_path_before_issue_16_computes_what_the_current_one_does():
    """The yardstick is the same MemVP: bound to a layer, the old forward gives the current layer's output."""
    pm = get_peft_model(tiny_llama(vocab_size=64, hidden_size=64), MemVPConfig(visual_dim=16, num_memory_slots=8))
    pm.eval()
    ids, features = torch.randint(3, 64, (2, 5)), torch.randn(2, 5, 16)
    with torch.no_grad():
        torch.nn.init.normal_(pm.base_model.memvp_memory["default"].value_pos)
        now = pm(input_ids=ids, image_features=features).logits
        for layer in pm.modules():
            if isinstance(layer, FFNMemoryLayer):
                layer.forward = forward_before_issue16.__get__(layer)
        before = pm(input_ids=ids, image_features=features).logits
    torch.testing.assert_close(before, now, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_decode_compare_writes_medians_paired_ratios_and_profiles(tmp_path):
    report = bench.run(["--decode_compare", "--quick", "--repeats", "2", "--profile_point", "16", "16",
                        "--output_dir", str(tmp_path), "--no_progress"])
    data = json.loads((tmp_path / "decode_compare.json").read_text())
    assert [r["method"] for r in data["results"]] == ["memvp", "memvp_before", "text_lora"]
    assert all(len(r["samples_ms"]["decode"]) == 2 and r["decode_ms_per_token"] > 0 for r in data["results"])
    for key in ("now_over_text", "before_over_text", "now_over_before"):
        assert 0 < data["ratios"][key] < 10 and 0 < data["ratios"]["cpu_" + key] < 10
    assert data["meta"]["max_abs_logit_difference_before_vs_now"] < 1e-4
    assert len(data["read_forms_us"]) == 3 and all(us > 0 for us in data["read_forms_us"].values())
    assert (tmp_path / "decode_profile_memvp.txt").read_text().count("aten::") > 5
    assert (tmp_path / "decode_profile_text_lora.txt").is_file()
    assert "MemVP now / MemVP before" in (tmp_path / "decode_compare.md").read_text()
    assert report["paths"]["markdown"].endswith("decode_compare.md")
