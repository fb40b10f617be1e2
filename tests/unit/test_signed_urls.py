"""Signed download links: genuine ones verify, anything altered, expired or hostile is a 404."""

import base64
import time

import pytest

from actors.metadata.database import Database
from configs.errors import NotFoundError
from deployments.signed_urls import UrlSigner


@pytest.fixture
def signer(database_url):
    db = Database(database_url)
    db.migrate()
    yield UrlSigner(db), UrlSigner(db)  # two replicas share the key through the database
    db.close()


def test_a_link_verifies_on_every_replica_until_it_expires(signer):
    one, two = signer
    token = one.sign({"r": "run", "f": "adapter_model.safetensors"}, time.time() + 60)
    assert two.verify(token)["f"] == "adapter_model.safetensors"
    with pytest.raises(NotFoundError):
        two.verify(one.sign({"r": "run"}, time.time() - 1))


@pytest.mark.parametrize(
    "mutate",
    [
        lambda t: t[:-2],
        lambda t: t.split(".")[0] + ".",
        lambda t: base64.urlsafe_b64encode(b"[" * 3000).decode().rstrip("=") + "." + t.split(".")[1],
        lambda t: "!!!." + t.split(".")[1],
        lambda t: "x" * 5000,
        lambda t: "",
    ],
)
def test_altered_or_hostile_links_are_unknown(signer, mutate):
    one, _ = signer
    token = one.sign({"r": "run"}, time.time() + 60)
    with pytest.raises(NotFoundError):
        one.verify(mutate(token))
