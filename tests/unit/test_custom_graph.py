"""Server-side custom losses: graphs traced by the SDK itself run to the same values and gradients as
the Python function, and hostile or oversized graphs are refused as user errors."""

import copy

import numpy as np
import pytest
import torch
from tinker.lib.public_interfaces.custom_loss import encode_graph, trace_loss

from actors.work import Datum
from configs.errors import UserError
from losses import custom_graph, graph_rules, loss_spec
from losses.graph_rules import CustomLoss


def upload(fn, ranks):
    handle = trace_loss(fn, ranks, "session")
    inputs = [x.model_dump() for x in handle.inputs]
    graph = encode_graph(handle).model_dump()
    return inputs, graph


def spec_of(fn, ranks, key=None):
    inputs, graph = upload(fn, ranks)
    return loss_spec("custom", CustomLoss("loss-1", key or repr((fn.__name__, ranks)), fn.__name__, inputs, graph))


def ppo_like(logprobs, advantages, old, scale):
    ratio = torch.exp(logprobs - old)
    clipped = torch.clamp(ratio, 0.8, 1.2)
    objective = torch.minimum(ratio * advantages, clipped * advantages)
    n = logprobs.shape[0]
    positive = logprobs[advantages > 0]
    metrics = {
        "custom/clipped:mean": (ratio != clipped).float().mean(),
        "custom/positive:sum": positive.sum().detach(),
    }
    return -objective.sum() * scale / n, metrics


def distill(logprobs, weights):
    probs = torch.nn.functional.softmax(logprobs, dim=-1)
    return -(weights * logprobs).sum() + 0.1 * (probs * probs).sum(), {"custom/width:mean": logprobs.new_ones(()) * 2}


def datums(rng, lengths, k=None):
    data = []
    for n in lengths:
        targets = rng.integers(0, 50, size=(n, k) if k else n)
        inputs = {
            "target_tokens": targets,
            "advantages": rng.normal(size=n).astype(np.float32),
            "old": (-rng.random(n)).astype(np.float32),
            "scale": np.array([1.5], dtype=np.float32),
            "weights": rng.random((n, k) if k else n).astype(np.float32),
        }
        data.append(Datum(tokens=rng.integers(0, 50, size=n), loss_fn_inputs=inputs))
    return data


def test_same_loss_metrics_and_gradients_as_the_python_function():
    rng = np.random.default_rng(0)
    data = datums(rng, [5, 3, 7])
    spec = spec_of(ppo_like, {"logprobs": 1, "advantages": 1, "old": 1, "scale": 0})
    for i, datum in enumerate(data):
        spec.check_inputs(datum.loss_fn_inputs, datum.num_scored, i)
    logprobs = torch.tensor(-rng.random(15), dtype=torch.float32, requires_grad=True)
    out = spec(logprobs, spec.inputs_of(data, torch.device("cpu")), {})
    out.loss.backward()
    server_grad = logprobs.grad.clone()

    reference = logprobs.detach().clone().requires_grad_(True)
    total, clipped, positive = 0, 0.0, 0.0
    for lp, datum in zip(torch.split(reference, [5, 3, 7]), data):
        x = {k: torch.from_numpy(v) for k, v in datum.loss_fn_inputs.items()}
        loss, metrics = ppo_like(lp, x["advantages"], x["old"], x["scale"].reshape(()))
        total = total + loss
        clipped += metrics["custom/clipped:mean"].item()
        positive += metrics["custom/positive:sum"].item()
    total.backward()
    assert out.loss.item() == pytest.approx(total.item(), abs=1e-5)
    assert out.metrics["custom/clipped:mean"] == pytest.approx(clipped / 3, abs=1e-6)
    assert out.metrics["custom/positive:sum"] == pytest.approx(positive, abs=1e-5)
    torch.testing.assert_close(server_grad, reference.grad, atol=1e-5, rtol=0)


def test_rank_two_logprobs():
    rng = np.random.default_rng(1)
    data = datums(rng, [4, 2], k=3)
    spec = spec_of(distill, {"logprobs": 2, "weights": 2})
    logprobs = torch.tensor(-rng.random((6, 3)), dtype=torch.float32, requires_grad=True)
    out = spec(logprobs, spec.inputs_of(data, torch.device("cpu")), {})
    expected = sum(
        distill(lp, torch.from_numpy(d.loss_fn_inputs["weights"]))[0]
        for lp, d in zip(torch.split(logprobs, [4, 2]), data)
    )
    assert out.loss.item() == pytest.approx(expected.item(), abs=1e-5)
    assert out.metrics == {"custom/width:mean": 2.0}


