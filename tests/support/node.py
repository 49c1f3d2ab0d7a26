"""A one-node Kubernetes cluster with a real node, for tests: containers really run.

:class:`RealNodeCluster` starts, on this machine, as root:

* a Linux bridge ``kt0`` with the gateway address ``10.250.0.1/24``; pods get addresses on it from
  the CNI ``bridge`` plugin (host-local IPAM, ``ipMasq: false``, no default route: a pod's only
  routes are the pod subnet and the Service range, so no packet from a pod leaves the machine; a
  FORWARD rule drops anything from the pod subnet to elsewhere in case a host forwards);
* the control plane of :mod:`tests.support.controlplane` with the API server bound to and
  advertising the gateway address (lease endpoint reconciler, so the ``kubernetes`` Service has
  endpoints), Service range ``10.250.1.0/24``, kwok still there for fake nodes;
* containerd (CRI; ``restrict_oom_score_adj``, cgroupfs, overlayfs, our own CNI config dir and
  pause image) with its image store under ``${KUBETUNE_CACHE}/containerd`` (kept between runs:
  images imported once), its socket and state under a temp dir;
* the kubelet (node ``kubetune-node``, InternalIP = the gateway, serving on it; cgroupfs; a token
  for ``system:node:kubetune-node``; image GC off so it never deletes the cached images);
* kube-proxy (iptables mode; touches no host sysctl) and CoreDNS as host processes, CoreDNS on the
  gateway address :53 with the ``kubernetes`` plugin only (no ``forward``: other names fail).

Images come from ``scripts/build-images.sh`` (buildah's storage) and are streamed into containerd
when it lacks them (``buildah push ... docker-archive:/dev/stdout | ctr images import -``):
:meth:`RealNodeCluster.image` gives a name to put in a
pod. See docs/control-plane.md ("A real node").

Teardown (``stop``): pods deleted through the API, then kubelet, kube-proxy (``--cleanup`` removes
its iptables chains), CoreDNS, the control plane, containerd, each by PID; leftover containers
removed, kubelet mounts unmounted, the bridge and the FORWARD rule removed, the sysctls the kubelet
changes restored. One such cluster runs at a time on a machine (a lock file in the cache).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from tests.support.controlplane import (
    Component,
    ControlPlane,
    cache_dir,
    ensure_binaries,
    free_port,
    poll,
    raise_if_exited,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
IMAGES_SCRIPT = REPO_ROOT / "scripts" / "build-images.sh"

BRIDGE = "kt0"
GATEWAY = "10.250.0.1"
POD_SUBNET = "10.250.0.0/24"
SERVICE_RANGE = "10.250.1.0/24"
ROUTED = "10.250.0.0/23"  # pods + Services: the only route a pod has
NODE_NAME = "kubetune-node"
CLUSTER_DOMAIN = "cluster.local"
NODE_BINARIES = ("kubelet", "kube-proxy", "coredns")
# host sysctls the kubelet sets (and that we restore)
KUBELET_SYSCTLS = (
    "vm.overcommit_memory",
    "vm.panic_on_oom",
    "kernel.panic",
    "kernel.panic_on_oops",
    "kernel.keys.root_maxkeys",
    "kernel.keys.root_maxbytes",
)
FORWARD_GUARD = [
    "FORWARD",
    "-s",
    ROUTED,
    "!",
    "-d",
    ROUTED,
    "-m",
    "comment",
    "--comment",
    "kubetune-test-node: pods never leave the machine",
    "-j",
    "DROP",
]


class NodeError(RuntimeError):
    pass


def _run(*args: str, check: bool = True, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise NodeError(f"{' '.join(args)} -> {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


def _sysctl_path(name: str) -> Path:
    return Path("/proc/sys") / name.replace(".", "/")


def ensure_images(names: Sequence[str] = ("pause", "operator", "trainer")) -> None:
    """Run scripts/build-images.sh (a no-op when up to date): the images are in buildah's storage."""
    subprocess.run(["bash", str(IMAGES_SCRIPT), *names], check=True, stdout=sys.stderr, stderr=sys.stderr)


