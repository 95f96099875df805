"""Access to the Kubernetes API: plain JSON over the official client's authenticated connection.

Every object read here is parsed into the typed views of model.py at once, so the rest of the
package never handles untyped client objects or two casings of the same field. Failures are
ApiError; domain_error() turns one into the driver's error families with a message naming the
object."""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import cast
from urllib.parse import quote

import urllib3
from kubernetes import client, config

from ..core.errors import FailedPrecondition, ReflinkerError, Unavailable

log = logging.getLogger(__name__)

JSON = dict[str, object]


@dataclass(frozen=True)
class Resource:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool

    def path(self, namespace: str = "", name: str = "", sub: str = "") -> str:
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if self.namespaced and namespace:
            base += f"/namespaces/{quote(namespace, safe='')}"
        base += f"/{self.plural}"
        if name:
            base += f"/{quote(name, safe='')}"
        if sub:
            base += f"/{sub}"
        return base


PODS = Resource("", "v1", "pods", "Pod", True)
CLAIMS = Resource("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim", True)
VOLUMES = Resource("", "v1", "persistentvolumes", "PersistentVolume", False)
SECRETS = Resource("", "v1", "secrets", "Secret", True)
NODES = Resource("", "v1", "nodes", "Node", False)
EVENTS = Resource("", "v1", "events", "Event", True)
CSINODES = Resource("storage.k8s.io", "v1", "csinodes", "CSINode", False)
STORAGECLASSES = Resource("storage.k8s.io", "v1", "storageclasses", "StorageClass", False)
LEASES = Resource("coordination.k8s.io", "v1", "leases", "Lease", True)
# The consent of a source namespace to cross-namespace clones (the Gateway API's ReferenceGrant,
# which external-provisioner also honours for dataSourceRef.namespace).
REFERENCEGRANTS = Resource(
    "gateway.networking.k8s.io", "v1beta1", "referencegrants", "ReferenceGrant", True
)
# CloudNativePG's Cluster: read for its fenced instances.
VOLUMESNAPSHOTS = Resource(
    "snapshot.storage.k8s.io", "v1", "volumesnapshots", "VolumeSnapshot", True
)
CNPG_CLUSTERS = Resource("postgresql.cnpg.io", "v1", "clusters", "Cluster", True)
REFLINKVOLUMES = Resource("pg-reflinker.csi", "v1alpha1", "reflinkvolumes", "ReflinkVolume", False)
# Who may read /metrics: a bearer token, reviewed by the API server.
TOKENREVIEWS = Resource("authentication.k8s.io", "v1", "tokenreviews", "TokenReview", False)
SUBJECTACCESSREVIEWS = Resource(
    "authorization.k8s.io", "v1", "subjectaccessreviews", "SubjectAccessReview", False
)


