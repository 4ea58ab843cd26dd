"""Who may read the admin API, and who may act on instances: closed unless configured.

Clients send ``Authorization: Bearer <token>``; browsers answer the Basic prompt with any user
name and the token as password (the challenge is Basic everywhere, so a browser can open the
JSON and metrics paths too). Tokens are compared in constant time. Without ``api.token``
every protected path answers 403 with a message saying how to open it.

Reading is the default role. ``api.operator_token`` is a second token with the operator role:
it reads too, and it alone may retry incidents and cancel instances (:class:`OperatorGuard`);
without it those endpoints answer 403. The web page's forms for the same actions carry a MAC
under the operator token besides (:meth:`OperatorGuard.form_token`), as a browser posts a form
cross-site with the credentials it remembers. The operator's name in the audit trail is the Basic
user name, or ``operator`` for a Bearer token.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

from fastapi import HTTPException, Request, status
from pydantic import SecretStr

__all__ = ["OperatorGuard", "TokenGuard"]

REALM = "dsf-bridge admin"


class TokenGuard:
    """A FastAPI dependency that lets a request through only with the configured token."""

    def __init__(self, token: SecretStr | None, operator_token: SecretStr | None = None) -> None:
        self._token = None if token is None else token.get_secret_value().encode()
        # The operator may read as well; without a read token the API stays closed.
        self._operator = None if operator_token is None else operator_token.get_secret_value()

    def __call__(self, request: Request) -> None:
        if self._token is None:
            raise HTTPException(
                status.HTTP_403_FORBIDDEN,
                "the admin API is closed: set api.token (environment DSF_BRIDGE_API__TOKEN) "
                "to open it",
            )
        given = _credentials(request.headers.get("authorization", ""))
        if given is not None:
            _user, password = given
            if hmac.compare_digest(password, self._token):
                return
            if self._operator is not None and hmac.compare_digest(
                password, self._operator.encode()
            ):
                return
        raise _unauthorized("missing or wrong token: send 'Authorization: Bearer <api.token>'")


class OperatorGuard:
    """A FastAPI dependency for the operator role: only ``api.operator_token`` passes; it
    returns the operator's name for the audit trail (``api:<Basic user>``, ``api:operator``)."""

    def __init__(self, operator_token: SecretStr | None, *, closed: str | None = None) -> None:
        """``closed`` keeps the role closed whatever the token, with that reason (an API
        without a bridge to run the requests: ``dsf-bridge api serve``)."""
        given = None if operator_token is None else operator_token.get_secret_value()
        self._token = None if closed is not None else given
        self._closed = closed or (
            "operator actions are closed: set api.operator_token (environment "
            "DSF_BRIDGE_API__OPERATOR_TOKEN) to open them; the read token cannot act"
        )

    def __call__(self, request: Request) -> str:
        if self._token is None:
            raise HTTPException(status.HTTP_403_FORBIDDEN, self._closed)
        given = _credentials(request.headers.get("authorization", ""))
        if given is None or not hmac.compare_digest(given[1], self._token.encode()):
            raise _unauthorized(
                "this action needs the operator token: send "
                "'Authorization: Bearer <api.operator_token>'"
            )
        return _actor(given[0])

    def admits(self, request: Request) -> bool:
        """Whether ``request`` carries the operator token (the page shows its forms then)."""
        if self._token is None:
            return False
        given = _credentials(request.headers.get("authorization", ""))
        return given is not None and hmac.compare_digest(given[1], self._token.encode())

    def form_token(self, *parts: str) -> str:
        """A token for one operator form (the web page's retry and cancel buttons): a MAC of
        ``parts`` under the operator token. A cross-site page that makes the browser post the
        form, with the Basic credentials it remembers, cannot know it."""
        key = (self._token or "").encode()
        return hmac.new(key, "\x1f".join(parts).encode(), hashlib.sha256).hexdigest()

    def check_form_token(self, given: str, *parts: str) -> bool:
        return self._token is not None and hmac.compare_digest(given, self.form_token(*parts))


def _actor(user_bytes: bytes) -> str:
    """The operator's name for the audit trail: ``api:<Basic user>`` or ``api:operator``."""
    # Self-asserted (anyone with the token may give any name): ASCII letters, digits and
    # "._@-" only, so that no look-alike or control character reaches the audit trail.
    user = user_bytes.decode("ascii", "replace").strip()
    name = "".join(ch for ch in user if (ch.isascii() and ch.isalnum()) or ch in "._@-")[:64]
    return f"api:{name or 'operator'}"


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED,
        message,
        headers={"WWW-Authenticate": f'Basic realm="{REALM}", charset="UTF-8"'},
    )


def _credentials(header: str) -> tuple[bytes, bytes] | None:
    """(user, token) of a Bearer (no user) or Basic authorization header."""
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return b"", value.strip().encode()
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value.strip(), validate=True)
        except (binascii.Error, ValueError):
            return None
        user, sep, password = decoded.partition(b":")
        return (user, password) if sep else None
    return None
