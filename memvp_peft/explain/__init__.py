"""Read maps: what a MemVP model read from its visual memory for each answer token, and where that lies on the image.

* `record_reads(model)` (a context manager) records, for every reading FFN and adapter, the memory activations
  `a_j` of every token and the value norms `||V_j||` (`recording.py`); `exclude_slots(model, keep)` reads without the
  slots `keep` leaves out. Both install an observer on the layers only inside the block: off, nothing is recorded
  and nothing is left on the model.
* `explain(model, batch)` turns one teacher-forced forward of prompt + answer into per-answer-token reads
  (`answers.py`); `explain_records(model, collator, records, answers, tokenizer)` does it for records and places each
  slot on the record's own images through the adapter's layout (`layout.py`: patch grids, tiles and overview,
  frames, pooled and multiscale grids, several images per row).
* `pictures.py` draws the maps over the images (PNG), `report.py` writes the `index.html` that shows them
  (`memvp-infer --explain DIR`), `faithfulness.py` measures whether the maps point at what the answer depends on
  (deletion / insertion curves against random and least-read slots, and Integrated Gradients).
"""

from .answers import AnswerReads, answer_log_probs, explain
from .layout import ImageGeometry, SlotLayout, SlotRegion, box_share, image_maps, slot_layout
from .records import ExplainedAnswer, explain_records
from .recording import LayerRead, ReadRecord, exclude_slots, record_reads

__all__ = [
    "AnswerReads",
    "ExplainedAnswer",
    "ImageGeometry",
    "LayerRead",
    "ReadRecord",
    "SlotLayout",
    "SlotRegion",
    "answer_log_probs",
    "box_share",
    "exclude_slots",
    "explain",
    "explain_records",
    "image_maps",
    "record_reads",
    "slot_layout",
]
