"""One small registry of named components.

Names are the same on the command line, in YAML recipes and inside checkpoints. A component is
added by decorating its class: ``@ATTENTIONS.register("luong-dot")``.
"""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

from nmtkit.errors import UsageError

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> class mapping for one kind of component (encoder, attention, window, ...)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, type[T]] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        """Class decorator that adds the class under ``name`` (and records the name on it)."""

        def add(cls: type[T]) -> type[T]:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._entries[name] = cls
            cls.registry_name = name  # type: ignore[attr-defined]
            return cls

        return add

    def get(self, name: str) -> type[T]:
        """The class registered as ``name``; unknown names fail with the list of valid ones."""
        try:
            return self._entries[name]
        except KeyError:
            raise UsageError(
                f"unknown {self.kind} '{name}'; choose one of: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries


ENCODERS: Registry = Registry("encoder")
ATTENTIONS: Registry = Registry("attention")
WINDOWS: Registry = Registry("window")
DECODERS: Registry = Registry("decoder")
BRIDGES: Registry = Registry("bridge")
