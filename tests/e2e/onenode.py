"""A real Kubernetes cluster of one or more nodes on this machine, for the real-cluster tests,
the demo and the benchmark: etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
kube-proxy and kubelet (all built from the pinned k8s.io/kubernetes module in tests/tools/k8s),
Debian's containerd, runc and CNI bridge plugin, images built locally (tests/e2e/images.py), the
chart installed with helm (tests/e2e/values-test.yaml; or deploy/ through the test overlay,
tests/e2e/overlay), and the CloudNativePG operator.

Everything runs as host processes with its own state directories and high ports. The host is put
back as it was found on exit: processes are ended by PID, and every address, bridge, netns,
mount, cgroup, iptables chain, sysctl and directory the cluster made is removed or restored.

Several nodes: the first runs in the host's mount namespace; each other one runs its containerd
and kubelet in a mount namespace of its own, where its own kubelet root, XFS (or btrfs)
filesystem and pod log directories are mounted at the first node's paths, so one DaemonSet
serves every node and a clone can only reflink on its source's node. All nodes share the host's
network namespace: a node IP on `lo`, a pod bridge and /24 each, one kube-proxy. Cluster DNS is
CoreDNS (built from its Go module, COREDNS) as a host process. The other nodes start cordoned:
scenarios that spread over nodes uncordon them, and every other one runs on the first node.

Addresses (all created here, all local; nothing is routed off the machine, nothing masqueraded
to the outside): the node IP on `lo`, the pod network on its own bridge, the service network
(virtual, kube-proxy's iptables rules).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client

from tests.conftest import ROOT, Filesystem
from tests.e2e import images
from tests.e2e.cluster import ControlPlane, reference_grant_crd
from tests.pgserver import free_port
from tests.tools import chart

NODE = "pg-reflinker-test-node"
NODE_IP = "10.245.255.1"
SERVICE_CIDR = "10.96.0.0/24"
BRIDGE = "prlk-test0"
# Every node's pod network (a /24 each) and the cluster DNS address (CoreDNS, on lo).
CLUSTER_CIDR = "10.245.0.0/20"
DNS_IP = "10.245.255.10"
# The S3-compatible object store (versitygw over a directory, OBJECT_STORE) and its one bucket.
OBJECT_STORE_IP = "10.245.255.20"
BUCKET = "backups"
CLUSTER_DOMAIN = "cluster.local"
KUBELET_ROOT = Path("/var/lib/kubelet")
# The overlay's HOSTPATH_PREFIX: where the harness mounts its XFS reflink filesystem.
PREFIX = Path("/var/lib/pg-reflinker-test")
RUN_DIR = Path("/run/pg-reflinker-test")
# Each run's work directory (containerd's state, logs, the control plane's files) in the temp dir.
WORK_PREFIX = "pg-reflinker-cluster."
OVERLAY = ROOT / "tests" / "e2e" / "overlay"
# The same changes for helm install: the chart's values for this cluster.
TEST_VALUES = ROOT / "tests" / "e2e" / "values-test.yaml"
CNPG_NAMESPACE = "cnpg-system"

# Kernel settings kubelet, kube-proxy or the bridge plugin may change; restored on exit.
SYSCTLS = (
    "net/ipv4/ip_forward",
    "net/ipv4/conf/all/route_localnet",
    "net/bridge/bridge-nf-call-iptables",
    "net/bridge/bridge-nf-call-ip6tables",
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
    "net/netfilter/nf_conntrack_max",
    "net/netfilter/nf_conntrack_tcp_timeout_established",
    "net/netfilter/nf_conntrack_tcp_timeout_close_wait",
    "net/netfilter/nf_conntrack_tcp_be_liberal",
)


def _run(*args: str, check: bool = True, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), check=check, text=True, capture_output=True, **kwargs)


def _mounts_under(path: Path) -> list[str]:
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point == str(path) or point.startswith(str(path) + "/"):
            found.append(point)
    return found


def _unmount_tree(path: Path) -> None:
    for point in sorted(set(_mounts_under(path)), key=len, reverse=True):
        _run("umount", "-l", point, check=False)


class HostState:
    """What the cluster changes on the host, recorded as it is changed and undone in reverse."""

    def __init__(self) -> None:
        self.undo: list[tuple[str, Callable[[], None]]] = []
        self.sysctls: dict[str, str] = {}

    def record_sysctls(self) -> None:
        self.sysctls = _read_sysctls()

    def restore_sysctls(self) -> None:
        for key, value in self.sysctls.items():
            path = Path("/proc/sys") / key
            with contextlib.suppress(OSError):
                if path.read_text().strip() != value:
                    path.write_text(value)

    def directory(self, path: Path) -> None:
        """Create `path` (and parents) and remove what was created on exit."""
        missing = []
        p = path
        while not p.exists():
            missing.append(p)
            p = p.parent
        path.mkdir(parents=True, exist_ok=True)
        for created in reversed(missing):
            self.undo.append((f"remove {created}", lambda c=created: _remove_tree(c)))

    def track(self, path: Path) -> None:
        """A host directory others also use (kubelet and CNI write to fixed places): on exit,
        remove what was added under it, or all of it if it did not exist."""
        if not path.exists():
            self.directory(path)
            return
        before = {str(p) for p in path.rglob("*")}

        def remove_added() -> None:
            added = [p for p in path.rglob("*") if str(p) not in before]
            for p in sorted(added, key=lambda p: -len(p.parts)):
                if p.is_dir() and not p.is_symlink():
                    _remove_tree(p)
                else:
                    p.unlink(missing_ok=True)

        self.undo.append((f"remove what was added under {path}", remove_added))

    def then(self, what: str, action: Callable[[], None]) -> None:
        self.undo.append((what, action))

    def restore(self) -> list[str]:
        problems = []
        for what, action in reversed(self.undo):
            try:
                action()
            except Exception as err:  # every step is tried; the first failure must not hide others
                problems.append(f"{what}: {err}")
        self.restore_sysctls()
        return problems


def _remove_tree(path: Path) -> None:
    _unmount_tree(path)
    shutil.rmtree(path, ignore_errors=True)
    if path.exists():
        raise RuntimeError(f"{path} could not be removed")


@dataclass
class Daemon:
    name: str
    process: subprocess.Popen[bytes]
    log: Path


@dataclass(frozen=True)
class NodeSpec:
    """One node: the first is the host's (NODE, NODE_IP, BRIDGE, RUN_DIR), the others are
    numbered from 2 and live in mount namespaces of their own (see the module's docstring)."""

    index: int

    @property
    def name(self) -> str:
        return NODE if self.index == 1 else f"{NODE}-{self.index}"

    @property
    def ip(self) -> str:
        return f"10.245.255.{self.index}"

    @property
    def pod_cidr(self) -> str:
        return f"10.245.{self.index - 1}.0/24"

    @property
    def gateway(self) -> str:
        return f"10.245.{self.index - 1}.1"

    @property
    def bridge(self) -> str:
        return f"prlk-test{self.index - 1}"

    @property
    def run(self) -> Path:
        return RUN_DIR if self.index == 1 else RUN_DIR / f"node-{self.index}"

    @property
    def socket(self) -> Path:
        return self.run / "containerd.sock"

    @property
    def mount_ns(self) -> Path | None:
        return None if self.index == 1 else RUN_DIR / "ns" / f"node-{self.index}"

    @property
    def cgroup_root(self) -> str:
        """kubelet's cgroupRoot: its kubepods go beneath it."""
        return "/" if self.index == 1 else f"/{CGROUP_PREFIX}{self.index}"

    def suffix(self, name: str) -> str:
        """A daemon's or directory's name for this node: kubelet, kubelet-2, ..."""
        return name if self.index == 1 else f"{name}-{self.index}"

    def enter(self) -> list[str]:
        """The prefix that runs a command in this node's mount namespace."""
        return [] if self.mount_ns is None else ["nsenter", f"--mount={self.mount_ns}", "--"]


CGROUP_PREFIX = "prlk-node-"
MAX_NODES = 3


@dataclass
class OneNodeCluster:
    """The running cluster: its control plane, its nodes' daemons and kubectl. fs is the first
    node's filesystem; node_fs every node's, by node name."""

    plane: ControlPlane
    fs: Filesystem
    work: Path
    bin: Path
    host: HostState
    nodes: list[NodeSpec] = field(default_factory=lambda: [NodeSpec(1)])
    node_fs: dict[str, Filesystem] = field(default_factory=dict)
    # The object store, when started: endpoint, bucket, access key and secret (made per run).
    s3: dict[str, str] = field(default_factory=dict)
    timings: list[tuple[str, float]] = field(default_factory=list)
    daemons: dict[str, Daemon] = field(default_factory=dict)

    def prefix_of(self, node: str) -> Path:
        """Where the host sees the node's HOSTPATH_PREFIX (PREFIX inside the node)."""
        return PREFIX if node == NODE else self.node_fs[node].mnt / "pg-reflinker"

    @property
    def api(self) -> client.ApiClient:
        return self.plane.api_client()

    @property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api)

    @property
    def kubeconfig(self) -> Path:
        return self.plane.admin_kubeconfig

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(self.bin / "kubectl"), f"--kubeconfig={self.kubeconfig}", *args],
            input=input,
            text=True,
            capture_output=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed:\n{result.stderr}")
        return result

    def helm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """helm (built from its Go module, HELM_TOOLS) against this cluster."""
        result = chart.helm(f"--kubeconfig={self.kubeconfig}", *args, check=False)
        if check and result.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed:\n{result.stderr}")
        return result

    def apply(self, manifest: str | dict[str, Any] | list[dict[str, Any]]) -> None:
        if not isinstance(manifest, str):
            docs = manifest if isinstance(manifest, list) else [manifest]
            manifest = yaml.safe_dump_all(docs)
        self.kubectl("apply", "-f", "-", input=manifest)

    def get(self, *args: str) -> Any:
        return json.loads(self.kubectl("get", "-o", "json", *args).stdout)

    def spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
        log = self.work / f"{name}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                args,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        self.daemons[name] = Daemon(name, proc, log)

    def log_tail(self, name: str, lines: int = 40) -> str:
        if name in self.daemons:
            text = self.daemons[name].log.read_text(errors="replace")
            return "\n".join(text.splitlines()[-lines:])
        return self.plane.log_tail(name, lines)

    def step(self, what: str, announce: Callable[[str], None], action: Callable[[], Any]) -> Any:
        announce(what)
        start = time.monotonic()
        result = action()
        self.timings.append((what, time.monotonic() - start))
        return result

    def wait(self, what: str, check: Callable[[], Any], timeout: float = 120) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            for daemon in self.daemons.values():
                if daemon.process.poll() is not None:
                    raise RuntimeError(f"{daemon.name} exited:\n{self.log_tail(daemon.name)}")
            value = check()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(0.25)

    def stop_kubelet(self, node: str) -> None:
        """A node whose kubelet is gone (SIGTERM): its containers go on running, the API server
        hears nothing from it, and the node goes NotReady after the node monitor's grace."""
        (spec,) = [n for n in self.nodes if n.name == node]
        daemon = self.daemons.pop(spec.suffix("kubelet"))
        daemon.process.terminate()
        daemon.process.wait(timeout=60)

    def start_kubelet(self, node: str) -> None:
        """The node's kubelet started again (after stop_kubelet), and the node Ready."""
        (spec,) = [n for n in self.nodes if n.name == node]
        if spec.suffix("kubelet") not in self.daemons:
            _spawn_kubelet(self, spec)
        self.wait(f"{node} Ready again", lambda: _node_ready(self, node), 120)

    def pod_logs(self, namespace: str, selector: str, container: str = "") -> str:
        args = ["logs", "-n", namespace, "-l", selector, "--tail=60", "--prefix"]
        args += ["-c", container] if container else ["--all-containers"]
        return self.kubectl(*args, check=False).stdout

    def wait_rollout(self, kind_name: str, namespace: str, timeout: float = 180) -> None:
        result = self.kubectl(
            "rollout",
            "status",
            kind_name,
            "-n",
            namespace,
            f"--timeout={int(timeout)}s",
            check=False,
            timeout=timeout + 30,
        )
        if result.returncode != 0:
            pods = self.kubectl("get", "pods", "-A", "-o", "wide", check=False).stdout
            events = self.kubectl(
                "get", "events", "-n", namespace, "--sort-by=.lastTimestamp", check=False
            ).stdout
            raise AssertionError(
                f"{kind_name} in {namespace} did not become ready: {result.stderr}\n{pods}\n"
                f"{events[-4000:]}\n--- kubelet ---\n{self.log_tail('kubelet', 30)}"
            )


