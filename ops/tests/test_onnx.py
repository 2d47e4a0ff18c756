"""ONNX translations of the msda:: ops (ops/onnx.py): the decomposed form run by onnxruntime against
eager at level sizes other than the export's, the TensorRT plugin form checked by structure."""

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from torch import nn

import ops.onnx as ops_onnx
from ops import MSDeformAttn
from ops.onnx import TRT_DOMAIN, TRT_PLUGIN, translation_table


class Layer(nn.Module):
    """One MSDeformAttn with its level table as graph inputs, so the export reads sizes at run time."""

    def __init__(self, fused: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attn = MSDeformAttn(d_model=32, n_levels=3, n_heads=4, n_points=3)
        self.attn.fused = fused  # True: msda::fused_forward; False: softmax and locations, then msda::forward
        with torch.no_grad():  # offsets and weights that differ per query, not the initial ring
            for layer in (self.attn.sampling_offsets, self.attn.attention_weights):
                layer.weight.normal_(0, 0.3)

    def forward(self, query, reference_points, input_flatten, spatial_shapes, level_start_index):
        return self.attn(query, reference_points, input_flatten, spatial_shapes, level_start_index)


def inputs(shapes, n, lq, ref_dim, seed):
    g = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64)
    areas = spatial_shapes.prod(1)
    level_start_index = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    # Reference points up to the borders, so some samples fall off the map (zero padding).
    reference = torch.rand(n, lq, len(shapes), ref_dim, generator=g)
    if ref_dim == 4:
        reference[..., 2:] = reference[..., 2:] * 0.6 + 0.05
    query = torch.randn(n, lq, 32, generator=g)
    flat = torch.randn(n, int(areas.sum()), 32, generator=g)
    return query, reference, flat, spatial_shapes, level_start_index


def export(layer, msda, opset, ref_dim):
    example = inputs([[6, 7], [3, 4], [2, 2]], n=2, lq=5, ref_dim=ref_dim, seed=0)
    n, lq, s = torch.export.Dim("n"), torch.export.Dim("lq"), torch.export.Dim("s")
    dynamic = ({0: n, 1: lq}, {0: n, 1: lq}, {0: n, 1: s}, None, None)
    program = torch.onnx.export(
        layer,
        example,
        dynamo=True,
        opset_version=opset,
        dynamic_shapes=dynamic,
        input_names=["query", "reference_points", "input_flatten", "spatial_shapes", "level_start_index"],
        custom_translation_table=translation_table(msda, opset),
        verbose=False,
    )
    return program.model_proto


@pytest.mark.parametrize(
    "fused, ref_dim, opset",
    [(True, 2, 23), (True, 4, 20), (False, 2, 16), (False, 4, 23)],
    ids=["fused-points-opset23", "fused-boxes-opset20", "unfused-points-opset16", "unfused-boxes-opset23"],
)
def test_decomposed_matches_eager_at_other_level_sizes(fused, ref_dim, opset):
    layer = Layer(fused).eval()
    model = export(layer, "decomposed", opset, ref_dim)
    onnx.checker.check_model(model, full_check=True)
    ops_used = {node.op_type for node in model.graph.node}
    assert "GridSample" in ops_used and not any(node.domain not in ("", "ai.onnx") for node in model.graph.node)
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    for shapes, n, lq in (([[9, 5], [5, 3], [3, 2]], 3, 4), ([[4, 11], [2, 6], [1, 3]], 1, 17)):
        args = inputs(shapes, n, lq, ref_dim, seed=n)
        with torch.no_grad():
            want = layer(*args).numpy()
        (got,) = session.run(None, {name: a.numpy() for name, a in zip(names, args)})
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_trt_plugin_node_has_the_plugins_inputs():
    model = export(Layer(fused=True).eval(), "trt-plugin", 20, ref_dim=2)
    onnx.checker.check_model(model)
    inferred = onnx.shape_inference.infer_shapes(model)
    (node,) = [n for n in inferred.graph.node if n.op_type == TRT_PLUGIN]
    assert node.domain == TRT_DOMAIN and len(node.input) == 5 and len(node.output) == 1
    assert "GridSample" not in {n.op_type for n in inferred.graph.node}
    types = {v.name: v.type.tensor_type for v in [*inferred.graph.value_info, *inferred.graph.input]}

    def rank_and_dtype(name):
        t = types[name]
        return len(t.shape.dim), t.elem_type

    value, shapes, starts, locations, weights = node.input
    f32, i32 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT32
    # value (N, S, M, D), spatial_shapes (L, 2) int32, level_start_index (L,) int32,
    # sampling_locations (N, Lq, M, L, P, 2), attention_weights (N, Lq, M, L, P): TensorRT's order.
    assert rank_and_dtype(value) == (4, f32)
    assert [d.dim_value for d in types[value].shape.dim[2:]] == [4, 8]
    assert rank_and_dtype(shapes) == (2, i32) and rank_and_dtype(starts) == (1, i32)
    assert rank_and_dtype(locations) == (6, f32) and rank_and_dtype(weights) == (5, f32)
    assert [d.dim_value for d in types[locations].shape.dim[2:]] == [4, 3, 3, 2]
    assert [d.dim_value for d in types[weights].shape.dim[2:]] == [4, 3, 3]
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attributes["plugin_version"] == b"2"


