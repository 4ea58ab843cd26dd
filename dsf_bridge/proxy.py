"""The forward proxy of outgoing calls: where it is, and which hosts bypass it.

Hospital networks often reach the internet only through an HTTP proxy. ``[proxy]`` in the
configuration names it once; every adapter that calls out (the DSF FHIR clients and their
websocket, DICOMweb, the OMI registry, the inference server) asks :meth:`ForwardProxy.route`
whether a URL goes through it. The proxy environment (``HTTPS_PROXY``, ``NO_PROXY``) is not
read: the configuration alone decides, and ``dsf-bridge config show`` shows what it decided.

For an ``https://`` target the proxy only sees a ``CONNECT host:port`` tunnel: TLS, and with it
the client certificate of mutual TLS, runs end to end inside it. This module holds no HTTP
library; each adapter turns the route into its library's proxy setting.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import quote, urlsplit

__all__ = ["ForwardProxy"]

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


@dataclass(frozen=True)
class ForwardProxy:
    """An HTTP forward proxy (``http://HOST:PORT``) with its optional Basic credentials and the
    hosts reached without it.

    A ``no_proxy`` entry is ``*`` (every host), a host name or address that matches itself and,
    for names, every subdomain (``example.org`` and ``.example.org`` both match
    ``dsf.example.org``), optionally with ``:PORT`` to match that port only (IPv6 in brackets:
    ``[::1]:8080``).
    """

    url: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    no_proxy: tuple[str, ...] = ()

    @property
    def auth(self) -> tuple[str, str] | None:
        """User and password for ``Proxy-Authorization: Basic``, if any."""
        if self.username is None:
            return None
        return self.username, self.password or ""

    def route(self, target: str) -> ForwardProxy | None:
        """This proxy if a call to ``target`` (a URL) goes through it, else ``None``."""
        parts = urlsplit(target)
        host = (parts.hostname or "").lower()
        try:
            port = parts.port or _DEFAULT_PORTS.get(parts.scheme.lower())
        except ValueError:  # a port that is no number: not ours to judge, the call will fail
            port = None
        if any(_matches(entry, host, port) for entry in self.no_proxy):
            return None
        return self

    def url_with_credentials(self) -> str:
        """The proxy URL with the credentials in it, for libraries that take them so (requests,
        websockets). Never log it."""
        if self.username is None:
            return self.url
        parts = urlsplit(self.url)
        userinfo = quote(self.username, safe="") + ":" + quote(self.password or "", safe="")
        return parts._replace(netloc=f"{userinfo}@{parts.netloc}").geturl()


def _matches(entry: str, host: str, port: int | None) -> bool:
    entry = entry.strip().lower()
    if entry == "*":
        return True
    entry_port: int | None = None
    if entry.startswith("["):  # [v6] or [v6]:port
        address, _, rest = entry[1:].partition("]")
        entry_host = address
        if rest.startswith(":") and rest[1:].isdigit():
            entry_port = int(rest[1:])
    elif entry.count(":") == 1:  # name:port or v4:port; a bare v6 address has more colons
        entry_host, _, port_text = entry.partition(":")
        if not port_text.isdigit():
            return False
        entry_port = int(port_text)
    else:
        entry_host = entry
    if entry_port is not None and entry_port != port:
        return False
    entry_host = entry_host.lstrip(".")
    return bool(entry_host) and (host == entry_host or host.endswith("." + entry_host))