def test_inputs_must_match_their_declared_ranks():
    spec = spec_of(ppo_like, {"logprobs": 1, "advantages": 1, "old": 1, "scale": 0})
    datum = datums(np.random.default_rng(2), [4])[0]
    bad = dict(datum.loss_fn_inputs, scale=np.ones(3, np.float32))
    with pytest.raises(UserError, match="scale.*rank 0"):
        spec.check_inputs(bad, 4, 0)
    with pytest.raises(UserError, match="lacks"):
        spec.check_inputs({k: v for k, v in datum.loss_fn_inputs.items() if k != "old"}, 4, 0)
    with pytest.raises(UserError, match="NaN"):
        spec.check_inputs(dict(datum.loss_fn_inputs, old=np.full(4, np.nan, np.float32)), 4, 0)


def simple_graph():
    return upload(lambda logprobs: (logprobs.sum(), {}), {"logprobs": 1})


def with_node(node, at=-1):
    inputs, graph = simple_graph()
    graph = copy.deepcopy(graph)
    graph["nodes"].insert(len(graph["nodes"]) + at if at < 0 else at, node)
    return inputs, graph


def call(target, *args, op="call_function", **kwargs):
    return {"op": op, "name": "evil", "target": target, "args": list(args), "kwargs": kwargs}


@pytest.mark.parametrize(
    "node, message",
    [
        (call("builtins.__import__", "os"), "not among the functions"),
        (call("builtins.eval", "1+1"), "not among the functions"),
        (call("builtins.open", "/etc/passwd"), "not among the functions"),
        (call("os.system", "true"), "not among the functions"),
        (call("torch.load", "/tmp/x"), "not among the functions"),
        (call("torch.Tensor.__reduce_ex__", {"ref": "logprobs"}), "not among the functions"),
        (call("operator.setitem", {"ref": "logprobs"}, 0, 1.0), "not among the functions"),
        (call("backward", {"ref": "logprobs"}, op="call_method"), "may not call"),
        (call("register_hook", {"ref": "logprobs"}, op="call_method"), "may not call"),
        (call("add_", {"ref": "logprobs"}, 1, op="call_method"), "may not call"),
        (call("item", {"ref": "logprobs"}, op="call_method"), "may not call"),
        (call("getattr", {"ref": "logprobs"}, "__class__"), "attribute"),
        (call("getattr", {"ref": "logprobs"}, "grad"), "attribute"),
        (call("torch.exp", {"ref": "logprobs"}, out={"ref": "logprobs"}), "out="),
        (call("torch.exp", {"ref": "later"}), "not an earlier node"),
        (call("torch.zeros", 3, dtype={"dtype": "complex128"}), "not one a custom loss may pass"),
        (call("torch.exp", {"py": "os.system"}), "not one a custom loss may pass"),
        ({"op": "call_module", "name": "m", "target": "linear", "args": [], "kwargs": {}}, "allowed are"),
        ({"op": "get_attr", "name": "w", "target": "weight", "args": [], "kwargs": {}}, "allowed are"),
    ],
)
def test_hostile_graphs_are_refused_before_anything_runs(node, message):
    inputs, graph = with_node(node)
    with pytest.raises(UserError, match=message):
        graph_rules.check_program("evil_loss", inputs, graph)


def test_malformed_uploads_are_user_errors():
    inputs, graph = simple_graph()
    for bad_inputs in ([], [{"name": "advantages", "rank": 1}], [{"name": "logprobs", "rank": 0}], "x"):
        with pytest.raises(UserError):
            graph_rules.check_program("f", bad_inputs, graph)
    for bad_graph in ({}, {"format": 2, "nodes": []}, {"format": 1, "nodes": [1]}, {"format": 1, "nodes": []}):
        with pytest.raises(UserError):
            graph_rules.check_program("f", inputs, bad_graph)
    too_many = copy.deepcopy(graph)
    too_many["nodes"][1:1] = [dict(call("torch.exp", {"ref": "logprobs"}), name=f"n{i}") for i in range(1100)]
    with pytest.raises(UserError, match="nodes"):
        graph_rules.check_program("f", inputs, too_many)
    with pytest.raises(UserError, match="name"):
        graph_rules.check_program("bad name!", inputs, graph)


