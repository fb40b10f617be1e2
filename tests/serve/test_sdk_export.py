"""Checkpoint export as the cookbook's `weights.download` does it, through the official SDK:
save_weights_external (age-encrypted), external_weights_urls fetched with plain GETs, PUT ttl,
DELETE; and TTLs enforced (an expired checkpoint is unlisted, unloadable and its files go)."""

import json
import os
import sqlite3
import time
from pathlib import Path

import numpy as np
import pyrage
import pytest
import requests
import tinker
from safetensors.numpy import load
from tinker import types

from tests.conftest import database_file

pytestmark = pytest.mark.serve


@pytest.fixture(scope="module")
def trained(service):
    tc = service.create_lora_training_client(base_model="tiny-a", rank=4, seed=4).result()
    datum = types.Datum(
        model_input=types.ModelInput.from_ints([1, 2, 3, 4]), loss_fn_inputs={"target_tokens": [2, 3, 4, 5]}
    )
    tc.forward_backward([datum], "cross_entropy")
    tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    return tc


def download(urls: dict[str, str]) -> dict[str, bytes]:
    files = {}
    for name, url in urls.items():
        assert ".." not in name and not name.startswith("/")
        response = requests.get(url, timeout=30)  # no API key: the link carries its own authorisation
        assert response.status_code == 200, response.text
        files[name] = response.content
    return files


def test_the_cookbook_download_flow_gives_an_encrypted_peft_folder(service, trained, tiny_url):
    identity = pyrage.x25519.Identity.generate()
    rest = tinker.RestClient(base_url=tiny_url)
    encrypted = trained.save_weights_external("download", 3600, [str(identity.to_public())]).result()
    plain = trained.save_weights_external("plain").result()
    assert encrypted.path == f"tinker://{trained.model_id}/external_weights/download"
    urls = rest.get_external_weights_urls(encrypted.path).result()
    rest.set_checkpoint_ttl_from_tinker_path(encrypted.path, 3600).result()
    assert urls.expires is not None and set(urls.urls) == {"adapter_config.json.age", "adapter_model.safetensors.age"}
    files = {name[: -len(".age")]: pyrage.decrypt(data, [identity]) for name, data in download(urls.urls).items()}
    assert files == download(rest.get_external_weights_urls(plain.path).result().urls)  # the same weights
    config = json.loads(files["adapter_config.json"])
    assert config["r"] == 4 and config["peft_type"] == "LORA"
    tensors = load(files["adapter_model.safetensors"])
    assert any(k.startswith("base_model.model.") and k.endswith(".lora_A.weight") for k in tensors)
    assert all(np.isfinite(t).all() for t in tensors.values())

    listed = {c.checkpoint_id: c for c in rest.list_checkpoints(trained.model_id).result().checkpoints}
    assert listed["external_weights/download"].checkpoint_type == "external"
    assert listed["external_weights/download"].expires_at is not None
    rest.delete_checkpoint_from_tinker_path(encrypted.path).result()
    assert all(requests.get(url, timeout=30).status_code == 404 for url in urls.urls.values())


def test_links_cannot_be_forged_and_exports_cannot_be_loaded(service, trained, tiny_url):
    rest = tinker.RestClient(base_url=tiny_url)
    path = trained.save_weights_external("signed").result().path
    url = next(iter(rest.get_external_weights_urls(path).result().urls.values()))
    token = url.rsplit("/", 1)[1]
    body, mac = token.split(".")
    forged = body[:-2] + ("A" if body[-2] != "A" else "B") + body[-1] + "." + mac
    for bad in (url.replace(token, forged), url.replace(token, token[:-3]), url + "x"):
        assert requests.get(bad, timeout=30).status_code == 404
    with pytest.raises(tinker.BadRequestError, match="external_weights"):
        service.create_sampling_client(model_path=path).result()