class ApiError(Exception):
    def __init__(self, status: int, reason: str, message: str = "") -> None:
        super().__init__(f"{status} {reason}: {message}" if message else f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.message = message


def domain_error(err: ApiError, what: str) -> ReflinkerError:
    """The driver's error for an API failure while trying to <what>."""
    if err.status == 403:
        return FailedPrecondition(f"the service account may not {what}: check the RBAC in deploy/")
    if err.status in (0, 429, 500, 502, 503, 504):
        return Unavailable(f"the Kubernetes API server failed to {what} ({err}); retrying")
    return FailedPrecondition(f"cannot {what}: {err}")


class WatchHandle:
    """Lets another thread end a watch at once (shutdown), and keeps a closed one closed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._response: urllib3.BaseHTTPResponse | None = None
        self.closed = False

    def attach(self, response: urllib3.BaseHTTPResponse | None) -> bool:
        with self._lock:
            self._response = response
            return not self.closed

    @property
    def attached(self) -> bool:
        """A watch response is open (the request reached the server)."""
        with self._lock:
            return self._response is not None

    def close(self) -> None:
        with self._lock:
            self.closed = True
            response, self._response = self._response, None
        if response is not None:
            try:
                response.shutdown()
            except (AttributeError, OSError):
                response.close()


def parse_json(text: str) -> object:
    """A JSON document from an object's field (an annotation); ValueError when it is not."""
    loaded: object = json.loads(text)
    return loaded


class Kube:
    """A thread-safe JSON client for the resources above."""

    def __init__(self, api_client: client.ApiClient, request_timeout: float = 30.0) -> None:
        self._client = api_client
        self.request_timeout = request_timeout

    def with_timeout(self, request_timeout: float) -> Kube:
        """The same connection, each request ending after request_timeout (connect included)."""
        return Kube(self._client, request_timeout)

    # -- plumbing -------------------------------------------------------------------------

    def _send(
        self,
        method: str,
        path: str,
        query: Mapping[str, str] | None = None,
        body: object = None,
        content_type: str = "application/json",
        stream: bool = False,
        timeout: float | None = None,
    ) -> urllib3.BaseHTTPResponse:
        headers = {"Accept": "application/json", "Content-Type": content_type}
        limit = timeout or self.request_timeout
        request = self._client.param_serialize(
            method,
            path,
            query_params=list((query or {}).items()),
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        try:
            response = self._client.call_api(*request, _request_timeout=(min(10.0, limit), limit))
        except (urllib3.exceptions.HTTPError, OSError) as err:
            raise ApiError(0, "Unreachable", str(err)) from None
        raw = cast(urllib3.BaseHTTPResponse, response.response)
        if not 200 <= raw.status <= 299:
            data = raw.data
            try:
                message = str(json.loads(data).get("message", ""))
            except ValueError:
                message = data[:300].decode(errors="replace")
            raise ApiError(raw.status, raw.reason or "", message)
        if not stream:
            raw.read(cache_content=True)  # .data is the body from here on
        return raw

    def request(
        self,
        method: str,
        path: str,
        query: Mapping[str, str] | None = None,
        body: object = None,
        content_type: str = "application/json",
    ) -> JSON:
        data = self._send(method, path, query, body, content_type).data
        try:
            loaded = json.loads(data) if data else {}
        except ValueError as err:
            raise ApiError(0, "BadResponse", f"{method} {path}: not JSON ({err})") from None
        return cast(JSON, loaded) if isinstance(loaded, dict) else {}

    # -- verbs ----------------------------------------------------------------------------

    def get(self, res: Resource, name: str, namespace: str = "") -> JSON | None:
        try:
            return self.request("GET", res.path(namespace, name))
        except ApiError as err:
            if err.status == 404:
                return None
            raise

    def list(
        self, res: Resource, namespace: str = "", selector: str = ""
    ) -> tuple[list[JSON], str]:
        """Items and the list's resourceVersion (to watch from)."""
        query = {"labelSelector": selector} if selector else {}
        answer = self.request("GET", res.path(namespace), query)
        items = answer.get("items")
        meta = answer.get("metadata")
        version = meta.get("resourceVersion") if isinstance(meta, dict) else ""
        objects = (
            [cast(JSON, i) for i in items if isinstance(i, dict)] if isinstance(items, list) else []
        )
        return objects, str(version or "")

    def watch(
        self,
        res: Resource,
        version: str,
        selector: str = "",
        timeout_seconds: int = 300,
        handle: WatchHandle | None = None,
    ) -> Iterator[tuple[str, JSON]]:
        """Events (type, object) from version on, until the server ends the watch after
        timeout_seconds or handle.close() is called. A 410 Gone arrives as ApiError(410)."""
        handle = handle or WatchHandle()
        if handle.closed:
            return
        query = {
            "watch": "true",
            "resourceVersion": version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(timeout_seconds),
        }
        if selector:
            query["labelSelector"] = selector
        response = self._send("GET", res.path(), query, stream=True, timeout=timeout_seconds + 30.0)
        if not handle.attach(response):
            response.release_conn()
            return
        buffer = b""
        try:
            for chunk in response.stream(amt=None, decode_content=True):
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    kind, obj = str(event.get("type", "")), event.get("object")
                    if not isinstance(obj, dict):
                        continue
                    if kind == "ERROR":
                        raise ApiError(
                            int(obj.get("code") or 0),
                            str(obj.get("reason", "")),
                            str(obj.get("message", "")),
                        )
                    yield kind, cast(JSON, obj)
        except (urllib3.exceptions.HTTPError, OSError, ValueError) as err:
            if not handle.closed:
                raise ApiError(0, "WatchBroken", str(err)) from None
        finally:
            handle.attach(None)
            # Close the connection: the server ends the watch (a half-read one must not go
            # back to the pool).
            response.close()

    def create(self, res: Resource, body: JSON, namespace: str = "") -> JSON:
        return self.request("POST", res.path(namespace), body=body)

    def merge_patch(
        self, res: Resource, name: str, patch: JSON, namespace: str = "", status: bool = False
    ) -> JSON:
        return self.request(
            "PATCH",
            res.path(namespace, name, "status" if status else ""),
            body=patch,
            content_type="application/merge-patch+json",
        )

    def json_patch(
        self,
        res: Resource,
        name: str,
        ops: Sequence[JSON],
        namespace: str = "",
        status: bool = False,
    ) -> JSON:
        """RFC 6902 operations (an "add" replaces a whole member, where a merge patch would
        merge maps)."""
        return self.request(
            "PATCH",
            res.path(namespace, name, "status" if status else ""),
            body=ops,
            content_type="application/json-patch+json",
        )

    def replace(self, res: Resource, name: str, body: JSON, namespace: str = "") -> JSON:
        return self.request("PUT", res.path(namespace, name), body=body)

    def delete(self, res: Resource, name: str, namespace: str = "") -> None:
        try:
            self.request("DELETE", res.path(namespace, name))
        except ApiError as err:
            if err.status != 404:
                raise


def connect() -> Kube:
    """Credentials from KUBECONFIG when set, else the pod's service account."""
    try:
        if os.environ.get("KUBECONFIG"):
            config.load_kube_config(config_file=os.environ["KUBECONFIG"])
        else:
            config.load_incluster_config()
    except (config.ConfigException, OSError) as err:
        raise FailedPrecondition(
            f"no Kubernetes configuration ({err}); run inside a pod with a service account or "
            "set KUBECONFIG"
        ) from None
    return Kube(client.ApiClient())
