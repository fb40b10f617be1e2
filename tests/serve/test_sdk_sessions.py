"""The sessions REST routes through the official SDK: list, get, search (filters, statuses,
paging), project moves, trace export; another tenant's sessions are unknown."""

import pytest
import requests
import tinker
from tinker import types

pytestmark = pytest.mark.serve


def test_sessions_are_listed_found_and_searched_as_the_sdk_expects(tiny_url):
    first = tinker.ServiceClient(base_url=tiny_url, display_name="nightly sweep alpha", user_metadata={"team": "rl"})
    second = tinker.ServiceClient(base_url=tiny_url, display_name="nightly sweep beta", project_id="proj-b")
    tc = first.create_lora_training_client(base_model="tiny-a", rank=4).result()
    tc.save_weights_for_sampler("s1").result()
    sampler = tc.save_weights_and_get_sampling_client().result()
    other_tc = second.create_lora_training_client(base_model="tiny-a", rank=4).result()
    first_id, second_id = tc.model_id.split(":")[0], other_tc.model_id.split(":")[0]
    rest = tinker.RestClient(base_url=tiny_url)

    listed = rest.list_sessions(limit=1000).result().sessions
    assert {first_id, second_id} <= set(listed)
    got = rest.get_session(first_id).result()
    assert got.training_run_ids == [tc.model_id] and sampler is not None and len(got.sampler_ids) == 1
    assert got.display_name == "nightly sweep alpha" and got.user_metadata == {"team": "rl"}

    search = types.SessionSearchRequest(display_name="SWEEP nightly", owner=types.AccessibleSearchOwner(), limit=1)
    page = rest.search_sessions(search).result()
    assert [s.session_id for s in page.sessions] == [second_id]  # newest first, one per page
    page = rest.search_sessions(search.model_copy(update={"cursor": page.next_cursor})).result()
    assert [s.session_id for s in page.sessions] == [first_id]
    summary = page.sessions[0]
    assert summary.checkpoints_count == 1 and summary.checkpoint_storage_bytes > 0
    assert summary.status.type == "active" and summary.project_id == "default"
    by_project = rest.search_sessions(types.SessionSearchRequest(project_ids=["proj-b"])).result()
    assert [s.session_id for s in by_project.sessions] == [second_id]
    by_metadata = rest.search_sessions(types.SessionSearchRequest(user_metadata={"team": "rl"})).result()
    assert [s.session_id for s in by_metadata.sessions] == [first_id]

    second.close("interrupted", "ctrl-c").result()
    finished = types.SessionSearchRequest(
        session_id=second_id, statuses=[types.ClientFinishedSessionStatusQuery(reasons=["interrupted"])]
    )
    (hit,) = rest.search_sessions(finished).result().sessions
    assert hit.status.type == "client_finished" and hit.status.reason.type == "interrupted"

    key = {"X-API-Key": "tml-someone-else"}
    assert requests.get(f"{tiny_url}/api/v1/sessions/{first_id}", headers=key, timeout=30).status_code == 404
    other = requests.get(f"{tiny_url}/api/v1/sessions?limit=1000", headers=key, timeout=30).json()["sessions"]
    assert first_id not in other
    moved = requests.put(
        f"{tiny_url}/api/v1/sessions/{second_id}/project",
        json={"project_id": "proj-c"},
        timeout=30,
        headers={"X-API-Key": tinker_key()},
    )
    assert moved.status_code == 400 and "cannot be moved out" in moved.json()["error"]
    trace = requests.get(f"{tiny_url}/api/v1/sessions/{first_id}/trace_export", headers={"X-API-Key": tinker_key()})
    assert trace.json()["status"] == "failed"
    first.close("success").result()


def tinker_key() -> str:
    import os

    return os.environ["TINKER_API_KEY"]
