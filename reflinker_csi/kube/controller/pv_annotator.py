"""Traceability on our PersistentVolumes: the GUID, the source claim, the claim and what a hot
copy is as of (LSN, time, source lag) as annotations, whoever created the PV
(external-provisioner or the claim loop)."""

from __future__ import annotations

import logging

from ...core.keys import (
    ANNOTATION_CLAIM,
    ANNOTATION_GUID,
    ANNOTATION_SOURCE_PVC,
    ANNOTATIONS_AS_OF,
    CTX_CLAIM,
    CTX_SOURCE_PVC,
)
from ..api import VOLUMES, ApiError, Kube
from ..model import PersistentVolume
from ..runtime import DONE, Informer, Requeue, Result

log = logging.getLogger(__name__)


class PvAnnotator:
    def __init__(self, kube: Kube, volumes: Informer, driver_name: str) -> None:
        self.kube = kube
        self.volumes = volumes
        self.driver_name = driver_name

    def reconcile(self, key: str) -> Result:
        value = self.volumes.get(key)
        if value is None:
            return DONE
        pv = PersistentVolume.of(value)
        if pv.driver != self.driver_name or not pv.handle:
            return DONE
        wanted = {ANNOTATION_GUID: pv.handle}
        if pv.attributes.get(CTX_SOURCE_PVC):
            wanted[ANNOTATION_SOURCE_PVC] = pv.attributes[CTX_SOURCE_PVC]
        # What a hot copy is as of, from its volume context (empty when unknown).
        wanted.update({k: pv.attributes[k] for k in ANNOTATIONS_AS_OF if pv.attributes.get(k)})
        if pv.claim is not None:
            wanted[ANNOTATION_CLAIM] = f"{pv.claim.namespace}/{pv.claim.name}"
        elif pv.attributes.get(CTX_CLAIM):
            wanted[ANNOTATION_CLAIM] = pv.attributes[CTX_CLAIM]
        missing = {k: v for k, v in wanted.items() if pv.meta.annotations.get(k) != v}
        if not missing:
            return DONE
        try:
            self.kube.merge_patch(VOLUMES, pv.meta.name, {"metadata": {"annotations": missing}})
        except ApiError as err:
            if err.status == 404:
                return DONE
            log.warning("cannot annotate PV %s: %s", pv.meta.name, err)
            return Requeue(10.0)
        return DONE
