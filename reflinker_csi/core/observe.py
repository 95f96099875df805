"""What the domain reports as it works (metrics listen here); no metrics library in the core."""

from __future__ import annotations

from typing import Protocol


class Recorder(Protocol):
    def volume_made(self, method: str, result: str, seconds: float) -> None:
        """A volume was made (method: hot, cold, empty, snapshot; result: OK or a CSI code)."""


class NoRecorder:
    def volume_made(self, method: str, result: str, seconds: float) -> None:
        pass
