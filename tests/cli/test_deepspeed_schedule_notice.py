"""memvp-train says when a DeepSpeed JSON's "scheduler" section replaces --lr_scheduler_type (the HF Trainer then
runs DeepSpeed's schedule and ignores the flag: a cosine asked for would silently decay linearly)."""

from __future__ import annotations

import json
from pathlib import Path

from memvp_peft.cli.train import deepspeed_schedule_notice

ROOT = Path(__file__).resolve().parents[2]


def test_a_config_with_a_scheduler_section_gets_a_notice_naming_both_schedules():
    notice = deepspeed_schedule_notice(str(ROOT / "integrations" / "deepspeed" / "zero2.json"), "cosine")
    assert notice is not None
    assert "(WarmupDecayLR)" in notice and "not --lr_scheduler_type cosine" in notice and "Delete the section" in notice


def test_a_config_without_one_gets_none(tmp_path):
    assert deepspeed_schedule_notice(str(ROOT / "examples" / "scienceqa_zero2.json"), "cosine") is None
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    assert deepspeed_schedule_notice(str(config), "linear") is None


def test_no_deepspeed_gets_none():
    assert deepspeed_schedule_notice(None, "cosine") is None
