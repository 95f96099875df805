"""The whole Kubernetes-mode stack on one machine, for end-to-end tests, the demo and the
benchmark: an XFS reflink loop filesystem, the real control plane, deploy/ applied, our node
plugin and controller (each under its own service account's token), csi-provisioner, and a
PostgreSQL 'CNPG instance' whose data directory is a pg-reflinker volume.

Only kubelet (NodePublishVolume, CSINode, the Node object) and CNPG (the Pod and its status, the
secrets) are played."""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import urllib3
from kubernetes import client, dynamic

from csi import csi_pb2, csi_pb2_grpc
from reflinker_csi import TOPOLOGY_KEY
from tests.conftest import MOUNT_RW, ROOT, Filesystem
from tests.e2e.cluster import ControlPlane, load_manifests, reference_grant_crd
from tests.pgserver import Certificates, PostgresServer, chown_postgres, free_port

DEPLOY = ROOT / "deploy"
NODE = "node-a"
NS = "apps"


def wait_for(what: str, check: Callable[[], Any], timeout: float = 30, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


@dataclass
class Cluster:
    plane: ControlPlane
    fs: Filesystem
    prefix: Path
    kubelet: Path
    node_socket: Path
    controller_socket: Path
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    commands: dict[str, tuple[list[str], dict[str, str]]] = field(default_factory=dict)
    # /metrics of the driver processes, by process name
    metrics_ports: dict[str, int] = field(default_factory=dict)
    _metrics_token: str = ""

    def metrics(self, name: str) -> str:
        """/metrics of a driver process, read with the token of the chart's metrics reader."""
        if not self._metrics_token:
            self._metrics_token = self.token("pg-reflinker", "pg-reflinker-metrics")
        response = self.metrics_response(name, self._metrics_token)
        assert response.status == 200, response.data
        return str(response.data.decode())

    def metrics_response(self, name: str, token: str = "") -> urllib3.BaseHTTPResponse:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        port = self.metrics_ports[name]
        return urllib3.request(
            "GET", f"http://127.0.0.1:{port}/metrics", headers=headers, timeout=10
        )

    def token(self, namespace: str, service_account: str) -> str:
        """A fresh token of a service account (TokenRequest), as a pod would mount it."""
        request = client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=3600)
        )
        made = self.core.create_namespaced_service_account_token(
            service_account, namespace, request
        )
        return str(made.status.token)

    def spawn(self, name: str, args: list[str], env: dict[str, str]) -> None:
        self.commands[name] = (args, env)
        with open(self.plane.work / f"{name}.log", "ab") as log:
            self.processes[name] = subprocess.Popen(
                args, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT
            )

    def stop_process(self, name: str) -> None:
        proc = self.processes[name]
        proc.terminate()
        proc.wait(timeout=30)

    def restart(self, name: str) -> None:
        self.spawn(name, *self.commands[name])

    def restart_controller(self, env: dict[str, str] | None = None) -> None:
        """The controller (with another environment if given); its sidecars exit with it, so
        they restart."""
        if self.processes["controller"].poll() is None:
            self.stop_process("controller")
        args, current = self.commands["controller"]
        self.spawn("controller", args, current if env is None else env)
        for sidecar in ("csi-provisioner", "csi-snapshotter"):
            self.stop_process(sidecar)
            self.restart(sidecar)

    @property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.plane.api_client())

    @property
    def custom(self) -> client.CustomObjectsApi:
        return client.CustomObjectsApi(self.plane.api_client())

    @property
    def node(self) -> csi_pb2_grpc.NodeStub:
        return csi_pb2_grpc.NodeStub(grpc.insecure_channel(f"unix://{self.node_socket}"))

    def log_tail(self, name: str, lines: int = 60) -> str:
        return self.plane.log_tail(name, lines)

    def pvc(
        self, name: str, source: str = "", size: str = "1Gi", namespace: str = NS
    ) -> client.V1PersistentVolumeClaim:
        spec = client.V1PersistentVolumeClaimSpec(
            access_modes=["ReadWriteOnce"],
            storage_class_name="pg-reflinker",
            resources=client.V1VolumeResourceRequirements(requests={"storage": size}),
        )
        if source:
            spec.data_source = client.V1TypedLocalObjectReference(
                api_group="", kind="PersistentVolumeClaim", name=source
            )
        return self.core.create_namespaced_persistent_volume_claim(
            namespace,
            client.V1PersistentVolumeClaim(metadata=client.V1ObjectMeta(name=name), spec=spec),
        )

    def wait_bound(
        self, name: str, timeout: float = 30, namespace: str = NS
    ) -> client.V1PersistentVolume:
        def bound() -> Any:
            pvc = self.core.read_namespaced_persistent_volume_claim(name, namespace)
            return pvc if pvc.status.phase == "Bound" else None

        try:
            pvc = wait_for(f"claim {namespace}/{name} to be Bound", bound, timeout)
        except AssertionError as err:
            raise AssertionError(
                f"{err}\n--- csi-provisioner ---\n"
                f"{self.log_tail('csi-provisioner', 30)}\n--- controller ---\n"
                f"{self.log_tail('controller', 30)}"
            ) from None
        return self.core.read_persistent_volume(pvc.spec.volume_name)

    def publish(self, pv: client.V1PersistentVolume, pod_uid: str) -> Path:
        """What kubelet does: create the pod's volume directory and call NodePublishVolume."""
        target = (
            self.kubelet
            / "pods"
            / pod_uid
            / "volumes"
            / "kubernetes.io~csi"
            / pv.metadata.name
            / "mount"
        )
        target.parent.mkdir(parents=True, exist_ok=True)
        self.node.NodePublishVolume(
            csi_pb2.NodePublishVolumeRequest(
                volume_id=pv.spec.csi.volume_handle,
                target_path=str(target),
                volume_capability=MOUNT_RW,
                volume_context=pv.spec.csi.volume_attributes,
            )
        )
        return target

    def unpublish(self, pv: client.V1PersistentVolume, target: Path) -> None:
        self.node.NodeUnpublishVolume(
            csi_pb2.NodeUnpublishVolumeRequest(
                volume_id=pv.spec.csi.volume_handle, target_path=str(target)
            )
        )

    def events_for(self, kind: str, name: str, namespace: str = NS) -> list[str]:
        events = self.core.list_namespaced_event(
            namespace, field_selector=f"involvedObject.kind={kind},involvedObject.name={name}"
        )
        return [
            f"{e.source.component if e.source else ''} {e.reason}: {e.message}"
            for e in events.items
        ]


