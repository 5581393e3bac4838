"""Exceptions raised by Panes.

Every error is a :class:`PanesError`; the subclass says what went wrong and carries
the details as attributes (which view, column, feature or key). Each also derives
from the closest built-in exception, so ``except ValueError`` / ``except KeyError``
keep working.
"""

from __future__ import annotations

from typing import Any


class PanesError(Exception):
    """Base class of every Panes error.

    ``domain`` says who has to act: ``"user"`` (fix the call or the data),
    ``"external"`` (a file or device; retrying may help) or ``"internal"`` (a bug).
    """

    domain: str = "user"

    def __init__(self, message: str, **attrs: Any) -> None:
        super().__init__(message)
        self.message = message
        for k, v in attrs.items():
            setattr(self, k, v)

    def __str__(self) -> str:
        return self.message

    @property
    def retryable(self) -> bool:
        """Whether the same call may succeed when retried."""
        return self.domain == "external"


class SpecError(PanesError, ValueError):
    """Invalid feature definitions.

    ``origin`` names where they came from; ``issues`` lists every problem as
    ``(location, field, message)``, e.g.
    ``('view "cards" feature "amount_mean"', "window", 'bad duration "5x": ...')``.
    """

    origin: str
    issues: list[tuple[str, str, str]]


class SchemaError(PanesError, ValueError):
    """Pushed data lacks a column a view needs, or has one of the wrong type.

    No row of it was aggregated; its rows are counted as rejected (``schema``).
    Attributes: ``view``, ``column``.
    """

    view: str
    column: str


class DataError(PanesError, ValueError):
    """Invalid arguments or values: keys of an unsupported type, a spine without its
    time column, data that fits no view, …"""


class UnknownViewError(PanesError, KeyError):
    """No view has this name. Attribute: ``name``."""

    name: str


class UnknownFeatureError(PanesError, KeyError):
    """The view has no feature of this name. Attributes: ``view``, ``name``."""

    view: str
    name: str


class InexactReadError(PanesError, ValueError):
    """A read at a past time cannot be answered exactly from the panes held (use
    ``Engine.backfill`` for history). Attributes: ``view``, ``key``, ``at``."""

    view: str
    key: str
    at: int


class PanesFileError(PanesError, OSError):
    """A file could not be read or written. Attribute: ``path``."""

    domain = "external"
    path: str


class BackendError(PanesError, RuntimeError):
    """The compute backend failed or is unavailable (e.g. ``backend="gpu"`` on a
    machine without an adapter)."""

    domain = "external"


class InternalError(PanesError, RuntimeError):
    """A bug in Panes; please report it with the message."""

    domain = "internal"


__all__ = [
    "BackendError",
    "DataError",
    "InexactReadError",
    "InternalError",
    "PanesError",
    "PanesFileError",
    "SchemaError",
    "SpecError",
    "UnknownFeatureError",
    "UnknownViewError",
]
