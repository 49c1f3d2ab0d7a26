"""A real Kubernetes control plane as local processes, for tests.

``ControlPlane`` starts etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok on
free loopback ports, all built from Go modules by ``scripts/build-control-plane.sh`` into
``${KUBETUNE_CACHE:-~/.cache/kubetune}/bin`` (the script is run automatically, once, if a binary
is missing: a cold build takes tens of minutes). There is no kubelet: kwok plays every kubelet
of the fake nodes added with :meth:`ControlPlane.add_fake_node`, driven by the Stage documents
in ``tests/support/kwok-stages.yaml``.  See docs/control-plane.md. For a real node (containerd,
kubelet, kube-proxy, CoreDNS; containers really run) see ``tests/support/node.py``, which starts
this control plane on its bridge address (``address=``, ``service_cluster_ip_range=``).

Usage::

    from tests.support.controlplane import ControlPlane

    with ControlPlane(extra_tokens={"alice": ("alice-token", ["dev"])}) as cp:
        cp.add_fake_node("gpu-0", gpus=8)
        cp.create_namespace("team-a")  # waits for its default ServiceAccount
        cp.kubectl("apply", "-f", "job.yaml")  # CompletedProcess; raises on failure by default
        api = cp.api_client()  # kubernetes.client.ApiClient (admin)
        cp.kubeconfig  # admin kubeconfig path (token, system:masters)
        cp.kubeconfig_for("alice")  # kubeconfig acting as an extra token user

Authentication is by static tokens (``--token-auth-file``); ``admin`` is in ``system:masters``.
Authorization is ``Node,RBAC``, so extra token users have only what RBAC grants them.  Client
certificates signed by ``cp.ca_cert`` are accepted too.

Pod lifecycle on fake nodes (what a test does to steer a pod)
--------------------------------------------------------------
A pod that the scheduler binds to a fake node becomes ``Running`` (Ready, pod IP from kwok).  Then:

* **Complete** (default for Job pods): a Running pod owned by a Job becomes ``Succeeded`` at
  once, every container terminated with exit code 0 (reason ``Completed``).  Annotation
  ``kubetune.test/complete-delay: "5s"`` delays that.  A pod not owned by a Job (bare pod,
  Deployment, ...) stays Running unless completion is requested (next point).
* **Stay Running** ("hold"): annotation ``kubetune.test/hold: "true"`` (on the pod, or on the
  Job's pod template) keeps it Running.  To release it later, remove the annotation
  (``kubectl annotate pod P kubetune.test/hold-``) or set it to anything but "true": it then
  completes as above.  Or annotate ``kubetune.test/complete=true``: any Running pod (held, or not
  owned by a Job) becomes Succeeded with exit code 0.
* **Fail with a chosen exit code** (kwok's chaos stage ``pod-container-running-failed``): label
  ``pod-container-running-failed.stage.kwok.x-k8s.io: "true"`` makes a Running pod ``Failed``
  after about 1-2 s, its containers terminated with the exit code from annotation
  ``pod-container-running-failed.stage.kwok.x-k8s.io/exit-code`` (default 1), reason
  ``.../reason`` (default ``containerFailed``) and message ``.../message``.  With
  ``.../container-name`` only that container fails (the others stay running); ``.../delay`` (Go
  duration) changes the delay.  Reason and message may contain any text (the committed stage
  quotes them; upstream's broke on ": ").  The label wins over hold and over completion.  It can be set on
  the pod template (every pod, including the Job's replacements, fails) or added to one running
  pod later (``kubectl label pod P pod-container-running-failed.stage.kwok.x-k8s.io=true`` after
  annotating the exit code).  :meth:`ControlPlane.fail_pod` does exactly that.
  The pod's phase becomes Failed even with ``restartPolicy: OnFailure`` (kwok does not restart
  containers), so Job ``podFailurePolicy`` rules on exit codes see the chosen code.
* **Stay Pending**: make it unschedulable (e.g. a nodeSelector no fake node matches, or more
  ``nvidia.com/gpu`` than any node has); nothing else keeps a bound pod from Running.
* Deleting a pod removes it at once (pod-delete stage); finalizers still apply.

Environment: ``KUBETUNE_CACHE`` (binary cache), ``KUBETUNE_KEEP_CONTROLPLANE=1`` (keep the temp
dir with logs, certs and etcd data after stop, and print where it is).
"""

