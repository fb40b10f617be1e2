"""Run by tests/serve/test_sdk_versions.py under an older tinker SDK (0.25 / 0.30): the flows
recipes of that time use, against a Thinker server. Prints one JSON line of what it saw."""

import io
import json
import os
import sys
import tarfile
import urllib.error
import urllib.request

import tinker
from tinker import types

url, base_model = sys.argv[1], sys.argv[2]
service = tinker.ServiceClient(base_url=url)
tc = service.create_lora_training_client(base_model=base_model, rank=4, seed=1)
datum = types.Datum(
    model_input=types.ModelInput.from_ints([1, 2, 3, 4]), loss_fn_inputs={"target_tokens": [2, 3, 4, 5]}
)
losses = []
for _ in range(2):
    fb = tc.forward_backward([datum], "cross_entropy")
    tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    losses.append(fb.result().metrics["loss:sum"])
state = tc.save_state("old-sdk").result().path
sampler = tc.save_weights_and_get_sampling_client("old-sdk-sampler")
sample = sampler.sample(types.ModelInput.from_ints([1, 2, 3]), 2, types.SamplingParams(max_tokens=3, seed=2)).result()
resumed = service.create_training_client_from_state(state)
resumed_loss = resumed.forward([datum], "cross_entropy").result().metrics["loss:sum"]
# a newer client's export in the same run: a 0.25 listing must still parse (it knows training/sampler only)
key = {"X-API-Key": os.environ["TINKER_API_KEY"], "content-type": "application/json"}
export = {"model_id": tc.model_id, "path": "newer-export"}
request = urllib.request.Request(f"{url}/api/v1/save_weights_external", json.dumps(export).encode(), key)
request_id = json.load(urllib.request.urlopen(request))["request_id"]
while True:
    body = json.dumps({"request_id": request_id}).encode()
    poll = urllib.request.Request(f"{url}/api/v1/retrieve_future", body, key)
    try:
        with urllib.request.urlopen(poll) as answer:
            if answer.status == 200:
                break
    except urllib.error.HTTPError as exc:
        if exc.code == 408:  # the long-poll's "try again"
            continue
        raise SystemExit(f"save_weights_external failed: {exc.read()[:500]!r}") from None
rest = service.create_rest_client()
listed = rest.list_checkpoints(tc.model_id).result()
archive = None
if hasattr(rest, "get_checkpoint_archive_url"):
    answer = rest.get_checkpoint_archive_url(tc.model_id, "weights/old-sdk").result()
    with urllib.request.urlopen(answer.url) as response:  # a plain GET of the signed link
        names = sorted(tarfile.open(fileobj=io.BytesIO(response.read())).getnames())
    archive = names
print(
    json.dumps(
        {
            "version": tinker.__version__ if hasattr(tinker, "__version__") else "?",
            "losses": losses,
            "resumed_loss": resumed_loss,
            "samples": [len(s.tokens) for s in sample.sequences],
            "checkpoint_types": sorted({c.checkpoint_type for c in listed.checkpoints} - {"external"}),
            "external_listed": any(c.checkpoint_type == "external" for c in listed.checkpoints),
            "archive": archive,
        }
    )
)