def host_snapshot() -> dict[str, Any]:
    """What the cluster may touch on the host, to compare before and after a run."""
    mounts = {line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()}
    netns = Path("/run/netns")
    return {
        "addresses": _run("ip", "-o", "addr", "show", check=False).stdout.count("\n"),
        "links": sorted(
            line.split(":")[1].strip()
            for line in _run("ip", "-o", "link", "show", check=False).stdout.splitlines()
        ),
        "mounts": sorted(mounts),
        "netns": sorted(os.listdir(netns)) if netns.exists() else [],
        "iptables": {f"{tool} {table}": sorted(c) for (tool, table), c in _chains().items()},
        "sysctls": {k: v for k, v in _read_sysctls().items()},
        "kubepods": sorted(str(c) for c in _kubepods_tops()),
        "paths": sorted(
            str(p)
            for p in (
                KUBELET_ROOT,
                PREFIX,
                RUN_DIR,
                Path("/run/containerd"),
                Path("/var/lib/cni"),
                Path("/var/log/pods"),
                Path("/var/log/containers"),
            )
            if p.exists()
        ),
        "processes": sorted(_cluster_processes()),
    }


def _read_sysctls() -> dict[str, str]:
    values = {}
    for key in SYSCTLS:
        with contextlib.suppress(OSError):
            values[key] = (Path("/proc/sys") / key).read_text().strip()
    return values


