"""ONNX translations of the ``msda::`` ops for ``torch.onnx.export(..., dynamo=True)``.

Legend: N batch, S = sum_l H_l*W_l value positions, M heads, D channels per head, Lq queries,
L levels, P sampling points per (head, level).

Two forms, picked by ``translation_table(msda=...)``:

- ``decomposed``: standard ONNX ops only, so the file runs in any ONNX runtime with no custom-op
  library: the softmax and the location arithmetic of ``ops.fused``, then one ``GridSample`` per
  level on that level's slice of the value. The level sizes are read from ``spatial_shapes`` at run
  time, so the graph takes any image size; L, M, D and P are the model's and fixed.
- ``trt-plugin``: the same softmax and locations, then one ``MultiscaleDeformableAttnPlugin_TRT``
  node per attention, in the form TensorRT's plugin takes (value (N, S, M, D), spatial_shapes (L, 2)
  int32, level_start_index (L,) int32, sampling_locations (N, Lq, M, L, P, 2), attention_weights
  (N, Lq, M, L, P); output (N, Lq, M, D)). TensorRT's ONNX parser turns an op it does not know into
  the plugin of that name; onnxruntime cannot run it.

Needs ``onnxscript`` (the ``export`` extra); import this module only when exporting.
"""

from __future__ import annotations

from collections.abc import Callable

import onnx
import torch
from onnxscript import ir
from onnxscript import opset18 as op
from onnxscript.values import Opset

MSDA_FORMS = ("decomposed", "trt-plugin")

# GridSample arrived in opset 16; opset 20 renamed its "bilinear" mode to "linear".
MIN_OPSET = 16

TRT_PLUGIN = "MultiscaleDeformableAttnPlugin_TRT"
TRT_DOMAIN = "trt.plugins"
# Version 2 (IPluginV3) has the same inputs and output as version 1, which TensorRT deprecated in 10.11.
TRT_PLUGIN_VERSION = "2"


def _plugin_schema() -> onnx.defs.OpSchema:
    """The plugin's signature as an ONNX schema: the checker then verifies every plugin node's inputs,
    their dtypes and attributes, and onnxscript can build the node."""
    param = onnx.defs.OpSchema.FormalParameter
    string = onnx.defs.OpSchema.AttrType.STRING
    return onnx.defs.OpSchema(
        TRT_PLUGIN,
        TRT_DOMAIN,
        1,
        "TensorRT's multi-scale deformable attention plugin; output (N, Lq, M, D).",
        inputs=[
            param("value", "T", "(N, S, M, D)"),
            param("spatial_shapes", "tensor(int32)", "(L, 2) (H, W) per level"),
            param("level_start_index", "tensor(int32)", "(L,)"),
            param("sampling_locations", "T", "(N, Lq, M, L, P, 2) normalized (x, y)"),
            param("attention_weights", "T", "(N, Lq, M, L, P) softmaxed over L*P"),
        ],
        outputs=[param("output", "T", "(N, Lq, M, D)")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "the plugin runs float32 or float16")],
        attributes=[
            onnx.defs.OpSchema.Attribute("plugin_version", string, "the plugin creator's version"),
            onnx.defs.OpSchema.Attribute("plugin_namespace", string, "the plugin creator's namespace"),
        ],
    )


def _trt_opset() -> Opset:
    if not onnx.defs.has(TRT_PLUGIN, TRT_DOMAIN):
        onnx.defs.register_schema(_plugin_schema())
    return Opset(TRT_DOMAIN, 1)


def _static(dim, what: str) -> int:
    if not isinstance(dim, int):
        raise ValueError(f"the exported msda op needs a fixed {what}, got the symbolic size {dim}")
    return dim


def _ints(*values: int):
    """A constant 1-D int64 tensor (what Concat and Reshape take for shapes)."""
    return op.Constant(value_ints=list(values))


def _locations_and_weights(spatial_shapes, reference_points, offsets, attention_logits):
    """``ops.fused.sampling_locations_of`` and ``attention_weights_of`` in ONNX ops: (N, Lq, M, L, P, 2)
    normalized locations and (N, Lq, M, L, P) softmaxed weights."""
    L = _static(offsets.shape[3], "number of levels")
    P = _static(offsets.shape[4], "number of points")
    M = _static(offsets.shape[2], "number of heads")
    ref = op.Unsqueeze(op.Cast(reference_points, to=offsets.dtype), [2, 4])  # (N, Lq, L, 2|4) -> (N, Lq, 1, L, 1, 2|4)
    if reference_points.shape[-1] == 2:
        # Point offsets are in pixels of their level: divide by (W_l, H_l).
        normalizer = op.Cast(op.Gather(spatial_shapes, [1, 0], axis=1), to=offsets.dtype)  # (L, 2) (W, H)
        locations = op.Add(ref, op.Div(offsets, op.Reshape(normalizer, [1, 1, 1, L, 1, 2])))
    else:
        # Box offsets are in units of half the box size over P.
        centre = op.Slice(ref, [0], [2], [5])
        size = op.Slice(ref, [2], [4], [5])
        scale = op.Mul(size, op.CastLike(op.Constant(value_float=0.5 / P), offsets))
        locations = op.Add(centre, op.Mul(offsets, scale))
    logits = op.Reshape(attention_logits, [0, 0, M, L * P])  # (N, Lq, M, L, P) -> (N, Lq, M, L*P)
    weights = op.Reshape(op.Softmax(logits, axis=-1), [0, 0, M, L, P])
    return locations, weights