from __future__ import annotations

import atexit
import base64
import datetime as _dt
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "scripts" / "build-control-plane.sh"
STAGES_FILE = Path(__file__).resolve().parent / "kwok-stages.yaml"

FAKE_NODE_ANNOTATION = ("kwok.x-k8s.io/node", "fake")
HOLD_ANNOTATION = "kubetune.test/hold"
COMPLETE_ANNOTATION = "kubetune.test/complete"
COMPLETE_DELAY_ANNOTATION = "kubetune.test/complete-delay"
FAIL_LABEL = "pod-container-running-failed.stage.kwok.x-k8s.io"
FAIL_EXIT_CODE_ANNOTATION = FAIL_LABEL + "/exit-code"
FAIL_REASON_ANNOTATION = FAIL_LABEL + "/reason"
FAIL_MESSAGE_ANNOTATION = FAIL_LABEL + "/message"
FAIL_CONTAINER_ANNOTATION = FAIL_LABEL + "/container-name"

REQUIRED_BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl", "kwok")
SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"
POD_CIDR = "10.244.0.0/16"


T = TypeVar("T")


class ControlPlaneError(RuntimeError):
    pass


def raise_if_exited(components: Iterable[Component], error: type[Exception], during: str = "") -> None:
    """Raise `error` (naming the process, `during` and its log tail) if one of `components` has exited."""
    for c in components:
        if not c.alive():
            raise error(f"{c.name} exited with {c.proc.returncode}{during}; log {c.log_path}:\n{c.tail()}")