class Op(nn.Module):
    """One msda:: op alone: a smaller, quicker export than the layer's."""

    def __init__(self, op) -> None:
        super().__init__()
        self.op = op

    def forward(self, *args):
        return self.op(*args)


def export_op(op, args, msda, opset):
    table = translation_table(msda, opset)
    return torch.onnx.export(Op(op), args, dynamo=True, opset_version=opset, custom_translation_table=table).model_proto


def test_trt_plugin_half_export_passes_weights_in_the_values_type():
    """float16 values with float32 offsets and logits (as the layer passes them): the plugin takes all
    its float inputs in the value's type, so the softmaxed weights are cast to float16 too."""
    g = torch.Generator().manual_seed(0)
    ss, lsi = torch.tensor([[3, 4], [2, 2]]), torch.tensor([0, 12])
    value = torch.randn(1, 16, 2, 4, generator=g).half()
    ref, offsets, logits = torch.rand(1, 3, 2, 2), torch.randn(1, 3, 2, 2, 2, 2), torch.randn(1, 3, 2, 2, 2)
    model = export_op(torch.ops.msda.fused_forward, (value, ss, lsi, ref, offsets, logits), "trt-plugin", 20)
    inferred = onnx.shape_inference.infer_shapes(model)
    (node,) = [n for n in inferred.graph.node if n.op_type == TRT_PLUGIN]
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.value_info, *inferred.graph.input]}
    value, _, _, locations, weights = node.input
    f16 = onnx.TensorProto.FLOAT16
    assert (types[value], types[locations], types[weights]) == (f16, f16, f16)


@pytest.mark.parametrize("opset, mode", [(19, "bilinear"), (20, "linear")])
def test_grid_sample_mode_is_named_for_the_opset(inputs_factory, monkeypatch, opset, mode):
    """Opset 20 renamed GridSample's "bilinear" mode to "linear": the translation names the mode as the
    target opset does, not relying on the exporter's version converter to rename it, and the file
    holds that name."""
    requested = []
    grid_sample = ops_onnx.op.GridSample

    def spy(*args, **kwargs):
        requested.append(kwargs["mode"])
        return grid_sample(*args, **kwargs)

    monkeypatch.setattr(ops_onnx.op, "GridSample", spy)
    args = inputs_factory([[3, 4], [2, 2]], N=1, Lq=2, M=1, D=2, P=1, dtype=torch.float32)
    model = export_op(torch.ops.msda.forward, args, "decomposed", opset)
    modes = [
        onnx.helper.get_attribute_value(a).decode()
        for n in model.graph.node
        if n.op_type == "GridSample"
        for a in n.attribute
        if a.name == "mode"
    ]
    assert requested == [mode, mode] and modes == [mode, mode]  # one GridSample per level


def test_opset_without_grid_sample_is_refused():
    with pytest.raises(ValueError, match="opset 15 is too old.*GridSample"):
        translation_table("decomposed", 15)
    with pytest.raises(ValueError, match="msda must be one of"):
        translation_table("gathers", 20)
