"""Custom losses uploaded with `create_custom_loss`, per session.

- `create` checks the upload against the allow-list (`losses.graph_rules`; nothing runs) and
  stores it as its session's `custom_loss_seq_id`-th loss. A retried upload (same session and seq)
  gets the same loss_id; a different graph under a seq already used is a user error.
- `get` answers only the session that made the loss (its training requests name it by loss_id);
  another session's or tenant's id reads as unknown.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from actors import ids
from actors.metadata.database import Database
from actors.metadata.tables import CustomLossRecord
from configs.errors import UserError
from losses.graph_rules import CustomLoss, check_program

MAX_PER_SESSION = 256
MAX_UPLOAD_BYTES = 1 << 20  # a loss's name, inputs and graph as JSON (each training request carries it)


class CustomLosses:
    def __init__(self, db: Database):
        self._db = db

    def create(self, tenant: str, session_id: str, seq_id: int, name: Any, inputs: Any, graph: Any) -> str:
        check_program(name, inputs, graph)
        upload = {"name": name, "inputs": inputs, "graph": graph}
        text = json.dumps(upload, sort_keys=True)
        if len(text) > MAX_UPLOAD_BYTES:
            raise UserError(f"a custom loss upload is {len(text)} bytes of JSON, over the limit of {MAX_UPLOAD_BYTES}")
        digest = hashlib.sha256(text.encode()).hexdigest()
        loss_id = ids.check_id(f"{session_id}:loss:{seq_id}", "loss_id")
        try:
            return self._store(tenant, session_id, seq_id, loss_id, digest, upload)
        except IntegrityError:  # the same upload, retried at the same moment: the first one stands
            return self._store(tenant, session_id, seq_id, loss_id, digest, upload)

    def _store(self, tenant: str, session_id: str, seq_id: int, loss_id: str, digest: str, upload: dict) -> str:
        with self._db.transaction() as session:
            existing = session.get(CustomLossRecord, loss_id)
            if existing is not None:
                if existing.tenant_id != tenant or existing.digest != digest:
                    raise UserError(f"custom_loss_seq_id {seq_id} of this session already names another loss")
                return loss_id
            count = session.scalar(select(func.count()).where(CustomLossRecord.session_id == session_id))
            if count >= MAX_PER_SESSION:
                raise UserError(f"a session may create at most {MAX_PER_SESSION} custom losses")
            session.add(
                CustomLossRecord(
                    id=loss_id, tenant_id=tenant, session_id=session_id, seq_id=seq_id, digest=digest, upload=upload
                )
            )
        return loss_id

    def get(self, tenant: str, session_id: str | None, loss_id: Any) -> CustomLoss:
        if not isinstance(loss_id, str):
            raise UserError("loss_fn custom needs loss_fn_config loss_id, the id create_custom_loss returned")
        ids.check_id(loss_id, "loss_id")
        with self._db.reading() as session:
            row = session.get(CustomLossRecord, loss_id)
        if row is None or row.tenant_id != tenant or row.session_id != session_id:
            raise UserError(f"unknown loss_id {loss_id!r} for this session (a custom loss serves its own session)")
        upload = row.upload
        return CustomLoss(loss_id, row.digest, upload["name"], upload["inputs"], upload["graph"])
