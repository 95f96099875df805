"""Who may read /metrics: a bearer token that the API server authenticates (TokenReview) and
authorizes for GET on the non-resource path /metrics (SubjectAccessReview), as kubelet and
controller-runtime's metrics filter do. The metrics name every claim with a volume on a node;
a pod in a tenant's namespace reads them only with a token the admin allowed."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict

from .api import JSON, SUBJECTACCESSREVIEWS, TOKENREVIEWS, ApiError, Kube
from .fields import obj, text, texts

log = logging.getLogger(__name__)
METRICS_PATH = "/metrics"
# An answer is kept this long per token (by its hash, never the token), and at most this many
# answers: a client sending random tokens costs two API requests a token, not a growing memory.
REVIEW_TTL_SECONDS = 60.0
MAX_REVIEWS = 1024


class TokenAuthorizer:
    def __init__(self, kube: Kube, ttl: float = REVIEW_TTL_SECONDS) -> None:
        self.kube = kube
        self.ttl = ttl
        self._lock = threading.Lock()
        self._answers: OrderedDict[str, tuple[bool, float]] = OrderedDict()

    def __call__(self, token: str) -> bool:
        key = hashlib.sha256(token.encode()).hexdigest()
        now = time.monotonic()
        with self._lock:
            cached = self._answers.get(key)
            if cached is not None and cached[1] > now:
                return cached[0]
        allowed = self._review(token)
        with self._lock:
            self._answers[key] = (allowed, now + self.ttl)
            self._answers.move_to_end(key)
            while len(self._answers) > MAX_REVIEWS:
                self._answers.popitem(last=False)
        return allowed

    def _review(self, token: str) -> bool:
        try:
            review = self.kube.create(
                TOKENREVIEWS,
                {
                    "apiVersion": "authentication.k8s.io/v1",
                    "kind": "TokenReview",
                    "spec": {"token": token},
                },
            )
            status = obj(review, "status")
            if status.get("authenticated") is not True:
                return False
            user = obj(status, "user")
            spec: JSON = {
                "user": text(user, "username"),
                "uid": text(user, "uid"),
                "groups": list(texts(user, "groups")),
                "nonResourceAttributes": {"path": METRICS_PATH, "verb": "get"},
            }
            given = obj(user, "extra")  # e.g. a pod-bound token's pod and node
            extra = {k: list(texts(given, k)) for k in given}
            if extra:
                spec["extra"] = extra
            answer = self.kube.create(
                SUBJECTACCESSREVIEWS,
                {
                    "apiVersion": "authorization.k8s.io/v1",
                    "kind": "SubjectAccessReview",
                    "spec": spec,
                },
            )
        except ApiError as err:
            # Refused for now (the answer is kept only as long as any other).
            log.warning("metrics: token review failed", extra={"fields": {"status": err.status}})
            return False
        return obj(answer, "status").get("allowed") is True
