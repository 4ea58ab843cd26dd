"""``dsf-bridge check-connection`` against a sandbox server in another process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dsf_bridge.sandbox.certs import CertificateAuthority
from tests.forward_proxy import ForwardProxyServer
from tests.served import cli, served_sandbox_module

__all__ = ["served_sandbox_module"]


@pytest.fixture
def served(served_sandbox_module: Path) -> Path:
    """One server for the module: ``check-connection`` only reads from it, and the tests that
    write a configuration of their own give it a name of its own."""
    return served_sandbox_module


def test_all_steps_pass_against_a_good_configuration(served: Path) -> None:
    result = cli("--config", str(served / "Site_A" / "bridge.toml"), "check-connection")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    for step in (
        "client certificate",
        "TLS configuration",
        "FHIR server",
        "local organization",
        "websocket",
    ):
        assert any(line.startswith(f"OK   {step}") for line in lines), result.stdout
    assert "FAIL" not in result.stdout


def test_all_steps_pass_through_the_configured_proxy(served: Path) -> None:
    with ForwardProxyServer.in_thread(credentials=("site-a", "proxy-pass")) as proxy:
        env = {
            **os.environ,
            "DSF_BRIDGE_PROXY__URL": proxy.url,
            "DSF_BRIDGE_PROXY__USERNAME": "site-a",
            "DSF_BRIDGE_PROXY__PASSWORD": "proxy-pass",
            "DSF_BRIDGE_PROXY__NO_PROXY": "[]",  # the sandbox is on the loopback
        }
        result = cli(
            "--config", str(served / "Site_A" / "bridge.toml"), "check-connection", env=env
        )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"OK   TLS configuration: 1 CA file(s), through the proxy {proxy.url}" in result.stdout
    assert any(line.startswith("OK   websocket") for line in result.stdout.splitlines())
    # REST and the websocket: two tunnels at least, every one authenticated.
    assert len(proxy.seen) >= 2
    assert {(seen.method, seen.authorization is not None) for seen in proxy.seen} == {
        ("CONNECT", True)
    }


def test_a_certificate_of_another_organization_is_refused(served: Path) -> None:
    # Site_B's client certificate against Site_A's server: a remote org, not the local one.
    site_a = (served / "Site_A" / "bridge.toml").read_text().splitlines()
    site_b = (served / "Site_B" / "bridge.toml").read_text().splitlines()
    url_of_a = next(line for line in site_a if line.startswith("fhir_base_url"))
    wrong = served / "wrong.toml"
    wrong.write_text(
        "\n".join(url_of_a if line.startswith("fhir_base_url") else line for line in site_b)
    )
    result = cli("--config", str(wrong), "check-connection")
    assert result.returncode == 1
    assert "FAIL local organization" in result.stdout


def test_an_untrusted_server_certificate_names_the_fix(served: Path, tmp_path: Path) -> None:
    other_ca = tmp_path / "other-ca.pem"
    CertificateAuthority("some other CA").write(other_ca)
    config = served / "Site_A" / "bridge.toml"
    text = config.read_text()
    lines = [
        f'ca_certificates = ["{other_ca}"]' if line.startswith("ca_certificates") else line
        for line in text.splitlines()
    ]
    wrong = served / "untrusted.toml"
    wrong.write_text("\n".join(lines))
    result = cli("--config", str(wrong), "check-connection")
    assert result.returncode == 1
    assert "OK   client certificate" in result.stdout
    assert "FAIL FHIR server" in result.stdout


def test_missing_settings_are_named() -> None:
    result = cli("check-connection")
    assert result.returncode == 1
    assert "dsf.fhir_base_url is not set" in result.stdout
