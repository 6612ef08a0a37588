"""Which etcd answers mean "try another endpoint / later", what the error
says when no endpoint answers, and which endpoint settings are accepted
(fast, no etcd server)."""

import http.server
import socket
import threading

import pytest
from etcd3gw import exceptions as etcd_exc

from ares_celery.clients.etcd import EtcdGateway, _transient
from ares_celery.clients.etcd_endpoints import parse_endpoints
from ares_celery.errors import ConfigurationError, ServiceUnavailable


def test_gateway_not_ready_and_elections_are_transient():
    # etcd's HTTP gateway answers 404 until the server has started.
    assert _transient(etcd_exc.Etcd3Exception("404 page not found",
                                              "Not Found"), "404 page not found")
    assert _transient(etcd_exc.InternalServerError(
        '{"error":"etcdserver: leader changed"}', "Internal Server Error"),
        '{"error":"etcdserver: leader changed"}')
    assert _transient(etcd_exc.Etcd3Exception("", "Service Unavailable"), "")


def test_refusals_are_not_transient():
    detail = '{"error":"etcdserver: permission denied"}'
    assert not _transient(etcd_exc.Etcd3Exception(detail, "Forbidden"), detail)
    detail = '{"error":"etcdserver: requested lease not found","code":5}'
    assert not _transient(etcd_exc.Etcd3Exception(detail, "Not Found"),
                          detail)


# -- what an operator reads when etcd cannot be reached -------------------
# Real sockets on free loopback ports, no etcd: each case is the network
# condition itself (nothing listening, a listener that never answers, an
# HTTP server that is not etcd, a name that does not resolve).


@pytest.fixture()
def closed_port():
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture()
def silent_port():
    """A port whose listener accepts connections and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock.getsockname()[1]


@pytest.fixture()
def not_etcd_port():
    """An HTTP server that answers every request 404, as etcd's gateway
    does before it has started (or any other web server would)."""

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's naming
            body = b"404 page not found\n"
            self.send_response(404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def _unavailable(gateway: EtcdGateway) -> str:
    with pytest.raises(ServiceUnavailable) as info:
        gateway.status()
    return str(info.value)


def test_nothing_listening_says_connection_refused_once_with_a_hint(
        closed_port):
    address = f"127.0.0.1:{closed_port}"
    message = _unavailable(EtcdGateway([address]))
    assert f"etcd unreachable at {address} (connection refused)." in message
    assert message.count(address) == 1, message
    assert "Is etcd running and listening on that address?" in message
    assert "ares_etcd_endpoints" in message
    assert "ares_etcd_timeout (how long to wait for each answer, now 2s)" \
        in message


def test_a_listener_that_never_answers_says_how_long_was_waited(silent_port):
    # The timeout is what this test is about: 0.2 s keeps it short.
    message = _unavailable(EtcdGateway([f"127.0.0.1:{silent_port}"],
                                       timeout=0.2))
    assert f"127.0.0.1:{silent_port} (timed out after 0.2s)" in message
    assert "raise ares_etcd_timeout" in message
    assert "now 0.2s" in message


def test_an_http_server_that_is_not_etcd_is_told_apart(not_etcd_port):
    message = _unavailable(EtcdGateway([f"127.0.0.1:{not_etcd_port}"]))
    assert f"127.0.0.1:{not_etcd_port} (404 page not found (HTTP Not Found))" \
        in message
    assert "Is that etcd's client port" in message
    assert "(" + repr(("127.0.0.1", not_etcd_port)) not in message


def test_a_host_name_that_does_not_resolve():
    message = _unavailable(EtcdGateway(["etcd.invalid:2379"], timeout=1.0))
    assert "etcd.invalid:2379 (host name not resolved" in message
    assert "Is the host name in ares_etcd_endpoints right?" in message


def test_every_endpoint_is_named_with_its_own_reason(closed_port,
                                                     silent_port):
    message = _unavailable(EtcdGateway(
        [f"127.0.0.1:{closed_port}", f"127.0.0.1:{silent_port}"],
        timeout=0.2))
    assert (f"etcd unreachable at every endpoint: 127.0.0.1:{closed_port} "
            f"(connection refused); 127.0.0.1:{silent_port} (timed out "
            "after 0.2s).") in message
    assert "Is etcd running" in message and "raise ares_etcd_timeout" \
        in message


def test_a_watch_that_cannot_open_says_why(closed_port):
    gateway = EtcdGateway([f"127.0.0.1:{closed_port}"])
    with pytest.raises(ServiceUnavailable) as info:
        gateway.watch_prefix("/ares/", 1)
    message = str(info.value)
    assert f"etcd watch unavailable at 127.0.0.1:{closed_port} " \
           "(connection refused)." in message
    assert "ares_etcd_endpoints" in message


def test_a_member_answers_only_if_it_serves_or_refuses(
        closed_port, silent_port, not_etcd_port, monkeypatch):
    """The watch probe's question (``PROBE_EVERY_S``): a member that does
    not answer, or answers "cannot serve now", gets its stream closed; one
    that refuses (an expired auth token) is alive and keeps it."""
    gateway = EtcdGateway([f"127.0.0.1:{closed_port}",
                           f"127.0.0.1:{silent_port}",
                           f"127.0.0.1:{not_etcd_port}"], timeout=0.2)
    assert not gateway.answers(0, "/ares/")   # nothing listening
    assert not gateway.answers(1, "/ares/")   # a hung member
    assert not gateway.answers(2, "/ares/")   # the gateway not ready (404)

    def refuse(self, url, **kwargs):
        detail = '{"error":"etcdserver: invalid auth token"}'
        raise etcd_exc.Etcd3Exception(detail, "Unauthorized")

    monkeypatch.setattr(type(gateway._client(0)), "post", refuse)
    assert gateway.answers(0, "/ares/")


# -- ares_etcd_endpoints: what is accepted, and what is said otherwise ----


@pytest.mark.parametrize("value, expected", [
    ("127.0.0.1:2379", [("127.0.0.1", 2379)]),
    ("a:1, https://b:2/", [("a", 1), ("b", 2)]),
    (["http://h:2379", "[::1]:2380"], [("h", 2379), ("::1", 2380)]),
    (("h1:1", "h2:65535"), [("h1", 1), ("h2", 65535)]),
])
def test_endpoint_forms_accepted(value, expected):
    assert parse_endpoints(value) == expected


@pytest.mark.parametrize("value, why", [
    (2379, "a int is not an endpoint list"),
    (None, "a NoneType is not an endpoint list"),
    ("127.0.0.1:99999", "port 99999, outside 1..65535"),
    ("127.0.0.1:0", "port 0, outside 1..65535"),
    ("127.0.0.1:http", "no numeric port"),
    ("127.0.0.1", "has no port"),
    (":2379", "has no host"),
    (["h:2379", 2380], "entry 2380 is a int, not a string"),
    ("ftp://h:21", "scheme 'ftp', not http or https"),
    ("http://h:2379/v3", "has a path"),
    ("", "no endpoint given"),
    ([], "no endpoint given"),
])
def test_bad_endpoints_name_the_setting_value_and_accepted_forms(value, why):
    with pytest.raises(ConfigurationError) as info:
        parse_endpoints(value)
    message = str(info.value)
    assert message.startswith(f"ares_etcd_endpoints={value!r}: ")
    assert why in message
    assert "'host:port', 'http://host:port' or 'https://host:port', or a " \
           "list" in message
