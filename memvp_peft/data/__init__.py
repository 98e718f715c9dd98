"""Records -> batches: the data side of MemVP.

MemVP puts the image into the FFN *memory* of the language model, not into the token sequence, so the text of a
record is tokenized as plain text (any LLaVA ``<image>`` placeholder is removed, not expanded) and its images travel
beside it as ``pixel_values`` plus an ``image_mask``.  The modules follow a record through that path:

* ``formats``       -- dataset files -> records: ``load_llava_json`` (LLaVA conversations), ``load_jsonl``;
* ``conversations`` -- a record in any text layout -> its checked ``Dialogue`` (``record_dialogue``), with
  ``chat_layouts`` (TRL ``messages``, the_cauldron ``texts``) and ``multiple_choice`` (the authors' ScienceQA prompt);
* ``prompts``       -- the prompt template and ``build_prompt``, shared by training and generation;
* ``tokenization``  -- dialogues -> ids with answer-only labels (``IGNORE_INDEX``), truncation, padding;
* ``chat_template`` -- the same through the base's chat template, loss on the assistant turns;
* ``images``        -- any image form -> an RGB PIL image (``to_rgb_image``);
* ``image_batching``-- a batch's images (raw, or ``precomputed`` tensors) -> ``pixel_values``/``image_features``
  and ``image_mask``;
* ``tiling``, ``video`` -- a high-resolution image as the overview plus a grid of tiles (``image_grid``), a video file
  or frame list sampled to ``num_frames`` (``sample_frame_indices``): several images of the multi-image layout;
* ``collator``      -- ``MemVPDataCollator``, which puts those together for the ``Trainer`` and for ``generate``;
* ``digits``, ``tasks`` -- the command line's datasets: the built-in digits task (and its patch-token featurizer
  for the embedded model), ``load_task`` and answer scoring.
"""

from .collator import MemVPDataCollator
from .conversations import Dialogue, first_answer, record_dialogue
from .formats import load_jsonl, load_llava_json
from .images import to_rgb_image
from .multiple_choice import ANSWER_PHRASE, multiple_choice_prompt, multiple_choice_target
from .prompts import (
    DEFAULT_PROMPT_TEMPLATE,
    GPT_ROLES,
    HUMAN_ROLES,
    IMAGE_PLACEHOLDER,
    build_prompt,
    strip_image_placeholder,
)
from .tokenization import IGNORE_INDEX
from .video import sample_frame_indices

__all__ = [
    "ANSWER_PHRASE",
    "DEFAULT_PROMPT_TEMPLATE",
    "Dialogue",
    "GPT_ROLES",
    "HUMAN_ROLES",
    "IGNORE_INDEX",
    "IMAGE_PLACEHOLDER",
    "MemVPDataCollator",
    "build_prompt",
    "first_answer",
    "load_jsonl",
    "load_llava_json",
    "multiple_choice_prompt",
    "multiple_choice_target",
    "record_dialogue",
    "sample_frame_indices",
    "strip_image_placeholder",
    "to_rgb_image",
]
