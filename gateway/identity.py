"""Who is calling: the client name and the limits and models that come with it."""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase


@dataclass(frozen=True, slots=True)
class Identity:
    """An authenticated caller. Built once per configured key (or per JWT subject)."""

    client: str
    rpm: int = 0
    burst: int = 0
    tpm: int = 0
    max_concurrent: int = 0
    models: tuple[str, ...] = ("*",)

    def allows(self, model: str) -> bool:
        """True when `model` matches one of this client's fnmatch patterns."""
        return any(p == "*" or fnmatchcase(model, p) for p in self.models)


ANONYMOUS = Identity(client="anonymous")
