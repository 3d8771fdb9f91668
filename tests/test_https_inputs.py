"""`https://` inputs against a loopback TLS server: what a user sees when the URL, the server or the download fails.

The server's certificate is made per session and trusted through `SSL_CERT_FILE`, the way an operator trusts a
private CA; `refuse_internal` is switched off because the only server a test can reach is on loopback.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from worker import https_fetch
from worker.errors import InputForbidden, InputNotFound, InvalidRequest, JobError, StorageError
from worker.settings import Settings
from worker.storage import StorageFetcher

SECRETS = ("SIGNATURE123", "TOKEN456")
QUERY = "?X-Amz-Signature=SIGNATURE123&token=TOKEN456"
IMAGE = bytes(range(256)) * 40  # 10 KiB: any bytes do, the fetcher does not decode them
REBINDING_HOST = "images.example.test"  # on the test certificate; resolved only by the test's resolver

Behaviour = Callable[[BaseHTTPRequestHandler], None]


@pytest.fixture(scope="session")
def certificate(tmp_path_factory) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1: (certificate file, key file)."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName(REBINDING_HOST)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    folder = tmp_path_factory.mktemp("tls")
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_file), str(key_file)


class Server:
    """A loopback HTTPS server; `routes` maps a path (without query) to what the handler does; `hits` counts."""

    def __init__(self, certificate: tuple[str, str]):
        self.routes: dict[str, Behaviour] = {}
        self.hits: dict[str, int] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                path = self.path.split("?", 1)[0]
                server.hits[path] = server.hits.get(path, 0) + 1
                try:
                    server.routes[path](self)
                except OSError:  # the fetcher hung up first: that is what some tests want
                    self.close_connection = True

            def log_message(self, *args):
                pass

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*certificate)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def url(self, path: str) -> str:
        return f"https://127.0.0.1:{self.port}{path}{QUERY}"


@pytest.fixture
def server(certificate, monkeypatch) -> Iterator[Server]:
    monkeypatch.setenv("SSL_CERT_FILE", certificate[0])
    monkeypatch.setattr(https_fetch, "refuse_internal", lambda host, address, field: None)  # loopback only in tests
    running = Server(certificate)
    yield running
    running.httpd.shutdown()
    running.httpd.server_close()


def fetcher(**settings) -> StorageFetcher:
    values = {"http_allow": ["127.0.0.1"], "storage_attempts": 3, "storage_backoff_s": 0} | settings
    return StorageFetcher(Settings(**values), client=object())


def reply(status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> Behaviour:
    def send(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(status)
        for name, value in (headers or {"Content-Length": str(len(body))}).items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(body)
    return send


def assert_shown_safely(error: JobError, field: str = "image") -> None:
    """The error names the field, and nothing of the signed query reaches the user or the logs."""
    assert error.field == field and error.to_dict()["field"] == field
    assert error.message.startswith(f"{field}: ")
    for secret in SECRETS:
        assert secret not in error.message and secret not in str(error)


def test_an_https_input_is_fetched(server):
    server.routes["/photo.png"] = reply(200, IMAGE)
    assert fetcher().fetch(server.url("/photo.png"), "image") == IMAGE


def test_the_fetch_connects_to_the_address_that_was_checked_and_never_resolves_the_name_again(server, monkeypatch):
    """DNS rebinding: a name that resolves to an allowed address when checked and to another a moment later (here
    127.0.0.2, where nothing listens). The fetch goes to the address checked; TLS and the Host header name the host.
    The one stand-in is the resolver (no DNS server can be run here)."""
    real_getaddrinfo, asked = socket.getaddrinfo, []

    def rebinding(host, port, *args, **kwargs):
        if host != REBINDING_HOST:
            return real_getaddrinfo(host, port, *args, **kwargs)
        asked.append(host)
        address = "127.0.0.1" if len(asked) == 1 else "127.0.0.2"
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, port))]

    hosts = []

    def photo(handler: BaseHTTPRequestHandler) -> None:
        hosts.append(handler.headers["Host"])
        reply(200, IMAGE)(handler)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    server.routes["/photo.png"] = photo
    url = server.url("/photo.png").replace("127.0.0.1", REBINDING_HOST)
    assert fetcher(http_allow=[REBINDING_HOST]).fetch(url, "image") == IMAGE
    assert asked == [REBINDING_HOST] and hosts == [f"{REBINDING_HOST}:{server.port}"]


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("https://127.0.0.1:{port}/photo.png?X-Amz-Signature=SIGNATURE123&token=TOKEN 456",
                     id="space-in-the-query"),
        pytest.param("https://127.0.0.1:{port}/my photo.png?X-Amz-Signature=SIGNATURE123&token=TOKEN456",
                     id="space-in-the-path"),
        pytest.param("https://127.0.0.1:{port}/photo.png?X-Amz-Signature=SIGNATURE123\x01&token=TOKEN456",
                     id="control-character"),
        pytest.param("https://127.0.0.1:{port}/photo.png?X-Amz-Signature=SIGNATURE123&token=TOKEN456\u00e9",
                     id="non-ascii"),
        pytest.param("https://127.0.0.1:abc/photo.png?X-Amz-Signature=SIGNATURE123&token=TOKEN456", id="bad-port"),
        pytest.param("https://127.0.0.1:99999/photo.png?X-Amz-Signature=SIGNATURE123&token=TOKEN456",
                     id="port-out-of-range"),
    ],
)
def test_a_malformed_https_url_is_an_invalid_request_that_does_not_echo_its_query(server, url):
    server.routes["/photo.png"] = server.routes["/my photo.png"] = reply(200, IMAGE)
    with pytest.raises(InvalidRequest) as caught:
        fetcher().fetch(url.format(port=server.port), "image")
    assert caught.value.code == "invalid_request"
    assert "is not a valid URL" in caught.value.message
    assert_shown_safely(caught.value)
    assert server.hits == {}  # refused before any request


def test_a_protocol_error_is_a_storage_error_naming_the_field_and_only_the_error_type(server):
    def garbage(handler: BaseHTTPRequestHandler) -> None:
        handler.wfile.write(b"NOT-HTTP garbage-from-the-server\r\n\r\n")
        handler.close_connection = True

    server.routes["/photo.png"] = garbage
    with pytest.raises(StorageError) as caught:
        fetcher().fetch(server.url("/photo.png"), "image")
    assert caught.value.code == "storage_error"
    assert_shown_safely(caught.value)
    assert f"https://127.0.0.1:{server.port}/photo.png?..." in caught.value.message
    assert "BadStatusLine" in caught.value.message and "garbage-from-the-server" not in caught.value.message


def test_a_truncated_download_is_a_storage_error_not_a_corrupt_image(server):
    def truncated(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(IMAGE)))
        handler.end_headers()
        handler.wfile.write(IMAGE[:1000])
        handler.close_connection = True

    server.routes["/photo.png"] = truncated
    with pytest.raises(StorageError) as caught:
        fetcher().fetch(server.url("/photo.png"), "image")
    assert caught.value.code == "storage_error"
    assert_shown_safely(caught.value)
    assert f"the connection closed after 1000 of {len(IMAGE)} bytes" in caught.value.message


@pytest.mark.parametrize(
    ("status", "error_type", "code", "tries"),
    [
        pytest.param(503, StorageError, "storage_error", 3, id="503-is-retried-then-storage-error"),
        pytest.param(500, StorageError, "storage_error", 3, id="500-is-retried-then-storage-error"),
        pytest.param(429, StorageError, "storage_error", 3, id="429-is-retried-then-storage-error"),
        pytest.param(408, StorageError, "storage_error", 3, id="408-is-retried-then-storage-error"),
        pytest.param(401, InputForbidden, "input_forbidden", 1, id="401-is-forbidden"),
        pytest.param(403, InputForbidden, "input_forbidden", 1, id="403-is-forbidden"),
        pytest.param(410, InputForbidden, "input_forbidden", 1, id="410-is-forbidden"),
        pytest.param(404, InputNotFound, "input_not_found", 1, id="404-is-not-found"),
    ],
)
def test_an_http_status_maps_to_the_error_a_user_can_act_on(server, status, error_type, code, tries):
    server.routes["/photo.png"] = reply(status, b"no")
    with pytest.raises(error_type) as caught:
        fetcher(storage_attempts=3).fetch(server.url("/photo.png"), "image")
    assert caught.value.code == code
    assert_shown_safely(caught.value)
    assert str(status) in caught.value.message
    assert server.hits["/photo.png"] == tries


def test_a_redirect_is_refused_without_being_followed(server):
    server.routes["/photo.png"] = reply(302, headers={"Location": "/internal-metadata", "Content-Length": "0"})
    server.routes["/internal-metadata"] = reply(200, IMAGE)
    with pytest.raises(InputForbidden) as caught:
        fetcher().fetch(server.url("/photo.png"), "image")
    assert "302" in caught.value.message and "redirects are not followed" in caught.value.message
    assert server.hits == {"/photo.png": 1}  # a redirect could lead off the allow-list


def test_a_server_error_that_passes_is_retried_until_the_download_succeeds(server):
    answers = iter([reply(503, b"busy"), reply(502, b"busy"), reply(200, IMAGE)])
    server.routes["/photo.png"] = lambda handler: next(answers)(handler)
    assert fetcher(storage_attempts=3).fetch(server.url("/photo.png"), "image") == IMAGE
    assert server.hits["/photo.png"] == 3


@pytest.mark.slow
def test_a_server_that_trickles_bytes_is_cut_off_after_the_overall_bound(server, monkeypatch):
    monkeypatch.setattr(https_fetch, "HTTPS_FETCH_TIMEOUT_S", 0.5)

    def trickle(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", "40")
        handler.end_headers()
        for _ in range(40):  # 4 s in all; each byte well inside the per-read timeout
            handler.wfile.write(b"x")
            handler.wfile.flush()
            time.sleep(0.1)

    server.routes["/photo.png"] = trickle
    started = time.monotonic()
    with pytest.raises(StorageError) as caught:
        fetcher().fetch(server.url("/photo.png"), "image")
    assert time.monotonic() - started < 2
    assert caught.value.code == "storage_error"
    assert_shown_safely(caught.value)
    assert "0.5 s" in caught.value.message


@pytest.mark.slow
def test_a_server_that_trickles_its_headers_is_cut_off_after_the_overall_bound(server, monkeypatch):
    monkeypatch.setattr(https_fetch, "HTTPS_FETCH_TIMEOUT_S", 0.5)

    def trickle_headers(handler: BaseHTTPRequestHandler) -> None:
        handler.wfile.write(b"HTTP/1.1 200 OK\r\n")
        for index in range(40):  # 4 s of header lines, each byte well inside the per-read timeout
            for byte in f"X-Slow-{index}: y\r\n".encode():
                handler.wfile.write(bytes([byte]))
                handler.wfile.flush()
                time.sleep(0.01)
        handler.close_connection = True

    server.routes["/photo.png"] = trickle_headers
    started = time.monotonic()
    with pytest.raises(StorageError) as caught:
        fetcher().fetch(server.url("/photo.png"), "image")
    assert time.monotonic() - started < 2  # it took as long as the server liked: 90 s against the real 60 s bound
    assert_shown_safely(caught.value)
    assert "took over 0.5 s" in caught.value.message


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param(None, id="content-length-over-the-cap"),
        pytest.param({"Connection": "close"}, id="no-content-length"),
    ],
)
def test_an_https_input_over_the_size_cap_is_refused(server, headers):
    server.routes["/photo.png"] = reply(200, IMAGE, headers)
    with pytest.raises(InvalidRequest) as caught:
        fetcher(input_max_bytes=1000).fetch(server.url("/photo.png"), "image")
    assert_shown_safely(caught.value)
    assert "1000-byte cap" in caught.value.message