def _cluster_processes() -> list[str]:
    names = (b"containerd", b"kubelet", b"kube-proxy", b"kube-apiserver", b"etcd", b"/pause")
    names = (*names, b"coredns", b"versitygw")
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                first = (proc / "cmdline").read_bytes().split(b"\0")[0]
                if first.endswith(names):
                    found.append(first.decode(errors="replace"))
    return found


# -- set-up -------------------------------------------------------------------------------------


def _node_work(c: OneNodeCluster, node: NodeSpec) -> Path:
    return c.work if node.index == 1 else c.work / f"node-{node.index}"


def _containerd_config(c: OneNodeCluster, node: NodeSpec) -> Path:
    work = _node_work(c, node)
    root, state = work / "containerd", node.run / "containerd"
    config = work / "containerd.toml"
    config.write_text(
        f"""version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "{node.socket}"
[ttrpc]
  address = "{node.socket}.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{root}/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{images.PAUSE}"
  # This machine's root lacks CAP_SYS_RESOURCE: runc must not lower oom_score_adj.
  restrict_oom_score_adj = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{work / "cni"}"
"""
    )
    (work / "cni").mkdir()
    (work / "cni" / "10-pg-reflinker-test.conflist").write_text(
        json.dumps(
            {
                "cniVersion": "0.4.0",
                "name": "pg-reflinker-test",
                "plugins": [
                    {
                        "type": "bridge",
                        "bridge": node.bridge,
                        "isGateway": True,
                        "ipMasq": False,
                        "hairpinMode": True,
                        "ipam": {
                            "type": "host-local",
                            "ranges": [[{"subnet": node.pod_cidr, "gateway": node.gateway}]],
                            "routes": [{"dst": "0.0.0.0/0"}],
                            "dataDir": str(work / "cni-ipam"),
                        },
                    }
                ],
            }
        )
    )
    return config


def _kubelet_config(c: OneNodeCluster, node: NodeSpec) -> Path:
    work = _node_work(c, node)
    resolv = work / "resolv.conf"
    # The pods' upstream (dnsPolicy Default) is the cluster's DNS too: nothing else resolves here.
    resolv.write_text(f"nameserver {DNS_IP}\noptions ndots:1 timeout:1 attempts:2\n")
    config = work / "kubelet.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kubelet.config.k8s.io/v1beta1",
                "kind": "KubeletConfiguration",
                "address": node.ip,
                "port": free_port(),
                "readOnlyPort": 0,
                "healthzBindAddress": "127.0.0.1",
                "healthzPort": free_port(),
                "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
                "authorization": {"mode": "AlwaysAllow"},
                "cgroupDriver": "cgroupfs",
                "failCgroupV1": False,
                "failSwapOn": False,
                "containerRuntimeEndpoint": f"unix://{node.socket}",
                "cgroupRoot": node.cgroup_root,
                # Imported images cannot be pulled again: never collect them.
                "imageGCHighThresholdPercent": 100,
                "imageGCLowThresholdPercent": 99,
                "evictionHard": {
                    "memory.available": "100Mi",
                    "nodefs.available": "1%",
                    "imagefs.available": "1%",
                    "nodefs.inodesFree": "1%",
                },
                "resolvConf": str(resolv),
                "clusterDomain": CLUSTER_DOMAIN,
                "clusterDNS": [DNS_IP],
                "serializeImagePulls": False,
                "volumePluginDir": str(work / "volume-plugins"),
                "syncFrequency": "10s",
                "fileCheckFrequency": "10s",
                "nodeStatusUpdateFrequency": "4s",
                "shutdownGracePeriod": "0s",
                "protectKernelDefaults": False,
            }
        )
    )
    return config


