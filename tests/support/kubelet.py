"""A stand-in kubelet for the test control plane: runs a pod's container as a local process.

The control plane of ``tests/support/controlplane.py`` has no container runtime: kwok plays the
kubelets and no container ever runs. :class:`LocalKubelet` runs what a pod bound to a fake node
*would* run, unmodified, as a local process, doing what a kubelet and a container runtime do:

* **Namespaces.** Each pod gets its own mount and UTS namespace (``unshare --mount --uts``), so
  every volume is mounted at its exact ``mountPath`` and two pods on this machine never share a
  ``/cache`` or ``/tmp``. The network namespace is the host's (pods reach each other, the API
  server and S3 on loopback), so pod DNS names resolve to 127.0.0.1. Needs root (CAP_SYS_ADMIN);
  without it :meth:`LocalKubelet.start_pod` fails loudly, it never degrades silently.
* **Volumes** (kubelet volume plugins), materialized in a per-pod directory, then mounted in the
  pod's mount namespace (read-only where the mount says so): ``configMap``, ``secret``,
  ``downwardAPI``, ``projected`` (``serviceAccountToken`` from the TokenRequest API for the pod's
  ServiceAccount, bound to the pod, with the source's audience and expiry; ``configMap``,
  ``secret``, ``downwardAPI``) and ``emptyDir`` (mode 0777; ``medium: Memory`` is a tmpfs of
  ``sizeLimit``). Anything else (hostPath, PVCs, subPath, init containers, several containers)
  raises :class:`PodUnsupported`. Mount points that do not exist are created on the host
  (empty directories, removed by :meth:`LocalKubelet.close`).
* **/etc/hosts** is a per-pod, kubelet-managed-style file bind-mounted over /etc/hosts (the host's
  file is not touched): the pod's own names, ``kubernetes.default.svc...``, and for every pod of
  the namespace that cluster DNS would answer for (``hostname`` + ``subdomain`` naming a headless
  Service that selects it, ready or ``publishNotReadyAddresses``)
  ``<hostname>.<subdomain>``, ``.<ns>``, ``.<ns>.svc`` and ``.<ns>.svc.cluster.local``, all
  127.0.0.1 (the search domains of a pod's resolv.conf are spelled out). The UTS hostname is the
  pod's hostname.
* **Environment**, in the kubelet's order: the ``kubernetes`` Service variables
  (``KUBERNETES_SERVICE_HOST=127.0.0.1``, ``KUBERNETES_SERVICE_PORT=<API server port>``,
  ``KUBERNETES_PORT...``), ``envFrom``, then ``env`` (``value`` with ``$(VAR)`` expansion of the
  variables before it; ``valueFrom`` ``secretKeyRef``, ``configMapKeyRef``, ``fieldRef`` including
  labels and annotations, e.g. the Job controller's ``JOB_COMPLETION_INDEX``, and
  ``resourceFieldRef``), layered over the image's environment (``image_env``, e.g. ``PATH``) and
  ``HOSTNAME`` as a runtime does. Nothing of the test process's own environment leaks in.
* **Command**: ``command`` + ``args`` with ``$(VAR)`` expanded exactly as Kubernetes does
  (``$$`` escapes, unknown references stay as written), in ``workingDir`` (else ``image_workdir``).
* **securityContext**: ``runAsUser``/``runAsGroup``, ``fsGroup`` and ``supplementalGroups`` as the
  process's groups, ``no_new_privs`` for ``allowPrivilegeEscalation: false``, an empty capability
  bounding set for ``capabilities.drop: [ALL]``. Host paths the image's files live under but that
  a non-root user cannot traverse (the venv's Python under /root) are exposed read-only in the
  pod's mount namespace (``expose_paths``), standing in for the image's filesystem.
* **Logs**: stdout and stderr, one timestamped line each (like CRI logs), in
  ``<pod dir>/container.log`` and :attr:`RunningPod.lines`.
* **Results**: when the process exits its pod is reported to kwok with
  :meth:`ControlPlane.complete_pod` (exit 0) or :meth:`ControlPlane.fail_pod` with the exit code
  (128+N after signal N). A pod that is deleted, or gets a ``deletionTimestamp``, while its process
  runs gets SIGTERM, then SIGKILL after ``terminationGracePeriodSeconds``.

Only standard-library imports at module level: the same file is the in-namespace launcher
(``python kubelet.py --exec-pod``, reading its instructions from stdin).
"""

from __future__ import annotations

import base64
import ctypes
import json
import math
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

