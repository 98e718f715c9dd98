"""The `MEMVP` member of peft's `PeftType` enum -- a leaf module, imported by the config and by registration.

peft's in-tree tuners own a member of `PeftType` declared in peft's source. An out-of-tree tuner cannot edit that
enum, and `peft.utils.register_peft_method` only accepts names that are already members. So this module adds the
one member to the live enum (the same bookkeeping `EnumType.__new__` does for members declared in the class body) and
nothing else: it imports no other part of memvp_peft, so `config -> peft_type` can never become a cycle. The
registration itself happens in `memvp_peft/tuner/__init__.py`, the way `peft/tuners/lora/__init__.py` registers LoRA.
"""

from __future__ import annotations

from peft.utils.peft_types import PeftType

MEMVP_NAME = "MEMVP"

#: The peft type as `adapter_config.json` stores it. peft looks a folder's `peft_type` up in a plain dict, so a
#: process that loads a MemVP adapter without `import memvp_peft` fails with `KeyError(<the stored name>)` -- the only
#: message peft lets a tuner word. Stored as the bare "MEMVP", that error says nothing; stored as this, it says what
#: to install and import. Both names are registered, so adapters saved either way load.
MEMVP_STORED_NAME = "MEMVP (pip install memvp-peft, then import memvp_peft before loading this adapter)"


def _add_peft_type_member(name: str) -> PeftType:
    """Return `PeftType[name]`, adding it to the live enum first when this peft release does not know it."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__init__(name)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    type.__setattr__(PeftType, name, member)
    return member


MEMVP_PEFT_TYPE = _add_peft_type_member(MEMVP_NAME)


def is_memvp_peft_type(stored: object) -> bool:
    """Whether an `adapter_config.json`'s `peft_type` names MemVP (either name it may be stored under)."""
    return stored in (MEMVP_NAME, MEMVP_STORED_NAME)
