"""Who may read the admin API: closed unless a token is configured.

Clients send ``Authorization: Bearer <token>``; browsers answer the Basic prompt with any user
name and the token as password (the challenge is Basic everywhere, so a browser can open the
JSON and metrics paths too). Tokens are compared in constant time. Without ``api.token``
every protected path answers 403 with a message saying how to open it.
"""

from __future__ import annotations

import base64
import binascii
import hmac

from fastapi import HTTPException, Request, status
from pydantic import SecretStr

__all__ = ["TokenGuard"]

REALM = "dsf-bridge admin"


class TokenGuard:
    """A FastAPI dependency that lets a request through only with the configured token."""

    def __init__(self, token: SecretStr | None) -> None:
        self._token = None if token is None else token.get_secret_value().encode()

    def __call__(self, request: Request) -> None:
        if self._token is None:
            raise HTTPException(
                status.HTTP_403_FORBIDDEN,
                "the admin API is closed: set api.token (environment DSF_BRIDGE_API__TOKEN) "
                "to open it",
            )
        given = _credentials(request.headers.get("authorization", ""))
        if given is None or not hmac.compare_digest(given, self._token):
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                "missing or wrong token: send 'Authorization: Bearer <api.token>'",
                headers={"WWW-Authenticate": f'Basic realm="{REALM}", charset="UTF-8"'},
            )


def _credentials(header: str) -> bytes | None:
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip().encode()
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value.strip(), validate=True)
        except (binascii.Error, ValueError):
            return None
        _user, sep, password = decoded.partition(b":")
        return password if sep else None
    return None
