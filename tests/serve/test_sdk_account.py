"""Identity, usage and audit routes through the official SDK (RestClient / AdminClient) and plain
HTTP: auth/apikey/me (and logout revoking only that key), hourly usage events, checkpoint storage,
the audit log of checkpoint saves; each tenant sees its own only."""

import time
from datetime import UTC, datetime, timedelta

import pytest
import requests
import tinker
from tinker import types

pytestmark = pytest.mark.serve
KEY = "tml-account-test-key"


def test_who_am_i_usage_audit_and_logout(tiny_url):
    service = tinker.ServiceClient(base_url=tiny_url, api_key=KEY)
    tc = service.create_lora_training_client(base_model="tiny-a", rank=4).result()
    datum = types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3]), loss_fn_inputs={"target_tokens": [2, 3, 4]})
    tc.forward_backward([datum], "cross_entropy").result()
    tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()
    path = tc.save_state("audited").result().path
    admin = tinker.AdminClient(base_url=tiny_url, api_key=KEY)  # billing and audit (0.38's home for them)

    me = requests.get(f"{tiny_url}/api/v1/auth/apikey/me", headers={"X-API-Key": KEY}, timeout=30).json()
    assert isinstance(me["key_id"], int) and me["details"]["org_details"]["name"]

    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    usage = None
    for _ in range(20):  # usage counts are written just after the answer
        usage = admin.get_billing_usage(hour - timedelta(hours=1), hour + timedelta(hours=1)).result()
        if usage.data:
            break
        time.sleep(0.25)
    trained = [e for e in usage.data if e.event_info.type == "training"]
    assert trained and sum(e.event_info.token_count for e in trained) == 3
    assert trained[0].session_id == tc.model_id.split(":")[0] and trained[0].base_model == "tiny-a"
    with pytest.raises(tinker.BadRequestError):
        admin.get_billing_usage(hour - timedelta(days=15), hour).result()

    storage = admin.get_current_checkpoint_storage_usage().result()
    assert storage.data[0].checkpoint_count >= 1 and storage.data[0].size_bytes > 0
    entries = admin.get_audit_log(event_type="checkpoints").result().entries
    assert path in [e.tinker_path for e in entries]
    other = requests.get(f"{tiny_url}/api/v1/audit", headers={"X-API-Key": "tml-another-tenant"}, timeout=30)
    assert path not in [e.get("tinker_path") for e in other.json()["entries"]]

    service.close("success").result()
    assert requests.delete(f"{tiny_url}/api/v1/auth/apikey/me", headers={"X-API-Key": KEY}, timeout=30).ok
    after = requests.get(f"{tiny_url}/api/v1/auth/apikey/me", headers={"X-API-Key": KEY}, timeout=30)
    assert after.status_code == 401 and "revoked" in after.json()["error"]
    assert after.json()["detail"] == after.json()["error"]  # the CLI shows `detail`
    still = requests.get(f"{tiny_url}/api/v1/healthz", headers={"X-API-Key": "tml-another-tenant"}, timeout=30)
    assert still.status_code == 200