def _kube_proxy_config(c: OneNodeCluster) -> Path:
    config = c.work / "kube-proxy.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
                "kind": "KubeProxyConfiguration",
                "mode": "iptables",
                "clientConnection": {"kubeconfig": str(c.plane.admin_kubeconfig)},
                "hostnameOverride": NODE,
                "bindAddress": NODE_IP,
                "healthzBindAddress": f"127.0.0.1:{free_port()}",
                "metricsBindAddress": f"127.0.0.1:{free_port()}",
                "clusterCIDR": CLUSTER_CIDR,
                "nodePortAddresses": [f"{NODE_IP}/32"],
                # Leave the host's conntrack and localhost settings alone.
                "iptables": {"localhostNodePorts": False, "masqueradeAll": True},
                "conntrack": {
                    "maxPerCore": 0,
                    "min": 0,
                    "tcpEstablishedTimeout": "0s",
                    "tcpCloseWaitTimeout": "0s",
                },
            }
        )
    )
    return config


def clean_after_a_killed_run() -> None:
    """RUN_DIR exists only while a cluster runs: a run that was killed before its teardown
    (a CI time-out, a kill -9) left it, and with it processes, mounts, pod network namespaces
    and the node IP."""
    if not RUN_DIR.exists():
        return
    print(f"     cleaning up after a run that did not finish ({RUN_DIR} exists)", flush=True)
    recorded = RUN_DIR / "sysctls.json"
    with contextlib.suppress(OSError, ValueError):
        for key, value in json.loads(recorded.read_text()).items():
            with contextlib.suppress(OSError):
                (Path("/proc/sys") / key).write_text(value)
    # The node's daemons, and the control plane's (each in a session of its own, so a killed
    # run's process group did not take them along).
    for pattern in (
        "containerd --config",
        "kubelet --config",
        "kube-proxy --config",
        "etcd --name",
        "kube-apiserver --etcd-servers",
        "kube-controller-manager --kubeconfig",
        "kube-scheduler --kubeconfig",
        "coredns -conf",
        "versitygw --port",
    ):
        _run("pkill", "-9", "-f", f"{pattern}.*pg-reflinker-cluster", check=False)
    _kill_pods()
    _remove_kubepods_cgroups()
    with contextlib.suppress(OSError, ValueError):
        _remove_netns(set(json.loads((RUN_DIR / "netns.json").read_text())))
    filesystems: list[str] = []
    with contextlib.suppress(OSError, ValueError):
        filesystems = json.loads((RUN_DIR / "filesystems.json").read_text())
    # kube-proxy's rules first (its own --cleanup reads their quoted comments), then every
    # chain made since the run began (kubelet's canaries).
    proxy = Path(os.environ.get("K8S_TOOLS", "/nonexistent"), "kube-proxy")
    if proxy.exists():
        _run(str(proxy), "--cleanup", check=False)
    with contextlib.suppress(OSError, ValueError):
        recorded_chains = json.loads((RUN_DIR / "chains.json").read_text())
        _remove_new_chains({(tool, table): set(chains) for tool, table, chains in recorded_chains})
    for path in (KUBELET_ROOT, PREFIX, RUN_DIR):
        _unmount_tree(path)
        shutil.rmtree(path, ignore_errors=True)
    # The nodes' loop filesystems, once nothing above holds them: each loop device goes with
    # its last mount.
    for work in filesystems:
        if Path(work).name.startswith("pg-reflinker-"):  # ours, nothing else
            _unmount_tree(Path(work))
            shutil.rmtree(work, ignore_errors=True)
    for node in map(NodeSpec, range(1, MAX_NODES + 1)):
        _run("ip", "addr", "del", f"{node.ip}/32", "dev", "lo", check=False)
        _remove_link(node.bridge)
    for ip in (DNS_IP, OBJECT_STORE_IP):
        _run("ip", "addr", "del", f"{ip}/32", "dev", "lo", check=False)


def _remove_stale_work_dirs() -> None:
    """The work directories of earlier runs that ended without their teardown (containerd's
    state with every image, the logs: gigabytes each). One cluster runs on a host at a time
    (RUN_DIR, the node IP), so any found here is stale."""
    for stale in Path(tempfile.gettempdir()).glob(f"{WORK_PREFIX}*"):
        if not (stale / "containerd").exists():
            continue  # the logs an E2E_KEEP run kept on purpose
        print(f"     removing {stale}, left by a run that did not finish", flush=True)
        _unmount_tree(stale)
        shutil.rmtree(stale, ignore_errors=True)


def _add_address(c: OneNodeCluster, ip: str) -> None:
    """A node's (or the DNS server's) IP: kubelet refuses a loopback address, so one of our own
    goes on lo."""
    _run("ip", "addr", "add", f"{ip}/32", "dev", "lo")
    c.host.then(f"remove {ip}", lambda: _run("ip", "addr", "del", f"{ip}/32", "dev", "lo"))