def image_ref(name: str) -> str:
    return (cache_dir() / "images" / f"{name}.ref").read_text().strip()


def image_id(name: str) -> str:
    return (cache_dir() / "images" / f"{name}.id").read_text().strip()


def _issue_client_cert(pki: Path, name: str, cn: str, org: str) -> tuple[Path, Path]:
    """A client certificate signed by the control plane's CA (cryptography, a dev dependency)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), None)
    ca = x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = _dt.datetime.now(_dt.timezone.utc) - _dt.timedelta(minutes=5)
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, cn),
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
                ]
            )
        )
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + _dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    crt, keyf = pki / f"{name}.crt", pki / f"{name}.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyf.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    keyf.chmod(0o600)
    return crt, keyf


def flush_kube_chains() -> None:
    """Remove the KUBE-* chains (and the jumps to them) that kubelet and kube-proxy leave behind."""
    for tool in ("iptables", "ip6tables"):
        if shutil.which(tool) is None:
            continue
        for table in ("filter", "nat", "mangle"):
            rules = _run(tool, "-t", table, "-S", check=False).stdout.splitlines()
            chains = [r.split()[1] for r in rules if r.startswith("-N KUBE-")]
            for rule in rules:
                parts = shlex.split(rule)
                if (
                    parts[:1] == ["-A"]
                    and not parts[1].startswith("KUBE-")
                    and "-j" in parts
                    and parts[parts.index("-j") + 1].startswith("KUBE-")
                ):
                    _run(tool, "-t", table, "-D", *parts[1:], check=False)
            for chain in chains:
                _run(tool, "-t", table, "-F", chain, check=False)
            for chain in chains:
                _run(tool, "-t", table, "-X", chain, check=False)


class RealNodeCluster:
    """Control plane + containerd + kubelet + kube-proxy + CoreDNS on this machine (root only).

    ``images``: names built by scripts/build-images.sh to import into containerd (the pause image
    always). Attributes after start: ``cp`` (the :class:`ControlPlane`), ``dir`` (temp dir with
    configs and logs), ``components`` (node processes), ``timings`` (seconds per start phase).
    """

    def __init__(
        self,
        images: Sequence[str] = ("operator", "trainer"),
        *,
        verbosity: int = 1,
        keep: bool | None = None,
        start_timeout: float = 180.0,
    ):
        self.images = list(dict.fromkeys(["pause", *images]))
        self.verbosity = verbosity
        self.keep = keep if keep is not None else os.environ.get("KUBETUNE_KEEP_CONTROLPLANE") == "1"
        self.start_timeout = start_timeout
        self.cp = ControlPlane(
            keep=self.keep,
            address=GATEWAY,
            service_cluster_ip_range=SERVICE_RANGE,
            before_apiserver=self._apiserver_args,
            verbosity=verbosity,
        )
        self.node_token = "node-" + os.urandom(12).hex()
        self.proxy_token = "proxy-" + os.urandom(12).hex()
        self.dns_token = "dns-" + os.urandom(12).hex()
        self.cp.add_token_user(f"system:node:{NODE_NAME}", self.node_token, ["system:nodes"])
        self.cp.add_token_user("system:kube-proxy", self.proxy_token, [])
        self.cp.add_token_user("kubetune:coredns", self.dns_token, [])
        self.components: dict[str, Component] = {}
        self.dir: Path | None = None
        self.kubelet_root: Path | None = None
        self.timings: dict[str, float] = {}
        self._lock_file = None
        self._sysctls: dict[str, str] = {}
        self._undo: list = []
        self._started = False

    # -- start ----------------------------------------------------------------------------------
    def __enter__(self) -> RealNodeCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        if exc[0] is not None:
            print(self.diagnostics(), file=sys.stderr)
        self.stop()

    def start(self) -> RealNodeCluster:
        if os.geteuid() != 0:
            raise NodeError("a real node needs root (containerd, kubelet, bridge, iptables)")
        t0 = time.monotonic()
        self.bin_dir = ensure_binaries((*NODE_BINARIES, "kube-apiserver", "kubectl"))
        ensure_images(self.images)
        self.timings["images"] = time.monotonic() - t0
        lock_path = cache_dir() / "node.lock"
        self._lock_file = open(lock_path, "w")
        deadline = time.monotonic() + 1800
        while True:
            try:
                fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise NodeError(f"another real-node cluster holds {lock_path}") from None
                time.sleep(2)
        self._started = True
        try:
            self._start()
        except BaseException:
            print(self.diagnostics(), file=sys.stderr)
            self.stop()
            raise
        self.timings["total"] = time.monotonic() - t0
        return self

    def _start(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="kubetune-node-"))
        (self.dir / "logs").mkdir()
        # the kubelet's root (emptyDirs, volumes) on disk, not /tmp's possible tmpfs
        self.kubelet_root = Path(tempfile.mkdtemp(prefix="kubetune-kubelet-", dir="/var/lib"))
        for name in KUBELET_SYSCTLS:
            path = _sysctl_path(name)
            if path.exists():
                self._sysctls[name] = path.read_text().strip()
        if _sysctl_path("net.bridge.bridge-nf-call-iptables").exists() is False:
            _run("modprobe", "br_netfilter", check=False)
        self._network_up()
        t = time.monotonic()
        self._start_containerd()
        self._import_images()
        self.timings["containerd+import"] = time.monotonic() - t
        t = time.monotonic()
        self.cp.start()
        self.timings["control plane"] = time.monotonic() - t
        t = time.monotonic()
        self._start_coredns()
        self._start_kube_proxy()
        self._start_kubelet()
        self._wait_node_ready()
        self.timings["node Ready"] = time.monotonic() - t

    def _network_up(self) -> None:
        if _run("ip", "link", "show", BRIDGE, check=False).returncode == 0:
            _run("ip", "link", "delete", BRIDGE)  # a leftover of an interrupted run
        _run("ip", "link", "add", BRIDGE, "type", "bridge")
        self._undo.append(lambda: _run("ip", "link", "delete", BRIDGE, check=False))
        _run("ip", "addr", "add", f"{GATEWAY}/24", "dev", BRIDGE)
        _run("ip", "link", "set", BRIDGE, "up")
        if _run("iptables", "-C", *FORWARD_GUARD, check=False).returncode != 0:
            _run("iptables", "-I", *FORWARD_GUARD[:1], "1", *FORWARD_GUARD[1:])
            self._undo.append(lambda: _run("iptables", "-D", *FORWARD_GUARD, check=False))
        cni = self.dir / "cni"
        cni.mkdir()
        (cni / "10-kubetune.conflist").write_text(
            json.dumps(
                {
                    "cniVersion": "1.0.0",
                    "name": "kubetune",
                    "plugins": [
                        {
                            "type": "bridge",
                            "bridge": BRIDGE,
                            "isGateway": True,
                            "isDefaultGateway": False,
                            "ipMasq": False,
                            "hairpinMode": True,
                            "ipam": {
                                "type": "host-local",
                                "ranges": [[{"subnet": POD_SUBNET, "gateway": GATEWAY}]],
                                "routes": [{"dst": ROUTED}],
                                "dataDir": str(self.dir / "cni-ipam"),
                            },
                        },
                        {"type": "portmap", "capabilities": {"portMappings": True}},
                    ],
                },
                indent=1,
            )
        )

    # -- containerd -----------------------------------------------------------------------------
    @property
    def containerd_socket(self) -> str:
        return str(self.dir / "containerd.sock")

    def ctr(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
        return _run(
            "ctr",
            "--address",
            self.containerd_socket,
            "--namespace",
            "k8s.io",
            *args,
            check=check,
            timeout=timeout,
        )

    def _start_containerd(self) -> None:
        root = cache_dir() / "containerd"
        root.mkdir(parents=True, exist_ok=True)
        config = self.dir / "containerd.toml"
        config.write_text(f'''version = 2
root = "{root}"
state = "{self.dir / "containerd-state"}"
oom_score = 0
[grpc]
  address = "{self.containerd_socket}"
[ttrpc]
  address = "{self.containerd_socket}.ttrpc"
[debug]
  level = "warn"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{image_ref("pause")}"
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
    conf_dir = "{self.dir / "cni"}"
''')
        self._spawn("containerd", ["containerd", "--config", str(config)])
        self._wait("containerd", lambda: self.ctr("version", check=False, timeout=10).returncode == 0, 60)
        self._remove_leftover_containers()

    def _remove_leftover_containers(self) -> None:
        """Containers an interrupted run left in the kept image store."""
        for cid in self.ctr("containers", "list", "-q", check=False).stdout.split():
            self.ctr("tasks", "kill", "-s", "SIGKILL", cid, check=False, timeout=30)
            self.ctr("tasks", "delete", "-f", cid, check=False, timeout=30)
            self.ctr("containers", "delete", cid, check=False, timeout=30)

    def _import_images(self) -> None:
        """Stream each image from buildah's storage into containerd unless containerd has that very
        image (its ref with a label holding buildah's image ID: a rebuild under the same tag is
        imported again). No archive is written to disk."""
        listing = self.ctr("images", "list").stdout.splitlines()[1:]
        present = {line.split()[0] for line in listing if line.split()}
        labels = {line.split()[0]: line.split()[-1] for line in listing if line.split()}
        current = {image_ref(name) for name in self.images}
        repos = {ref.rsplit(":", 1)[0] for ref in current}
        stale = [ref for ref in present if ref.rsplit(":", 1)[0] in repos and ref not in current]
        if stale:  # earlier builds of the same images (their layers stay while still shared)
            self.ctr("images", "remove", *stale, check=False)
        for name in self.images:
            ref = image_ref(name)
            label = f"io.kubetune.image-id={image_id(name)}"
            if ref in present and label in labels.get(ref, "").split(","):
                continue
            t = time.monotonic()
            env = {**os.environ, "CONTAINERS_CONF": str(cache_dir() / "images" / "containers.conf")}
            push = subprocess.Popen(
                ["buildah", "push", "--quiet", ref, f"docker-archive:/dev/stdout:{ref}"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
            )
            try:
                imported = subprocess.run(
                    [
                        "ctr",
                        "--address",
                        self.containerd_socket,
                        "--namespace",
                        "k8s.io",
                        "images",
                        "import",
                        "-",
                    ],
                    stdin=push.stdout,
                    capture_output=True,
                    text=True,
                    timeout=1800,
                )
            finally:
                push.stdout.close()
                push_err = push.stderr.read().decode(errors="replace")
                push.wait(60)
            if push.returncode != 0 or imported.returncode != 0:
                raise NodeError(
                    f"importing {ref}: buildah push -> {push.returncode} {push_err}\n"
                    f"ctr import -> {imported.returncode} {imported.stdout} {imported.stderr}"
                )
            self.ctr("images", "label", ref, label)
            self.timings[f"import {name}"] = time.monotonic() - t

    def image(self, name: str) -> str:
        """The reference of an image built by scripts/build-images.sh, present in containerd."""
        return image_ref(name)

    # -- node processes -------------------------------------------------------------------------
    def _kubeconfig(self, user: str, token: str, path: Path) -> Path:
        path.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "current-context": "node",
                    "clusters": [
                        {
                            "name": "node",
                            "cluster": {"server": self.cp.server, "certificate-authority": self.cp.ca_cert},
                        }
                    ],
                    "users": [{"name": user, "user": {"token": token}}],
                    "contexts": [{"name": "node", "context": {"cluster": "node", "user": user}}],
                }
            )
        )
        path.chmod(0o600)
        return path

    def _apiserver_args(self, cp: ControlPlane) -> list[str]:
        crt, key = _issue_client_cert(
            cp._pki, "apiserver-kubelet-client", "kube-apiserver-kubelet-client", "system:masters"
        )
        return [
            f"--kubelet-client-certificate={crt}",
            f"--kubelet-client-key={key}",
            "--kubelet-preferred-address-types=InternalIP",
        ]

    def _start_coredns(self) -> None:
        self.cp.apply(
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRole",
                "metadata": {"name": "kubetune:coredns"},
                "rules": [
                    {
                        "apiGroups": [""],
                        "resources": ["endpoints", "services", "pods", "namespaces"],
                        "verbs": ["list", "watch"],
                    },
                    {
                        "apiGroups": ["discovery.k8s.io"],
                        "resources": ["endpointslices"],
                        "verbs": ["list", "watch"],
                    },
                ],
            }
        )
        self.cp.apply(
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRoleBinding",
                "metadata": {"name": "kubetune:coredns"},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "ClusterRole",
                    "name": "kubetune:coredns",
                },
                "subjects": [{"kind": "User", "name": "kubetune:coredns"}],
            }
        )
        kc = self._kubeconfig("kubetune:coredns", self.dns_token, self.dir / "coredns.kubeconfig")
        self.dns_health, self.dns_ready = free_port(), free_port()
        corefile = self.dir / "Corefile"
        # No forward: names outside the cluster fail and never leave the machine. The short
        # denial cache: a peer pod's name that has no address yet is asked again within 2 s.
        corefile.write_text(f""".:53 {{
    bind {GATEWAY}
    errors
    health 127.0.0.1:{self.dns_health}
    ready 127.0.0.1:{self.dns_ready}
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {kc} node
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }}
    cache 30 {{
        denial 9984 2
    }}
}}
""")
        self._spawn("coredns", [str(self.bin_dir / "coredns"), "-conf", str(corefile)])
        self._wait("coredns /ready", lambda: self._http_ok(f"http://127.0.0.1:{self.dns_ready}/ready"), 60)

    def _start_kube_proxy(self) -> None:
        kc = self._kubeconfig("system:kube-proxy", self.proxy_token, self.dir / "kube-proxy.kubeconfig")
        self.proxy_healthz = free_port()
        config = self.dir / "kube-proxy.yaml"
        config.write_text(
            json.dumps(
                {
                    "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
                    "kind": "KubeProxyConfiguration",
                    "clientConnection": {"kubeconfig": str(kc)},
                    "mode": "iptables",
                    "clusterCIDR": POD_SUBNET,
                    "hostnameOverride": NODE_NAME,
                    "bindAddress": GATEWAY,
                    "healthzBindAddress": f"127.0.0.1:{self.proxy_healthz}",
                    "metricsBindAddress": f"127.0.0.1:{free_port()}",
                    "nodePortAddresses": [f"{GATEWAY}/32"],
                    "oomScoreAdj": 0,
                    # 0: leave the host's conntrack sysctls alone
                    "conntrack": {
                        "maxPerCore": 0,
                        "min": 0,
                        "tcpEstablishedTimeout": "0s",
                        "tcpCloseWaitTimeout": "0s",
                    },
                    "iptables": {"localhostNodePorts": False, "masqueradeAll": False},
                }
            )
        )
        self.kube_proxy_config = config
        self._spawn(
            "kube-proxy", [str(self.bin_dir / "kube-proxy"), f"--config={config}", f"--v={self.verbosity}"]
        )

    def _start_kubelet(self) -> None:
        kc = self._kubeconfig(f"system:node:{NODE_NAME}", self.node_token, self.dir / "kubelet.kubeconfig")
        resolv = self.dir / "resolv.conf"
        resolv.write_text("")  # no host search domains or nameservers in pods
        self.kubelet_port, self.kubelet_healthz = free_port(), free_port()
        config = self.dir / "kubelet.yaml"
        config.write_text(
            json.dumps(
                {
                    "apiVersion": "kubelet.config.k8s.io/v1beta1",
                    "kind": "KubeletConfiguration",
                    "address": GATEWAY,
                    "port": self.kubelet_port,
                    "readOnlyPort": 0,
                    "healthzBindAddress": "127.0.0.1",
                    "healthzPort": self.kubelet_healthz,
                    "containerRuntimeEndpoint": f"unix://{self.containerd_socket}",
                    "cgroupDriver": "cgroupfs",
                    "failCgroupV1": False,
                    "failSwapOn": False,
                    "oomScoreAdj": 0,
                    "protectKernelDefaults": False,
                    "clusterDomain": CLUSTER_DOMAIN,
                    "clusterDNS": [GATEWAY],
                    "resolvConf": str(resolv),
                    "authentication": {
                        "anonymous": {"enabled": False},
                        "webhook": {"enabled": True},
                        "x509": {"clientCAFile": self.cp.ca_cert},
                    },
                    "authorization": {"mode": "Webhook"},
                    "evictionHard": {
                        "memory.available": "100Mi",
                        "nodefs.available": "1%",
                        "imagefs.available": "1%",
                        "nodefs.inodesFree": "1%",
                    },
                    "imageGCHighThresholdPercent": 100,
                    "imageGCLowThresholdPercent": 99,
                    "serializeImagePulls": False,
                    "registerNode": True,
                    "syncFrequency": "10s",
                    "fileCheckFrequency": "10s",
                    "nodeStatusUpdateFrequency": "5s",
                }
            )
        )
        self._spawn(
            "kubelet",
            [
                str(self.bin_dir / "kubelet"),
                f"--config={config}",
                f"--kubeconfig={kc}",
                f"--root-dir={self.kubelet_root}",
                f"--cert-dir={self.dir / 'kubelet-pki'}",
                f"--hostname-override={NODE_NAME}",
                f"--node-ip={GATEWAY}",
                f"--v={self.verbosity}",
            ],
        )

    def _wait_node_ready(self) -> None:
        def ready() -> bool:
            node = self.cp._api_get(f"/api/v1/nodes/{NODE_NAME}") or {}
            conds = {c["type"]: c["status"] for c in node.get("status", {}).get("conditions", [])}
            taints = {t["key"] for t in node.get("spec", {}).get("taints", []) or []}
            return conds.get("Ready") == "True" and "node.kubernetes.io/not-ready" not in taints

        self._wait(f"node {NODE_NAME} Ready", ready, 120)

    # -- helpers --------------------------------------------------------------------------------
    def _spawn(self, name: str, args: list[str]) -> Component:
        c = Component(name, args, self.dir / "logs" / f"{name}.log")
        self.components[name] = c
        return c

    def _wait(self, what: str, check, timeout: float) -> None:
        deadline = time.monotonic() + min(timeout, self.start_timeout)
        while True:
            raise_if_exited(self.components.values(), NodeError, f" while waiting for {what}")
            with contextlib.suppress(Exception):
                if check():
                    return
            if time.monotonic() > deadline:
                raise NodeError(f"timed out after {timeout}s waiting for {what}\n{self.diagnostics(20)}")
            time.sleep(0.3)

    def _http_ok(self, url: str) -> bool:
        return self.cp._http_ok(url)

    def wait_for(self, predicate, timeout: float = 60, what: str = "condition", interval: float = 0.5):
        """ControlPlane.wait_for, also failing fast when a node process died."""
        return poll(
            predicate,
            timeout,
            what,
            interval,
            before=lambda: raise_if_exited(self.components.values(), NodeError),
            fatal=(NodeError,),
        )

    def diagnostics(self, lines: int = 30) -> str:
        out = [
            self.cp.diagnostics(lines) if self.cp.dir else "control plane not started",
            f"node dir: {self.dir}",
        ]
        for c in self.components.values():
            state = "running" if c.alive() else f"exited {c.proc.returncode}"
            out.append(f"--- {c.name} ({state}) {c.log_path}\n{c.tail(lines)}")
        return "\n".join(out)

    # -- stop -----------------------------------------------------------------------------------
    def _delete_workloads(self) -> None:
        """Delete every pod through the API (controllers first, so nothing is recreated) and wait."""
        if not self.cp._started or "kubelet" not in self.components:
            return
        kubectl = self.cp.kubectl
        with contextlib.suppress(Exception):
            kubectl(
                "delete",
                "deployments,statefulsets,daemonsets,replicasets,jobs",
                "--all",
                "--all-namespaces",
                "--wait=false",
                check=False,
                timeout=60,
            )
            kubectl(
                "delete",
                "pods",
                "--all",
                "--all-namespaces",
                "--grace-period=5",
                "--wait=false",
                check=False,
                timeout=60,
            )
            self.cp.wait_for(lambda: not self.cp.get_json("pods", "--all-namespaces")["items"], 90, "no pods")

    def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        self._delete_workloads()
        for name in ("kubelet", "kube-proxy", "coredns"):
            if name in self.components:
                with contextlib.suppress(Exception):
                    self.components[name].stop(timeout=20)
        if hasattr(self, "kube_proxy_config"):
            # removes the KUBE-* chains and rules it made
            _run(
                str(self.bin_dir / "kube-proxy"),
                "--cleanup",
                f"--config={self.kube_proxy_config}",
                check=False,
            )
            flush_kube_chains()  # the kubelet's own (KUBE-FIREWALL, canaries)
        self.cp.stop()
        if "containerd" in self.components:
            with contextlib.suppress(Exception):
                self._remove_leftover_containers()
            with contextlib.suppress(Exception):
                self.components["containerd"].stop(timeout=30)
        if self.kubelet_root is not None:
            # the kubelet's volume mounts (tmpfs, projected volumes) under its root
            mounts = [
                line.split()[4]
                for line in Path("/proc/self/mountinfo").read_text().splitlines()
                if line.split()[4].startswith(str(self.kubelet_root))
            ]
            for mount in sorted(mounts, key=len, reverse=True):
                _run("umount", "-l", mount, check=False)
            shutil.rmtree(self.kubelet_root, ignore_errors=True)
        if self.dir is not None:
            state = self.dir / "containerd-state"
            if state.exists():
                mounts = [
                    line.split()[4]
                    for line in Path("/proc/self/mountinfo").read_text().splitlines()
                    if line.split()[4].startswith(str(state))
                ]
                for mount in sorted(mounts, key=len, reverse=True):
                    _run("umount", "-l", mount, check=False)
        # the kubelet's (now empty) pod cgroups
        for hierarchy in Path("/sys/fs/cgroup").iterdir():
            top = hierarchy / "kubepods"
            if top.is_dir():
                for path in sorted(
                    (d for d in top.rglob("*") if d.is_dir()), key=lambda d: len(d.parts), reverse=True
                ) + [top]:
                    with contextlib.suppress(OSError):
                        path.rmdir()
        for undo in reversed(self._undo):
            with contextlib.suppress(Exception):
                undo()
        self._undo.clear()
        for name, value in self._sysctls.items():
            path = _sysctl_path(name)
            with contextlib.suppress(OSError):
                if path.read_text().strip() != value:
                    path.write_text(value)
        if self.dir is not None:
            if self.keep:
                print(f"[node] kept {self.dir}", file=sys.stderr)
            else:
                shutil.rmtree(self.dir, ignore_errors=True)
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None
