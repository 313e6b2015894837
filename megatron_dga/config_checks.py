"""Helpers the component configs share for their start-up checks (no component imports here)."""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

from megatron_dga.errors import ConfigError


def flag_name(name: str) -> str:
    """A config field's flag: ``dga_eta`` -> ``--dga-eta``."""
    return "--" + name.replace("_", "-")


def refuse_without(
    given: Dict[str, Any],
    needed: str,
    consequence: str,
    add: Optional[str] = None,
    flag: Callable[[str], str] = flag_name,
) -> None:
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


class ReadOnlyOnceParsed:
    """Mixin of the job config's dataclasses: read-only once the job config is built (``freeze``).

    After that a change raises AttributeError naming the field; code that needs other values builds a
    changed copy (``dataclasses.replace``, which validates it again). Setting a field to the value it
    already holds is allowed: re-validating a copy re-resolves its defaults to the same values.
    """

    _frozen = False

    def __setattr__(self, name: str, value: Any) -> None:
        if self._frozen and not (name in self.__dict__ and _same(self.__dict__[name], value)):
            raise AttributeError(
                f"{type(self).__name__}.{name}: the job config is read-only once parsed; build a changed copy "
                "with dataclasses.replace"
            )
        object.__setattr__(self, name, value)

    def freeze(self) -> None:
        object.__setattr__(self, "_frozen", True)


def _same(a: Any, b: Any) -> bool:
    try:
        return type(a) is type(b) and bool(a == b)
    except (TypeError, ValueError):  # e.g. arrays: not a plain config value
        return False