def _start_node(c: OneNodeCluster, announce: Callable[[str], None]) -> None:
    host = c.host
    _add_address(c, NODE_IP)

    # kubelet's root must be a shared mount for Bidirectional propagation (CSI node plugin).
    host.directory(KUBELET_ROOT)
    _run("mount", "--bind", str(KUBELET_ROOT), str(KUBELET_ROOT))
    _run("mount", "--make-rshared", str(KUBELET_ROOT))
    host.then("unmount the kubelet root", lambda: _unmount_tree(KUBELET_ROOT))

    # The overlay's HOSTPATH_PREFIX, on the XFS reflink filesystem, also shared.
    host.directory(PREFIX)
    (c.fs.mnt / "pg-reflinker").mkdir(exist_ok=True)
    _run("mount", "--bind", str(c.fs.mnt / "pg-reflinker"), str(PREFIX))
    _run("mount", "--make-rshared", str(PREFIX))
    host.then("unmount the prefix", lambda: _unmount_tree(PREFIX))

    # Fixed places kubelet, containerd's CNI and kube-controller-manager write to.
    for shared in (
        Path("/var/log/pods"),
        Path("/var/log/containers"),
        Path("/var/lib/cni"),
        Path("/usr/libexec/kubernetes"),
    ):
        host.track(shared)
    host.directory(RUN_DIR)
    # For the clean-up after a killed run, which has no other record of the host's settings.
    (RUN_DIR / "sysctls.json").write_text(json.dumps(host.sysctls))
    shim_dir = Path("/run/containerd")
    host.directory(shim_dir)  # containerd 1.6 keeps shim sockets under /run/containerd/s
    netns_dir = Path("/run/netns")
    host.directory(netns_dir)
    netns_before = set(os.listdir(netns_dir))
    # So is the list of network namespaces the pods' will be told from.
    (RUN_DIR / "netns.json").write_text(json.dumps(sorted(netns_before)))
    # And the nodes' loop filesystems (each holds a loop device until it is unmounted).
    (RUN_DIR / "filesystems.json").write_text(
        json.dumps(sorted({str(fs.work) for fs in c.node_fs.values()}))
    )
    # Undone in reverse: containers are ended first, then their cgroups, netns and bridge.
    for node in c.nodes:
        host.then(f"remove the pod bridge {node.bridge}", lambda n=node: _remove_link(n.bridge))
    host.then("remove pod network namespaces", lambda: _remove_netns(netns_before))
    host.then("remove kubepods cgroups", _remove_kubepods_cgroups)
    host.then("end leftover container processes", _kill_pods)
    for node in c.nodes[1:]:
        _prepare_node(c, node)
    c.step(f"start containerd on {len(c.nodes)} node(s)", announce, lambda: _start_containerds(c))


def _prepare_node(c: OneNodeCluster, node: NodeSpec) -> None:
    """Another node's IP, cgroupRoot, and mount namespace with its own kubelet root, prefix and
    pod logs at the first node's paths (each shared there, for the CSI node plugin's
    Bidirectional mounts)."""
    _add_address(c, node.ip)
    for controller in Path("/sys/fs/cgroup").iterdir():
        if controller.is_dir() and not controller.is_symlink() and (controller / "tasks").exists():
            root = controller / node.cgroup_root.lstrip("/")
            root.mkdir(exist_ok=True)
            for key in ("cpuset.cpus", "cpuset.mems"):  # a new cpuset takes none until told
                if (controller / key).exists():
                    (root / key).write_text((controller / key).read_text())
    work = _node_work(c, node)
    own = {
        KUBELET_ROOT: work / "kubelet",
        PREFIX: c.node_fs[node.name].mnt / "pg-reflinker",
        Path("/var/log/pods"): work / "log-pods",
        Path("/var/log/containers"): work / "log-containers",
    }
    for path in own.values():
        path.mkdir(parents=True, exist_ok=True)
    assert node.mount_ns is not None
    namespaces = node.mount_ns.parent
    if not namespaces.exists():
        # A file that holds a mount namespace must sit on a private mount.
        namespaces.mkdir(parents=True)
        _run("mount", "--bind", str(namespaces), str(namespaces))
        _run("mount", "--make-private", str(namespaces))
    node.mount_ns.touch()
    _run("unshare", f"--mount={node.mount_ns}", "--propagation", "private", "true")
    node.run.mkdir(parents=True, exist_ok=True)
    for target, source in own.items():
        # The first node's mounts there, copied with the namespace, go: a check for a shared
        # mount (containerd's, for Bidirectional propagation) reads the first one it finds.
        _run(*node.enter(), "umount", "-R", str(target), check=False)
        _run(*node.enter(), "mount", "--bind", str(source), str(target))
    for shared in (KUBELET_ROOT, PREFIX):
        _run(*node.enter(), "mount", "--make-rshared", str(shared))


def _start_containerds(c: OneNodeCluster) -> None:
    for node in c.nodes:
        config = _containerd_config(c, node)
        c.spawn(node.suffix("containerd"), [*node.enter(), "containerd", "--config", str(config)])
    for node in c.nodes:
        c.wait(f"containerd on {node.name}", node.socket.exists, 30)


def _images(node: NodeSpec, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """ctr images ... in a node's containerd (kubelet's namespace)."""
    socket = str(node.socket)
    return _run("ctr", "--address", socket, "-n", "k8s.io", "images", *args, check=check)


def import_images(c: OneNodeCluster, archives: dict[str, Path]) -> None:
    """Every image into the first node's containerd, and all but the PostgreSQL images of other
    majors (their scenarios run on the first node) into the others', the nodes side by side."""
    others = {images.postgres_image(m) for m in images.PG_SUITES if m != images.PG_MAJOR}

    def into(node: NodeSpec) -> None:
        for name, archive in archives.items():
            if node.index > 1 and name in others:
                continue
            result = _images(node, "import", "--no-unpack", str(archive), check=False)
            if result.returncode != 0:
                raise RuntimeError(f"importing {name} into {node.name}: {result.stderr}")

    with ThreadPoolExecutor(len(c.nodes)) as pool:
        for done in [pool.submit(into, node) for node in c.nodes]:
            done.result()


def tag_image(c: OneNodeCluster, image: str, tag: str) -> str:
    """Another name for an image every node holds (an upgrade to a new tag); return it."""
    name = f"{image.rsplit(':', 1)[0]}:{tag}"
    for node in c.nodes:
        _images(node, "tag", "--force", image, name)
    return name


def _remove_link(name: str) -> None:
    if _run("ip", "link", "show", name, check=False).returncode == 0:
        _run("ip", "link", "del", name)


def _remove_netns(before: set[str]) -> None:
    netns_dir = Path("/run/netns")
    if not netns_dir.exists():
        return
    for name in set(os.listdir(netns_dir)) - before:
        _run("umount", "-l", str(netns_dir / name), check=False)
        with contextlib.suppress(OSError):
            (netns_dir / name).unlink()


def _thaw_pods() -> None:
    """A container cgroup runc froze (it freezes one while it signals or updates it) and that
    nobody thawed because runc was stopped in between stays frozen, and its processes never
    see SIGKILL: thaw every one first."""
    for top in _kubepods_tops("freezer"):
        for state in top.rglob("freezer.state"):
            with contextlib.suppress(OSError):
                if state.read_text().strip() != "THAWED":
                    state.write_text("THAWED")


def _kill_pods() -> None:
    """Every process in a pod's cgroup, then containerd's shims: both outlive containerd."""
    _thaw_pods()
    for _ in range(20):
        pids = set()
        for top in _kubepods_tops():
            if top.is_dir():
                for procs in top.rglob("cgroup.procs"):
                    with contextlib.suppress(OSError):
                        pids |= {int(p) for p in procs.read_text().split()}
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    _kill_shims()


def _kill_shims() -> None:
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            cmdline
            and cmdline[0].endswith(b"containerd-shim-runc-v2")
            and any(str(RUN_DIR).encode() in a for a in cmdline)
        ):
            with contextlib.suppress(OSError):
                os.killpg(int(proc.name), signal.SIGKILL)
            with contextlib.suppress(OSError):
                os.kill(int(proc.name), signal.SIGKILL)


