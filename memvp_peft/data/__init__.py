"""Records -> batches: the data side of MemVP.

MemVP puts the image into the FFN *memory* of the language model, not into the token sequence, so the text of a
record is tokenized as plain text (any LLaVA ``<image>`` placeholder is removed, not expanded) and its images travel
beside it as ``pixel_values`` plus an ``image_mask``.  The modules follow a record through that path:

* ``conversations`` -- a record in any text layout (simple, LLaVA ``conversations``, TRL ``messages`` and
  ``prompt``/``completion``, the_cauldron ``texts``) -> its checked ``Dialogue`` (``record_dialogue``), and the
  prompt template with ``build_prompt``, shared by training and generation;
* ``multiple_choice`` -- the authors' ScienceQA prompt for records with ``choices``;
* ``tokenization``  -- dialogues -> ids with answer-only labels (``IGNORE_INDEX``), truncation, padding;
* ``chat_template`` -- the same through the base's chat template, loss on the assistant turns;
* ``images``        -- any image form -> an RGB PIL image (``to_rgb_image``), a dataset's image files checked as it
  loads, and a batch's images -> ``pixel_values``/``image_features`` and ``image_mask``;
* ``video``         -- a video file or frame list sampled to ``num_frames`` (``sample_frame_indices``): several
  images of the multi-image layout, like the tiles of a high-resolution image (``image_grid``, tiled by
  :mod:`memvp_peft.vision.tiling`, the one home of tiling for the model and the collator alike);
* ``collator``      -- ``MemVPDataCollator``, which puts those together for the ``Trainer`` and for ``generate``
  (precomputed ``pixel_values``/``image_features`` columns too).

Where records come from -- dataset files, the sources ``datasets`` reads, ScienceQA, the built-in digit tasks -- is
:mod:`memvp_peft.tasks`, one layer up: it builds records for this one.  Its two file loaders, ``load_jsonl`` and
``load_llava_json``, are re-exported here because user code that builds a collator reads its records with them
through ``memvp_peft.data``, the name the API documentation shows.
"""

from .collator import MemVPDataCollator
from .conversations import (
    DEFAULT_PROMPT_TEMPLATE,
    GPT_ROLES,
    HUMAN_ROLES,
    IMAGE_PLACEHOLDER,
    Dialogue,
    build_prompt,
    first_answer,
    record_dialogue,
    strip_image_placeholder,
)
from .images import to_rgb_image
from .multiple_choice import ANSWER_PHRASE, multiple_choice_prompt, multiple_choice_target
from .tokenization import IGNORE_INDEX
from .video import sample_frame_indices

# the one import of the layer above: the documented public names of the file loaders (see the docstring)
from ..tasks.files import load_jsonl, load_llava_json  # noqa: E402

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
