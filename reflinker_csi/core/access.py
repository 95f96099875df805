"""What a pg-reflinker volume (a directory on one node) can be used as, in both vocabularies that
ask: CSI's volume capabilities (rpc/capabilities.py) and a claim's access modes and volume mode
(the claim loop)."""

from __future__ import annotations

from .errors import InvalidArgument

BLOCK_UNSUPPORTED = (
    "block access is not supported: pg-reflinker volumes are directories (use mount)"
)
# A claim's access modes that one node serves.
CLAIM_MODES = ("ReadWriteOnce", "ReadWriteOncePod")


def mode_unsupported(name: str) -> str:
    return (
        f"access mode {name} is not supported: a volume lives on one node, so only "
        "single-node modes (ReadWriteOnce, ReadWriteOncePod, ReadOnlyOnce) work"
    )


def require_claim_servable(claim: str, access_modes: tuple[str, ...], volume_mode: str) -> None:
    """The checks CreateVolume makes, for a claim the claim loop provisions itself."""
    if volume_mode == "Block":
        raise InvalidArgument(f"claim {claim}: {BLOCK_UNSUPPORTED}; set volumeMode: Filesystem")
    for mode in access_modes:
        if mode not in CLAIM_MODES:
            raise InvalidArgument(f"claim {claim}: {mode_unsupported(mode)}")
