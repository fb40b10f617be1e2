"""The protobuf codec against the SDK's own encoder and decoder."""

import numpy as np
import pytest
import torch
from tinker import types
from tinker.proto.request_conv import forward_backward_request_to_proto
from tinker.proto.response_conv import deserialize_forward_backward_output

from actors.work import ForwardBackwardResult
from configs.errors import UserError
from deployments import wire_proto


def sdk_request(data, loss_fn="cross_entropy", config=None, seq_id=3) -> bytes:
    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=data, loss_fn=loss_fn, loss_fn_config=config),
        model_id="s:train:0",
        seq_id=seq_id,
    )
    return forward_backward_request_to_proto(request).SerializeToString()


def test_forward_backward_request_decodes_tokens_inputs_and_config():
    datum = types.Datum(
        model_input=types.ModelInput.from_ints([5, 6, 7]),
        loss_fn_inputs={"target_tokens": [6, 7, 8], "advantages": [0.5, -1.0, 2.0], "logprobs": [-1.0, -2.0, -3.0]},
    )
    msg = wire_proto.parse_forward_backward(sdk_request([datum], "ppo", {"clip_low_threshold": 0.7, "name": "x"}))
    work = wire_proto.to_work(msg, forward_only=False, max_datums=8, max_topk=4)
    assert (work.model_id, work.seq_id, work.loss_fn) == ("s:train:0", 3, "ppo")
    assert work.loss_fn_config == {"clip_low_threshold": pytest.approx(0.7), "name": "x"}
    (d,) = work.data
    assert d.tokens.tolist() == [5, 6, 7] and d.tokens.dtype == np.int64
    assert d.loss_fn_inputs["target_tokens"].tolist() == [6, 7, 8]
    assert d.loss_fn_inputs["advantages"].dtype == np.float32
    assert d.loss_fn_inputs["advantages"].tolist() == [0.5, -1.0, 2.0]


def test_forward_backward_request_densifies_sparse_top_k_targets():
    targets = torch.zeros(6, 4, dtype=torch.int64)
    targets[0, 1], targets[3, 2] = 9, 4
    weights = torch.zeros(6, 4)
    weights[0, 1], weights[3, 2] = 1.0, -0.5
    datum = types.Datum(  # the SDK sparsifies 2-D target_tokens / weights tensors itself
        model_input=types.ModelInput.from_ints([1, 2, 3, 4, 5, 6]),
        loss_fn_inputs={"target_tokens": targets, "weights": weights},
    )
    msg = wire_proto.parse_forward_backward(sdk_request([datum]))
    assert msg.data[0].loss_fn_inputs["target_tokens"].HasField("sparse_csr")
    work = wire_proto.to_work(msg, forward_only=True, max_datums=8, max_topk=4)
    assert work.forward_only
    np.testing.assert_array_equal(work.data[0].loss_fn_inputs["target_tokens"], targets.numpy())
    np.testing.assert_array_equal(work.data[0].loss_fn_inputs["weights"], weights.numpy())


def test_sparse_csr_tensor_is_densified():
    msg = wire_proto.pb.Tensor(dtype=wire_proto.pb.DTYPE_FLOAT32, shape=[2, 3])
    msg.sparse_csr.values = np.array([1.5, 2.5], "<f4").tobytes()
    msg.sparse_csr.crow_indices = np.array([0, 1, 2], "<i8").tobytes()
    msg.sparse_csr.col_indices = np.array([2, 0], "<i8").tobytes()
    np.testing.assert_array_equal(wire_proto.tensor_to_numpy(msg), [[0, 0, 1.5], [2.5, 0, 0]])
    msg.sparse_csr.col_indices = np.array([3, 0], "<i8").tobytes()
    with pytest.raises(ValueError):
        wire_proto.tensor_to_numpy(msg)


def test_malformed_protobuf_is_a_user_error():
    with pytest.raises(UserError, match="protobuf"):
        wire_proto.parse_forward_backward(b"\xff\xff\xff not a protobuf")


def test_image_chunks_are_rejected_per_datum():
    msg = wire_proto.pb.ForwardBackwardRequest(model_id="m", seq_id=1, loss_fn="cross_entropy")
    msg.data.add().model_input.add().image.data = b"png"
    with pytest.raises(UserError, match="datum 0: image"):
        wire_proto.to_work(msg, forward_only=False, max_datums=8, max_topk=4)


def test_forward_backward_output_decodes_in_the_sdk():
    result = ForwardBackwardResult(
        loss_fn_outputs=[{"logprobs": np.array([-1.0, -2.0], np.float32)}, {"logprobs": np.array([-0.5], np.float32)}],
        metrics={"loss:sum": 3.5, "clip_fraction:mean": 0.25},
    )
    out = deserialize_forward_backward_output(wire_proto.encode_forward_backward_output(result))
    assert out.metrics == {"loss:sum": 3.5, "clip_fraction:mean": 0.25}
    assert [o["logprobs"].tolist() for o in out.loss_fn_outputs] == [[-1.0, -2.0], [-0.5]]


def test_forward_backward_output_top_k_shapes_survive():
    result = ForwardBackwardResult([{"logprobs": np.ones((3, 2), np.float32)}], {"loss:sum": 0.0})
    out = deserialize_forward_backward_output(wire_proto.encode_forward_backward_output(result))
    assert out.loss_fn_outputs[0]["logprobs"].shape == [3, 2]
