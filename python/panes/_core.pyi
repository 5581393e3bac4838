"""The Rust extension module; use the `panes` package instead."""

from typing import Any, final

import numpy as np

__all__ = ["Engine", "__version__"]
__version__: str

@final
class Engine:
    def __new__(
        cls,
        toml: str,
        origin: str = "<python>",
        backend: str | None = None,
        shards: int = 32,
        batch_rows: int = 65536,
        batch_age_ms: int = 50,
        read_copy: bool = True,
        max_keys: int | None = None,
        max_state_bytes: int | None = None,
    ) -> Engine: ...
    @property
    def backend(self) -> str: ...
    def to_toml(self) -> str: ...
    def views(self) -> list[dict[str, Any]]: ...
    def push(self, data: object, view: str | None = None) -> dict[str, Any]: ...
    def flush(self) -> None: ...
    def read(
        self,
        keys: object,
        view: str | None = None,
        at: int | None = None,
        features: list[str] | None = None,
    ) -> tuple[Any, int]: ...
    def read_all(
        self,
        view: str | None = None,
        at: int | None = None,
        features: list[str] | None = None,
    ) -> tuple[Any, int]: ...
    def read_numpy(
        self,
        keys: object,
        view: str | None = None,
        at: int | None = None,
        features: list[str] | None = None,
    ) -> tuple[np.ndarray[Any, np.dtype[np.float64]], list[str], int]: ...
    def backfill(
        self,
        events: object,
        spine: object,
        at_column: str = "ts",
        dead_letter: bool = False,
        service: str | None = None,
    ) -> tuple[Any, Any | None, dict[str, Any]]: ...
    def read_service(self, service: str, request: object, at_column: str = "ts") -> Any: ...
    def services(self) -> list[dict[str, Any]]: ...
    def metrics(self) -> dict[str, dict[str, Any]]: ...
