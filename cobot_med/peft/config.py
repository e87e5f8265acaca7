"""The shared shape of every PEFT method's settings: a dataclass built from plain dicts."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, TypeVar

T = TypeVar("T", bound="PeftConfig")


@dataclasses.dataclass
class PeftConfig:
    """Base of every method's settings; subclasses check their values in ``__post_init__``."""

    @classmethod
    def from_dict(cls: type[T], options: Mapping[str, Any] | None = None) -> T:
        options = dict(options or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown option(s) {unknown}; known: {sorted(names)}")
        return cls(**options)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
