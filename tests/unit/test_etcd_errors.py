"""Which etcd answers mean "try another endpoint / later" (fast, no server)."""

from etcd3gw import exceptions as etcd_exc

from ares_celery.clients.etcd import _transient


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