def run_node(node, key):
    """Insert `node` before the output and run the graph on one datum; the loss is unchanged."""
    inputs, graph = with_node(node)
    spec = loss_spec("custom", CustomLoss("loss-1", key, "f", inputs, graph))
    datum = Datum(tokens=np.zeros(4, np.int64), loss_fn_inputs={"target_tokens": np.zeros(4, np.int64)})
    return spec(torch.zeros(4), spec.inputs_of([datum], torch.device("cpu")), {})


@pytest.mark.parametrize(
    "node",
    [
        call("torch.arange", 10**12),
        call("torch.zeros", 4096, 4096, 16),
        call("new_ones", {"ref": "logprobs"}, [10**6, 10**6], op="call_method"),
        call("expand", {"ref": "logprobs"}, 10**9, 4, op="call_method"),
        call("torch.full", [50_000_000], 1.0, device="cpu"),  # a device string is the CPU, checked on meta first
        call("new_zeros", {"ref": "logprobs"}, [10**6], op="call_method", device="meta"),
    ],
)
def test_a_node_too_large_fails_before_it_allocates(node, monkeypatch):
    monkeypatch.setattr(custom_graph, "MAX_VALUE_ELEMENTS", 10)
    with pytest.raises(UserError, match="over the limit"):
        run_node(node, repr(node))


def run_nodes(nodes, key, logprobs=None):
    """Insert `nodes` before the output; the graph's loss stays logprobs.sum()."""
    inputs, graph = simple_graph()
    graph = copy.deepcopy(graph)
    graph["nodes"][1:1] = nodes
    spec = loss_spec("custom", CustomLoss("loss-1", key, "f", inputs, graph))
    datum = Datum(tokens=np.zeros(4, np.int64), loss_fn_inputs={"target_tokens": np.zeros(4, np.int64)})
    logprobs = torch.zeros(4) if logprobs is None else logprobs
    return spec(logprobs, spec.inputs_of([datum], torch.device("cpu")), {})


def named(node, name):
    return dict(node, name=name)


@pytest.mark.parametrize(
    "nodes",
    [
        [  # mse_loss broadcasts [4, 1] against [1, 4] inside, before its output is known
            named(call("unsqueeze", {"ref": "logprobs"}, 1, op="call_method"), "col"),
            named(call("unsqueeze", {"ref": "logprobs"}, 0, op="call_method"), "row"),
            named(call("torch.nn.functional.mse_loss", {"ref": "col"}, {"ref": "row"}, reduction="sum"), "x"),
        ],
        [  # a boolean index next to an integer one broadcasts their nonzero tuples
            named(call("operator.gt", {"ref": "logprobs"}, -1.0), "mask"),
            named(call("torch.zeros", [8, 1], dtype={"dtype": "int64"}), "idx"),
            named(call("unsqueeze", {"ref": "logprobs"}, 1, op="call_method"), "col"),
            named(call("operator.getitem", {"ref": "col"}, {"tuple": [{"ref": "mask"}, {"ref": "idx"}]}), "x"),
        ],
        [  # nonzero's result is bounded by numel x ndim before it runs
            named(call("new_ones", {"ref": "logprobs"}, [3, 3], op="call_method"), "ones"),
            named(call("torch.nonzero", {"ref": "ones"}), "x"),
        ],
        [  # masked_select broadcasts its input and mask
            named(call("unsqueeze", {"ref": "logprobs"}, 1, op="call_method"), "col"),
            named(call("unsqueeze", {"ref": "logprobs"}, 0, op="call_method"), "row"),
            named(call("operator.gt", {"ref": "row"}, -1.0), "mask"),
            named(call("torch.masked_select", {"ref": "col"}, {"ref": "mask"}), "x"),
        ],
    ],
    ids=["broadcast-inside-a-loss", "mask-and-integer-index", "nonzero", "masked-select"],
)
def test_hidden_broadcasts_are_bounded_before_they_run(nodes, monkeypatch):
    monkeypatch.setattr(custom_graph, "MAX_VALUE_ELEMENTS", 12)
    with pytest.raises(UserError, match="over|broadcast"):
        run_nodes(nodes, repr(nodes))


