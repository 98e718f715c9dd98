"""`memvp-infer --explain DIR`: the read maps of every answered image, and the page that shows them.

After the answers are generated, each record is read once more with its answer (`explain.records.explain_records`:
a teacher-forced forward under `record_reads`), and its pictures (`explain.pictures.save_answer_maps`) and a section
of `DIR/index.html` (`explain.report.write_report`) are written. Questions without an image have no map and are left
out of the page (it says how many). The folder is checked before any model loads: a run never replaces another
run's pictures.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence


def explain_layers(text: Optional[str]) -> Optional[list[int]]:
    """`--explain_layers 0,2` -> [0, 2]; None -> None (every layer)."""
    if text is None:
        return None
    try:
        layers = [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError as error:
        raise ValueError(f"--explain_layers must be comma-separated layer indices, e.g. 0,1; got {text!r}.") from error
    if not layers:
        raise ValueError(f"--explain_layers must name at least one layer, got {text!r}.")
    return layers


def check_explain_request(options: Any) -> None:
    """Refuse, before anything loads, an `--explain` that cannot be written or is not for this kind of run."""
    folder = options.explain
    if folder is None:
        if options.explain_layers is not None:
            raise ValueError("--explain_layers chooses the layers of the --explain maps; pass --explain DIR too.")
        return
    if options.dataset is not None:
        raise ValueError("--explain draws read maps of --image / --input_file answers; --dataset scores a whole "
                         "benchmark: pass one or the other.")
    explain_layers(options.explain_layers)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"--explain {folder} is a file; pass a folder (new or empty).")
    if os.path.isdir(folder) and os.listdir(folder):
        raise ValueError(f"--explain {folder} is not empty; pass a new or empty folder (the pictures of another run "
                         "are never replaced).")
    parent = os.path.dirname(os.path.abspath(folder))
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise ValueError(f"--explain {folder}: its parent folder {parent} does not exist or cannot be written.")


def write_read_maps(options: Any, model: Any, tokenizer: Any, collator: Any, records: Sequence[dict],
                    answers: Sequence[str], rows: Sequence[dict]) -> str:
    """The pictures and `index.html` of every answered record with an image, in `options.explain`; returns the
    page's path."""
    from tqdm.auto import tqdm

    from ..explain.pictures import save_answer_maps
    from ..explain.records import explain_records, record_sources
    from ..explain.report import write_report

    folder, layers = options.explain, explain_layers(options.explain_layers)
    os.makedirs(folder, exist_ok=True)
    chosen = [index for index, record in enumerate(records) if any(
        image is not None for image in record_sources(record, collator, f"record {index}")[0])]
    entries = []
    batch = options.batch_size
    for start in tqdm(range(0, len(chosen), batch), desc="read maps", disable=len(chosen) <= batch, leave=False):
        part = chosen[start:start + batch]
        explained = explain_records(model, collator, [records[i] for i in part], [answers[i] for i in part],
                                    tokenizer)
        for index, item in zip(part, explained):
            pictures = save_answer_maps(folder, f"answer{index:04d}", item, layers)
            row = rows[index]
            source = row["image"] if row["image"] is not None else row.get("video")
            entries.append({"source": source, "question": row["question"], "answer": row["answer"],
                            "log_prob": item.reads.answer_log_prob, "pictures": pictures})
    skipped = len(records) - len(chosen)
    which = "every layer" if layers is None else f"layers {layers}"
    note = (f"Adapter {options.adapter}. Each map: every slot's contribution |s a_j| ||V_j|| to the FFN output of the "
            f"position that produced the token, summed over {which}, spread over the slot's patch of the image."
            + (f" {skipped} question(s) without an image have no map." if skipped else ""))
    return write_report(folder, entries, note=note)