def test_bad_exports_fail_as_user_errors(trained):
    with pytest.raises(tinker.RequestFailedError, match="age recipient"):
        trained.save_weights_external("bad-key", age_encryption_recipients=["age1notakey"]).result()
    with pytest.raises((tinker.BadRequestError, tinker.UnprocessableEntityError)):
        trained.save_weights_external("too-short", ttl_seconds=60).result()


def test_an_expired_checkpoint_is_gone(service, trained, checkpoint_root, tiny_url):
    rest = tinker.RestClient(base_url=tiny_url)
    path = trained.save_weights_for_sampler("short-lived", ttl_seconds=3600).result().path
    service.create_sampling_client(model_path=path).result()  # loadable while it lives
    with sqlite3.connect(database_file(checkpoint_root).removeprefix("sqlite:///")) as db:
        db.execute("UPDATE checkpoints SET expires_at = '2000-01-01 00:00:00.000000' WHERE name = 'short-lived'")
    listed = [c.checkpoint_id for c in rest.list_checkpoints(trained.model_id).result().checkpoints]
    assert "sampler_weights/short-lived" not in listed
    with pytest.raises(tinker.NotFoundError):
        service.create_sampling_client(model_path=path).result()
    with pytest.raises(tinker.NotFoundError):
        rest.set_checkpoint_ttl_from_tinker_path(path, None).result()
    deadline = time.time() + 30
    while list(Path(checkpoint_root).glob(f"*/{trained.model_id}/sampler_weights/short-lived")):
        assert time.time() < deadline, "the expired checkpoint's files were never swept"
        rest.list_checkpoints(trained.model_id).result()  # a listing sweeps (at most every few seconds)
        time.sleep(1)


def test_the_cookbooks_own_download_of_a_training_checkpoint(service, trained, tiny_url, checkpoint_root, tmp_path):
    """tinker_cookbook.weights.download, unmodified: it loads the checkpoint into a new training run,
    exports it age-encrypted to a key of its own, fetches the signed links, renews the TTL,
    decrypts, deletes the export and finishes its session. The adapter is the saved one."""
    from tinker_cookbook import weights

    state = trained.save_state("for-download").result().path
    out = weights.download(tinker_path=state, output_dir=str(tmp_path / "adapter"), base_url=tiny_url)
    got = load((Path(out) / "adapter_model.safetensors").read_bytes())
    (saved,) = Path(checkpoint_root).glob(f"*/{trained.model_id}/weights/for-download/adapter_model.safetensors")
    expected = load(saved.read_bytes())
    assert got.keys() == expected.keys() and all(np.array_equal(got[k], expected[k]) for k in got)
    assert json.loads((Path(out) / "adapter_config.json").read_text())["r"] == 4
    assert not list(Path(checkpoint_root).glob("*/*/external_weights/download"))  # the export was deleted


def test_a_published_checkpoint_is_loadable_by_every_tenant_until_unpublished(service, trained, tiny_url):
    rest = tinker.RestClient(base_url=tiny_url)
    path = trained.save_weights_for_sampler("shared").result().path
    bob = tinker.ServiceClient(base_url=tiny_url, api_key="tml-bob-export-test")
    try:
        with pytest.raises(tinker.NotFoundError):
            bob.create_sampling_client(model_path=path).result()
        rest.publish_checkpoint_from_tinker_path(path).result()
        rest.publish_checkpoint_from_tinker_path(path).result()  # already public: still a 2xx
        listed = {c.checkpoint_id: c for c in rest.list_checkpoints(trained.model_id).result().checkpoints}
        assert listed["sampler_weights/shared"].public
        sampler = bob.create_sampling_client(model_path=path).result()
        sampled = sampler.sample(types.ModelInput.from_ints([1, 2]), 1, types.SamplingParams(max_tokens=2)).result()
        assert len(sampled.sequences) == 1
        bob_rest = tinker.RestClient(base_url=tiny_url, api_key="tml-bob-export-test")
        assert bob_rest.get_weights_info_by_tinker_path(path).result().lora_rank == 4
        seen = bob_rest.get_training_run(trained.model_id, access_scope="accessible").result()
        assert seen.last_sampler_checkpoint.tinker_path == path and seen.last_checkpoint is None  # published only
        with pytest.raises(tinker.NotFoundError):
            bob_rest.get_training_run(trained.model_id).result()  # owned scope: not Bob's
        for attempt in (bob_rest.unpublish_checkpoint_from_tinker_path, bob_rest.delete_checkpoint_from_tinker_path):
            with pytest.raises(tinker.NotFoundError):  # only the owner
                attempt(path).result()
        rest.unpublish_checkpoint_from_tinker_path(path).result()
        rest.unpublish_checkpoint_from_tinker_path(path).result()
        with pytest.raises(tinker.NotFoundError):
            bob.create_sampling_client(model_path=path).result()
    finally:
        bob.close("success").result()


