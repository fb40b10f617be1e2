"""Tenants and API keys: who a request comes from.

- `keys` mode: only keys issued by `thinker keys create --tenant NAME` are accepted; anything else
  (no key, an unknown or revoked key) is an AuthenticationError (401).
- `open` mode: any key is accepted and each distinct key is its own tenant (`key-` + a digest of
  the key); requests without a key share the `anonymous` tenant. An issued key still names its
  tenant, and a revoked one is refused.
- Keys are stored as SHA-256 digests, never in clear. Issued keys are `tml-` + 43 random URL-safe
  characters (the SDK insists on the `tml-` prefix); a digest of 256 random bits needs no salt.
- Every call reads the database (no cache), so a revoked key stops working at once.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from actors import ids
from actors.metadata.database import Database
from actors.metadata.tables import ApiKey, Tenant, utc_now
from actors.work import ANONYMOUS
from configs.errors import AuthenticationError, NotFoundError

KEY_PREFIX = "tml-"
MAX_KEY_LENGTH = 4096

AuthMode = Literal["open", "keys"]


@dataclass(frozen=True)
class KeyRecord:
    id: int
    tenant_id: str
    name: str
    prefix: str  # the key's first characters, to recognise it
    created_at: datetime
    revoked_at: datetime | None


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def open_tenant_id(key: str) -> str:
    """The tenant an unissued key stands for in open mode."""
    return f"key-{digest(key)[:24]}"


class Tenants:
    def __init__(self, db: Database, mode: AuthMode):
        self._db = db
        self.mode = mode

    def authenticate(self, key: str | None) -> str:
        """The tenant id of a request that carried `key` (the X-API-Key header, None if absent)."""
        if key is not None and (not key or len(key) > MAX_KEY_LENGTH):
            raise AuthenticationError(f"an API key must be 1 to {MAX_KEY_LENGTH} characters")
        if key is None:
            if self.mode == "keys":
                raise AuthenticationError("this server needs an API key (X-API-Key); ask its operator for one")
            return self._ensure_tenant(ANONYMOUS, "anonymous")
        hashed = digest(key)
        with self._db.reading() as session:
            row = session.scalars(select(ApiKey).where(ApiKey.key_hash == hashed)).one_or_none()
            if row is not None and row.revoked_at is not None:
                raise AuthenticationError("this API key was revoked")
            if row is not None and (row.issued or self.mode == "open"):
                return row.tenant_id
        if self.mode == "keys":
            raise AuthenticationError("unknown API key")
        return self._open_tenant(key, hashed)

    def create_key(self, tenant_id: str, name: str = "") -> tuple[KeyRecord, str]:
        """Issue a key for `tenant_id` (created if new); returns its record and the key, shown once."""
        ids.check_name(tenant_id, "tenant name")
        self._ensure_tenant(tenant_id, "named")
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        row = ApiKey(key_hash=digest(key), key_prefix=key[:12], tenant_id=tenant_id, name=name[:128], issued=True)
        with self._db.transaction() as session:
            session.add(row)
        return _record(row), key

    def list_keys(self, tenant_id: str | None = None) -> list[KeyRecord]:
        query = select(ApiKey).where(ApiKey.issued).order_by(ApiKey.id)
        if tenant_id is not None:
            query = query.where(ApiKey.tenant_id == tenant_id)
        with self._db.reading() as session:
            return [_record(row) for row in session.scalars(query)]

    def revoke(self, key_id: int) -> KeyRecord:
        with self._db.transaction() as session:
            row = session.get(ApiKey, key_id)
            if row is None or not row.issued:
                raise NotFoundError(f"no issued API key with id {key_id}")
            if row.revoked_at is None:
                row.revoked_at = utc_now()
            return _record(row)

    def key_record(self, key: str) -> KeyRecord:
        """The record of a key that authenticates (issued, or seen in open mode)."""
        self.authenticate(key)
        with self._db.reading() as session:
            row = session.scalars(select(ApiKey).where(ApiKey.key_hash == digest(key))).one()
            return _record(row)

    def revoke_key(self, key: str) -> KeyRecord:
        """Revoke the key itself (`tinker auth logout`): it authenticates no more, in either mode."""
        record = self.key_record(key)
        with self._db.transaction() as session:
            row = session.get(ApiKey, record.id)
            row.revoked_at = row.revoked_at or utc_now()
            return _record(row)

    def _open_tenant(self, key: str, hashed: str) -> str:
        tenant_id = open_tenant_id(key)
        self._ensure_tenant(tenant_id, "key")
        try:
            with self._db.transaction() as session:
                session.add(ApiKey(key_hash=hashed, key_prefix="", tenant_id=tenant_id, issued=False))
        except IntegrityError:  # another replica recorded it first
            pass
        return tenant_id

    def _ensure_tenant(self, tenant_id: str, kind: str) -> str:
        with self._db.reading() as session:
            if session.get(Tenant, tenant_id) is not None:
                return tenant_id
        try:
            with self._db.transaction() as session:
                session.add(Tenant(id=tenant_id, kind=kind))
        except IntegrityError:  # another process created it first
            pass
        return tenant_id


def _record(row: ApiKey) -> KeyRecord:
    return KeyRecord(row.id, row.tenant_id, row.name, row.key_prefix, row.created_at, row.revoked_at)
