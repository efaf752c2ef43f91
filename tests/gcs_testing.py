"""Test-only Google Cloud Storage stand-ins, all on loopback.

* `GcsEmulator` runs `gcp-storage-emulator` in a subprocess on 127.0.0.1.
  google-cloud-storage reaches it through ``STORAGE_EMULATOR_HOST``.
* `GcsProxy` lets TensorFlow's own gs:// filesystem (which has no endpoint
  override) talk to the emulator.  TF honours ``https_proxy``/``http_proxy``,
  ``CURL_CA_BUNDLE`` and ``GOOGLE_AUTH_TOKEN_FOR_TESTING``, so the proxy accepts
  ``CONNECT www.googleapis.com:443`` / ``storage.googleapis.com:443``,
  terminates TLS with a certificate signed by a CA generated here, and forwards
  every decrypted request to the emulator over plain HTTP.  It also serves
  plain-http absolute-URI proxy requests and origin-form requests (so the
  google-cloud-storage client can be pointed at it as a reverse proxy with
  ``STORAGE_EMULATOR_HOST``), and it can inject faults (503/429/500 responses,
  dropped connections) for requests matching a path pattern.

The proxy only ever opens connections to the emulator's loopback address;
requests for any other host are answered with 403 and recorded in
`GcsProxy.refused`.

Fixtures (import them into a test module):
  ``gcs_emulator``  session-scoped running `GcsEmulator` with a bucket.
  ``gcs_proxy``     session-scoped `GcsProxy` in front of ``gcs_emulator``.
  ``gcs_tf_env``    env dict for TF subprocesses that use gs:// via the proxy.
  ``loopback_only`` fails a test whose process reaches a non-loopback address.

The emulator answers a resumable-upload POST with a plain-http ``Location``
(``http://www.googleapis.com/upload/...``); by default the proxy passes it on,
so TF sends the upload PUT through ``http_proxy`` as an absolute-URI request
(``rewrite_location_https=True`` rewrites it to https like real GCS instead).
Known emulator quirks worked around here: TF sends request bodies chunked
(with ``Expect: 100-continue``) - the proxy de-chunks them and sends
Content-Length; an empty ``uploadType=media`` body (TF's "dir/" markers from
``makedirs``) crashes the emulator - the proxy re-sends it as a multipart upload.
"""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import json
import os
import re
import socket
import socketserver
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass

import pytest

GOOGLE_HOSTS = frozenset({"www.googleapis.com", "storage.googleapis.com"})
DEFAULT_BUCKET = "showtell-test"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _require_loopback(host: str) -> None:
    try:
        ok = ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = host == "localhost"
    if not ok:
        raise ValueError(f"refusing non-loopback address {host!r}")


# --------------------------------------------------------------------------
# Emulator
# --------------------------------------------------------------------------


class GcsEmulator:
    """gcp-storage-emulator in a subprocess on 127.0.0.1 (in-memory store)."""

    def __init__(self, bucket: str = DEFAULT_BUCKET, host: str = "127.0.0.1",
                 log_path: str | None = None):
        _require_loopback(host)
        self.host = host
        self.port: int | None = None
        self.bucket = bucket
        self._proc: subprocess.Popen | None = None
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix="gcs-emulator-", suffix=".log")
            os.close(fd)
        self.log_path = log_path
        self._log = open(log_path, "ab")

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def env(self) -> dict:
        """Env for processes whose google-cloud-storage should use the emulator."""
        return {"STORAGE_EMULATOR_HOST": self.endpoint}

    def start(self, timeout: float = 30.0) -> "GcsEmulator":
        last = None
        for _ in range(3):  # a port picked by free_port() can be taken meanwhile
            self.port = free_port()
            self._proc = subprocess.Popen(
                [
                    sys.executable, "-m", "gcp_storage_emulator", "start",
                    f"--host={self.host}", f"--port={self.port}", "--in-memory",
                    "--quiet", f"--default-bucket={self.bucket}",
                ],
                stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log,
                env={k: v for k, v in os.environ.items()
                     if k.lower() not in ("http_proxy", "https_proxy")},
            )
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self._proc.poll() is None:
                try:
                    status, body = self.raw_request("GET", "/")
                    if status == 200:
                        return self
                except OSError as e:
                    last = e
                time.sleep(0.05)
            self.stop()
        raise RuntimeError(
            f"gcp-storage-emulator did not start ({last}); log: {self.log_path}"
        )

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
        self._proc = None

    def raw_request(self, method: str, path: str, body=None, headers=None):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def client(self, endpoint: str | None = None):
        """A google-cloud-storage client for the emulator (or `endpoint`)."""
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(
            project="showtell-test",
            credentials=AnonymousCredentials(),
            client_options={"api_endpoint": endpoint or self.endpoint},
        )

    def create_bucket(self, name: str, location: str | None = None) -> None:
        body = {"name": name}
        status, data = self.raw_request(
            "POST", "/storage/v1/b?project=showtell-test", json.dumps(body),
            {"Content-Type": "application/json"},
        )
        if status not in (200, 409):
            raise RuntimeError(f"create bucket {name}: {status} {data!r}")
        if location:
            status, data = self.raw_request(
                "PATCH", f"/storage/v1/b/{name}", json.dumps({"location": location}),
                {"Content-Type": "application/json"},
            )
            if status != 200:
                raise RuntimeError(f"patch bucket {name}: {status} {data!r}")

    def delete_prefix(self, prefix: str, bucket: str | None = None) -> None:
        client = self.client()
        for blob in list(client.list_blobs(bucket or self.bucket, prefix=prefix)):
            blob.delete()