def test_no_write_reaches_the_pass_log_probs():
    """normalize's positional `out` and relu / silu's positional `inplace` are never passed on."""
    shared = torch.tensor([-1.0, -2.0, -3.0, -4.0], requires_grad=True)
    before = shared.detach().clone()
    nodes = [
        named(call("detach", {"ref": "logprobs"}, op="call_method"), "d"),
        named(call("new_full", {"ref": "d"}, [8], {"float": "inf"}, op="call_method"), "big"),
        named(call("torch.nn.functional.normalize", {"ref": "big"}, 2.0, 0, 1e-12, {"ref": "d"}), "n"),
        named(call("torch.nn.functional.relu", {"ref": "d"}, True), "r"),
        named(call("torch.nn.functional.silu", {"ref": "d"}, True), "s"),
    ]
    out = run_nodes(nodes, "no-writes", shared)
    assert torch.equal(shared.detach(), before) and out.loss.item() == pytest.approx(-10.0)
    out.loss.backward()
    assert torch.equal(shared.grad, torch.ones(4))


def test_a_loss_on_another_device_stays_a_cpu_scalar():
    """device="meta" (or "cuda") in a graph is the CPU: the loss comes back as a plain scalar."""
    nodes = [named(call("torch.zeros", [], device="meta"), "z")]
    assert run_nodes(nodes, "meta-device").loss.device.type == "cpu"


def test_a_graph_cannot_run_for_ever(monkeypatch):
    monkeypatch.setattr(custom_graph, "MAX_SECONDS", -1.0)
    with pytest.raises(UserError, match="ran longer"):
        run_nodes([named(call("torch.exp", {"ref": "logprobs"}), "e")], "deadline")


def test_python_values_cannot_blow_up():
    inputs, graph = simple_graph()
    graph = copy.deepcopy(graph)
    graph["nodes"][1:1] = [
        call("getattr", {"ref": "logprobs"}, "shape") | {"name": "shape"},
        call("operator.getitem", {"ref": "shape"}, 0) | {"name": "n"},
        call("operator.pow", {"ref": "n"}, 10**9) | {"name": "huge"},
    ]
    spec = loss_spec("custom", CustomLoss("loss-1", "pow-bomb", "f", inputs, graph))
    datum = Datum(tokens=np.zeros(4, np.int64), loss_fn_inputs={"target_tokens": np.zeros(4, np.int64)})
    with pytest.raises(UserError, match="datum 0, node 'huge'.*64-bit"):
        spec(torch.zeros(4), spec.inputs_of([datum], torch.device("cpu")), {})
    with pytest.raises(UserError, match="takes tensors or numbers"):
        run_node(call("operator.mul", "x" * 200, 10**9), "str-bomb")
    with pytest.raises(UserError, match="takes tensors or numbers"):  # a list holding a tensor, repeated
        run_node(call("operator.mul", [{"ref": "logprobs"}], 50_000_000), "list-bomb")


def test_a_graph_that_fails_names_the_datum_and_node():
    def needs_two(logprobs, advantages):
        return (logprobs * advantages).sum(), {}

    spec = spec_of(needs_two, {"logprobs": 1, "advantages": 1})
    data = datums(np.random.default_rng(3), [3, 4])
    inputs = spec.inputs_of(data, torch.device("cpu"))
    inputs["datums"][1][0] = torch.ones(2)  # as if it had the wrong length
    with pytest.raises(UserError, match="datum 1, node 'mul'"):
        spec(torch.zeros(7), inputs, {})


def test_every_allow_listed_name_is_bound():
    assert set(custom_graph._FUNCTIONS) == graph_rules.FUNCTIONS
    assert all(callable(f) for f in custom_graph._FUNCTIONS.values())
    assert set(custom_graph._METHODS) == graph_rules.METHODS
    in_place = {n for n in graph_rules.METHODS | graph_rules.FUNCTIONS if n.endswith("_")}
    assert in_place == {"operator.and_", "operator.or_"}  # Python's & and |; in-place would be iand / ior


