"""The listener with [dicom.tls]: TLS only, client certificates verified against the CA."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from support import EdgedProcess, require_tool, run


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run([require_tool("openssl"), *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate."""
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=edged test CA",
             "-keyout", "ca.key", "-out", "ca.crt", cwd=d)
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"), ("client", "extendedKeyUsage=clientAuth")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN=edged test {name}",
                 "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)
        (d / f"{name}.ext").write_text(ext + "\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.crt", cwd=d)
    return d


@pytest.fixture
def tls_edged(edged_factory, pki: Path) -> EdgedProcess:
    return edged_factory(**{"dicom.tls": {"cert": str(pki / "server.crt"), "key": str(pki / "server.key"),
                                          "ca": str(pki / "ca.crt")}}).start()


def test_storescu_over_tls_stores(tls_edged: EdgedProcess, pki: Path, ct_series: list[Path]) -> None:
    res = run([require_tool("storescu"), "+tls", str(pki / "client.key"), str(pki / "client.crt"),
               "+cf", str(pki / "ca.crt"), "-aec", "EDGED", "127.0.0.1", str(tls_edged.port),
               *map(str, ct_series[:10])])
    assert res.returncode == 0, res.stderr
    assert len(tls_edged.rows()) == 10
    assert "tls=True" in tls_edged.log_text()


def test_plain_association_fails(tls_edged: EdgedProcess) -> None:
    res = run([require_tool("echoscu"), "-to", "5", "-ta", "5", "-aec", "EDGED", "127.0.0.1", str(tls_edged.port)],
              timeout=60)
    assert res.returncode != 0
    assert tls_edged.rows() == []


def test_client_without_certificate_fails(tls_edged: EdgedProcess, pki: Path, ct_series: list[Path]) -> None:
    res = run([require_tool("storescu"), "+tla", "+cf", str(pki / "ca.crt"), "-aec", "EDGED",
               "127.0.0.1", str(tls_edged.port), str(ct_series[0])], timeout=60)
    assert res.returncode != 0
    assert tls_edged.rows() == []
    # An honest client still gets through afterwards.
    ok = run([require_tool("echoscu"), "+tls", str(pki / "client.key"), str(pki / "client.crt"),
              "+cf", str(pki / "ca.crt"), "-aec", "EDGED", "127.0.0.1", str(tls_edged.port)])
    assert ok.returncode == 0, ok.stderr


def test_silent_clients_do_not_stall_other_senders(tls_edged: EdgedProcess, pki: Path, ct_series: list[Path]) -> None:
    """More silent clients than max_associations (16), some that never start their TLS handshake
    (pynetdicom handshakes inside its accept loop; edged in the connection's own thread) and some that
    finish it and then say nothing (pynetdicom makes an association of each at once, edged only once the
    client speaks): honest senders are accepted and served meanwhile."""
    import socket
    import ssl

    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    ctx.load_cert_chain(str(pki / "client.crt"), str(pki / "client.key"))
    silent = [socket.create_connection(("127.0.0.1", tls_edged.port)) for _ in range(10)]
    silent += [ctx.wrap_socket(socket.create_connection(("127.0.0.1", tls_edged.port)), server_hostname="127.0.0.1")
               for _ in range(17)]
    try:
        tls = ["+tls", str(pki / "client.key"), str(pki / "client.crt"), "+cf", str(pki / "ca.crt")]
        ok = run([require_tool("echoscu"), "-to", "10", "-ta", "10", *tls, "-aec", "EDGED", "127.0.0.1",
                  str(tls_edged.port)], timeout=60)
        assert ok.returncode == 0, ok.stderr
        stored = run([require_tool("storescu"), "-to", "10", "-ta", "10", *tls, "-aec", "EDGED", "127.0.0.1",
                      str(tls_edged.port), *map(str, ct_series[:5])], timeout=60)
        assert stored.returncode == 0, stored.stderr
        assert len(tls_edged.rows()) == 5
    finally:
        for s in silent:
            s.close()
