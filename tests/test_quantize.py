"""int8 static quantization (dsnet.export.quantize) of graphs that trip ONNX Runtime's quantizer as it stands."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from dsnet.export.quantize import quantize_onnx_batches


def _shared_bias_graph(path) -> None:
    """Two InstanceNormalization nodes share the bias ``b``, and a value is called ``b0``: the name ONNX Runtime
    gives its own copy of ``b`` (torch.onnx graphs, whose values are all ``val_<n>``, have such pairs)."""
    channels = 3
    initializers = [
        numpy_helper.from_array(np.linspace(0.5, 1.5, channels, dtype=np.float32), "s"),
        numpy_helper.from_array(np.linspace(-0.2, 0.2, channels, dtype=np.float32), "b"),
        numpy_helper.from_array(np.array([0, channels, -1], dtype=np.int64), "flat"),
        numpy_helper.from_array(np.array([0, channels, 8, 8], dtype=np.int64), "square"),
    ]
    nodes = [
        helper.make_node("InstanceNormalization", ["image", "s", "b"], ["normed"], name="norm1"),
        helper.make_node("Reshape", ["normed", "flat"], ["b0"], name="flatten"),
        helper.make_node("Reshape", ["b0", "square"], ["unflat"], name="unflatten"),
        helper.make_node("InstanceNormalization", ["unflat", "s", "b"], ["logits"], name="norm2"),
    ]
    graph = helper.make_graph(
        nodes,
        "shared_bias",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", channels, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", channels, 8, 8])],
        initializers,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def test_int8_of_a_graph_whose_shared_bias_copy_would_take_an_activation_name(tmp_path):
    fp32 = tmp_path / "shared_bias.onnx"
    _shared_bias_graph(fp32)
    rng = np.random.default_rng(0)
    images = [rng.standard_normal((2, 3, 8, 8)).astype(np.float32) for _ in range(4)]
    int8 = quantize_onnx_batches(fp32, tmp_path / "shared_bias.int8.onnx", lambda: iter(images))

    model = onnx.load(int8)
    assert {"QuantizeLinear", "DequantizeLinear"} <= {node.op_type for node in model.graph.node}
    # no initializer shadows an activation
    produced = {name for node in model.graph.node for name in node.output}
    assert not produced & {init.name for init in model.graph.initializer}
    # and the int8 graph computes what the float one does, to the quantization step
    x = images[0]
    expected = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    got = ort.InferenceSession(str(int8), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    assert np.abs(got - expected).max() < 0.1 * np.abs(expected).max()
