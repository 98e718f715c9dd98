"""Teach the installed peft about the `MEMVP` peft type.

peft's `register_peft_method` only accepts names that already exist in its `PeftType` enum, and an out-of-tree
package cannot edit that enum's source. We therefore add one member to the live enum (the same bookkeeping the enum
machinery does for members declared in the class body) and then call the official registration function, so that
`get_peft_model`, `PeftConfig.from_pretrained` and `PeftModel.from_pretrained` dispatch to MemVP like any built-in
method. Kept deliberately tiny: everything here is exercised by `tests/test_registration.py`.
"""

from __future__ import annotations

from peft.utils.peft_types import PeftType

MEMVP_NAME = "MEMVP"


def _add_peft_type_member(name: str) -> PeftType:
    """Return `PeftType[name]`, adding it to the live enum first when this peft release does not know it."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__init__(name)
    # Same bookkeeping as `EnumType.__new__` performs for members declared in the class body.
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    type.__setattr__(PeftType, name, member)
    return member


MEMVP_PEFT_TYPE = _add_peft_type_member(MEMVP_NAME)


def register_memvp() -> None:
    """Register `MemVPConfig`/`MemVPModel` with peft (idempotent: importing the package twice is harmless)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.utils import register_peft_method

    from .config import MemVPConfig
    from .model import MemVPModel

    if PEFT_TYPE_TO_CONFIG_MAPPING.get(MEMVP_PEFT_TYPE) is MemVPConfig:
        return
    register_peft_method(name=MEMVP_NAME.lower(), config_cls=MemVPConfig, model_cls=MemVPModel, prefix=MemVPModel.prefix)