def _sample(value, spatial_shapes, level_start_index, locations, weights, L: int, P: int, grid_sample_mode: str):
    """The unfused op, ``ms_deform_attn``, in standard ONNX ops: (N, Lq, M*D) in ``value``'s dtype."""
    M = _static(value.shape[2], "number of heads")
    D = _static(value.shape[3], "channels per head")
    # GridSample's grid spans [-1, 1] over the map, align_corners=0: the op's pixel-centre convention.
    two, one = (
        op.CastLike(op.Constant(value_float=2.0), locations),
        op.CastLike(op.Constant(value_float=1.0), locations),
    )
    grid = op.Sub(op.Mul(locations, two), one)
    grid = op.Transpose(grid, perm=[0, 2, 1, 3, 4, 5])  # (N, Lq, M, L, P, 2) -> (N, M, Lq, L, P, 2)
    grid_shape = op.Concat(_ints(-1), op.Shape(grid, start=2, end=3), _ints(P, 2), axis=0)  # (N*M, Lq, P, 2)
    samples = []
    for level in range(L):
        hw = op.Gather(spatial_shapes, level, axis=0)  # (2,) (H_l, W_l)
        start = op.Gather(level_start_index, [level], axis=0)  # (1,)
        area = op.Mul(op.Slice(hw, _ints(0), _ints(1)), op.Slice(hw, _ints(1), _ints(2)))  # (1,) H_l*W_l
        end = op.Add(start, area)
        value_l = op.Slice(value, start, end, [1])  # (N, H_l*W_l, M, D)
        value_l = op.Transpose(value_l, perm=[0, 2, 3, 1])  # -> (N, M, D, H_l*W_l)
        value_l = op.Reshape(value_l, op.Concat(_ints(-1, D), hw, axis=0))  # -> (N*M, D, H_l, W_l)
        grid_l = op.Reshape(op.Gather(grid, level, axis=3), grid_shape)  # (N, M, Lq, P, 2) -> (N*M, Lq, P, 2)
        samples.append(
            op.GridSample(
                value_l, op.CastLike(grid_l, value_l), mode=grid_sample_mode, padding_mode="zeros", align_corners=0
            )
        )  # (N*M, D, Lq, P)
    sampled = op.Concat(*samples, axis=3)  # (N*M, D, Lq, L*P), levels outer, points inner
    weights = op.Transpose(weights, perm=[0, 2, 1, 3, 4])  # (N, Lq, M, L, P) -> (N, M, Lq, L, P)
    weights = op.Reshape(
        op.CastLike(weights, value), op.Concat(_ints(-1, 1), op.Shape(weights, start=2, end=3), _ints(L * P), axis=0)
    )
    out = op.ReduceSum(op.Mul(sampled, weights), [-1], keepdims=0)  # (N*M, D, Lq)
    out = op.Reshape(out, [-1, M * D, 0])  # -> (N, M*D, Lq)
    return op.Transpose(out, perm=[0, 2, 1])  # -> (N, Lq, M*D)


def _trt_plugin(value, spatial_shapes, level_start_index, locations, weights):
    """One plugin node; its output (N, Lq, M, D) flattened to the op's (N, Lq, M*D)."""
    M = _static(value.shape[2], "number of heads")
    D = _static(value.shape[3], "channels per head")
    out = _trt_opset().MultiscaleDeformableAttnPlugin_TRT(
        value,
        op.Cast(spatial_shapes, to=ir.DataType.INT32),
        op.Cast(level_start_index, to=ir.DataType.INT32),
        op.CastLike(locations, value),
        op.CastLike(weights, value),
        plugin_version=TRT_PLUGIN_VERSION,
        plugin_namespace="",
    )
    return op.Reshape(out, [0, 0, M * D])


def translation_table(msda: str = "decomposed", opset: int = 20) -> dict[Callable, Callable]:
    """``custom_translation_table`` for ``torch.onnx.export``: ``msda::fused_forward`` and
    ``msda::forward`` in the form ``msda`` ("decomposed" or "trt-plugin") at ONNX opset ``opset``."""
    if msda not in MSDA_FORMS:
        raise ValueError(f"msda must be one of {MSDA_FORMS}, got {msda!r}")
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} is too old: the decomposed attention needs GridSample, opset >= {MIN_OPSET}")
    grid_sample_mode = "linear" if opset >= 20 else "bilinear"

    def attend(value, spatial_shapes, level_start_index, locations, weights, weights_shape):
        if msda == "trt-plugin":
            return _trt_plugin(value, spatial_shapes, level_start_index, locations, weights)
        L = _static(weights_shape[3], "number of levels")
        P = _static(weights_shape[4], "number of points")
        return _sample(value, spatial_shapes, level_start_index, locations, weights, L, P, grid_sample_mode)

    # Only the graph's inputs carry shapes while a translation runs (what it builds has none yet), so
    # L and P are read off the attention logits or weights.
    def fused_forward(value, spatial_shapes, level_start_index, reference_points, offsets, attention_logits):
        locations, weights = _locations_and_weights(spatial_shapes, reference_points, offsets, attention_logits)
        return attend(value, spatial_shapes, level_start_index, locations, weights, attention_logits.shape)

    def forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        return attend(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights, attention_weights.shape
        )

    import ops.functional  # noqa: F401  (registers msda::forward)
    import ops.fused  # noqa: F401  (registers msda::fused_forward)

    return {torch.ops.msda.fused_forward.default: fused_forward, torch.ops.msda.forward.default: forward}