def _kubepods_tops(controller: str = "*") -> list[Path]:
    """Every node's kubepods cgroup (the first node's at the root, the others' beneath their
    cgroupRoot), and the other nodes' cgroupRoots, in each (or one) cgroup v1 controller."""
    root = Path("/sys/fs/cgroup")
    found = [
        *root.glob(f"{controller}/{CGROUP_PREFIX}*/kubepods"),
        *root.glob(f"{controller}/kubepods"),
    ]
    found += root.glob(f"{controller}/{CGROUP_PREFIX}*")
    return [p for p in found if p.is_dir() and not p.is_symlink() and not p.parent.is_symlink()]


def _remove_kubepods_cgroups() -> None:
    for top in _kubepods_tops():
        if not top.is_dir():
            continue
        for _ in range(50):
            dirs = sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
            for d in [*dirs, top]:
                with contextlib.suppress(OSError):
                    d.rmdir()
            if not top.exists():
                break
            time.sleep(0.1)


def _start_kubernetes(c: OneNodeCluster, announce: Callable[[str], None]) -> None:
    plane = c.plane
    c.step("start etcd, kube-apiserver, kube-controller-manager", announce, plane.start)
    admin = str(plane.admin_kubeconfig)
    c.spawn(
        "kube-scheduler",
        [
            str(c.bin / "kube-scheduler"),
            f"--kubeconfig={admin}",
            f"--authentication-kubeconfig={admin}",
            f"--authorization-kubeconfig={admin}",
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            f"--secure-port={free_port()}",
            "--v=1",
        ],
    )
    chains_before = _chains()
    # Recorded for the clean-up after a killed run: its kube-proxy's chains, left behind,
    # would be removed by the next run's kube-proxy and read as a host changed by that run.
    (RUN_DIR / "chains.json").write_text(
        json.dumps(
            [[tool, table, sorted(chains)] for (tool, table), chains in chains_before.items()]
        )
    )
    c.host.then("remove iptables chains", lambda: _remove_new_chains(chains_before))
    # kube-proxy's own --cleanup removes the chains it made.
    proxy_config = _kube_proxy_config(c)
    c.host.then(
        "remove kube-proxy's iptables rules",
        lambda: _run(
            str(c.bin / "kube-proxy"), "--cleanup", f"--config={proxy_config}", check=False
        ),
    )
    c.spawn("kube-proxy", [str(c.bin / "kube-proxy"), f"--config={proxy_config}", "--v=1"])
    _start_dns(c)
    c.step(
        f"start kubelet on {len(c.nodes)} node(s) and wait for them to be Ready",
        announce,
        lambda: _start_kubelets(c),
    )


def _spawn_kubelet(c: OneNodeCluster, node: NodeSpec) -> None:
    c.spawn(
        node.suffix("kubelet"),
        [
            *node.enter(),
            str(c.bin / "kubelet"),
            f"--config={_kubelet_config(c, node)}",
            f"--kubeconfig={c.plane.admin_kubeconfig}",
            f"--hostname-override={node.name}",
            f"--node-ip={node.ip}",
            f"--root-dir={KUBELET_ROOT}",
            f"--cert-dir={_node_work(c, node) / 'kubelet-pki'}",
            "--v=1",
        ],
    )


def _start_kubelets(c: OneNodeCluster) -> None:
    for node in c.nodes:
        _spawn_kubelet(c, node)
    # The other nodes take no pods until a scenario uncordons them.
    for node in c.nodes[1:]:
        c.wait(f"{node.name} registered", lambda n=node: _registered(c, n.name), 60)
        c.kubectl("cordon", node.name)
    for node in c.nodes:
        c.wait(f"{node.name} Ready", lambda n=node: _node_ready(c, n.name), 120)


def _start_dns(c: OneNodeCluster) -> None:
    """CoreDNS answers the cluster's names (Services, pods) on DNS_IP; nothing else."""
    coredns = os.environ.get("COREDNS", "")
    if not coredns or not Path(coredns).exists():
        raise RuntimeError(
            "COREDNS is not set to a CoreDNS binary: run through make (make cluster-test, "
            "make test), which builds it from tests/tools/coredns"
        )
    _add_address(c, DNS_IP)
    health = free_port()
    corefile = c.work / "Corefile"
    corefile.write_text(
        f"""{CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
    bind {DNS_IP}
    health 127.0.0.1:{health}
    errors
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {c.plane.admin_kubeconfig}
        pods insecure
    }}
}}
. {{
    bind {DNS_IP}
    errors
}}
"""
    )
    c.spawn("coredns", [coredns, "-conf", str(corefile)])
    c.wait("CoreDNS answering", lambda: _answers(f"http://127.0.0.1:{health}/health"), 30)