def test_per_save_metadata_and_overwrite(service, trained, tiny_url):
    rest = tinker.RestClient(base_url=tiny_url)

    def metadata(checkpoint_id):
        listed = {c.checkpoint_id: c for c in rest.list_checkpoints(trained.model_id).result().checkpoints}
        return listed[checkpoint_id].user_metadata

    trained.save_state("meta", user_metadata={"epoch": "1"}).result()
    assert metadata("weights/meta") == {"epoch": "1"}
    trained.save_state("meta", overwrite=True, user_metadata={"epoch": "2"}).result()  # replaced whole
    assert metadata("weights/meta") == {"epoch": "2"}
    trained.save_state("meta", overwrite=True).result()  # overwrite without metadata: none left
    assert not metadata("weights/meta")
    trained.save_state("meta").result()  # the same name again without overwrite: replaced quietly, never a 409
    trained.save_weights_for_sampler("meta-s", user_metadata={"k": "v"}).result()
    assert metadata("sampler_weights/meta-s") == {"k": "v"}


def test_copy_weights_makes_a_new_untrainable_run_and_a_retry_returns_the_same_copy(service, trained, tiny_url):
    rest = tinker.RestClient(base_url=tiny_url)
    source = trained.save_weights_for_sampler("to-copy").result().path
    copied = rest.copy_weights(source, "proj-x", ttl_seconds=7200).result()
    run_id, segment, name = copied[len("tinker://") :].split("/")
    assert (segment, name) == ("sampler_weights", "to-copy") and run_id != trained.model_id
    (listed,) = rest.list_checkpoints(run_id).result().checkpoints
    assert listed.expires_at is not None
    sampler = service.create_sampling_client(model_path=copied).result()
    assert sampler.sample(types.ModelInput.from_ints([3, 4]), 1, types.SamplingParams(max_tokens=2)).result()
    key = {"X-API-Key": os.environ["TINKER_API_KEY"], "X-Idempotency-Key": "same-key"}
    body = {"source_path": source, "destination_project_id": "proj-x"}
    first = requests.post(f"{tiny_url}/api/v1/copy_weights", json=body, headers=key, timeout=60).json()
    again = requests.post(f"{tiny_url}/api/v1/copy_weights", json=body, headers=key, timeout=60).json()
    assert first == again and first["tinker_path"] != copied
    other = {"X-API-Key": "tml-copy-stranger", "X-Idempotency-Key": "k"}
    assert requests.post(f"{tiny_url}/api/v1/copy_weights", json=body, headers=other, timeout=60).status_code == 404


def test_a_link_dies_when_its_checkpoint_is_saved_anew(service, trained, tiny_url):
    rest = tinker.RestClient(base_url=tiny_url)
    path = trained.save_weights_external("resaved").result().path
    urls = rest.get_external_weights_urls(path).result().urls
    assert all(requests.get(u, timeout=30).status_code == 200 for u in urls.values())
    trained.save_weights_external("resaved").result()
    assert all(requests.get(u, timeout=30).status_code == 404 for u in urls.values())