def _apply(api: client.ApiClient, docs: list[dict[str, Any]], dry_run: bool) -> None:
    dyn = dynamic.DynamicClient(api)
    for doc in docs:
        resource = dyn.resources.get(api_version=doc["apiVersion"], kind=doc["kind"])
        namespace = doc["metadata"].get("namespace")
        kwargs: dict[str, Any] = {"dry_run": "All"} if dry_run else {}
        resource.create(body=doc, namespace=namespace, **kwargs)


def _driver_env(
    cluster: Cluster, kubeconfig: Path, socket: Path, namespace_path: str, name: str
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")}
    env.update(
        HOSTPATH_PREFIX=str(cluster.prefix),
        TARGET_ROOT=str(cluster.kubelet),
        CSI_ENDPOINT=f"unix://{socket}",
        NODE_ID=NODE,
        KUBECONFIG=str(kubeconfig),
        LOG_LEVEL="debug",
        PYTHONPATH=str(ROOT),
        NAMESPACE_PATH=namespace_path,
        STORAGE_CLASS="pg-reflinker,pg-reflinker-native",
        METRICS_PORT=str(cluster.metrics_ports.setdefault(name, free_port())),
        USAGE_INTERVAL="2",
    )
    return env


@contextlib.contextmanager
def running_stack(
    bin_dir: Path,
    disk: str = "8G",
    namespace_path: str = "templates",
    announce: Callable[[str], None] = lambda step: None,
) -> Iterator[Cluster]:
    """The whole stack on one machine; everything is stopped and removed on exit.
    announce(step) is called as each phase begins."""
    announce("make an XFS reflink filesystem on a sparse loop file")
    work = Path(tempfile.mkdtemp(prefix="pg-reflinker-e2e."))
    os.chmod(work, 0o755)
    fs = Filesystem("xfs", size=disk)
    os.chmod(fs.work, 0o755)  # PostgreSQL (user postgres) runs on hostPath volumes in there
    plane = ControlPlane(bin_dir, work / "plane")
    prefix, kubelet = fs.mnt / "pg-reflinker", work / "kubelet"
    prefix.mkdir()
    kubelet.mkdir()
    c = Cluster(plane, fs, prefix, kubelet, work / "node.sock", work / "controller.sock")
    try:
        announce("start etcd, kube-apiserver and kube-controller-manager")
        plane.start()
        admin = plane.api_client()
        announce("apply deploy/ (CRD, RBAC, CSIDriver, StorageClass; workloads as a dry run)")
        # Real: namespace, CRD, RBAC, CSIDriver, StorageClass. Dry run: the workloads.
        for name in (
            "namespace.yaml",
            "crd-reflinkvolume.yaml",
            "rbac.yaml",
            "admission-policy.yaml",
            "csidriver.yaml",
            "storageclass.yaml",
        ):
            _apply(admin, load_manifests(DEPLOY / name), dry_run=False)
        wait_for("the ReflinkVolume CRD", lambda: _crd_established(admin), 30)
        # What docs/install.md has users install for snapshots: external-snapshotter's CRDs
        # (snapshot-controller runs below as a process), then our VolumeSnapshotClass.
        for crd in sorted((bin_dir / "snapshot-crds").glob("snapshot.storage.k8s.io_*.yaml")):
            _apply(admin, load_manifests(crd), dry_run=False)
        wait_for(
            "the snapshot CRDs",
            lambda: all(
                _crd_established(admin, f"volumesnapshot{k}.snapshot.storage.k8s.io")
                for k in ("s", "contents", "classes")
            ),
            30,
        )
        _apply(admin, load_manifests(DEPLOY / "volumesnapshotclass.yaml"), dry_run=False)
        # What docs/install.md has users install for clones across namespaces.
        _apply(admin, load_manifests(reference_grant_crd(bin_dir)), dry_run=False)
        wait_for(
            "the ReferenceGrant CRD",
            lambda: _crd_established(admin, "referencegrants.gateway.networking.k8s.io"),
            30,
        )
        for name in ("controller.yaml", "node.yaml"):
            _apply(admin, load_manifests(DEPLOY / name), dry_run=True)
        core = client.CoreV1Api(admin)
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=NS)))
        enable_source_namespace(admin, NS)
        # kubelet and node-driver-registrar's part: the Node and its CSINode entry.
        core.create_node(
            client.V1Node(
                metadata=client.V1ObjectMeta(
                    name=NODE, labels={TOPOLOGY_KEY: NODE, "kubernetes.io/hostname": NODE}
                )
            )
        )
        client.StorageV1Api(admin).create_csi_node(
            client.V1CSINode(
                metadata=client.V1ObjectMeta(name=NODE),
                spec=client.V1CSINodeSpec(
                    drivers=[
                        client.V1CSINodeDriver(
                            name="pg-reflinker.csi", node_id=NODE, topology_keys=[TOPOLOGY_KEY]
                        )
                    ]
                ),
            )
        )
        announce("start reflinker-csi node and controller, and csi-provisioner")
        controller_kc = plane.service_account_kubeconfig("pg-reflinker", "pg-reflinker-controller")
        # The node plugin's pod, as the DaemonSet would make it on this node (nothing runs in
        # it: the plugin runs as a process here), so its token names the node as kubelet's
        # projected token does; deploy/admission-policy.yaml relies on that.
        node_pod = core.create_namespaced_pod(
            "pg-reflinker",
            client.V1Pod(
                metadata=client.V1ObjectMeta(name=f"pg-reflinker-node-{NODE}"),
                spec=client.V1PodSpec(
                    node_name=NODE,
                    service_account_name="pg-reflinker-node",
                    containers=[client.V1Container(name="node", image="pg-reflinker")],
                ),
            ),
        )
        node_kc = plane.service_account_kubeconfig("pg-reflinker", "pg-reflinker-node", node_pod)
        reflinker = [sys.executable, "-m", "reflinker_csi.cli"]
        c.spawn(
            "node",
            [*reflinker, "node"],
            _driver_env(c, node_kc, c.node_socket, namespace_path, "node"),
        )
        c.spawn(
            "controller",
            [*reflinker, "controller"],
            _driver_env(c, controller_kc, c.controller_socket, namespace_path, "controller"),
        )
        wait_for(
            "the driver sockets",
            lambda: c.node_socket.exists() and c.controller_socket.exists(),
            30,
        )
        # The flags both controller sidecars share: our controller's socket, its service
        # account, one instance each, quick retries, and room for them in the API client (with
        # 4 s retries, two hundred claims of the claim loop that csi-provisioner cannot serve
        # write an event each every few seconds; at its default 5 requests a second the backlog
        # outlives the claims by minutes).
        sidecar_flags = [
            f"--csi-address={c.controller_socket}",
            f"--kubeconfig={controller_kc}",
            "--leader-election=false",
            "--timeout=60s",
            "--retry-interval-start=1s",
            "--retry-interval-max=4s",
            "--kube-api-qps=100",
            "--kube-api-burst=200",
            "--v=3",
        ]
        c.spawn(
            "csi-provisioner",
            [
                str(bin_dir / "csi-provisioner"),
                *sidecar_flags,
                "--extra-create-metadata",
                "--feature-gates=Topology=true",
            ],
            {"PATH": os.environ["PATH"]},
        )
        c.spawn(
            "csi-snapshotter",
            [str(bin_dir / "csi-snapshotter"), *sidecar_flags, "--extra-create-metadata"],
            {"PATH": os.environ["PATH"]},
        )
        c.spawn(
            "snapshot-controller",
            [
                str(bin_dir / "snapshot-controller"),
                f"--kubeconfig={plane.admin_kubeconfig}",
                "--leader-election=false",
                "--retry-interval-start=1s",
                "--retry-interval-max=4s",
                "--v=3",
            ],
            {"PATH": os.environ["PATH"]},
        )
        wait_for("the default service account in apps", lambda: _has_sa(core, NS), 60)
        yield c
    finally:
        for proc in c.processes.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in c.processes.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        plane.stop()
        fs.close()
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            if line.split()[4].startswith(str(work)):
                subprocess.run(["umount", "-l", line.split()[4]], check=False)
        if os.environ.get("E2E_KEEP"):
            print(f"\nlogs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def _crd_established(api: client.ApiClient, name: str = "reflinkvolumes.pg-reflinker.csi") -> bool:
    try:
        crd = client.ApiextensionsV1Api(api).read_custom_resource_definition(name)
    except client.exceptions.ApiException:
        return False
    return any(
        c.type == "Established" and c.status == "True" for c in (crd.status.conditions or [])
    )


def _has_sa(core: client.CoreV1Api, ns: str) -> bool:
    try:
        core.read_namespaced_service_account("default", ns)
        return True
    except client.exceptions.ApiException:
        return False


@dataclass
class CnpgInstance:
    """What CNPG would have made: a PGDATA PVC, a running server on it, its Pod and secrets."""

    pvc: str
    pv: client.V1PersistentVolume
    target: Path
    server: PostgresServer
    certs: Certificates
    pod_uid: str

    def set_ready(self, cluster: Cluster, ready: bool) -> None:
        cluster.core.patch_namespaced_pod_status(
            self.pvc,
            NS,
            {
                "status": {
                    "phase": "Running",
                    "podIP": "127.0.0.1",
                    "podIPs": [{"ip": "127.0.0.1"}],
                    "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
                }
            },
        )


def start_cnpg(
    cluster: Cluster,
    scale: int = 2,
    name: str = "pg-xyz-1",
    announce: Callable[[str], None] = lambda step: None,
    pgbench_output: Any = subprocess.PIPE,
) -> CnpgInstance:
    """Play CNPG: a PGDATA claim of our StorageClass, published (playing kubelet), a TLS
    PostgreSQL on it with reflink_snapshot() and pgbench data, its secrets and its Pod."""
    announce(
        f"start PostgreSQL like a CNPG instance on claim {NS}/{name} (TLS, "
        "streaming_replica certificate, reflink_snapshot)"
    )
    cluster.pvc(name)
    pv = cluster.wait_bound(name)
    pod_uid = "0000aaaa-1111-4222-8333-444455556666"
    target = cluster.publish(pv, pod_uid)
    chown_postgres(target)
    certs = Certificates.create(cluster.plane.work / "certs", "pg-xyz", NS)
    os.chmod(certs.directory, 0o755)
    server = PostgresServer(
        volume=target, port=free_port(), socket_dir=cluster.plane.work / "sock", certs=certs
    )
    server.initdb()
    server.start()
    server.install_function()
    server.psql("CREATE DATABASE app")
    announce(f"load pgbench data, scale {scale} (about {scale * 15} MB)")
    if pgbench_output is subprocess.PIPE:
        server.pgbench("-i", "-s", str(scale), "-q")
    else:
        server.pgbench("-i", "-s", str(scale), "-q", stdout=pgbench_output, stderr=pgbench_output)
    create_cnpg_objects(cluster.core, NS, "pg-xyz", name, name, certs, str(target), server.port)
    instance = CnpgInstance(name, pv, target, server, certs, pod_uid)
    instance.set_ready(cluster, True)
    return instance


def set_pod_ready(core: client.CoreV1Api, ns: str, pod: str, ready: bool) -> None:
    """What kubelet reports for a running instance: Running, Ready, the pod IP."""
    core.patch_namespaced_pod_status(
        pod,
        ns,
        {
            "status": {
                "phase": "Running",
                "podIP": "127.0.0.1",
                "podIPs": [{"ip": "127.0.0.1"}],
                "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
            }
        },
    )


def enable_source_namespace(api: client.ApiClient, ns: str) -> None:
    """What docs/install.md has admins run for each source namespace: a RoleBinding that lets
    the controller read Secrets there."""
    client.RbacAuthorizationV1Api(api).create_namespaced_role_binding(
        ns,
        {
            "metadata": {"name": "pg-reflinker-source"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "pg-reflinker-source",
            },
            "subjects": [
                {
                    "kind": "ServiceAccount",
                    "name": "pg-reflinker-controller",
                    "namespace": "pg-reflinker",
                }
            ],
        },
    )


def create_cnpg_objects(
    core: client.CoreV1Api,
    ns: str,
    cluster_name: str,
    pod: str,
    claim: str,
    certs: Certificates | None,
    mount_path: str,
    port: int,
    wal: tuple[str, str] | None = None,
) -> None:
    """What CNPG creates for an instance: its secrets (once per cluster) and its Pod (with
    `wal` = (claim, mount path), a WAL volume as well)."""

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    if certs is not None:
        core.create_namespaced_secret(
            ns,
            client.V1Secret(
                metadata=client.V1ObjectMeta(name=f"{cluster_name}-ca"),
                type="Opaque",
                data={"ca.crt": b64(certs.read("ca.crt")), "ca.key": b64(certs.read("ca.key"))},
            ),
        )
        core.create_namespaced_secret(
            ns,
            client.V1Secret(
                metadata=client.V1ObjectMeta(name=f"{cluster_name}-replication"),
                type="kubernetes.io/tls",
                data={
                    "tls.crt": b64(certs.read("replication.crt")),
                    "tls.key": b64(certs.read("replication.key")),
                },
            ),
        )
    mounts = [("pgdata", claim, mount_path)] + ([("pg-wal", *wal)] if wal else [])
    core.create_namespaced_pod(
        ns,
        client.V1Pod(
            metadata=client.V1ObjectMeta(
                name=pod,
                labels={
                    "cnpg.io/cluster": cluster_name,
                    "cnpg.io/instanceName": pod,
                    "cnpg.io/podRole": "instance",
                    "cnpg.io/instanceRole": "primary",
                },
            ),
            spec=client.V1PodSpec(
                node_name=NODE,
                automount_service_account_token=False,
                containers=[
                    client.V1Container(
                        name="postgres",
                        image="postgres",
                        ports=[client.V1ContainerPort(name="postgresql", container_port=port)],
                        volume_mounts=[
                            client.V1VolumeMount(name=name, mount_path=path)
                            for name, _, path in mounts
                        ],
                    )
                ],
                volumes=[
                    client.V1Volume(
                        name=name,
                        persistent_volume_claim=(
                            client.V1PersistentVolumeClaimVolumeSource(claim_name=volume_claim)
                        ),
                    )
                    for name, volume_claim, _ in mounts
                ],
            ),
        ),
    )
    set_pod_ready(core, ns, pod, True)