def _start_object_store(c: OneNodeCluster) -> None:
    """versitygw serving BUCKET from a directory of the run, on OBJECT_STORE_IP, with a root key
    made for this run (given to it through its environment, never on a command line)."""
    binary = os.environ.get("OBJECT_STORE", "")
    if not binary or not Path(binary).exists():
        raise RuntimeError(
            "OBJECT_STORE is not set to a versitygw binary: run through make (make "
            "cluster-test, make test), which builds it from tests/tools/objectstore"
        )
    _add_address(c, OBJECT_STORE_IP)
    root = c.work / "objectstore"
    (root / BUCKET).mkdir(parents=True)
    port = 7070
    c.s3 = {
        "endpoint": f"http://{OBJECT_STORE_IP}:{port}",
        "bucket": BUCKET,
        "access": secrets.token_hex(10),
        "secret": secrets.token_hex(20),
    }
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "ROOT_ACCESS_KEY_ID": c.s3["access"],
        "ROOT_SECRET_ACCESS_KEY": c.s3["secret"],
    }
    c.spawn("versitygw", [binary, "--port", f"{OBJECT_STORE_IP}:{port}", "posix", str(root)], env)
    c.wait("the object store answering", lambda: _listens(OBJECT_STORE_IP, port), 30)


def _listens(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
        return True
    return False


def _answers(url: str) -> bool:
    with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as response:
        return bool(response.status == 200)
    return False


IPTABLES = ("iptables", "ip6tables")
TABLES = ("filter", "nat", "mangle")


def _chains() -> dict[tuple[str, str], set[str]]:
    found = {}
    for tool in IPTABLES:
        for table in TABLES:
            rules = _run(tool, "-t", table, "-S", check=False).stdout.splitlines()
            found[tool, table] = {r.split()[1] for r in rules if r.startswith(("-N ", "-P "))}
    return found


def _remove_new_chains(before: dict[tuple[str, str], set[str]]) -> None:
    """Chains kubelet and kube-proxy made (KUBE-FIREWALL, the canaries, ...), with the rules
    that jump to them; chains that were there before are left alone."""
    for (tool, table), chains in _chains().items():
        new = chains - before.get((tool, table), set())
        if not new:
            continue
        for rule in _run(tool, "-t", table, "-S", check=False).stdout.splitlines():
            words = rule.split()
            if words[:1] == ["-A"] and words[1] not in new and any(c in words for c in new):
                _run(tool, "-t", table, "-D", *words[1:], check=False)
        for chain in new:
            _run(tool, "-t", table, "-F", chain, check=False)
        for chain in new:
            _run(tool, "-t", table, "-X", chain, check=False)


def _registered(c: OneNodeCluster, name: str) -> bool:
    try:
        c.core.read_node(name)
    except client.exceptions.ApiException:
        return False
    return True


def _node_ready(c: OneNodeCluster, name: str = NODE) -> bool:
    try:
        node = c.core.read_node(name)
    except client.exceptions.ApiException:
        return False
    ready = any(
        cond.type == "Ready" and cond.status == "True" for cond in node.status.conditions or []
    )
    return ready and not any(
        t.key == "node.kubernetes.io/not-ready" for t in node.spec.taints or []
    )


def snapshot_manifests(k8s_tools: Path) -> str:
    """What docs/install.md has users install for VolumeSnapshots: the snapshot CRDs and
    snapshot-controller of external-snapshotter, its Deployment with the locally built image."""
    directory = k8s_tools / "snapshot-crds"
    docs: list[dict[str, Any]] = []
    for path in sorted(directory.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    for doc in docs:
        if doc["kind"] == "Deployment":
            doc["spec"]["replicas"] = 1  # one node: a second replica would only wait for the lease
            for container in doc["spec"]["template"]["spec"]["containers"]:
                container["image"] = images.SNAPSHOT_CONTROLLER
                container["imagePullPolicy"] = "Never"
    return yaml.safe_dump_all(docs)


def _install_snapshots(c: OneNodeCluster, announce: Callable[[str], None]) -> None:
    def install() -> None:
        c.kubectl("apply", "--server-side", "-f", "-", input=snapshot_manifests(c.bin))
        c.wait_rollout("deployment/snapshot-controller", "kube-system")

    c.step("install the snapshot CRDs and snapshot-controller v8.6.0", announce, install)
    c.step(
        "install the ReferenceGrant CRD",
        announce,
        lambda: c.kubectl("apply", "--server-side", "-f", str(reference_grant_crd(c.bin))),
    )


def helm_install(c: OneNodeCluster, *args: str) -> None:
    """helm install of the chart with this cluster's values (TEST_VALUES)."""
    chart_args = [str(chart.CHART), "-n", "pg-reflinker", "-f", str(TEST_VALUES)]
    c.helm("install", "pg-reflinker", *chart_args, *args)


def _deploy_driver(c: OneNodeCluster, announce: Callable[[str], None], install: str) -> None:
    def apply() -> None:
        if install == "helm":
            # The namespace as deploy/ makes it (labelled for the privileged node plugin).
            c.kubectl("apply", "-f", str(ROOT / "deploy" / "namespace.yaml"))
            helm_install(c)
        else:
            c.kubectl("apply", "-k", str(OVERLAY))
        c.wait_rollout("daemonset/pg-reflinker-node", "pg-reflinker")
        c.wait_rollout("deployment/pg-reflinker-controller", "pg-reflinker")
        c.wait(
            "the node plugin registered with kubelet (CSINode)", lambda: driver_registered(c), 60
        )

    how = (
        "helm install the chart" if install == "helm" else "apply deploy/ through the test overlay"
    )
    c.step(f"{how}; wait for both plugins", announce, apply)


def driver_registered(c: OneNodeCluster) -> bool:
    """The node plugin registered with every node's kubelet."""
    for node in c.nodes:
        result = c.kubectl("get", "csinode", node.name, "-o", "json", check=False)
        if result.returncode != 0:
            return False
        drivers = json.loads(result.stdout)["spec"].get("drivers") or []
        if not any(d["name"] == "pg-reflinker.csi" for d in drivers):
            return False
    return True


def cnpg_manifest(cnpg_tools: Path) -> str:
    """CNPG's own release manifest, with the locally built images: the operator's, and the
    PostgreSQL image as the operator's default (there is no registry to pull from)."""
    docs = [d for d in yaml.safe_load_all((cnpg_tools / "cnpg-1.30.0.yaml").read_text()) if d]
    for doc in docs:
        if doc["kind"] != "Deployment":
            continue
        for container in doc["spec"]["template"]["spec"]["containers"]:
            container["image"] = images.OPERATOR
            container["imagePullPolicy"] = "IfNotPresent"
            for env in container.get("env", []):
                if env["name"] == "OPERATOR_IMAGE_NAME":
                    env["value"] = images.OPERATOR
            container.setdefault("env", []).append(
                {"name": "POSTGRES_IMAGE_NAME", "value": images.POSTGRES}
            )
    return yaml.safe_dump_all(docs)


def _install_cnpg(c: OneNodeCluster, cnpg_tools: Path, announce: Callable[[str], None]) -> None:
    def install() -> None:
        c.kubectl("apply", "--server-side", "-f", "-", input=cnpg_manifest(cnpg_tools))
        c.wait_rollout("deployment/cnpg-controller-manager", CNPG_NAMESPACE)

    c.step("install the CloudNativePG operator 1.30.0", announce, install)


def _teardown_workloads(c: OneNodeCluster) -> None:
    """Operator first (it recreates instance pods), then workloads, then the CSI plugins."""
    if "kubelet" not in c.daemons or c.daemons["kubelet"].process.poll() is not None:
        return
    c.kubectl("delete", "deployment", "-n", CNPG_NAMESPACE, "--all", "--wait=false", check=False)
    namespaces = [
        ns.metadata.name
        for ns in c.core.list_namespace().items
        if ns.metadata.name not in ("kube-system", "kube-public", "kube-node-lease", "default")
        and ns.metadata.name != "pg-reflinker"
    ]
    for ns in namespaces:
        c.kubectl(
            "delete",
            "pods",
            "-n",
            ns,
            "--all",
            "--grace-period=1",
            "--wait=true",
            "--timeout=60s",
            check=False,
            timeout=90,
        )
    c.kubectl(
        "delete",
        "pods",
        "-n",
        "pg-reflinker",
        "--all",
        "--grace-period=1",
        "--wait=true",
        "--timeout=30s",
        check=False,
        timeout=60,
    )


@contextlib.contextmanager
def running_cluster(
    k8s_tools: Path,
    cnpg_tools: Path,
    disk: str = "24G",
    announce: Callable[[str], None] = lambda step: None,
    pg_majors: Iterable[int] = (images.PG_MAJOR,),
    install: str = "helm",
    filesystem: str = "xfs",
    nodes: int = 1,
    object_store: bool = False,
) -> Iterator[OneNodeCluster]:
    """The whole cluster; stopped and the host restored on exit, even after a failed set-up.
    pg_majors: the PostgreSQL images it holds (images.postgres_image()). install: the driver by
    helm install of the chart (with TEST_VALUES), or "kustomize": deploy/ through OVERLAY.
    filesystem: what HOSTPATH_PREFIX is on, "xfs" (reflink=1) or "btrfs", on every node.
    nodes: how many (1 to MAX_NODES); every node but the first starts cordoned. object_store:
    start the S3-compatible object store (c.s3) for CNPG's WAL archive."""
    if install not in ("helm", "kustomize") or filesystem not in ("xfs", "btrfs"):
        raise ValueError(f"install {install!r} on {filesystem!r}: helm or kustomize, xfs or btrfs")
    if not 1 <= nodes <= MAX_NODES:
        raise ValueError(f"{nodes} nodes: the test cluster has 1 to {MAX_NODES}")
    clean_after_a_killed_run()
    _remove_stale_work_dirs()
    work = Path(tempfile.mkdtemp(prefix=WORK_PREFIX))
    os.chmod(work, 0o755)
    host = HostState()
    host.record_sysctls()
    fs = Filesystem(filesystem, size=disk)
    os.chmod(fs.work, 0o755)
    plane = ControlPlane(
        k8s_tools,
        work / "plane",
        address=NODE_IP,
        controllers=ControlPlane.WITH_NODE,
        service_cidr=SERVICE_CIDR,
    )
    specs = [NodeSpec(i) for i in range(1, nodes + 1)]
    c = OneNodeCluster(plane, fs, work, k8s_tools, host, specs, {NODE: fs})
    try:
        for node in specs[1:]:
            c.node_fs[node.name] = Filesystem(filesystem, size=disk)
            os.chmod(c.node_fs[node.name].work, 0o755)
            (c.node_fs[node.name].mnt / "pg-reflinker").mkdir()
        archives = c.step(
            "build images (cached by input)",
            announce,
            lambda: images.build_all(
                k8s_tools,
                cnpg_tools,
                lambda what: print(f"     {what}", flush=True),
                pg_majors,
            ),
        )
        _start_node(c, announce)
        c.step("import images into containerd", announce, lambda: import_images(c, archives))
        _start_kubernetes(c, announce)
        if object_store:
            c.step("start the object store (versitygw)", announce, lambda: _start_object_store(c))
        _install_snapshots(c, announce)
        _deploy_driver(c, announce, install)
        _install_cnpg(c, cnpg_tools, announce)
        yield c
    finally:
        start = time.monotonic()
        with contextlib.suppress(Exception):
            _teardown_workloads(c)
        for daemon in reversed(list(c.daemons.values())):
            if daemon.process.poll() is None:
                daemon.process.terminate()
        for daemon in reversed(list(c.daemons.values())):
            try:
                daemon.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                daemon.process.kill()
                daemon.process.wait()
        plane.stop()
        problems = host.restore()
        for each in c.node_fs.values():
            each.close()
        _unmount_tree(work)
        if os.environ.get("E2E_KEEP"):
            shutil.rmtree(work / "containerd", ignore_errors=True)
            print(f"\ncluster logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
        c.timings.append(("teardown, host restored", time.monotonic() - start))
        if problems:
            raise RuntimeError("the host could not be fully restored:\n" + "\n".join(problems))