JOB_COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CLUSTER_DOMAIN = "cluster.local"


class PodUnsupported(RuntimeError):
    """The pod uses something this stand-in kubelet cannot do faithfully."""


class PodStartError(RuntimeError):
    """The kubelet could not start the container (as CreateContainerConfigError would)."""


# ----- $(VAR) expansion (k8s.io/kubernetes/third_party/forked/golang/expansion) -----

def expand(text: str, lookup: Mapping[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion: `$(NAME)` -> value if NAME is defined, else left as is;
    `$$` -> `$`; a `$` followed by anything else is kept with it."""
    out: list[str] = []
    checkpoint = 0
    cursor = 0
    while cursor < len(text):
        if text[cursor] == "$" and cursor + 1 < len(text):
            out.append(text[checkpoint:cursor])
            rest = text[cursor + 1:]
            if rest[0] == "$":  # escaped operator
                out.append("$")
                advance = 1
            elif rest[0] == "(":
                close = rest.find(")", 1)
                if close == -1:  # incomplete reference: keep "$(" and go on after it
                    out.append("$(")
                    advance = 1
                else:
                    name = rest[1:close]
                    out.append(lookup[name] if name in lookup else f"$({name})")
                    advance = close + 1
            else:
                out.append("$" + rest[0])
                advance = 1
            cursor += advance
            checkpoint = cursor + 1
        cursor += 1
    out.append(text[checkpoint:])
    return "".join(out)


# ----- quantities -----

_SUFFIX = {"": 1, "m": 1e-3, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
           "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


def parse_quantity(value: str | int | float) -> float:
    """A Kubernetes resource quantity ("500m", "8Gi", "1e3", 2) as a number."""
    if isinstance(value, (int, float)):
        return float(value)
    match = re.fullmatch(r"([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)([a-zA-Z]*)", value.strip())
    if not match or match.group(2) not in _SUFFIX:
        raise PodUnsupported(f"cannot parse quantity {value!r}")
    return float(match.group(1)) * _SUFFIX[match.group(2)]


# ----- field paths (downward API) -----

def _field_value(pod: Mapping[str, Any], path: str) -> str:
    meta, spec, status = pod["metadata"], pod["spec"], pod.get("status") or {}
    match = re.fullmatch(r"metadata\.(labels|annotations)\['([^']*)'\]", path)
    if match:
        return (meta.get(match.group(1)) or {}).get(match.group(2), "")
    if path in ("metadata.labels", "metadata.annotations"):
        items = meta.get(path.split(".")[1]) or {}
        return "\n".join(f'{k}="{v}"' for k, v in sorted(items.items()))
    simple = {
        "metadata.name": meta.get("name"), "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"), "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName"), "status.hostIP": status.get("hostIP"),
        "status.podIP": status.get("podIP"),
        "status.hostIPs": ",".join(i["ip"] for i in status.get("hostIPs") or []),
        "status.podIPs": ",".join(i["ip"] for i in status.get("podIPs") or []),
    }
    if path not in simple:
        raise PodUnsupported(f"fieldRef {path!r} is not supported")
    return simple[path] or ""


def _resource_value(pod: Mapping[str, Any], container: Mapping[str, Any], ref: Mapping[str, Any],
                    node_allocatable: Callable[[], Mapping[str, str]]) -> str:
    resource = ref["resource"]
    kind, _, name = resource.partition(".")
    if name not in ("cpu", "memory", "ephemeral-storage") or kind not in ("limits", "requests"):
        raise PodUnsupported(f"resourceFieldRef {resource!r} is not supported")
    resources = container.get("resources") or {}
    quantity = (resources.get(kind) or {}).get(name)
    if quantity is None and kind == "limits":  # no limit: the node's allocatable, as the kubelet does
        quantity = node_allocatable().get(name)
    if quantity is None:
        quantity = "0"
    divisor = parse_quantity(ref.get("divisor") or "1")
    return str(int(math.ceil(parse_quantity(quantity) / divisor)))


# ----- pods -----

@dataclass
class RunningPod:
    """One pod's container process."""

    namespace: str
    name: str
    uid: str
    pod_dir: Path
    proc: subprocess.Popen
    grace_seconds: int
    started: float = field(default_factory=time.time)
    lines: list[tuple[float, str]] = field(default_factory=list)
    exit_code: int | None = None
    finished: float | None = None
    reported: threading.Event = field(default_factory=threading.Event)
    terminating: bool = False
    argv: list[str] = field(default_factory=list)  # the command as run, after $(VAR) expansion
    env_names: list[str] = field(default_factory=list)  # the variables it got (values are not kept)

    @property
    def log_path(self) -> Path:
        return self.pod_dir / "container.log"

    def log(self) -> str:
        return "".join(line for _, line in self.lines)

    def done(self) -> bool:
        return self.reported.is_set()


class LocalKubelet:
    """Runs pods of the test control plane as local processes (see the module docstring).

    ``cp`` is a started ``ControlPlane``; ``root`` a directory for the pods' files; ``image_env``
    the environment the image would set (default: ``PATH`` with this Python's bin directory
    first); ``expose_paths`` host paths the image's user must be able to read (default: this
    Python's installation); ``report`` whether exits are reported to kwok.
    """

    def __init__(self, cp: Any, root: str | os.PathLike[str], *, image_env: Mapping[str, str] | None = None,
                 image_workdir: str = "/", expose_paths: Iterable[str] | None = None, report: bool = True,
                 poll_interval: float = 1.0):
        from kubernetes import client

        self.cp = cp
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.api = cp.api_client()
        self.core = client.CoreV1Api(self.api)
        bin_dir = str(Path(sys.executable).parent)
        self.image_env = dict(image_env) if image_env is not None else {"PATH": f"{bin_dir}:{DEFAULT_PATH}"}
        self.image_workdir = image_workdir
        if expose_paths is None:
            expose_paths = {os.path.realpath(sys.base_prefix), os.path.realpath(sys.prefix)}
        self.expose_paths = sorted(set(expose_paths))
        self.report = report
        self.poll_interval = poll_interval
        self.pods: dict[str, RunningPod] = {}
        self._created_dirs: list[Path] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._watcher = threading.Thread(target=self._watch_deletions, name="kubelet-watch", daemon=True)
        self._watcher.start()
        self.api_port = int(cp.server.rsplit(":", 1)[1].rstrip("/"))

    # ----- API reads (raw JSON, as the API server sends it) -----
    def _get(self, path: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            response = self.api.call_api(path, "GET", header_params={"Accept": "application/json"},
                                         auth_settings=["BearerToken"], _preload_content=False)
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        raw = response[0] if isinstance(response, tuple) else response  # (data, status, headers) in older clients
        return json.loads(raw.data)

    def read_pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._get(f"/api/v1/namespaces/{namespace}/pods/{name}")

    def _config_map(self, namespace: str, name: str) -> dict[str, str] | None:
        obj = self._get(f"/api/v1/namespaces/{namespace}/configmaps/{name}")
        if obj is None:
            return None
        data = dict(obj.get("data") or {})
        data.update({k: base64.b64decode(v).decode("latin-1") for k, v in (obj.get("binaryData") or {}).items()})
        return data

    def _secret(self, namespace: str, name: str) -> dict[str, str] | None:
        obj = self._get(f"/api/v1/namespaces/{namespace}/secrets/{name}")
        if obj is None:
            return None
        return {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()}

    def _node_allocatable(self, pod: Mapping[str, Any]) -> Mapping[str, str]:
        node = self._get(f"/api/v1/nodes/{pod['spec'].get('nodeName')}") or {}
        return (node.get("status") or {}).get("allocatable") or {}

    def _token(self, pod: Mapping[str, Any], source: Mapping[str, Any]) -> str:
        """A token for the pod's ServiceAccount from the TokenRequest API, bound to the pod."""
        meta = pod["metadata"]
        spec: dict[str, Any] = {
            "expirationSeconds": int(source.get("expirationSeconds") or 3600),
            "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": meta["name"], "uid": meta["uid"]},
        }
        if source.get("audience"):
            spec["audiences"] = [source["audience"]]
        account = pod["spec"].get("serviceAccountName") or "default"
        response = self.core.create_namespaced_service_account_token(
            account, meta["namespace"],
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec})
        return response.status.token

    # ----- environment -----
    def service_env(self) -> dict[str, str]:
        """The `kubernetes` Service variables every container gets (the API server on loopback)."""
        port = str(self.api_port)
        url = f"tcp://127.0.0.1:{port}"
        return {
            "KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": port,
            "KUBERNETES_SERVICE_PORT_HTTPS": port, "KUBERNETES_PORT": url,
            f"KUBERNETES_PORT_{port}_TCP": url, f"KUBERNETES_PORT_{port}_TCP_PROTO": "tcp",
            f"KUBERNETES_PORT_{port}_TCP_PORT": port, f"KUBERNETES_PORT_{port}_TCP_ADDR": "127.0.0.1",
        }

    def container_env(self, pod: Mapping[str, Any], container: Mapping[str, Any]) -> dict[str, str]:
        """The variables the kubelet gives the container (without the image's), in the kubelet's order."""
        namespace = pod["metadata"]["namespace"]
        env: dict[str, str] = dict(self.service_env())
        for source in container.get("envFrom") or []:
            prefix = source.get("prefix") or ""
            if "configMapRef" in source:
                ref, data = source["configMapRef"], self._config_map(namespace, source["configMapRef"]["name"])
            elif "secretRef" in source:
                ref, data = source["secretRef"], self._secret(namespace, source["secretRef"]["name"])
            else:
                raise PodUnsupported(f"envFrom {source}")
            if data is None:
                if ref.get("optional"):
                    continue
                raise PodStartError(f"envFrom: {ref['name']} not found")
            env.update({prefix + k: v for k, v in data.items()})
        for var in container.get("env") or []:
            name = var["name"]
            if "valueFrom" not in var:
                env[name] = expand(var.get("value", ""), env)
                continue
            source = var["valueFrom"]
            if "fieldRef" in source:
                env[name] = _field_value(pod, source["fieldRef"]["fieldPath"])
            elif "resourceFieldRef" in source:
                env[name] = _resource_value(pod, container, source["resourceFieldRef"],
                                            lambda: self._node_allocatable(pod))
            elif "secretKeyRef" in source or "configMapKeyRef" in source:
                is_secret = "secretKeyRef" in source
                ref = source["secretKeyRef" if is_secret else "configMapKeyRef"]
                data = (self._secret if is_secret else self._config_map)(namespace, ref["name"])
                if data is None or ref["key"] not in data:
                    if ref.get("optional"):
                        continue
                    what = "secret" if is_secret else "configmap"
                    raise PodStartError(f"CreateContainerConfigError: {what} {ref['name']!r} "
                                        f"{'not found' if data is None else 'has no key ' + repr(ref['key'])}")
                env[name] = data[ref["key"]]
            else:
                raise PodUnsupported(f"env {name}: valueFrom {sorted(source)}")
        return env

    # ----- volumes -----
    def _write_files(self, directory: Path, files: list[tuple[str, str | bytes, int]]) -> None:
        for rel, content, mode in files:
            path = directory / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content.encode() if isinstance(content, str) else content)
            path.chmod(mode)

    def _items(self, data: Mapping[str, str], items: list[Mapping[str, Any]] | None, default_mode: int,
               what: str) -> list[tuple[str, str, int]]:
        if not items:
            return [(k, v, default_mode) for k, v in data.items()]
        out = []
        for item in items:
            if item["key"] not in data:
                raise PodStartError(f"{what}: no key {item['key']!r}")
            out.append((item["path"], data[item["key"]], int(item.get("mode", default_mode))))
        return out

    def _projection(self, pod: Mapping[str, Any], container: Mapping[str, Any], volume: Mapping[str, Any],
                    kind: str, default_mode: int) -> list[tuple[str, str, int]]:
        """Files of one configMap/secret/downwardAPI/serviceAccountToken source (or volume)."""
        namespace = pod["metadata"]["namespace"]
        if kind in ("configMap", "secret"):
            name = volume.get("name") if kind == "configMap" else volume.get("secretName", volume.get("name"))
            data = self._config_map(namespace, name) if kind == "configMap" else self._secret(namespace, name)
            if data is None:
                if volume.get("optional"):
                    return []
                raise PodStartError(f"{kind} {name!r} not found")
            return self._items(data, volume.get("items"), default_mode, f"{kind} {name}")
        if kind == "downwardAPI":
            files = []
            for item in volume.get("items") or []:
                if "fieldRef" in item:
                    value = _field_value(pod, item["fieldRef"]["fieldPath"])
                else:
                    value = _resource_value(pod, container, item["resourceFieldRef"],
                                            lambda: self._node_allocatable(pod))
                files.append((item["path"], value, int(item.get("mode", default_mode))))
            return files
        if kind == "serviceAccountToken":
            return [(volume["path"], self._token(pod, volume), default_mode)]
        raise PodUnsupported(f"volume source {kind!r} is not supported")

    def _materialize(self, pod: Mapping[str, Any], container: Mapping[str, Any], volume: Mapping[str, Any],
                     directory: Path) -> dict[str, Any]:
        """Write one volume's content; returns how to mount it ({kind: bind|tmpfs, ...})."""
        kinds = [k for k in volume if k != "name"]
        if len(kinds) != 1:
            raise PodUnsupported(f"volume {volume.get('name')}: {kinds}")
        kind = kinds[0]
        source = volume[kind] or {}
        if kind == "emptyDir":
            if source.get("medium") == "Memory":
                size = source.get("sizeLimit")
                return {"kind": "tmpfs", "size": int(parse_quantity(size)) if size else None}
            if source.get("medium"):
                raise PodUnsupported(f"emptyDir medium {source['medium']!r}")
            directory.mkdir(parents=True)
            directory.chmod(0o777)  # the kubelet's emptyDir mode
            return {"kind": "bind", "source": str(directory)}
        directory.mkdir(parents=True)
        directory.chmod(0o755)
        default_mode = int(source.get("defaultMode", 0o644))
        if kind == "projected":
            files = []
            for projection in source.get("sources") or []:
                (sub_kind, sub), = projection.items()
                files += self._projection(pod, container, sub or {}, sub_kind, default_mode)
        else:
            files = self._projection(pod, container, source, kind, default_mode)
        self._write_files(directory, files)
        return {"kind": "bind", "source": str(directory)}

    # ----- hosts -----
    def hosts_file(self, pod: Mapping[str, Any]) -> str:
        """The pod's /etc/hosts: its own names and what cluster DNS answers in its namespace, on loopback."""
        namespace = pod["metadata"]["namespace"]
        lines = ["# Kubernetes-managed hosts file (kubetune test kubelet: every pod address is 127.0.0.1).",
                 "127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback",
                 "127.0.0.1\t" + " ".join(["kubernetes", "kubernetes.default", "kubernetes.default.svc",
                                           f"kubernetes.default.svc.{CLUSTER_DOMAIN}"])]
        own = pod["spec"].get("hostname") or pod["metadata"]["name"][:63]
        names = [own]
        if pod["spec"].get("subdomain"):
            names = [f"{own}.{pod['spec']['subdomain']}.{namespace}.svc.{CLUSTER_DOMAIN}", own]
        lines.append("127.0.0.1\t" + " ".join(names))
        services = {s["metadata"]["name"]: s for s in
                    (self._get(f"/api/v1/namespaces/{namespace}/services") or {}).get("items", [])}
        for other in (self._get(f"/api/v1/namespaces/{namespace}/pods") or {}).get("items", []):
            hostname, subdomain = other["spec"].get("hostname"), other["spec"].get("subdomain")
            service = services.get(subdomain or "")
            if not (hostname and service) or service["spec"].get("clusterIP") != "None":
                continue
            selector = service["spec"].get("selector") or {}
            labels = other["metadata"].get("labels") or {}
            if not selector or any(labels.get(k) != v for k, v in selector.items()):
                continue
            ready = any(c.get("type") == "Ready" and c.get("status") == "True"
                        for c in (other.get("status") or {}).get("conditions") or [])
            if not (ready or service["spec"].get("publishNotReadyAddresses")):
                continue
            base = f"{hostname}.{subdomain}"
            lines.append("127.0.0.1\t" + " ".join([f"{base}.{namespace}.svc.{CLUSTER_DOMAIN}",
                                                   f"{base}.{namespace}.svc", f"{base}.{namespace}", base]))
        return "\n".join(lines) + "\n"

    # ----- starting a pod -----
    def _mount_point(self, target: str, is_file: bool = False) -> None:
        """Make sure a mount point exists on the host (created ones are removed by close())."""
        path = Path(target)
        if path.exists():
            if path.is_dir() == is_file:
                raise PodUnsupported(f"mount point {target} exists as a {'directory' if path.is_dir() else 'file'}")
            return
        if is_file:
            raise PodUnsupported(f"file mount point {target} does not exist")
        missing = []
        probe = path
        while not probe.exists():
            missing.append(probe)
            probe = probe.parent
        try:
            path.mkdir(parents=True)
        except OSError as error:
            raise PodStartError(f"cannot create the mount point {target}: {error}") from error
        with self._lock:
            self._created_dirs.extend(reversed(missing))

    def image_paths(self) -> list[str]:
        """Host paths that stand in for the image's filesystem: the environment and kubetune's sources."""
        import kubetune
        import kubetune_trainer

        sources = {os.path.realpath(Path(m.__file__).parent.parent) for m in (kubetune, kubetune_trainer)}
        return sorted(set(self.expose_paths) | sources)

    def _expose_ops(self, pod_dir: Path) -> list[dict[str, Any]]:
        """Mounts that make `expose_paths` readable under an ancestor a non-root user cannot traverse."""
        ops: list[dict[str, Any]] = []
        blocked: dict[str, list[str]] = {}
        for path in self.expose_paths:
            parts = Path(path).parts
            for depth in range(2, len(parts) + 1):
                ancestor = str(Path(*parts[:depth]))
                if not os.stat(ancestor).st_mode & stat.S_IXOTH:
                    blocked.setdefault(ancestor, []).append(str(Path(*parts[:depth + 1])))
                    break
        for index, (ancestor, children) in enumerate(sorted(blocked.items())):
            stages = []
            for child_index, child in enumerate(sorted(set(children))):
                stage = pod_dir / "expose" / f"{index}-{child_index}"
                stage.mkdir(parents=True)
                ops.append({"kind": "bind", "source": child, "target": str(stage), "readOnly": True})
                stages.append((stage, child))
            ops.append({"kind": "tmpfs", "target": ancestor, "mode": "0755", "size": 1 << 20})
            for stage, child in stages:
                ops.append({"kind": "mkdir", "target": child})
                ops.append({"kind": "bind", "source": str(stage), "target": child, "readOnly": True})
        return ops

    @staticmethod
    def _order_mounts(mounts: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Parents before children, and a mount that hides another's source after that one."""
        def under(path: str, ancestor: str) -> bool:
            return path == ancestor or path.startswith(ancestor.rstrip("/") + "/")

        remaining = sorted(mounts, key=lambda m: (m["target"].count("/"), m["target"]))
        ordered: list[dict[str, Any]] = []
        while remaining:
            for m in remaining:
                blocked = any(o is not m and (
                    (under(m["target"], o["target"]) and m["target"] != o["target"])  # o is m's parent
                    or (o.get("source") and under(o["source"], m["target"])))  # m would hide o's source
                    for o in remaining)
                if not blocked:
                    ordered.append(m)
                    remaining.remove(m)
                    break
            else:
                raise PodUnsupported(f"no order for the mounts {[m['target'] for m in remaining]}")
        return ordered

    def start_pod(self, namespace: str, name: str) -> RunningPod:
        """Run the pod's container; its exit is reported to the control plane by a monitor thread."""
        if os.geteuid() != 0 or not shutil.which("unshare"):
            raise PodUnsupported("the test kubelet needs root and unshare(1) for per-pod mount namespaces")
        pod = self.read_pod(namespace, name)
        if pod is None:
            raise PodStartError(f"pod {namespace}/{name} not found")
        spec = pod["spec"]
        if spec.get("initContainers") or len(spec["containers"]) != 1 or spec.get("ephemeralContainers"):
            raise PodUnsupported(f"pod {name}: only pods with exactly one container are supported")
        container = spec["containers"][0]
        if not container.get("command"):
            raise PodUnsupported(f"pod {name}: no command (the image's entrypoint is unknown here)")
        pod_dir = self.root / f"{namespace}_{name}_{pod['metadata']['uid'][:8]}"
        pod_dir.mkdir(parents=True)

        # volumes
        volumes = {v["name"]: v for v in spec.get("volumes") or []}
        mounts: list[dict[str, Any]] = []
        for mount in container.get("volumeMounts") or []:
            if mount.get("subPath") or mount.get("subPathExpr"):
                raise PodUnsupported(f"volumeMount {mount['name']}: subPath is not supported")
            volume = volumes.get(mount["name"])
            if volume is None:
                raise PodStartError(f"volumeMount {mount['name']}: no such volume")
            how = self._materialize(pod, container, volume, pod_dir / "volumes" / mount["name"])
            self._mount_point(mount["mountPath"])
            mounts.append({**how, "target": mount["mountPath"], "readOnly": bool(mount.get("readOnly"))})
        hosts = pod_dir / "hosts"
        hosts.write_text(self.hosts_file(pod))
        hosts.chmod(0o644)
        mounts.append({"kind": "bind", "source": str(hosts), "target": "/etc/hosts", "readOnly": False})

        # environment and command
        env = self.container_env(pod, container)
        hostname = spec.get("hostname") or pod["metadata"]["name"][:63]
        process_env = {**self.image_env, "HOSTNAME": hostname, **env}
        argv = [expand(a, env) for a in (container.get("command") or []) + (container.get("args") or [])]

        # security context
        pod_sc = spec.get("securityContext") or {}
        sc = container.get("securityContext") or {}
        uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
        gid = sc.get("runAsGroup", pod_sc.get("runAsGroup"))
        if (sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) and not uid) or sc.get("privileged"):
            raise PodUnsupported(f"pod {name}: runAsNonRoot without a runAsUser, or privileged")
        groups = [g for g in [pod_sc.get("fsGroup"), *(pod_sc.get("supplementalGroups") or [])] if g is not None]
        drop_all = "ALL" in ((sc.get("capabilities") or {}).get("drop") or [])
        if (sc.get("capabilities") or {}).get("add"):
            raise PodUnsupported(f"pod {name}: capabilities.add is not supported")
        expose = self._expose_ops(pod_dir) if uid else []
        for m in mounts:  # fsGroup: volumes are group-owned by it (emptyDirs are 0777 anyway)
            if m["kind"] == "bind" and pod_sc.get("fsGroup") is not None and m["target"] != "/etc/hosts":
                for dirpath, _, filenames in os.walk(m["source"]):
                    for entry in [dirpath, *(os.path.join(dirpath, f) for f in filenames)]:
                        os.chown(entry, -1, int(pod_sc["fsGroup"]))
        # The image's own files (Python, the environment, the installed kubetune sources) stay visible
        # even where a pod volume is mounted over an ancestor (an emptyDir at /tmp hides a checkout
        # under /tmp): stage them first, and bind them back after the volumes.
        stage_first: list[dict[str, Any]] = []
        bind_back: list[dict[str, Any]] = []
        targets = [m["target"] for m in mounts]
        for index, path in enumerate(self.image_paths()):
            if any(path == t or path.startswith(t.rstrip("/") + "/") for t in targets):
                stage = Path("/run/kubetune-kubelet") / pod["metadata"]["uid"] / str(index)
                stage.mkdir(parents=True, exist_ok=True)
                stage_first.append({"kind": "bind", "source": path, "target": str(stage), "readOnly": True})
                bind_back += [{"kind": "mkdir", "target": path},
                              {"kind": "bind", "source": str(stage), "target": path, "readOnly": True}]
        instructions = {
            "mounts": stage_first + expose + self._order_mounts(mounts) + bind_back,
            "hostname": hostname,
            "cwd": container.get("workingDir") or self.image_workdir,
            "uid": uid, "gid": gid if gid is not None else (0 if uid is None else uid), "groups": groups,
            "noNewPrivs": sc.get("allowPrivilegeEscalation") is False, "dropAllCaps": drop_all,
            "argv": argv, "env": process_env,
        }
        launcher = [shutil.which("unshare"), "--mount", "--uts", "--propagation", "private", "--",
                    sys.executable, "-S", os.path.abspath(__file__), "--exec-pod"]
        proc = subprocess.Popen(launcher, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env={"PATH": DEFAULT_PATH}, cwd="/", start_new_session=True)
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(instructions).encode())
        proc.stdin.close()
        running = RunningPod(namespace, name, pod["metadata"]["uid"], pod_dir, proc,
                             int(spec.get("terminationGracePeriodSeconds", 30)), argv=argv,
                             env_names=sorted(process_env))
        with self._lock:
            self.pods[f"{namespace}/{name}"] = running
        threading.Thread(target=self._pump_logs, args=(running,), name=f"log-{name}", daemon=True).start()
        return running

    def _pump_logs(self, pod: RunningPod) -> None:
        assert pod.proc.stdout is not None
        with open(pod.log_path, "a", encoding="utf-8") as log:
            for raw in iter(pod.proc.stdout.readline, b""):
                now = time.time()
                line = raw.decode("utf-8", errors="replace")
                pod.lines.append((now, line))
                stamp = datetime.fromtimestamp(now, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
                log.write(f"{stamp} {line if line.endswith(chr(10)) else line + chr(10)}")
                log.flush()
        code = pod.proc.wait()
        pod.exit_code = 128 - code if code < 0 else code  # killed by signal N -> 128+N, as runtimes report
        pod.finished = time.time()
        shutil.rmtree(pod.pod_dir / "volumes", ignore_errors=True)  # tokens and secrets go with the pod
        try:
            if self.report and not pod.terminating:
                if pod.exit_code == 0:
                    self.cp.complete_pod(pod.namespace, pod.name)
                else:
                    self.cp.fail_pod(pod.namespace, pod.name, exit_code=pod.exit_code, reason="Error")
        except Exception as error:  # noqa: BLE001 - the pod may be gone already
            print(f"[kubelet] reporting {pod.namespace}/{pod.name} exit {pod.exit_code}: {error}", file=sys.stderr)
        finally:
            pod.reported.set()

    def _watch_deletions(self) -> None:
        """Terminate the process of a pod that is deleted (or being deleted), as the kubelet does."""
        while not self._closed.wait(self.poll_interval):
            with self._lock:
                active = [p for p in self.pods.values() if p.proc.poll() is None and not p.terminating]
            for pod in active:
                try:
                    current = self.read_pod(pod.namespace, pod.name)
                except Exception:  # noqa: BLE001 - API hiccup: look again later
                    continue
                if current is None or current["metadata"]["uid"] != pod.uid or current["metadata"].get(
                        "deletionTimestamp"):
                    self.terminate(pod, reason="pod deleted")

    def terminate(self, pod: RunningPod, grace: float | None = None, reason: str = "") -> None:
        """SIGTERM to the container's main process, SIGKILL to all of it after the grace period."""
        if pod.proc.poll() is not None:
            return
        pod.terminating = True
        print(f"[kubelet] stopping {pod.namespace}/{pod.name} ({reason})", file=sys.stderr)
        try:
            pod.proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            return
        grace = pod.grace_seconds if grace is None else grace

        def kill_later() -> None:
            try:
                pod.proc.wait(grace)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(pod.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        threading.Thread(target=kill_later, daemon=True).start()

    def wait(self, pods: Iterable[RunningPod], timeout: float) -> None:
        """Until every pod's process has exited and been reported; TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        for pod in pods:
            if not pod.reported.wait(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"pod {pod.namespace}/{pod.name} still running after {timeout}s:\n"
                                   + "".join(line for _, line in pod.lines[-40:]))

    def close(self) -> None:
        """Kill what still runs, remove the mount points created on the host and the pods' volumes."""
        self._closed.set()
        with self._lock:
            pods = list(self.pods.values())
        for pod in pods:
            if pod.proc.poll() is None:
                pod.terminating = True
                try:
                    os.killpg(pod.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for pod in pods:
            try:
                pod.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
            pod.reported.wait(10)
            shutil.rmtree(pod.pod_dir / "volumes", ignore_errors=True)
            shutil.rmtree(pod.pod_dir / "expose", ignore_errors=True)
        with self._lock:
            created, self._created_dirs = self._created_dirs, []
        for path in reversed(created):  # deepest first; only if still empty
            try:
                path.rmdir()
            except OSError:
                pass

    def __enter__(self) -> LocalKubelet:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# ----- the launcher, inside the pod's mount and UTS namespaces (runs as root, then execs) -----

def _exec_pod() -> None:
    spec = json.loads(sys.stdin.buffer.read())
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)

    def run(*args: str) -> None:
        result = subprocess.run(["mount", *args], capture_output=True, text=True)
        if result.returncode != 0:
            sys.stderr.write(f"[kubelet] mount {' '.join(args)} failed: {result.stderr}")
            sys.exit(128)

    for m in spec["mounts"]:
        target = m["target"]
        if m["kind"] == "mkdir":
            os.makedirs(target, exist_ok=True)
        elif m["kind"] == "tmpfs":
            options = [f"mode={m.get('mode', '1777')}"] + ([f"size={m['size']}"] if m.get("size") else [])
            run("-t", "tmpfs", "-o", ",".join(options), "tmpfs", target)
        elif m["kind"] == "bind":
            run("--bind", m["source"], target)
            if m.get("readOnly"):
                run("-o", "remount,bind,ro", target)
        else:
            sys.stderr.write(f"[kubelet] unknown mount kind {m['kind']}\n")
            sys.exit(128)
    socket.sethostname(spec["hostname"])
    os.chdir(spec["cwd"])
    libc = ctypes.CDLL(None, use_errno=True)
    if spec["dropAllCaps"]:
        for cap in range(64):
            libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP (EINVAL past the last capability: ignored)
    if spec["uid"] is not None:
        os.setgroups(spec["groups"])
        os.setgid(spec["gid"])
        os.setuid(spec["uid"])
    if spec["noNewPrivs"] and libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        sys.stderr.write("[kubelet] PR_SET_NO_NEW_PRIVS failed\n")
        sys.exit(128)
    argv, env = spec["argv"], spec["env"]
    try:
        os.execvpe(argv[0], argv, env)
    except OSError as error:
        sys.stderr.write(f"[kubelet] exec {argv[0]}: {error}\n")
        sys.exit(127)


if __name__ == "__main__" and sys.argv[1:] == ["--exec-pod"]:
    _exec_pod()
