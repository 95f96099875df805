"""Typed domain errors. Each family carries its CSI status code by name; rpc/server.py turns
the name into a gRPC status, and Kubernetes mode stores it on a record so a node's failure
reaches csi-provisioner with its own code.

Messages are written for the person who reads them in `kubectl describe pvc`: they name the
object and say what to do next.
"""

import errno


class ReflinkerError(Exception):
    """Base of every error the driver raises on purpose."""

    code = "INTERNAL"


class InvalidArgument(ReflinkerError):
    """A request field is missing or malformed."""

    code = "INVALID_ARGUMENT"


class NotFound(ReflinkerError):
    """The volume or source named in the request does not exist."""

    code = "NOT_FOUND"


class AlreadyExists(ReflinkerError):
    """A volume with this name exists and was created from an incompatible request."""

    code = "ALREADY_EXISTS"


class Aborted(ReflinkerError):
    """The call cannot proceed as asked now (a concurrent operation, a stale page token)."""

    code = "ABORTED"


class OperationInProgress(Aborted):
    """Another call is working on the same volume or name; the caller should retry."""


class StaleToken(Aborted):
    """A ListVolumes starting_token this driver did not issue."""


class FailedPrecondition(ReflinkerError):
    """The request is valid but the system is not in a state that allows it."""

    code = "FAILED_PRECONDITION"


class PermissionDenied(ReflinkerError):
    """The owner of the data has not allowed this copy (no ReferenceGrant)."""

    code = "PERMISSION_DENIED"


class OutOfRange(ReflinkerError):
    """A requested size cannot be satisfied."""

    code = "OUT_OF_RANGE"


class ResourceExhausted(ReflinkerError):
    """No node or no space can satisfy the request."""

    code = "RESOURCE_EXHAUSTED"


class Unavailable(ReflinkerError):
    """A dependency (the source server, the API server) cannot be reached now; retryable."""

    code = "UNAVAILABLE"


class DeadlineExceeded(ReflinkerError):
    """The operation ran out of time."""

    code = "DEADLINE_EXCEEDED"


class Unimplemented(ReflinkerError):
    """The driver does not offer this call."""

    code = "UNIMPLEMENTED"


# Specific errors callers may want to catch precisely.


class VolumeNotFound(NotFound):
    def __init__(self, volume_id: str, detail: str = "") -> None:
        suffix = f": {detail}" if detail else ""
        super().__init__(f"volume {volume_id!r} does not exist{suffix}")
        self.volume_id = volume_id


class VolumeInUse(FailedPrecondition):
    pass


class ReflinkUnsupported(FailedPrecondition):
    pass


class SourceUnavailable(Unavailable):
    pass


FAMILIES: tuple[type[ReflinkerError], ...] = (
    InvalidArgument,
    NotFound,
    AlreadyExists,
    Aborted,
    FailedPrecondition,
    PermissionDenied,
    OutOfRange,
    ResourceExhausted,
    Unavailable,
    DeadlineExceeded,
    Unimplemented,
)


def classify(exc: BaseException) -> ReflinkerError | None:
    """The domain error an exception stands for, or None for a bug."""
    if isinstance(exc, ReflinkerError):
        return exc
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ResourceExhausted(f"no space left: {exc}")
    return None


def from_code(code: str, message: str) -> ReflinkerError:
    """The domain error for a code stored by name (a record's status)."""
    for family in FAMILIES:
        if family.code == code:
            return family(message)
    return FailedPrecondition(message)
