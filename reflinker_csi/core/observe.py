"""What the domain reports as it works (metrics listen here); no metrics library in the core."""

from __future__ import annotations

from typing import Protocol


class Recorder(Protocol):
    def volume_made(self, method: str, result: str, seconds: float) -> None:
        """A volume was made (method: hot, cold, empty, snapshot; result: OK or a CSI code)."""

    def source_read(self, namespace: str, cluster: str, pod: str, lag: float | None) -> None:
        """A hot copy read its source's position: seconds behind production (None: unknown)."""


class NoRecorder:
    def volume_made(self, method: str, result: str, seconds: float) -> None:
        pass

    def source_read(self, namespace: str, cluster: str, pod: str, lag: float | None) -> None:
        pass
