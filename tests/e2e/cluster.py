"""A real Kubernetes control plane for end-to-end tests: etcd, kube-apiserver (RBAC,
service-account tokens) and kube-controller-manager (the PV binder), built from the Go module
proxy by `make k8s-tools` (tests/tools/k8s). On its own it serves on loopback and tests play
kubelet; tests/e2e/onenode.py adds a real node around it."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

import urllib3
import yaml
from kubernetes import client

from tests.pgserver import free_port

ADMIN_TOKEN = "pg-reflinker-e2e-admin-token"


def reference_grant_crd(bin_dir: Path) -> Path:
    """The Gateway API's ReferenceGrant CRD, which `make k8s-tools` puts beside the binaries."""
    found = sorted((bin_dir / "gateway-crds").glob("referencegrants-*.yaml"))
    if not found:
        raise FileNotFoundError(
            f"no ReferenceGrant CRD in {bin_dir}/gateway-crds: run make k8s-tools"
        )
    return found[-1]


class ControlPlane:
    # Controllers that need a real node or a cloud are off unless a real node is there.
    WITHOUT_NODE = "*,-nodeipam,-nodelifecycle,-cloud-node-lifecycle,-route,-service"
    WITH_NODE = "*,-nodeipam,-cloud-node-lifecycle,-route,-service"

    def __init__(
        self,
        bin_dir: Path,
        work: Path,
        address: str = "127.0.0.1",
        controllers: str = WITHOUT_NODE,
        service_cidr: str = "10.96.0.0/24",
    ) -> None:
        self.bin = bin_dir
        self.work = work
        self.processes: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.api_port = free_port()
        self.address = address
        self.controllers = controllers
        self.service_cidr = service_cidr
        self.url = f"https://{address}:{self.api_port}"

    def _spawn(self, name: str, args: list[str]) -> None:
        # A session of its own: a terminal's Ctrl-C (SIGINT to the caller's process group) must
        # not stop etcd and kube-apiserver at once, which leaves the API server hanging on its
        # requests while the caller tears the cluster down through it; stop() ends them in order.
        log = open(self.work / f"{name}.log", "wb")  # noqa: SIM115 - the child owns it
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.processes.append((name, proc))
        log.close()

    def process(self, name: str) -> subprocess.Popen[bytes]:
        """The running daemon `name` (e.g. kube-apiserver), for faults injected into it."""
        return next(proc for each, proc in self.processes if each == name)

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.work / f"{name}.log"
        return (
            "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
            if path.exists()
            else ""
        )

    def start(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        sa_key, sa_pub = self.work / "sa.key", self.work / "sa.pub"
        subprocess.run(
            ["openssl", "genrsa", "-out", str(sa_key), "2048"], check=True, capture_output=True
        )
        subprocess.run(
            ["openssl", "rsa", "-in", str(sa_key), "-pubout", "-out", str(sa_pub)],
            check=True,
            capture_output=True,
        )
        (self.work / "tokens.csv").write_text(f"{ADMIN_TOKEN},admin,admin,system:masters\n")
        etcd_port, peer_port = free_port(), free_port()
        self._spawn(
            "etcd",
            [
                str(self.bin / "etcd"),
                "--name",
                "e2e",
                "--data-dir",
                str(self.work / "etcd"),
                "--listen-client-urls",
                f"http://127.0.0.1:{etcd_port}",
                "--advertise-client-urls",
                f"http://127.0.0.1:{etcd_port}",
                "--listen-peer-urls",
                f"http://127.0.0.1:{peer_port}",
                "--initial-advertise-peer-urls",
                f"http://127.0.0.1:{peer_port}",
                "--initial-cluster",
                f"e2e=http://127.0.0.1:{peer_port}",
                "--unsafe-no-fsync",
                "--log-level",
                "warn",
            ],
        )
        self._spawn(
            "kube-apiserver",
            [
                str(self.bin / "kube-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{etcd_port}",
                f"--bind-address={self.address}",
                f"--advertise-address={self.address}",
                f"--secure-port={self.api_port}",
                f"--cert-dir={self.work / 'pki'}",
                f"--token-auth-file={self.work / 'tokens.csv'}",
                "--authorization-mode=RBAC",
                "--service-account-issuer=https://kubernetes.default.svc",
                f"--service-account-key-file={sa_pub}",
                f"--service-account-signing-key-file={sa_key}",
                f"--service-cluster-ip-range={self.service_cidr}",
                "--allow-privileged=true",
                # exec, logs and port-forward reach kubelet at the node's IP, not its name.
                "--kubelet-preferred-address-types=InternalIP",
                "--enable-priority-and-fairness=false",
                # Keeps dataSourceRef.namespace on claims (alpha; the claim loop honours it
                # with the source namespace's ReferenceGrant).
                "--feature-gates=CrossNamespaceVolumeDataSource=true",
                "--v=1",
            ],
        )
        self.admin_kubeconfig = self.kubeconfig("admin", ADMIN_TOKEN)
        self._wait_ready()
        if not self.controllers:
            return  # API server and etcd only (the reconciler tests)
        self._spawn(
            "kube-controller-manager",
            [
                str(self.bin / "kube-controller-manager"),
                f"--kubeconfig={self.admin_kubeconfig}",
                f"--authentication-kubeconfig={self.admin_kubeconfig}",
                f"--authorization-kubeconfig={self.admin_kubeconfig}",
                "--leader-elect=false",
                "--use-service-account-credentials=false",
                f"--service-account-private-key-file={sa_key}",
                f"--root-ca-file={self.work / 'pki' / 'apiserver.crt'}",
                f"--controllers={self.controllers}",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                "--v=1",
            ],
        )

    def _wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        http = urllib3.PoolManager(cert_reqs="CERT_NONE")
        urllib3.disable_warnings()
        while True:
            for name, proc in self.processes:
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited:\n{self.log_tail(name)}")
            try:
                r = http.request(
                    "GET",
                    f"{self.url}/readyz",
                    headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                    timeout=2,
                )
                if r.status == 200:
                    return
            except urllib3.exceptions.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"kube-apiserver not ready:\n{self.log_tail('kube-apiserver')}")
            time.sleep(0.3)

    def kubeconfig(self, user: str, token: str) -> Path:
        path = self.work / f"{user}.kubeconfig"
        path.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "current-context": "e2e",
                    "clusters": [
                        {
                            "name": "e2e",
                            "cluster": {"server": self.url, "insecure-skip-tls-verify": True},
                        }
                    ],
                    "users": [{"name": user, "user": {"token": token}}],
                    "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": user}}],
                }
            )
        )
        os.chmod(path, 0o600)
        return path

    def api_client(self, token: str = ADMIN_TOKEN) -> client.ApiClient:
        cfg = client.Configuration()
        cfg.host = self.url
        cfg.verify_ssl = False
        cfg.api_key = {"authorization": f"Bearer {token}"}
        return client.ApiClient(cfg)

    def service_account_kubeconfig(
        self, namespace: str, name: str, pod: client.V1Pod | None = None
    ) -> Path:
        """A token of the service account; bound to pod when given, as a projected token in
        that pod is (the API server then adds the pod's node name to the token's user)."""
        core = client.CoreV1Api(self.api_client())
        bound = None
        if pod is not None:
            bound = client.V1BoundObjectReference(
                api_version="v1", kind="Pod", name=pod.metadata.name, uid=pod.metadata.uid
            )
        deadline = time.monotonic() + 60
        while True:
            try:
                token = core.create_namespaced_service_account_token(
                    name,
                    namespace,
                    client.AuthenticationV1TokenRequest(
                        spec=client.V1TokenRequestSpec(
                            audiences=[], expiration_seconds=7200, bound_object_ref=bound
                        )
                    ),
                )
                break
            except client.exceptions.ApiException:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        return self.kubeconfig(f"{namespace}-{name}", token.status.token)

    def stop(self) -> None:
        # One at a time, newest first: kube-apiserver shuts down cleanly only while etcd runs.
        for _, proc in reversed(self.processes):
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def load_manifests(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
