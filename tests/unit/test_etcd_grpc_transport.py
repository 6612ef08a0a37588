"""Which processes may talk to etcd over gRPC, and what the setting takes.

gRPC is not fork-safe: only a process marked fork-free (a prefork pool
child) gets the gRPC gateway; everything else, the worker's main process
included, gets the HTTP gateway and never even imports ``grpc``.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import pytest

from ares_celery.clients import etcd_grpc
from ares_celery.clients.etcd import EtcdGateway
from ares_celery.clients.etcd_grpc import GrpcEtcdGateway, process_gateway
from ares_celery.errors import ConfigurationError

ENDPOINTS = ["127.0.0.1:2379"]


@pytest.fixture()
def fork_free(monkeypatch):
    """This test process marked as a pool child (undone afterwards)."""
    monkeypatch.setattr(etcd_grpc, "_fork_free_pid", None)
    etcd_grpc.mark_fork_free()
    return etcd_grpc


def test_a_process_not_marked_fork_free_gets_http(monkeypatch):
    monkeypatch.setattr(etcd_grpc, "_fork_free_pid", None)
    for transport in ("auto", "grpc", "http"):
        gateway = process_gateway(ENDPOINTS, transport=transport)
        assert type(gateway) is EtcdGateway and gateway.transport == "http"


def test_a_fork_free_process_gets_grpc_unless_told_http(fork_free):
    for transport in ("auto", "grpc"):
        gateway = process_gateway(ENDPOINTS, transport=transport)
        assert isinstance(gateway, GrpcEtcdGateway)
        assert gateway.transport == "grpc"
    assert type(process_gateway(ENDPOINTS, transport="http")) is EtcdGateway


def test_a_process_forked_from_a_marked_one_is_not_fork_free(fork_free):
    gateway = process_gateway(ENDPOINTS)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report and leave without running pytest's exit
        answer = f"{etcd_grpc.fork_free()},{gateway.transport}," \
                 f"{type(process_gateway(ENDPOINTS)).__name__}"
        os.write(write, answer.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        answer = pipe.read()
    os.waitpid(pid, 0)
    assert answer == "False,http,EtcdGateway"
    assert etcd_grpc.fork_free() and gateway.transport == "grpc"


def test_grpc_that_does_not_import_falls_back_to_http_logged_once(
        fork_free, monkeypatch, caplog):
    class Broken:
        def __init__(self):
            raise ImportError("protobuf gencode 5.29 vs runtime 9.0")

    monkeypatch.setattr(etcd_grpc, "_Loaded", Broken)
    monkeypatch.setattr(etcd_grpc, "_loaded", None)
    monkeypatch.setattr(etcd_grpc, "_load_error", None)
    with caplog.at_level(logging.WARNING, logger=etcd_grpc.__name__):
        first = process_gateway(ENDPOINTS)
        second = process_gateway(ENDPOINTS)
    assert type(first) is EtcdGateway and type(second) is EtcdGateway
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "protobuf gencode" in warnings[0]
    with pytest.raises(ConfigurationError, match="ares_etcd_transport='grpc'"):
        process_gateway(ENDPOINTS, transport="grpc")


@pytest.mark.parametrize("value", ["auto", "grpc", "http"])
def test_transport_setting_accepts_its_three_values(value):
    assert etcd_grpc.check_transport(value) == value


@pytest.mark.parametrize("value", ["GRPC", "https", "", None, True])
def test_transport_setting_refuses_anything_else(value):
    with pytest.raises(ConfigurationError, match="'auto', 'grpc' or 'http'"):
        etcd_grpc.check_transport(value)


def test_grpc_required_but_not_installed_is_a_configuration_error(
        monkeypatch):
    real = etcd_grpc.importlib.util.find_spec
    monkeypatch.setattr(etcd_grpc.importlib.util, "find_spec",
                        lambda name: None if name == "etcd3" else real(name))
    with pytest.raises(ConfigurationError, match="pip install python3-etcd3"):
        etcd_grpc.check_transport("grpc")
    assert etcd_grpc.check_transport("auto") == "auto"


def test_the_main_process_never_imports_grpc():
    """A worker's main process forks pool children all its life: building
    the app, reading ``ares_etcd_transport='grpc'`` and using its etcd
    client must not load gRPC there."""
    script = textwrap.dedent("""
        import sys
        from celery import Celery
        from ares_celery import Ares
        app = Celery("t", broker="redis://127.0.0.1:1/0")
        app.conf.ares_etcd_transport = "grpc"
        ares = Ares(app)
        etcd = ares.services.etcd
        assert etcd.transport == "http", etcd
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in
                        ("grpc", "etcd3", "google"))
        print(leaked)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True,
                         text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr
