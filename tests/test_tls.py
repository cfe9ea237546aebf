"""TLS files and context (spoa_mp.tls), the allow-list (spoa_mp.access) and
their flags and TOML keys (config.py, cli.py)."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from pathlib import Path

import pytest
from support.tls_certs import PKI, make_cert, make_pki

from spoa_mp.access import AllowList, parse_network
from spoa_mp.cli import main
from spoa_mp.config import ConfigError, load_config
from spoa_mp.flags import parse_serve_args
from spoa_mp.tls import TLSError, TLSFiles, build_server_context, check_files


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _files(pki: PKI, ca: bool = True) -> TLSFiles:
    return TLSFiles(str(pki.server_cert), str(pki.server_key), str(pki.ca) if ca else None)


# ------------------------------------------------------------------ files


def test_good_files_have_no_problem(pki: PKI) -> None:
    assert check_files(_files(pki)) == []
    assert check_files(_files(pki, ca=False)) == []


def test_key_of_another_certificate_is_named(pki: PKI) -> None:
    files = TLSFiles(str(pki.server_cert), str(pki.client_key))
    assert check_files(files) == [
        f"--tls-key {pki.client_key} does not match the certificate {pki.server_cert}"
    ]


def test_unreadable_and_not_pem(pki: PKI, tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("hello\n")
    problems = check_files(TLSFiles(str(tmp_path / "missing.pem"), str(junk)))
    assert problems == [
        f"--tls-cert {tmp_path / 'missing.pem'} cannot be read: No such file or directory",
        f"--tls-key {junk} is not PEM (no '-----BEGIN' line)",
    ]


def test_expired_and_not_yet_valid(pki: PKI) -> None:
    later = time.time() + 400 * 86400
    problems = check_files(_files(pki), now=later)
    assert problems[0].startswith(f"--tls-cert {pki.server_cert} expired on ")
    assert problems[1].startswith(f"--tls-client-ca {pki.ca} expired on ")
    earlier = time.time() - 86400
    assert check_files(_files(pki, ca=False), now=earlier)[0].startswith(
        f"--tls-cert {pki.server_cert} is not valid before "
    )


def test_ca_file_without_a_ca(pki: PKI) -> None:
    files = TLSFiles(str(pki.server_cert), str(pki.server_key), str(pki.server_key))
    (problem,) = check_files(files)
    assert problem.startswith(f"--tls-client-ca {pki.server_key}")


def test_context_is_tls12_plus_and_requires_a_client_cert(pki: PKI) -> None:
    ctx = build_server_context(_files(pki))
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert build_server_context(_files(pki, ca=False)).verify_mode == ssl.CERT_NONE
    with pytest.raises(TLSError, match="does not match"):
        build_server_context(TLSFiles(str(pki.server_cert), str(pki.client_key)))


def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> str | None:
    """A real handshake over a socket pair; None when it succeeded, else why not."""
    a, b = socket.socketpair()
    outcome: list[str | None] = []

    def serve() -> None:
        try:
            with server_ctx.wrap_socket(a, server_side=True) as s:
                s.sendall(b"ok")
            outcome.append(None)
        except (ssl.SSLError, OSError) as e:
            outcome.append(str(e))

    t = threading.Thread(target=serve)
    t.start()
    try:
        with client_ctx.wrap_socket(b, server_hostname="localhost") as c:
            c.settimeout(10)
            c.recv(2)
    except (ssl.SSLError, OSError):
        pass
    t.join(10)
    assert outcome
    return outcome[0]


def _client(pki: PKI, cert: Path | None, key: Path | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    if cert is not None and key is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


def test_mutual_tls_accepts_our_client_refuses_others(pki: PKI) -> None:
    server = build_server_context(_files(pki))
    assert _handshake(server, _client(pki, pki.client_cert, pki.client_key)) is None
    assert _handshake(server, _client(pki, None, None)) is not None
    other = _client(pki, pki.other_client_cert, pki.other_client_key)
    assert _handshake(server, other) is not None


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated")
def test_tls11_client_refused(pki: PKI) -> None:
    server = build_server_context(_files(pki, ca=False))
    old = _client(pki, None, None)
    old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    try:
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    except (ValueError, ssl.SSLError):  # pragma: no cover - OpenSSL without TLS 1.1
        pytest.skip("this OpenSSL cannot offer TLS 1.1")
    assert _handshake(server, old) is not None


def test_short_lived_certificate_made(tmp_path: Path, pki: PKI) -> None:
    cert, key = make_cert(tmp_path, "brief", (pki.ca, pki.ca.with_suffix(".key")), server=True)
    assert check_files(TLSFiles(str(cert), str(key))) == []


# ------------------------------------------------------------------ allow-list


def test_allow_list_matches_v4_v6_and_mapped() -> None:
    allow = AllowList(["10.0.0.0/24", "2001:db8::/32", "127.0.0.2"])
    assert allow.allows(("10.0.0.7", 1234))
    assert not allow.allows(("10.0.1.7", 1234))
    assert allow.allows(("2001:db8::1", 1, 0, 0))
    assert not allow.allows(("::1", 1, 0, 0))
    assert allow.allows(("::ffff:10.0.0.9", 1, 0, 0))
    assert allow.allows(("127.0.0.2", 1))
    assert not allow.allows(("127.0.0.1", 1))
    assert allow.allows("")  # a Unix-socket peer
    assert allow.allows(b"\0abstract")
    assert not allow.allows(("not-an-address", 1))


def test_empty_allow_list_allows_everyone() -> None:
    assert not AllowList()
    assert AllowList().allows(("192.0.2.1", 9))


def test_parse_network_reasons() -> None:
    assert str(parse_network("10.1.2.3")) == "10.1.2.3/32"
    with pytest.raises(ValueError, match="host bits set"):
        parse_network("10.0.0.1/8")
    with pytest.raises(ValueError, match="must be an address or CIDR"):
        parse_network("ten")


# ------------------------------------------------------------------ flags, TOML


def test_flags_make_the_config(pki: PKI) -> None:
    config = parse_serve_args(
        ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
         "--tls-client-ca", str(pki.ca), "--allow", "10.0.0.0/8", "--allow", "::1"]
    )  # fmt: skip
    assert config.tls_cert == str(pki.server_cert)
    assert config.tls_client_ca == str(pki.ca)
    assert config.allow == ("10.0.0.0/8", "::1/128")


def test_toml_keys_relative_to_the_file(pki: PKI, tmp_path: Path) -> None:
    conf = pki.server_cert.parent / "agent.toml"
    conf.write_text(
        'tls-cert = "agent.pem"\ntls-key = "agent.key"\ntls-client-ca = "ca.pem"\n'
        'allow = ["127.0.0.0/8"]\n'
    )
    config = load_config({}, str(conf))
    assert config.tls_key == str(pki.server_key)
    assert config.allow == ("127.0.0.0/8",)
    conf.write_text('allow = "10.0.0.1/8"\n')
    with pytest.raises(ConfigError, match=r"'allow' must be an address or CIDR network"):
        load_config({}, str(conf))
    conf.write_text("allow = [1]\n")
    with pytest.raises(ConfigError, match=r"'allow' must be a list of CIDR strings, got integer"):
        load_config({}, str(conf))
    conf.write_text('tls-cert = "agent.pem"\ntls-key = "haproxy.key"\n')
    with pytest.raises(ConfigError, match=r"'tls-key' .*haproxy.key does not match"):
        load_config({}, str(conf))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tls-cert", "{cert}"], "--tls-cert needs --tls-key too"),
        (["--tls-key", "{key}"], "--tls-key needs --tls-cert too"),
        (["--tls-client-ca", "{ca}"], "--tls-client-ca needs --tls-cert and --tls-key"),
        (["--allow", "300.0.0.0/8"], "--allow must be an address or CIDR network"),
        (["--tls-cert", "{cert}", "--tls-key", "{ca}"], "--tls-key"),
    ],
)
def test_bad_flags_one_line_exit_2(
    pki: PKI, args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = {"cert": pki.server_cert, "key": pki.server_key, "ca": pki.ca}
    argv = [a.format(**paths) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"spoa-mp: error: {message}")


# ------------------------------------------------------------------ check-config, haproxy-config


def test_check_config_reports_every_tls_problem(
    pki: PKI, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from spoa_mp.check_config import main as check_main

    conf = tmp_path / "agent.toml"
    conf.write_text(
        f'tls-cert = "{pki.server_cert}"\ntls-key = "{pki.server_key}"\n'
        f'tls-client-ca = "{pki.ca}"\n'
    )
    assert check_main([str(conf)]) == 0
    assert "TLS agent.pem, client certificates required" in capsys.readouterr().out
    conf.write_text(
        f'tls-cert = "{pki.server_cert}"\ntls-key = "{pki.client_key}"\n'
        f'tls-client-ca = "{tmp_path / "nope.pem"}"\n'
    )
    assert check_main([str(conf)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"{conf}: 'tls-client-ca' cannot be read: {tmp_path / 'nope.pem'}: "
                   "No such file or directory"]  # fmt: skip
    conf.write_text(f'tls-cert = "{pki.server_cert}"\ntls-key = "{pki.client_key}"\n')
    assert check_main([str(conf)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"{conf}: 'tls-key' {pki.client_key} does not match the certificate {pki.server_cert}"
    ]
    conf.write_text(f'tls-cert = "{pki.server_cert}"\n')
    assert check_main([str(conf)]) == 2
    assert capsys.readouterr().err.splitlines() == [f"{conf}: 'tls-cert' needs --tls-key too"]


def test_haproxy_config_server_line_with_tls(pki: PKI) -> None:
    from spoa_mp.haproxy_config import Options, render

    base = ["-p", "12345", "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)]
    options = Options(ca_file="/etc/haproxy/ca.pem", crt="/etc/haproxy/me.pem")
    cfg = render(parse_serve_args(base), options)["haproxy.cfg"]
    line = next(x for x in cfg.splitlines() if x.strip().startswith("server agent1"))
    assert line.endswith("check-ssl ssl verify required ca-file /etc/haproxy/ca.pem")
    mutual = parse_serve_args([*base, "--tls-client-ca", str(pki.ca)])
    for version in ("2.6", "3.x"):
        cfg = render(mutual, Options(haproxy=version, ca_file="/c.pem", crt="/me.pem"))
        line = next(x for x in cfg["haproxy.cfg"].splitlines() if "server agent1" in x)
        assert "option spop-check" in cfg["haproxy.cfg"]
        assert line.endswith(
            "check inter 5s check-ssl ssl verify required ca-file /c.pem crt /me.pem"
        )
    plain = render(parse_serve_args(["-p", "12345"]))["haproxy.cfg"]
    assert " ssl " not in plain
