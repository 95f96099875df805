"""Typed domain errors. The gRPC layer maps each family to one status code (server.py).

Messages are written for the person who reads them in `kubectl describe pvc`: they name the
object and say what to do next.
"""


class ReflinkerError(Exception):
    """Base of every error the driver raises on purpose."""


class InvalidArgument(ReflinkerError):
    """A request field is missing or malformed."""


class NotFound(ReflinkerError):
    """The volume or source named in the request does not exist."""


class AlreadyExists(ReflinkerError):
    """A volume with this name exists and was created from an incompatible request."""


class Aborted(ReflinkerError):
    """The call cannot proceed as asked now (a concurrent operation, a stale page token)."""


class OperationInProgress(Aborted):
    """Another call is working on the same volume or name; the caller should retry."""


class StaleToken(Aborted):
    """A ListVolumes starting_token this driver did not issue."""


class FailedPrecondition(ReflinkerError):
    """The request is valid but the system is not in a state that allows it."""


class OutOfRange(ReflinkerError):
    """A requested size cannot be satisfied."""


class ResourceExhausted(ReflinkerError):
    """No node or no space can satisfy the request."""


class Unavailable(ReflinkerError):
    """A dependency (the source server, the API server) cannot be reached now; retryable."""


class DeadlineExceeded(ReflinkerError):
    """The operation ran out of time."""


class Unimplemented(ReflinkerError):
    """The driver does not offer this call."""


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