def test_what_torch_functional_traces_to_is_allowed():
    F = torch.nn.functional

    def smooth(logprobs, advantages):
        soft = F.softplus(logprobs) + F.logsigmoid(logprobs) + F.gelu(logprobs) + F.silu(logprobs)
        gated = torch.where(advantages > 0, soft, torch.zeros_like(soft)).to(torch.float32)
        return gated.sum() + F.mse_loss(logprobs, advantages, reduction="sum"), {}

    spec = spec_of(smooth, {"logprobs": 1, "advantages": 1})
    data = datums(np.random.default_rng(4), [5])
    logprobs = torch.tensor(-np.random.default_rng(5).random(5), dtype=torch.float32)
    out = spec(logprobs, spec.inputs_of(data, torch.device("cpu")), {})
    expected, _ = smooth(logprobs, torch.from_numpy(data[0].loss_fn_inputs["advantages"]))
    assert out.loss.item() == pytest.approx(expected.item(), abs=1e-5)


@pytest.mark.parametrize(
    "nodes, message",
    [
        (
            [
                named(call("operator.mod", 3.0, {"ref": "logprobs"}), "m"),
                named(call("sum", {"ref": "m"}, op="call_method"), "x"),
            ],
            "gradient failed",
        ),
        ([named(call("diff", {"ref": "logprobs"}, 10_000, op="call_method"), "x")], "diff's n"),
        ([named(call("split", {"ref": "big"}, 1, op="call_method"), "x")], "tensors, over the limit"),
    ],
    ids=["backward-not-implemented", "diff-order", "split-into-many"],
)
def test_costs_and_failures_hidden_in_one_node_are_the_requests_own(nodes, message):
    """A loss whose backward fails fails alone (its gradient is taken per request, not in the shared
    backward); diff's order and split's piece count are checked before they run."""
    big = named(call("new_zeros", {"ref": "logprobs"}, [100_000], op="call_method"), "big")
    # the loss must depend on the failing node: add it to the output's loss
    inputs, graph = simple_graph()
    graph = copy.deepcopy(graph)
    graph["nodes"][1:1] = [big, *nodes]
    loss_node = graph["nodes"][-2]
    if nodes[-1]["target"] == "sum":
        loss_node["args"] = [{"ref": "x"}]
        loss_node["target"] = "torch.sum"
        loss_node["op"] = "call_function"
    spec = loss_spec("custom", CustomLoss("loss-1", repr(nodes), "f", inputs, graph))
    datum = Datum(tokens=np.zeros(4, np.int64), loss_fn_inputs={"target_tokens": np.zeros(4, np.int64)})
    shared = torch.zeros(4, requires_grad=True)
    with pytest.raises(UserError, match=message):
        spec(shared, spec.inputs_of([datum], torch.device("cpu")), {})


def test_the_pass_gets_a_linear_stand_in_with_the_same_value_and_gradient():
    spec = spec_of(ppo_like, {"logprobs": 1, "advantages": 1, "old": 1, "scale": 0}, key="stand-in")
    data = datums(np.random.default_rng(6), [3, 5])
    logprobs = torch.tensor(-np.random.default_rng(7).random(8), dtype=torch.float32, requires_grad=True)
    out = spec(logprobs, spec.inputs_of(data, torch.device("cpu")), {})
    (out.loss * 2).backward()  # the pass may scale or sum it with others
    reference = logprobs.detach().clone().requires_grad_(True)
    expected = 0
    for lp, datum in zip(torch.split(reference, [3, 5]), data):
        x = {k: torch.from_numpy(v) for k, v in datum.loss_fn_inputs.items()}
        expected = expected + ppo_like(lp, x["advantages"], x["old"], x["scale"].reshape(()))[0]
    (expected * 2).backward()
    assert out.loss.item() == pytest.approx(expected.item(), abs=1e-5)
    torch.testing.assert_close(logprobs.grad, reference.grad, atol=1e-5, rtol=0)
    with torch.no_grad():  # forward only: no gradient is taken at all
        assert not spec(logprobs, spec.inputs_of(data, torch.device("cpu")), {}).loss.requires_grad


def test_zero_dim_masks_and_type_with_a_dtype_work():
    def masked(logprobs, flag):
        return logprobs[flag > 0].sum().type(torch.float64).float(), {}  # flag is 0-d: so is the mask

    spec = spec_of(masked, {"logprobs": 1, "flag": 0})
    datum = Datum(
        tokens=np.zeros(3, np.int64),
        loss_fn_inputs={"target_tokens": np.zeros(3, np.int64), "flag": np.ones(1, np.float32)},
    )
    out = spec(torch.tensor([-1.0, -2.0, -3.0]), spec.inputs_of([datum], torch.device("cpu")), {})
    assert out.loss.item() == pytest.approx(-6.0)
