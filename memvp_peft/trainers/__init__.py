"""TRL's trainers for MemVP (needs the `trl` extra: `pip install "memvp-peft[trl]"`).

* `MemVPSFTTrainer`: `trl.SFTTrainer` with MemVP's refusals and data path (`sft.py`).
* `MemVPDPOTrainer`: `trl.DPOTrainer` with images through `MemVPProcessor`, and the frozen initial adapter as the
  reference (`dpo.py`).

Plain `SFTTrainer` / `DPOTrainer` work too when given the right pieces; `docs/trl.md` shows both.
"""

from .dpo import MemVPDPOTrainer
from .sft import MemVPSFTTrainer

__all__ = ["MemVPDPOTrainer", "MemVPSFTTrainer"]