# --------------------------------------------------------------------------
# Test CA and certificates
# --------------------------------------------------------------------------


def make_test_ca(directory: str, hosts=tuple(sorted(GOOGLE_HOSTS))):
    """Write ca.pem, server.pem (leaf + CA chain) and server.key into directory.

    Returns (ca_path, cert_path, key_path).  EC P-256 keys: fast to generate.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=2)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "showtell test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(h) for h in hosts]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )

    pem = serialization.Encoding.PEM
    ca_path = os.path.join(directory, "ca.pem")
    cert_path = os.path.join(directory, "server.pem")
    key_path = os.path.join(directory, "server.key")
    with open(ca_path, "wb") as f:
        f.write(ca_cert.public_bytes(pem))
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(pem) + ca_cert.public_bytes(pem))
    with open(key_path, "wb") as f:
        f.write(
            key.private_bytes(
                pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return ca_path, cert_path, key_path


# --------------------------------------------------------------------------
# Proxy
# --------------------------------------------------------------------------

FAULT_ACTIONS = ("429", "500", "502", "503", "drop", "drop_after_forward", "corrupt")


@dataclass
class FaultRule:
    """Fail the next `count` requests whose "METHOD path?query" matches `pattern`.

    `body_pattern`, if given, must also match the start of the request body
    (google-cloud-storage multipart uploads carry the object name there).

    action: an HTTP status ("503", "429", "403", ...) answered instead of
    forwarding; "drop": read the request, then reset the connection without
    forwarding; "drop_after_forward": forward it (the emulator acts on it),
    then reset the connection instead of returning the response; "corrupt":
    flip one byte in the middle of the request body, then forward it.
    """

    action: str
    count: int = 1
    pattern: str = ""
    body_pattern: str | None = None
    hits: int = 0

    def matches(self, method: str, target: str, body: bytes = b"") -> bool:
        if self.hits >= self.count:
            return False
        if re.search(self.pattern, f"{method} {target}") is None:
            return False
        return self.body_pattern is None or re.search(
            self.body_pattern, body[:8192].decode("latin-1")) is not None


class _HttpError(Exception):
    pass


class _Conn:
    """Buffered reader + writer over a (possibly TLS) socket."""

    def __init__(self, sock):
        self.sock = sock
        self.rfile = sock.makefile("rb")

    def read_head(self):
        lines = []
        total = 0
        while True:
            line = self.rfile.readline(65537)
            if not line:
                if lines:
                    raise _HttpError("connection closed mid-header")
                return None
            total += len(line)
            if total > 256 * 1024:
                raise _HttpError("header too large")
            if line in (b"\r\n", b"\n"):
                if not lines:
                    continue  # tolerate stray CRLF between requests
                break
            lines.append(line.decode("latin-1").rstrip("\r\n"))
        start = lines[0]
        headers = []
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                headers.append((k.strip(), v.strip()))
        return start, headers

    def read_body(self, headers, expect_continue_cb=None):
        h = {k.lower(): v for k, v in headers}
        if "chunked" in h.get("transfer-encoding", "").lower():
            if expect_continue_cb:
                expect_continue_cb()
            out = bytearray()
            while True:
                size_line = self.rfile.readline(65537)
                if not size_line:
                    raise _HttpError("connection closed in chunked body")
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return bytes(out)
                out += self._read_exact(size)
                self.rfile.readline(65537)  # CRLF after chunk
        n = int(h.get("content-length", "0") or 0)
        if n and expect_continue_cb:
            expect_continue_cb()
        return self._read_exact(n)

    def _read_exact(self, n):
        data = self.rfile.read(n) if n else b""
        if len(data) != n:
            raise _HttpError("connection closed in body")
        return data

    def send(self, data: bytes):
        self.sock.sendall(data)

    def reset(self):
        """Abort the connection with a TCP RST (a "connection reset by peer")."""
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                 struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.close()

    def close(self):
        try:
            self.rfile.close()
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass


_HOP_BY_HOP = {
    "connection", "proxy-connection", "keep-alive", "transfer-encoding", "te",
    "trailer", "upgrade", "proxy-authorization", "proxy-authenticate", "expect",
    "content-length",
}


class _ProxyServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64


class GcsProxy:
    """Loopback HTTP(S) proxy mapping Google Storage hosts onto the emulator."""

    def __init__(self, emulator_host: str, emulator_port: int, workdir: str,
                 *, upstream_concurrency: int = 4, rewrite_location_https=False):
        _require_loopback(emulator_host)
        self.upstream = (emulator_host, int(emulator_port))
        self.ca_path, cert, key = make_test_ca(workdir)
        self._ssl = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._ssl.load_cert_chain(cert, key)
        self._ssl.set_alpn_protocols(["http/1.1"])
        # The emulator's HTTPServer is single-threaded with a listen backlog of
        # 5: more concurrent connects than that make SYNs wait for the 1 s
        # retransmit.  Bound the number of in-flight upstream requests.
        self._upstream_sem = threading.BoundedSemaphore(upstream_concurrency)
        self.rewrite_location_https = rewrite_location_https
        self.faults: list[FaultRule] = []
        self.log: list[tuple] = []  # (method, host, target, outcome, scheme)
        self.refused: list[str] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                proxy._handle(self.request)

        self._server = _ProxyServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="gcs-proxy", daemon=True
        )

    # -- control --------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "GcsProxy":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def add_fault(self, action: str, count: int = 1, pattern: str = "",
                  body_pattern: str | None = None) -> FaultRule:
        if action not in FAULT_ACTIONS and not re.fullmatch(r"[1-5]\d\d", action):
            raise ValueError(
                f"fault action must be an HTTP status or one of {FAULT_ACTIONS}")
        rule = FaultRule(action, count, pattern, body_pattern)
        with self._lock:
            self.faults.append(rule)
        return rule

    def clear(self) -> None:
        """Remove fault rules and forget the request log."""
        with self._lock:
            self.faults.clear()
            self.log.clear()
            self.refused.clear()

    def _take_fault(self, method, target, body):
        with self._lock:
            for rule in self.faults:
                if rule.matches(method, target, body):
                    rule.hits += 1
                    return rule.action
        return None

    def _record(self, *entry):
        with self._lock:
            self.log.append(entry)

    # -- connection handling ---------------------------------------------
    def _handle(self, sock):
        sock.settimeout(60)
        conn = _Conn(sock)
        try:
            head = conn.read_head()
            if head is None:
                return
            method, target, _ = self._split_start(head[0])
            if method == "CONNECT":
                host, _, port = target.rpartition(":")
                if host not in GOOGLE_HOSTS or port != "443":
                    self._refuse(conn, f"CONNECT {target}")
                    return
                conn.send(b"HTTP/1.1 200 Connection established\r\n\r\n")
                conn.rfile.close()
                tls = self._ssl.wrap_socket(sock, server_side=True)
                conn = _Conn(tls)
                self._serve(conn, "https", host, first=None)
            else:
                self._serve(conn, "http", None, first=head)
        except (OSError, _HttpError, ssl.SSLError, ValueError):
            pass
        finally:
            conn.close()

    @staticmethod
    def _split_start(line):
        parts = line.split()
        if len(parts) != 3:
            raise _HttpError(f"bad request line {line!r}")
        return parts

    def _refuse(self, conn, what):
        with self._lock:
            self.refused.append(what)
        body = f"test proxy refuses {what}: only Google Storage hosts, " \
               f"served by the local emulator\n".encode()
        conn.send(b"HTTP/1.1 403 Forbidden\r\nConnection: close\r\n"
                  b"Content-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s"
                  % (len(body), body))

    def _serve(self, conn, scheme, tunnel_host, first):
        head = first
        while True:
            if head is None:
                head = conn.read_head()
                if head is None:
                    return
            start, headers = head
            head = None
            method, target, version = self._split_start(start)
            hmap = {k.lower(): v for k, v in headers}

            # Where is the request going?
            if target.startswith(("http://", "https://")):
                u = urllib.parse.urlsplit(target)
                host, port = u.hostname or "", u.port
                path = u.path or "/"
                if u.query:
                    path += "?" + u.query
                scheme = u.scheme
            else:
                path = target
                host_hdr = hmap.get("host", "")
                host, _, port = host_hdr.rpartition(":") if ":" in host_hdr else (
                    host_hdr, "", None)
                port = int(port) if port else None
                if tunnel_host:
                    host = tunnel_host
            host = host.lower()
            local_ok = host in ("127.0.0.1", "localhost") and port in (
                self.port, self.upstream[1])
            if host not in GOOGLE_HOSTS and not local_ok:
                self._refuse(conn, f"{method} {scheme}://{host}:{port}{path}")
                return

            def send_continue():
                if "100-continue" in hmap.get("expect", "").lower():
                    conn.send(b"HTTP/1.1 100 Continue\r\n\r\n")

            body = conn.read_body(headers, send_continue)
            upstream_path = self._map_path(host, method, path)
            upstream_path, headers, body = self._fix_empty_media_upload(
                method, upstream_path, headers, body)
            fault = self._take_fault(method, upstream_path, body)
            if fault == "corrupt" and body:
                i = len(body) // 2
                body = body[:i] + bytes([body[i] ^ 0xFF]) + body[i + 1:]
                self._record(method, host, upstream_path, fault, scheme)
                fault = None
            if fault in ("drop", "drop_after_forward"):
                if fault == "drop_after_forward":
                    self._forward(method, upstream_path, headers, body, scheme)
                self._record(method, host, upstream_path, fault, scheme)
                conn.reset()
                return
            if fault is not None:
                status = int(fault)
                reason = http.client.responses.get(status, "Error")
                payload = json.dumps({"error": {
                    "code": status, "message": f"injected {status} by test proxy",
                    "errors": [{"message": "injected fault", "reason": "backendError"}],
                }}).encode()
                self._record(method, host, upstream_path, fault, scheme)
                conn.send(
                    f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json"
                    f"\r\nContent-Length: {len(payload)}\r\n\r\n".encode() + payload
                )
            else:
                status, reason, rheaders, rbody = self._forward(
                    method, upstream_path, headers, body, scheme
                )
                self._record(method, host, upstream_path, status, scheme)
                out = [f"HTTP/1.1 {status} {reason}"]
                for k, v in rheaders:
                    if k.lower() in _HOP_BY_HOP:
                        continue
                    if (k.lower() == "location" and scheme == "https"
                            and self.rewrite_location_https):
                        v = re.sub(r"^http://", "https://", v)
                    out.append(f"{k}: {v}")
                if method != "HEAD" and status not in (204, 304):
                    out.append(f"Content-Length: {len(rbody)}")
                data = ("\r\n".join(out) + "\r\n\r\n").encode("latin-1")
                if method != "HEAD":
                    data += rbody
                conn.send(data)
            if (version == "HTTP/1.0" or "close" in hmap.get("connection", "").lower()
                    or "close" in hmap.get("proxy-connection", "").lower()):
                return

    @staticmethod
    def _map_path(host, method, path):
        """storage.googleapis.com/BUCKET/OBJECT -> the emulator's download URL."""
        if host != "storage.googleapis.com":
            return path
        u = urllib.parse.urlsplit(path)
        m = re.fullmatch(r"/([^/]+)/(.+)", u.path)
        if method in ("GET", "HEAD") and m:
            obj = urllib.parse.quote(urllib.parse.unquote(m.group(2)), safe="")
            query = "alt=media" + ("&" + u.query if u.query else "")
            return f"/download/storage/v1/b/{m.group(1)}/o/{obj}?{query}"
        return path

    @staticmethod
    def _fix_empty_media_upload(method, path, headers, body):
        """Emulator workaround: it fails (500, dropped) on an empty
        ``uploadType=media`` body, which TF sends to create "dir/" markers.
        Send the same thing as a multipart upload, which it handles."""
        u = urllib.parse.urlsplit(path)
        q = urllib.parse.parse_qs(u.query)
        if body or method != "POST" or q.get("uploadType") != ["media"]:
            return path, headers, body
        boundary = "showtell_empty_upload"
        meta = json.dumps({"name": q.get("name", [""])[0]})
        body = (
            f"--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n"
            f"{meta}\r\n--{boundary}\r\nContent-Type: application/octet-stream"
            f"\r\n\r\n\r\n--{boundary}--\r\n"
        ).encode()
        headers = [(k, v) for k, v in headers if k.lower() != "content-type"]
        headers.append(("Content-Type", f"multipart/related; boundary={boundary}"))
        q["uploadType"] = ["multipart"]
        path = u.path + "?" + urllib.parse.urlencode(q, doseq=True)
        return path, headers, body

    def _forward(self, method, path, headers, body, scheme):
        """Send one request to the emulator (the only place we connect to)."""
        out = [f"{method} {path} HTTP/1.1"]
        for k, v in headers:
            if k.lower() not in _HOP_BY_HOP:
                out.append(f"{k}: {v}")
        if body or method in ("POST", "PUT", "PATCH"):
            out.append(f"Content-Length: {len(body)}")
        out.append("Connection: close")
        request = ("\r\n".join(out) + "\r\n\r\n").encode("latin-1") + body
        with self._upstream_sem:
            up = socket.create_connection(self.upstream, timeout=60)
            try:
                up.sendall(request)
                resp = http.client.HTTPResponse(up, method=method)
                resp.begin()
                rbody = resp.read()
                return resp.status, resp.reason, resp.getheaders(), rbody
            except (OSError, http.client.HTTPException):
                msg = b'{"error": {"code": 502, "message": "emulator failed"}}'
                return 502, "Bad Gateway", [("Content-Type", "application/json")], msg
            finally:
                up.close()