def poll(
    predicate: Callable[[], T],
    timeout: float,
    what: str,
    interval: float,
    before: Callable[[], None],
    fatal: tuple[type[Exception], ...] = (),
) -> T:
    """Call `before()` (whose exceptions end the wait), then poll `predicate()` until it returns a
    truthy value (returned). An exception from the predicate is remembered for the timeout message,
    unless it is one of `fatal` (re-raised at once); ControlPlaneError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while True:
        before()
        try:
            v = predicate()
            if v:
                return v
        except fatal:
            raise
        except Exception as e:  # noqa: BLE001
            last_exc = e
        if time.monotonic() > deadline:
            raise ControlPlaneError(
                f"timed out after {timeout}s waiting for {what}"
                + (f" (last error: {last_exc!r})" if last_exc else "")
            )
        time.sleep(interval)


def cache_dir() -> Path:
    return Path(os.environ.get("KUBETUNE_CACHE") or Path.home() / ".cache" / "kubetune")


def bin_dir() -> Path:
    return cache_dir() / "bin"


def ensure_binaries(names: Iterable[str] = REQUIRED_BINARIES) -> Path:
    """Return the binary directory, running scripts/build-control-plane.sh first if needed."""
    bdir = bin_dir()
    missing = [n for n in names if not os.access(bdir / n, os.X_OK)]
    if missing:
        print(
            f"[controlplane] missing {missing} in {bdir}; running {BUILD_SCRIPT} "
            "(a cold build takes tens of minutes)",
            file=sys.stderr,
            flush=True,
        )
        subprocess.run(["bash", str(BUILD_SCRIPT)], check=True, stdout=sys.stderr, stderr=sys.stderr)
        missing = [n for n in names if not os.access(bdir / n, os.X_OK)]
        if missing:
            raise ControlPlaneError(f"{BUILD_SCRIPT} did not produce {missing} in {bdir}")
    return bdir


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _free_ports(n: int) -> list[int]:
    # Hold all sockets open while choosing, so the n ports are distinct.
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# --------------------------------------------------------------------------------------------
# Certificates: `cryptography` if importable, else the openssl CLI.
# --------------------------------------------------------------------------------------------
_SERVING_DNS = [
    "localhost",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster",
    "kubernetes.default.svc.cluster.local",
]
_SERVING_IPS = ["127.0.0.1", "10.0.0.1"]


def _write_pki(d: Path, serving_ips: Sequence[str] = _SERVING_IPS) -> None:
    """Write ca.{crt,key}, apiserver.{crt,key} (serving, for ``serving_ips``) and sa.{key,pub} into d."""
    try:
        import cryptography  # noqa: F401
    except ImportError:
        _write_pki_openssl(d, serving_ips)
    else:
        _write_pki_cryptography(d, serving_ips)
    for name in ("ca.key", "apiserver.key", "sa.key"):
        os.chmod(d / name, 0o600)


def _write_pki_cryptography(d: Path, serving_ips: Sequence[str]) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    from tests.support.certs import cert_builder, pem_private_key

    now = _dt.datetime.now(_dt.timezone.utc) - _dt.timedelta(minutes=5)
    later = now + _dt.timedelta(days=3650)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubetune-test-ca")])
    ca = (
        cert_builder(ca_name, ca_name, ca_key.public_key(), now, later)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    srv_key = ec.generate_private_key(ec.SECP256R1())
    sans = [x509.DNSName(n) for n in _SERVING_DNS] + [
        x509.IPAddress(ipaddress.ip_address(i)) for i in serving_ips
    ]
    srv_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")])
    srv = (
        cert_builder(srv_name, ca_name, srv_key.public_key(), now, later)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    (d / "ca.key").write_bytes(pem_private_key(ca_key))
    (d / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (d / "apiserver.key").write_bytes(pem_private_key(srv_key))
    (d / "apiserver.crt").write_bytes(srv.public_bytes(serialization.Encoding.PEM))
    (d / "sa.key").write_bytes(
        sa_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    (d / "sa.pub").write_bytes(
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def _write_pki_openssl(d: Path, serving_ips: Sequence[str]) -> None:
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, cwd=d, capture_output=True)

    run("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ca.key")
    run(
        "req",
        "-x509",
        "-new",
        "-key",
        "ca.key",
        "-subj",
        "/CN=kubetune-test-ca",
        "-days",
        "3650",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,digitalSignature,keyCertSign,cRLSign",
        "-out",
        "ca.crt",
    )
    run("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "apiserver.key")
    run("req", "-new", "-key", "apiserver.key", "-subj", "/CN=kube-apiserver", "-out", "apiserver.csr")
    san = ",".join([f"DNS:{n}" for n in _SERVING_DNS] + [f"IP:{i}" for i in serving_ips])
    (d / "apiserver.ext").write_text(
        f"basicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth\nsubjectAltName={san}\n"
    )
    run(
        "x509",
        "-req",
        "-in",
        "apiserver.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "3650",
        "-extfile",
        "apiserver.ext",
        "-out",
        "apiserver.crt",
    )
    run("genrsa", "-out", "sa.key", "2048")
    run("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub")


# --------------------------------------------------------------------------------------------
# The control plane
# --------------------------------------------------------------------------------------------
class Component:
    """One running process: name, Popen, log path."""

    def __init__(self, name: str, args: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None):
        self.name = name
        self.args = list(args)
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self._log.write(("$ " + " ".join(self.args) + "\n").encode())
        self._log.flush()
        self.proc = subprocess.Popen(
            self.args,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=dict(env) if env is not None else None,
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(5)
        self._log.close()

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError as e:
            return f"<cannot read {self.log_path}: {e}>"


class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager + kube-scheduler + kwok on loopback.

    Parameters
    ----------
    extra_tokens: ``{user: (token, [groups])}`` added to the static token file, for RBAC tests.
        (Also :meth:`add_token_user` before :meth:`start`.)
    stages: kwok Stage YAML file (default ``tests/support/kwok-stages.yaml``).
    verbosity: klog ``-v`` of the Kubernetes components.
    keep: keep the temp dir after stop (default: env ``KUBETUNE_KEEP_CONTROLPLANE=1``).
    start_timeout: seconds to wait for everything to be ready.

    Attributes after start: ``kubeconfig`` (admin kubeconfig path), ``server`` (https URL),
    ``admin_token``, ``ca_cert`` (path), ``dir`` (temp dir), ``log_dir`` and ``logs``
    (``{component: log path}``), ``ports``, ``bin_dir``.
    """

    ADMIN_USER = "admin"

    def __init__(
        self,
        extra_tokens: Mapping[str, tuple[str, Sequence[str]]] | None = None,
        *,
        stages: str | os.PathLike | None = None,
        verbosity: int = 1,
        keep: bool | None = None,
        start_timeout: float = 120.0,
        address: str = "127.0.0.1",
        service_cluster_ip_range: str = SERVICE_CLUSTER_IP_RANGE,
        before_apiserver=None,
    ):
        # address: where the API server binds and what it advertises (kubeconfigs point there). On
        # 127.0.0.1 the "kubernetes" Endpoints stay empty (--endpoint-reconciler-type=none: they
        # cannot hold a loopback address); any other address (e.g. a real node's bridge gateway,
        # tests/support/node.py) gets the lease reconciler, so pods reach the API at its ClusterIP.
        # before_apiserver(cp) -> extra kube-apiserver flags, called once the PKI exists.
        self.address = address
        self.service_cluster_ip_range = service_cluster_ip_range
        self.before_apiserver = before_apiserver
        self.stages = Path(stages) if stages else STAGES_FILE
        self.verbosity = verbosity
        self.keep = keep if keep is not None else os.environ.get("KUBETUNE_KEEP_CONTROLPLANE") == "1"
        self.start_timeout = start_timeout
        self._started = False
        self.admin_token = secrets.token_hex(16)
        # user -> (token, groups); components get their own system:masters users so that their
        # requests are told apart in logs.
        self.tokens: dict[str, tuple[str, list[str]]] = {
            self.ADMIN_USER: (self.admin_token, ["system:masters"]),
            "kubetune:kube-controller-manager": (secrets.token_hex(16), ["system:masters"]),
            "kubetune:kube-scheduler": (secrets.token_hex(16), ["system:masters"]),
            "kubetune:kwok": (secrets.token_hex(16), ["system:masters"]),
        }
        for user, (token, groups) in (extra_tokens or {}).items():
            self.add_token_user(user, token, groups)
        self.components: dict[str, Component] = {}
        self.dir: Path | None = None
        self.kubeconfig: str | None = None
        self.server: str | None = None
        self.ports: dict[str, int] = {}
        self.bin_dir: Path | None = None

    # -- setup --------------------------------------------------------------------------------
    def add_token_user(self, user: str, token: str, groups: Sequence[str] = ()) -> None:
        """Add a static-token user (before start(); the apiserver reads the file once)."""
        if self._started:
            raise ControlPlaneError("add_token_user() must be called before start()")
        if "," in user or "," in token or '"' in "".join(groups):
            raise ValueError("user and token must not contain ',' nor groups '\"'")
        self.tokens[user] = (token, list(groups))

    @property
    def ca_cert(self) -> str:
        return str(self._pki / "ca.crt")

    @property
    def log_dir(self) -> Path:
        assert self.dir is not None
        return self.dir / "logs"

    @property
    def logs(self) -> dict[str, Path]:
        return {name: c.log_path for name, c in self.components.items()}

    @property
    def _pki(self) -> Path:
        assert self.dir is not None
        return self.dir / "pki"

    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is not None:
            print(self.diagnostics(), file=sys.stderr)
        self.stop()

    def start(self) -> ControlPlane:
        if self._started:
            return self
        self.bin_dir = ensure_binaries()
        self.dir = Path(tempfile.mkdtemp(prefix="kubetune-cp-"))
        self._started = True
        atexit.register(self.stop)
        try:
            self._start()
        except BaseException:
            print(self.diagnostics(), file=sys.stderr)
            self.stop()
            raise
        return self

    def _start(self) -> None:
        assert self.dir is not None and self.bin_dir is not None
        d = self.dir
        for sub in ("pki", "logs", "etcd", "cfg"):
            (d / sub).mkdir()
        (d / "etcd").chmod(0o700)
        first_service_ip = str(next(ipaddress.ip_network(self.service_cluster_ip_range).hosts()))
        _write_pki(self._pki, list(dict.fromkeys(["127.0.0.1", self.address, first_service_ip])))
        names = ["etcd", "etcd-peer", "apiserver", "controller-manager", "scheduler", "kwok"]
        self.ports = dict(zip(names, _free_ports(len(names)), strict=True))
        self.server = f"https://{self.address}:{self.ports['apiserver']}"

        token_file = d / "cfg" / "tokens.csv"
        token_file.write_text(
            "".join(
                f'{tok},{user},{user},"{",".join(groups)}"\n' for user, (tok, groups) in self.tokens.items()
            )
        )
        token_file.chmod(0o600)

        self.kubeconfig = str(self._write_kubeconfig(self.ADMIN_USER, d / "admin.kubeconfig"))
        comp_kc = {
            c: self._write_kubeconfig(f"kubetune:{c}", d / "cfg" / f"{c}.kubeconfig")
            for c in ("kube-controller-manager", "kube-scheduler", "kwok")
        }
        b, v, pki, p = self.bin_dir, f"--v={self.verbosity}", self._pki, self.ports

        etcd_url = f"http://127.0.0.1:{p['etcd']}"
        peer_url = f"http://127.0.0.1:{p['etcd-peer']}"
        self._spawn(
            "etcd",
            [
                str(b / "etcd"),
                "--name=default",
                f"--data-dir={d / 'etcd'}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=default={peer_url}",
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
        )
        self._wait(f"etcd at {etcd_url}/health", lambda: self._http_ok(f"{etcd_url}/health"), 30, "etcd")

        extra_apiserver_args = list(self.before_apiserver(self)) if self.before_apiserver else []
        reconciler = "none" if self.address == "127.0.0.1" else "lease"
        self._spawn(
            "kube-apiserver",
            [
                str(b / "kube-apiserver"),
                f"--etcd-servers={etcd_url}",
                f"--cert-dir={pki}",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={pki / 'ca.crt'}",
                f"--token-auth-file={token_file}",
                f"--secure-port={p['apiserver']}",
                f"--bind-address={self.address}",
                f"--advertise-address={self.address}",
                f"--service-cluster-ip-range={self.service_cluster_ip_range}",
                "--allow-privileged=true",
                "--authorization-mode=Node,RBAC",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                # The default admission plugins stay enabled (ServiceAccount, LimitRanger, Priority,
                # DefaultTolerationSeconds, ResourceQuota, PodSecurity, webhooks, ...).
                f"--endpoint-reconciler-type={reconciler}",  # the "kubernetes" Endpoints cannot hold 127.0.0.1
                "--profiling=false",
                v,
                *extra_apiserver_args,
            ],
        )
        self._wait(
            "kube-apiserver /readyz",
            lambda: self._http_ok(f"{self.server}/readyz", token=self.admin_token),
            60,
            "kube-apiserver",
        )

        self._spawn(
            "kube-controller-manager",
            [
                str(b / "kube-controller-manager"),
                f"--kubeconfig={comp_kc['kube-controller-manager']}",
                f"--authentication-kubeconfig={comp_kc['kube-controller-manager']}",
                f"--authorization-kubeconfig={comp_kc['kube-controller-manager']}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={p['controller-manager']}",
                f"--cert-dir={d / 'cfg'}",
                f"--service-account-private-key-file={pki / 'sa.key'}",
                f"--root-ca-file={pki / 'ca.crt'}",
                f"--cluster-signing-cert-file={pki / 'ca.crt'}",
                f"--cluster-signing-key-file={pki / 'ca.key'}",
                "--controllers=*",
                "--use-service-account-credentials=false",
                "--profiling=false",
                v,
            ],
        )
        self._spawn(
            "kube-scheduler",
            [
                str(b / "kube-scheduler"),
                f"--kubeconfig={comp_kc['kube-scheduler']}",
                f"--authentication-kubeconfig={comp_kc['kube-scheduler']}",
                f"--authorization-kubeconfig={comp_kc['kube-scheduler']}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={p['scheduler']}",
                f"--cert-dir={d / 'cfg'}",
                "--profiling=false",
                v,
            ],
        )
        kwok_home = d / "kwok-home"
        kwok_home.mkdir()
        self._spawn(
            "kwok",
            [
                str(b / "kwok"),
                f"--kubeconfig={comp_kc['kwok']}",
                f"--config={self.stages}",
                "--manage-all-nodes=false",
                f"--manage-nodes-with-annotation-selector={FAKE_NODE_ANNOTATION[0]}={FAKE_NODE_ANNOTATION[1]}",
                "--node-lease-duration-seconds=40",  # kwok holds a Lease per fake node (node health)
                f"--cidr={POD_CIDR}",  # pod IPs; kwok's default 10.0.0.0/24 is the service range here
                f"--server-address=127.0.0.1:{p['kwok']}",
            ],
            env={**os.environ, "HOME": str(kwok_home), "KWOK_WORKDIR": str(kwok_home)},
        )

        self._wait(
            "kube-controller-manager /healthz",
            lambda: self._http_ok(f"https://127.0.0.1:{p['controller-manager']}/healthz", verify=False),
            60,
            "kube-controller-manager",
        )
        self._wait(
            "kube-scheduler /healthz",
            lambda: self._http_ok(f"https://127.0.0.1:{p['scheduler']}/healthz", verify=False),
            60,
            "kube-scheduler",
        )
        self._wait(
            "kwok /healthz", lambda: self._http_ok(f"http://127.0.0.1:{p['kwok']}/healthz"), 60, "kwok"
        )
        # The ServiceAccount controller (kube-controller-manager) has created default/default.
        self._wait(
            "ServiceAccount default/default",
            lambda: self._api_get("/api/v1/namespaces/default/serviceaccounts/default") is not None,
            60,
            "kube-controller-manager",
        )

    def restart_apiserver(self, down_seconds: float = 0.0) -> None:
        """Stop kube-apiserver (SIGTERM: its connections and watches are cut), wait, and start it again
        with the same arguments against the same etcd; returns when it is ready. Clients see connection
        resets, and watches resumed from a resourceVersion older than the new watch cache get 410 Gone."""
        self._require_started()
        old = self.components["kube-apiserver"]
        old.stop()
        time.sleep(down_seconds)
        self._spawn("kube-apiserver", old.args)
        self._wait(
            "kube-apiserver /readyz",
            lambda: self._http_ok(f"{self.server}/readyz", token=self.admin_token),
            60,
            "kube-apiserver",
        )

    def _spawn(self, name: str, args: list[str], env: Mapping[str, str] | None = None) -> Component:
        c = Component(name, args, self.log_dir / f"{name}.log", env)
        self.components[name] = c
        return c

    def _wait(self, what: str, check, timeout: float, component: str | None = None) -> None:
        deadline = time.monotonic() + min(timeout, self.start_timeout)
        while True:
            raise_if_exited(self.components.values(), ControlPlaneError, f" while waiting for {what}")
            try:
                if check():
                    return
            except Exception:  # noqa: BLE001 - keep polling
                pass
            if time.monotonic() > deadline:
                log = self.components[component].tail() if component in self.components else ""
                raise ControlPlaneError(f"timed out after {timeout}s waiting for {what}\n{log}")
            time.sleep(0.2)

    # -- HTTP helpers (no kubernetes client needed) -----------------------------------------
    def _ssl_context(self, verify: bool = True) -> ssl.SSLContext:
        if verify:
            return ssl.create_default_context(cafile=self.ca_cert)
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx

    def _http_ok(self, url: str, token: str | None = None, verify: bool = True) -> bool:
        req = urllib.request.Request(url)
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        ctx = self._ssl_context(verify) if url.startswith("https") else None
        try:
            with urllib.request.urlopen(req, timeout=5, context=ctx) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def _api_get(self, path: str) -> dict | None:
        req = urllib.request.Request(
            self.server + path, headers={"Authorization": f"Bearer {self.admin_token}"}
        )
        try:
            with urllib.request.urlopen(req, timeout=10, context=self._ssl_context()) as r:
                return json.load(r)
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            raise

    # -- kubeconfigs, clients ------------------------------------------------------------------
    def _write_kubeconfig(self, user: str, path: Path) -> Path:
        token = self.tokens[user][0]
        ca = base64.b64encode((self._pki / "ca.crt").read_bytes()).decode()
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "current-context": "kubetune-test",
            "clusters": [
                {
                    "name": "kubetune-test",
                    "cluster": {"server": self.server, "certificate-authority-data": ca},
                }
            ],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [{"name": "kubetune-test", "context": {"cluster": "kubetune-test", "user": user}}],
        }
        path.write_text(json.dumps(cfg, indent=1))  # JSON is YAML
        path.chmod(0o600)
        return path

    def kubeconfig_for(self, user: str) -> str:
        """Write (once) and return a kubeconfig acting as static-token user ``user``."""
        self._require_started()
        path = self.dir / "cfg" / f"user-{user.replace(':', '_').replace('/', '_')}.kubeconfig"
        if not path.exists():
            self._write_kubeconfig(user, path)
        return str(path)

    def token_for(self, user: str) -> str:
        return self.tokens[user][0]

    def api_client(self, user: str | None = None):
        """A ``kubernetes.client.ApiClient`` for the admin (or a token user)."""
        from kubernetes import client, config

        self._require_started()
        cfg = client.Configuration()
        config.load_kube_config(
            config_file=self.kubeconfig_for(user) if user else self.kubeconfig, client_configuration=cfg
        )
        return client.ApiClient(cfg)

    @property
    def env(self) -> dict[str, str]:
        """os.environ plus KUBECONFIG (admin), for subprocesses (kopf, helm, ...)."""
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig)}

    # -- kubectl and helpers -------------------------------------------------------------------
    def kubectl(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        timeout: float = 60,
        user: str | None = None,
    ) -> subprocess.CompletedProcess:
        """Run kubectl (admin, or ``user``) and return the CompletedProcess (text output).

        Raises ControlPlaneError with stdout/stderr if ``check`` and the exit status is not 0.
        """
        self._require_started()
        kc = self.kubeconfig_for(user) if user else self.kubeconfig
        cmd = [str(self.bin_dir / "kubectl"), f"--kubeconfig={kc}", *args]
        r = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise ControlPlaneError(
                f"{' '.join(cmd[:1] + list(args))} -> {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"
            )
        return r

    def get_json(self, *args: str) -> dict:
        """``kubectl get ARGS -o json`` parsed."""
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    def apply(self, manifest: dict | str) -> subprocess.CompletedProcess:
        """``kubectl apply -f -`` of a dict (as JSON) or a YAML string."""
        text = manifest if isinstance(manifest, str) else json.dumps(manifest)
        return self.kubectl("apply", "-f", "-", input=text)

    def create_namespace(
        self, name: str, labels: Mapping[str, str] | None = None, timeout: float = 60
    ) -> None:
        """Create a namespace and wait for its ``default`` ServiceAccount (pods need it)."""
        self.apply(
            {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": name, "labels": dict(labels or {})},
            }
        )
        self.wait_for(
            lambda: self._api_get(f"/api/v1/namespaces/{name}/serviceaccounts/default") is not None,
            timeout,
            f"ServiceAccount {name}/default",
        )

    def add_fake_node(
        self,
        name: str,
        gpus: int = 8,
        cpu: str = "64",
        memory: str = "512Gi",
        labels: Mapping[str, str] | None = None,
        taints: Sequence[Mapping] = (),
        pods: str = "110",
        extra_resources: Mapping[str, str] | None = None,
        wait_ready: bool = True,
        timeout: float = 60,
    ) -> dict:
        """Create a kwok-managed Node with ``nvidia.com/gpu`` capacity/allocatable ``gpus``.

        Labels default to kubernetes.io/hostname, kubernetes.io/os/arch and type=kwok, plus
        ``labels``. With ``wait_ready`` it waits until the node is Ready and the
        node.kubernetes.io/not-ready taint is gone, so pods can be scheduled on it right away.
        """
        resources = {"cpu": cpu, "memory": memory, "pods": pods, "ephemeral-storage": "1Ti"}
        if gpus:
            resources["nvidia.com/gpu"] = str(gpus)
        resources.update(extra_resources or {})
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "annotations": {
                    FAKE_NODE_ANNOTATION[0]: FAKE_NODE_ANNOTATION[1],
                    "node.alpha.kubernetes.io/ttl": "0",
                },
                "labels": {
                    "kubernetes.io/hostname": name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    "type": "kwok",
                    **dict(labels or {}),
                },
            },
            "spec": {"taints": [dict(t) for t in taints]} if taints else {},
            "status": {"capacity": resources, "allocatable": dict(resources)},
        }
        self.apply(node)
        if wait_ready:

            def ready() -> bool:
                n = self._api_get(f"/api/v1/nodes/{name}") or {}
                conds = {c["type"]: c["status"] for c in n.get("status", {}).get("conditions", [])}
                taint_keys = {t["key"] for t in n.get("spec", {}).get("taints", []) or []}
                return conds.get("Ready") == "True" and "node.kubernetes.io/not-ready" not in taint_keys

            self.wait_for(ready, timeout, f"node {name} Ready")
        return self._api_get(f"/api/v1/nodes/{name}") or {}

    def fail_pod(
        self,
        namespace: str,
        pod: str,
        exit_code: int = 1,
        reason: str | None = None,
        message: str | None = None,
        container: str | None = None,
    ) -> None:
        """Make a Running pod on a fake node fail (kwok chaos stage) with ``exit_code``."""
        ann = [f"{FAIL_EXIT_CODE_ANNOTATION}={exit_code}"]
        if reason:
            ann.append(f"{FAIL_REASON_ANNOTATION}={reason}")
        if message:
            ann.append(f"{FAIL_MESSAGE_ANNOTATION}={message}")
        if container:
            ann.append(f"{FAIL_CONTAINER_ANNOTATION}={container}")
        self.kubectl("-n", namespace, "annotate", "--overwrite", "pod", pod, *ann)
        self.kubectl("-n", namespace, "label", "--overwrite", "pod", pod, f"{FAIL_LABEL}=true")

    def complete_pod(self, namespace: str, pod: str) -> None:
        """Make a Running pod (held, or not owned by a Job) succeed with exit code 0."""
        self.kubectl("-n", namespace, "annotate", "--overwrite", "pod", pod, f"{COMPLETE_ANNOTATION}=true")

    def release_pod(self, namespace: str, pod: str) -> None:
        """Remove the hold annotation: a Job-owned pod then completes (exit code 0)."""
        self.kubectl("-n", namespace, "annotate", "pod", pod, f"{HOLD_ANNOTATION}-")

    def wait_for(self, predicate, timeout: float = 60, what: str = "condition", interval: float = 0.25):
        """Poll ``predicate()`` until it returns a truthy value (returned); raise on timeout.

        Also fails fast if a control-plane process died."""
        return poll(
            predicate,
            timeout,
            what,
            interval,
            before=lambda: raise_if_exited(self.components.values(), ControlPlaneError),
        )

    def diagnostics(self, lines: int = 30) -> str:
        """Last log lines of every component (for failure reports)."""
        out = [f"control plane dir: {self.dir}"]
        for c in self.components.values():
            state = "running" if c.alive() else f"exited {c.proc.returncode}"
            out.append(f"--- {c.name} ({state}) {c.log_path}\n{c.tail(lines)}")
        return "\n".join(out)

    def _require_started(self) -> None:
        if not self._started or self.server is None:
            raise ControlPlaneError("control plane not started")

    # -- teardown ------------------------------------------------------------------------------
    def stop(self) -> None:
        """Terminate all processes (reverse start order) and remove the temp dir (unless keep)."""
        if not self._started:
            return
        self._started = False
        try:
            atexit.unregister(self.stop)
        except Exception:  # noqa: BLE001
            pass
        for c in reversed(list(self.components.values())):
            try:
                c.stop()
            except Exception as e:  # noqa: BLE001
                print(f"[controlplane] stopping {c.name}: {e!r}", file=sys.stderr)
        if self.dir is not None:
            if self.keep:
                print(f"[controlplane] kept {self.dir} (logs in {self.dir / 'logs'})", file=sys.stderr)
            else:
                shutil.rmtree(self.dir, ignore_errors=True)
