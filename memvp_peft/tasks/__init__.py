"""The command line's datasets: what `--dataset` names, read into records, and how answers to them are scored.

`memvp_peft.data` takes records to batches whatever their source; this folder is where records come from and what a
run does with the answers:

* ``catalogue`` -- ``load_task``: `--dataset` -> a :class:`Task` of train and held-out records (the built-in digit
  tasks, ScienceQA, a LLaVA ``.json``, a ``.jsonl``, the sources ``datasets`` reads), and exact-match scoring of
  generated answers (``reference_answer``, ``normalise_answer``);
* ``files``     -- dataset files -> records: ``load_llava_json`` (LLaVA conversations) and ``load_jsonl``, their
  images checked as they load;
* ``sources``   -- what the ``datasets`` library reads: save_to_disk folders, parquet/arrow files, data folders, Hub
  ids;
* ``scienceqa`` -- ScienceQA in either of its layouts -> multiple-choice records, and its answers -> the paper's
  table (``scienceqa_scores``);
* ``digits``    -- scikit-learn's digit scans as the `digits` task and its long-context layouts, and the patch-token
  featurizer the embedded model reads them with (``DigitPatchFeaturizer``).

The folder sits above ``data`` (it builds records for the collator).  The one import from below is
``memvp_peft.data`` re-exporting the two file loaders under the names the API documentation shows; nothing in
``data`` uses them.
"""

from .catalogue import Task, load_task, normalise_answer, reference_answer
from .digits import DIGIT_QUESTION, DigitPatchFeaturizer, digit_scan_tokens
from .files import load_jsonl, load_llava_json
from .scienceqa import format_scores_table, is_scienceqa_dataset, load_scienceqa, scienceqa_scores

__all__ = [
    "DIGIT_QUESTION",
    "DigitPatchFeaturizer",
    "Task",
    "digit_scan_tokens",
    "format_scores_table",
    "is_scienceqa_dataset",
    "load_jsonl",
    "load_llava_json",
    "load_scienceqa",
    "load_task",
    "normalise_answer",
    "reference_answer",
    "scienceqa_scores",
]