def tf_gcs_env(proxy: GcsProxy, base_env: dict | None = None) -> dict:
    """Environment for a subprocess whose TensorFlow uses gs:// via `proxy`.

    TF's GCS filesystem reads these at first use, so they must be set before
    the process touches gs:// (hence: a subprocess).
    """
    env = dict(os.environ if base_env is None else base_env)
    for k in list(env):
        if k.lower() in ("no_proxy", "http_proxy", "https_proxy", "all_proxy"):
            del env[k]
        elif k.startswith("GCS_") or k in ("GOOGLE_APPLICATION_CREDENTIALS",):
            del env[k]
    env.update({
        "https_proxy": proxy.url,
        "http_proxy": proxy.url,
        "HTTPS_PROXY": proxy.url,
        "CURL_CA_BUNDLE": proxy.ca_path,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "dummy-token",
        # No caches: tests read back objects changed behind TF's back.
        "GCS_READ_CACHE_MAX_SIZE_MB": "0",
        "GCS_STAT_CACHE_MAX_AGE": "0",
        "GCS_MATCHING_PATHS_CACHE_MAX_AGE": "0",
        # Retry fast when a fault is injected (defaults: 1 s initial delay).
        "GCS_RETRY_CONFIG_INIT_DELAY_TIME_US": "20000",
        "GCS_RETRY_CONFIG_MAX_DELAY_TIME_US": "200000",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "CUDA_VISIBLE_DEVICES": "",
    })
    env.pop("STORAGE_EMULATOR_HOST", None)
    return env


