"""Name → factory registries for every plug-in family (models, datasets, data sources, transfer losses).

Registration happens by importing the module that defines the plug-in; `zsq/__init__.py` imports them all,
so the CLI sees every name before it builds its `choices`. A plug-in may declare a dataclass of options; the
CLI turns each field into a `--flag` (underscores become dashes) and the run's config.json records them.
"""
from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any, Callable, Generic, TypeVar

from .errors import UserError, deprecated

F = TypeVar("F", bound=Callable)


class Registry(Generic[F]):
    def __init__(self, family: str) -> None:
        self.family = family
        self._entries: dict[str, F] = {}
        self._options: dict[str, type | None] = {}
        self._aliases: dict[str, str] = {}  # a former name → the name it has now

    def register(self, name: str | None = None, options: type | None = None,
                 aliases: tuple[str, ...] = ()) -> Callable[[F], F]:
        """`aliases`: former names, still accepted for one release with a deprecation line."""
        def deco(fn: F) -> F:
            key = name or fn.__name__
            if key in self._entries or key in self._aliases or any(a in self._entries for a in aliases):
                raise ValueError(f"{self.family} '{key}' is registered twice")
            self._entries[key] = fn
            self._options[key] = options
            self._aliases.update(dict.fromkeys(aliases, key))
            return fn

        return deco

    def canonical(self, name: str, quiet: bool = False) -> str:
        """The name a plug-in has now: a former name is translated (with a deprecation line unless `quiet`, e.g.
        when reading a run made before the rename); an unknown one raises UserError."""
        if name in self._aliases:
            if not quiet:
                deprecated(f"the {self.family} name '{name}'", f"'{self._aliases[name]}'")
            return self._aliases[name]
        self.get(name)
        return name

    def renamed(self) -> dict[str, str]:
        """Former name → current name."""
        return dict(self._aliases)

    def get(self, name: str) -> F:
        try:
            return self._entries[self._aliases.get(name, name)]
        except KeyError:
            raise UserError(
                f"unknown {self.family} '{name}'; choose one of: {', '.join(self.names())}"
            ) from None

    def names(self, pattern: str = "*") -> list[str]:
        return sorted(k for k in self._entries if fnmatch.fnmatch(k, pattern))

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._aliases

    def options_class(self, name: str) -> type | None:
        self.get(name)
        return self._options[self._aliases.get(name, name)]

    def build_options(self, name: str, values: dict[str, Any]) -> Any:
        """The plug-in's options dataclass filled from `values` (keys it does not have are ignored)."""
        cls = self.options_class(name)
        if cls is None:
            return None
        own = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in own and v is not None})

    def all_options(self) -> dict[str, dataclasses.Field]:
        """Every option field of every plug-in, by name. Plug-ins that share a field name share its meaning
        (their defaults may differ: each plug-in keeps its own unless the user sets the option)."""
        out: dict[str, dataclasses.Field] = {}
        for cls in self._options.values():
            for f in dataclasses.fields(cls) if cls else ():
                out.setdefault(f.name, f)
        return out
