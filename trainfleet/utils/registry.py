"""A name -> factory registry that lists the valid names on a miss.

Entries may be given as ``"package.module:attr"`` strings so that optional
heavy backends (horovod, torchvision) are imported only when selected.
"""
from __future__ import annotations

import difflib
import importlib
from typing import Callable, Generic, Iterable, TypeVar

from trainfleet.utils.errors import UsageError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects (or lazy ``"module:attr"`` references).

    Args:
        kind: what the registry holds, used in error messages ("strategy").
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T | str] = {}

    def register(self, name: str, obj: T | str | None = None) -> Callable[[T], T] | None:
        """Register ``obj`` under ``name``; without ``obj`` return a decorator."""
        if obj is not None:
            self._entries[name] = obj
            return None

        def decorator(target: T) -> T:
            self._entries[name] = target
            return target

        return decorator

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def get(self, name: str) -> T:
        """Return the object registered as ``name``.

        Raises:
            UsageError: ``name`` is unknown; the message lists the valid names.
        """
        if name not in self._entries:
            raise UsageError(self.unknown_message(name, self.names()))
        entry = self._entries[name]
        if isinstance(entry, str):
            module, _, attr = entry.partition(":")
            entry = getattr(importlib.import_module(module), attr)
            self._entries[name] = entry
        return entry

    def unknown_message(self, name: str, valid: Iterable[str]) -> str:
        """``Unknown strategy 'dpp'. Available: [...]`` plus a close match when there is one."""
        valid = list(valid)
        message = f"Unknown {self.kind} {name!r}. Available: {valid}"
        close = difflib.get_close_matches(name, valid, n=1)
        return f"{message} HINT: did you mean {close[0]!r}?" if close else message
