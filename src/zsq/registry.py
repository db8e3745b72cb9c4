"""Name → factory registries for every plug-in family (models, datasets, later generators and losses).

Registration happens by importing the module that defines the plug-in; `zsq/__init__.py` imports them all,
so the CLI sees every name before it builds its `choices`.
"""
from __future__ import annotations

import fnmatch
from typing import Callable, Generic, TypeVar

from .errors import UserError

F = TypeVar("F", bound=Callable)


class Registry(Generic[F]):
    def __init__(self, family: str) -> None:
        self.family = family
        self._entries: dict[str, F] = {}

    def register(self, name: str | None = None) -> Callable[[F], F]:
        def deco(fn: F) -> F:
            key = name or fn.__name__
            if key in self._entries:
                raise ValueError(f"{self.family} '{key}' is registered twice")
            self._entries[key] = fn
            return fn

        return deco

    def get(self, name: str) -> F:
        try:
            return self._entries[name]
        except KeyError:
            raise UserError(
                f"unknown {self.family} '{name}'; choose one of: {', '.join(self.names())}"
            ) from None

    def names(self, pattern: str = "*") -> list[str]:
        return sorted(k for k in self._entries if fnmatch.fnmatch(k, pattern))

    def __contains__(self, name: object) -> bool:
        return name in self._entries
