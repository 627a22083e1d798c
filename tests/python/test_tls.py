"""TLS on the client port: pymemcache over TLS, client certificates, certificate reload."""
import os
import shutil
import ssl
import subprocess
import tempfile
import time

import pytest
from pymemcache.client.base import Client

import kache_testlib as kt


def openssl(*args):
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def make_cert(d, name, ca, cn, san="IP:127.0.0.1"):
    key, csr, crt, ext = (os.path.join(d, f"{name}.{x}") for x in ("key", "csr", "crt", "ext"))
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-subj", f"/CN={cn}", "-out", csr)
    with open(ext, "w") as f:
        f.write(f"subjectAltName={san}\nbasicConstraints=CA:FALSE\n")
    openssl("x509", "-req", "-in", csr, "-CA", ca + ".crt", "-CAkey", ca + ".key", "-CAcreateserial",
            "-days", "2", "-out", crt, "-extfile", ext)
    return crt, key


@pytest.fixture(scope="module")
def pki():
    if not shutil.which("openssl"):
        pytest.fail("openssl is needed to make test certificates: run `make deps`")
    d = tempfile.mkdtemp(prefix="kache-tls-")
    ca = os.path.join(d, "ca")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca + ".key", "-out", ca + ".crt",
            "-subj", "/CN=kache test CA", "-days", "2")
    server = make_cert(d, "server", ca, "kache-node")
    client = make_cert(d, "client", ca, "app", san="DNS:app")
    yield {"dir": d, "ca": ca + ".crt", "server": server, "client": client, "ca_base": ca}
    shutil.rmtree(d, ignore_errors=True)


def tls_client(port, pki, cert=None):
    ctx = ssl.create_default_context(cafile=pki["ca"])
    if cert:
        ctx.load_cert_chain(*cert)
    return Client(("127.0.0.1", port), tls_context=ctx, connect_timeout=3, timeout=3)


def test_pymemcache_over_tls(servers, pki):
    crt, key = pki["server"]
    node = servers.node(extra=["--tls-cert", crt, "--tls-key", key])
    client = tls_client(node.port, pki)
    assert client.set("secure", b"value", noreply=False)
    assert client.get("secure") == b"value"
    assert client.get_many(["secure", "nope"]) == {"secure": b"value"}
    # Plain-text clients get nowhere: the port speaks TLS only.
    with kt.Conn(node.addr) as conn:
        conn.send(b"get secure\r\n")
        assert b"VALUE" not in conn.read_idle(idle=0.5)


def test_client_certificates_are_required_when_a_client_ca_is_set(servers, pki):
    crt, key = pki["server"]
    node = servers.node(extra=["--tls-cert", crt, "--tls-key", key, "--tls-client-ca", pki["ca"]])
    with pytest.raises(Exception):
        tls_client(node.port, pki).get("x")
    client = tls_client(node.port, pki, cert=pki["client"])
    assert client.set("k", b"v", noreply=False)
    assert client.get("k") == b"v"


def test_a_renewed_certificate_is_used_without_restart(servers, pki):
    d = tempfile.mkdtemp(prefix="kache-tls-rot-")
    crt, key = os.path.join(d, "tls.crt"), os.path.join(d, "tls.key")
    shutil.copy(pki["server"][0], crt)
    shutil.copy(pki["server"][1], key)
    node = servers.node(extra=["--tls-cert", crt, "--tls-key", key])

    def served_cn():
        ctx = ssl.create_default_context(cafile=pki["ca"])
        import socket
        with socket.create_connection(("127.0.0.1", node.port), timeout=3) as raw:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                return dict(x[0] for x in s.getpeercert()["subject"])["commonName"]

    assert served_cn() == "kache-node"
    new_crt, new_key = make_cert(d, "renewed", pki["ca_base"], "kache-node-renewed")
    os.replace(new_key, key)
    os.replace(new_crt, crt)
    deadline = time.monotonic() + 30
    while served_cn() != "kache-node-renewed":
        assert time.monotonic() < deadline, "renewed certificate never served"
        time.sleep(0.5)
    shutil.rmtree(d, ignore_errors=True)