# --------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory):
    log = tmp_path_factory.mktemp("gcs-emulator") / "emulator.log"
    emu = GcsEmulator(log_path=str(log)).start()
    try:
        yield emu
    finally:
        emu.stop()
        emu._log.close()


@pytest.fixture(scope="session")
def gcs_proxy(gcs_emulator, tmp_path_factory):
    proxy = GcsProxy(
        gcs_emulator.host, gcs_emulator.port, str(tmp_path_factory.mktemp("gcs-ca"))
    ).start()
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture(scope="session")
def gcs_tf_env(gcs_proxy):
    return tf_gcs_env(gcs_proxy)


def _is_loopback_host(host) -> bool:
    if isinstance(host, bytes):
        host = host.decode()
    if host in ("localhost", "", None):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@pytest.fixture
def loopback_only(monkeypatch):
    """Fail the test if this process resolves or connects to a non-loopback
    address (the TF subprocess only talks to the proxy, which only connects to
    the emulator)."""
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex
    real_getaddrinfo = socket.getaddrinfo

    def check(address):
        if isinstance(address, tuple) and not _is_loopback_host(address[0]):
            raise AssertionError(f"test tried to reach non-loopback {address!r}")

    def connect(self, address):
        check(address)
        return real_connect(self, address)

    def connect_ex(self, address):
        check(address)
        return real_connect_ex(self, address)

    def getaddrinfo(host, *args, **kwargs):
        check((host,))
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
