"""`Registry`: name -> class tables filled by decorators where the plug-in is defined (policies, predictors).

Duplicates are rejected; a failed lookup raises `UnknownNameError` listing the valid names.
"""

from __future__ import annotations

from .errors import UnknownNameError

__all__ = ["Registry"]


class Registry:
    """Args:
    kind: what is registered, for messages ("eviction policy").
    plural: its plural, for messages ("policies").
    suffix: appended to the list of valid names in the error (e.g. " (or 'none')").
    """

    def __init__(self, kind: str, plural: str, suffix: str = ""):
        self.kind, self.plural, self.suffix = kind, plural, suffix
        self._classes: dict[str, type] = {}

    def register(self, name: str):
        """Class decorator registering the class under `name` and setting its `name` attribute."""

        def deco(cls: type) -> type:
            if name in self._classes:
                raise ValueError(f"{self.kind} {name!r} is already registered ({self._classes[name].__name__})")
            cls.name = name
            self._classes[name] = cls
            return cls

        return deco

    def names(self) -> list[str]:
        return sorted(self._classes)

    def get(self, name: str) -> type:
        try:
            return self._classes[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; valid {self.plural}: {', '.join(self.names())}{self.suffix}"
            ) from None
