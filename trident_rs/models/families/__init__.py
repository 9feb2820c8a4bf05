"""The model families, one module each (`trident_rs/models/families/<name>.py`, each defining
`FAMILY`), found by listing this package: adding a family is adding its module.

Importing a family module loads no torch (heavy imports happen inside its functions).
"""
from __future__ import annotations

import importlib
import pkgutil

from trident_rs.errors import ConfigError
from trident_rs.models.family import Family


def _discover() -> dict[str, Family]:
    found: dict[str, Family] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        family = importlib.import_module(f"{__name__}.{info.name}").FAMILY
        if family.name != info.name:
            raise ConfigError(f"family module {info.name!r} defines FAMILY named {family.name!r}")
        for spec in family.specs:
            if spec.family != family.name:
                raise ConfigError(f"family {family.name!r} lists model {spec.name!r} of family {spec.family!r}")
        found[family.name] = family
    return found


FAMILIES: dict[str, Family] = _discover()


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ConfigError(f"no model family {name!r}; have {sorted(FAMILIES)}") from None


__all__ = ["FAMILIES", "Family", "get_family"]
