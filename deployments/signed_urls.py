"""Download links that carry their own authorisation (external_weights_urls).

- A link names one file of one checkpoint and an expiry, signed with HMAC-SHA256 under a key every
  ingress replica shares (made once, kept in the metadata database). Clients fetch it with a plain
  GET and no API key; a link that is altered, expired, or whose checkpoint has gone is a 404.
- NOTE: the payload is readable (base64 JSON), only not forgeable: it names a run and a file,
  which the holder of the link may know anyway.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time

from sqlalchemy.exc import IntegrityError

from actors.metadata.database import Database
from actors.metadata.tables import ServerSecret
from configs.errors import NotFoundError

KEY_NAME = "download-url-key"
LINK_LIFETIME_S = 3600


class UrlSigner:
    def __init__(self, db: Database):
        self._db = db
        self._key: bytes | None = None

    def sign(self, claims: dict, expires_at: float) -> str:
        body = json.dumps({**claims, "exp": int(expires_at)}, separators=(",", ":"), sort_keys=True).encode()
        return f"{_b64(body)}.{_b64(hmac.new(self._secret(), body, hashlib.sha256).digest())}"

    def verify(self, token: str) -> dict:
        """The claims of a genuine, unexpired link; else NotFoundError."""
        body_part, _, mac_part = token.partition(".")
        try:
            body, mac = _unb64(body_part), _unb64(mac_part)
        except ValueError:
            raise NotFoundError("unknown or expired download link") from None
        expected = hmac.new(self._secret(), body, hashlib.sha256).digest()
        if not hmac.compare_digest(mac, expected):  # before parsing anything a stranger sent
            raise NotFoundError("unknown or expired download link")
        try:
            claims = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise NotFoundError("unknown or expired download link") from None
        if not isinstance(claims, dict):
            raise NotFoundError("unknown or expired download link")
        if not isinstance(claims.get("exp"), int) or claims["exp"] < time.time():
            raise NotFoundError("unknown or expired download link")
        return claims

    def _secret(self) -> bytes:
        if self._key is None:
            with self._db.transaction() as session:
                row = session.get(ServerSecret, KEY_NAME)
            if row is None:
                try:
                    with self._db.transaction() as session:
                        session.add(ServerSecret(name=KEY_NAME, value=secrets.token_bytes(32)))
                except IntegrityError:  # another replica made it first
                    pass
                with self._db.transaction() as session:
                    row = session.get(ServerSecret, KEY_NAME)
            self._key = bytes(row.value)
        return self._key


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    if not text or len(text) > 4096:
        raise ValueError("bad link")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
