"""Helpers the component configs share for their start-up checks (no component imports here)."""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

from megatron_dga.errors import ConfigError


def flag_name(name: str) -> str:
    """A config field's flag: ``dga_eta`` -> ``--dga-eta``."""
    return "--" + name.replace("_", "-")


def refuse_without(given: Dict[str, Any], needed: str, consequence: str, add: Optional[str] = None,
                   flag: Callable[[str], str] = flag_name) -> None:
    """ConfigError when flags that only act together with ``needed`` were given without it.

    Args:
        given: field name -> value of the flags given explicitly (booleans: True).
        needed: the missing flag, e.g. "--save".
        consequence: what would happen (or not) if the run went on, e.g. "nothing is saved".
        add: the fix, when it is more than ``needed`` (e.g. "--save DIR").
        flag: a field name's flag, where a section spells some differently.
    """
    if not given:
        return
    names = ", ".join(flag(k) if v is True else f"{flag(k)} {v}" for k, v in given.items())
    them = "it" if len(given) == 1 else "them"
    raise ConfigError(f"{names} given without {needed}: {consequence}; add {add or needed} or drop {them}")
