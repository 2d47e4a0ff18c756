"""The detector as a deployable file: a ``torch.export`` program or an ONNX model, dynamic in batch and
image size, with the metadata a predictor needs to run it (classes, input size), and the ONNX runner.

Shapes: N images, H x W the padded batch, Lq queries, C classes, k detections kept per image.

    program = export_program(ExportableDetector(model), image_size=800)        # torch.export
    torch.export.save(program, "model.pt2")
    onnx_model = export_onnx(program, opset=20, msda="decomposed")             # onnx.ModelProto

The export takes normalized images and the padding mask, as the model does; with ``postprocess`` also
the original sizes, and it then returns the top-k detections in pixels instead of the raw heads.
``torch.export`` keeps the ``msda::`` ops as custom ops (load the program after ``import ops``); ONNX
gets them translated by ``ops.onnx``. ONNX needs the ``export`` extra (onnx, onnxscript, onnxruntime),
imported only by the functions that use it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from core.postprocess import PostProcess

if TYPE_CHECKING:
    import onnx

# The smallest side a dynamic export takes: the stride-64 level must be at least 2 pixels, since the
# exporter specializes a map of 1.
MIN_SIDE = 65
MAX_SIDE = 4096
MAX_BATCH = 256

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
METADATA_KEY = "deformable_detr"  # ONNX metadata_props key / torch.export extra file name
RAW_OUTPUTS = ["logits", "boxes"]
POSTPROCESS_OUTPUTS = ["scores", "labels", "boxes"]


class ExportError(ValueError):
    """An export that cannot be made as asked, with the one-line reason."""


class ExportableDetector(nn.Module):
    """A DeformableDETR with tensor inputs and outputs only, the form exporters take.

    Args:
        model: a DeformableDETR; put in eval mode, cast to ``dtype`` and its aux outputs turned off, in place.
        postprocess: also take the original image sizes and return the top-k detections.
        top_k: detections per image with postprocess.
        valid_classes: (C,) bool, head classes that stand for a category; the others never take a
            top-k slot (as in ``Predictor``). None: all.
        label_map: head class -> category id for the labels returned with postprocess; None: the index.
        dtype: the dtype the model runs in; inputs and outputs stay float32.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        postprocess: bool = False,
        top_k: int = 100,
        valid_classes: Tensor | None = None,
        label_map: list[int] | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.model = model.eval().to(dtype)
        self.model.aux_loss = False
        self.dtype = dtype
        self.num_classes = int(model.class_embed[0].out_features)
        self.postprocess = PostProcess(num_select=top_k, label_map=label_map) if postprocess else None
        valid = torch.ones(self.num_classes, dtype=torch.bool) if valid_classes is None else valid_classes
        self.register_buffer("valid_classes", valid.to(torch.bool), persistent=False)

    def forward(self, images: Tensor, mask: Tensor, target_sizes: Tensor | None = None) -> tuple[Tensor, ...]:
        """Runs the detector.

        Args:
            images: (N, 3, H, W) float32 normalized images, zero-padded.
            mask: (N, H, W) bool, True at padding.
            target_sizes: (N, 2) int64 (height, width) of the original images; postprocess only.

        Returns:
            Raw: logits (N, Lq, C) float32 and boxes (N, Lq, 4) float32 normalized cxcywh.
            With postprocess: scores (N, k) float32 descending, labels (N, k) int64 (category ids with
            a label map) and boxes (N, k, 4) float32 xyxy in original pixels, not clipped.
        """
        out = self.model(images.to(self.dtype), mask)
        logits, boxes = out["pred_logits"].float(), out["pred_boxes"].float()
        if self.postprocess is None:
            return logits, boxes
        logits = logits.masked_fill(~self.valid_classes, float("-inf"))  # (N, Lq, C)
        return self.postprocess.select(logits, boxes, target_sizes, self.postprocess.num_select)


def example_size(image_size: int) -> tuple[int, int]:
    """(height, width) of the example input: ``image_size`` high, 4/3 as wide, as COCO's photos mostly are."""
    if not MIN_SIDE <= image_size <= MAX_SIDE * 3 // 4:
        raise ExportError(
            f"--image-size must be in {MIN_SIDE}..{MAX_SIDE * 3 // 4} (the stride-64 map needs 2 pixels; the "
            f"example, 4/3 as wide, at most {MAX_SIDE}), got {image_size}"
        )
    return image_size, math.ceil(image_size * 4 / 3)


def example_inputs(detector: ExportableDetector, image_size: int, batch_size: int = 2) -> tuple[Tensor, ...]:
    """Random inputs of the export: ``batch_size`` images ``image_size`` high and 4/3 as wide."""
    h, w = example_size(image_size)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, h, w, generator=generator)
    mask = torch.zeros(batch_size, h, w, dtype=torch.bool)
    if detector.postprocess is None:
        return images, mask
    return images, mask, torch.tensor([[h, w]] * batch_size, dtype=torch.int64)


def dynamic_shapes(detector: ExportableDetector) -> dict[str, Any]:
    """Batch, height and width free within [1, MAX_BATCH] and [MIN_SIDE, MAX_SIDE]."""
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    height = torch.export.Dim("height", min=MIN_SIDE, max=MAX_SIDE)
    width = torch.export.Dim("width", min=MIN_SIDE, max=MAX_SIDE)
    shapes = {"images": {0: batch, 2: height, 3: width}, "mask": {0: batch, 1: height, 2: width}}
    if detector.postprocess is not None:
        shapes["target_sizes"] = {0: batch}
    return shapes


def export_program(
    detector: ExportableDetector, *, image_size: int = 800, static: bool = False, batch_size: int = 1
) -> torch.export.ExportedProgram:
    """``torch.export`` of the detector; dynamic in batch, height and width unless ``static``.

    Args:
        detector: what to export.
        image_size: the example's height (its width is 4/3 of it); with ``static`` the only size taken.
        static: fix batch, height and width to the example's.
        batch_size: the batch of a static export (a dynamic one traces with 2, as 1 would specialize).
    """
    import ops  # noqa: F401  (registers the msda:: ops the program calls)

    inputs = example_inputs(detector, image_size, batch_size if static else 2)
    try:
        return torch.export.export(detector, inputs, dynamic_shapes=None if static else dynamic_shapes(detector))
    except Exception as e:  # the tracer raises many types; all mean the same to the user
        raise ExportError(f"torch.export could not trace this model: {type(e).__name__}: {_first_line(e)}") from e


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def newest_opset() -> int:
    """The newest ONNX opset both the exporter and the installed onnxruntime run."""
    from onnxruntime.capi.onnxruntime_pybind11_state import get_all_operator_schema
    from torch.onnx._constants import ONNX_MAX_OPSET

    ort_opset = max(s.since_version for s in get_all_operator_schema() if s.domain == "")
    return min(ONNX_MAX_OPSET, ort_opset)


def export_onnx(
    program: torch.export.ExportedProgram, *, opset: int | None = None, msda: str = "decomposed"
) -> onnx.ModelProto:
    """The program as ONNX; the ``msda::`` ops in the form ``msda`` (see ``ops.onnx``).

    Inputs keep the program's names (images, mask[, target_sizes]); outputs are named logits, boxes or
    scores, labels, boxes. Dynamic dimensions stay dynamic (named batch, height, width).
    """
    from ops.onnx import translation_table

    opset = newest_opset() if opset is None else opset
    table = translation_table(msda, opset)  # raises on an old opset or an unknown form
    n_out = len(program.graph_signature.user_outputs)
    output_names = RAW_OUTPUTS if n_out == len(RAW_OUTPUTS) else POSTPROCESS_OUTPUTS
    try:
        onnx_program = torch.onnx.export(
            program,
            dynamo=True,
            opset_version=opset,
            output_names=output_names,
            custom_translation_table=table,
            optimize=True,
            verbose=False,
        )
    except Exception as e:
        raise ExportError(f"ONNX export failed: {type(e).__name__}: {_first_line(e)}") from e
    return onnx_program.model_proto


def metadata(
    detector: ExportableDetector,
    *,
    category_names: dict[int, str],
    label_map: list[int] | None,
    input_size: dict[str, Any],
    msda: str | None = None,
) -> dict[str, Any]:
    """What a predictor needs besides the graph: classes (``core.predictor.ClassInfo``'s fields), the
    input size (``InputSize`` as a dict) and the export's form."""
    return {
        "num_classes": detector.num_classes,
        "postprocess_top_k": None if detector.postprocess is None else detector.postprocess.num_select,
        "category_names": {str(k): v for k, v in category_names.items()},
        "label_map": label_map,
        "input_size": input_size,
        "msda": msda,
        "dtype": str(detector.dtype).removeprefix("torch."),
    }


def attach_onnx_metadata(model: onnx.ModelProto, meta: dict[str, Any]) -> None:
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(meta)


def read_onnx_metadata(model: onnx.ModelProto | Any) -> dict[str, Any]:
    """The metadata ``attach_onnx_metadata`` wrote, from an onnx.ModelProto or an onnxruntime session."""
    props = getattr(model, "get_modelmeta", None)
    if props is not None:
        value = model.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    else:
        value = next((p.value for p in model.metadata_props if p.key == METADATA_KEY), None)
    if value is None:
        raise ExportError(f"the ONNX file has no {METADATA_KEY!r} metadata: it was not written by pipelines/export.py")
    return json.loads(value)


def output_names(detector: ExportableDetector) -> list[str]:
    return RAW_OUTPUTS if detector.postprocess is None else POSTPROCESS_OUTPUTS


def load_exported(path: str, *, threads: int | None = None) -> Callable[..., tuple[Tensor, ...]]:
    """A file written by ``pipelines/export.py`` as a function of the export's inputs returning its
    outputs as CPU tensors: a ``.pt2`` program through ``torch.export.load``, ONNX through onnxruntime."""
    if path.endswith(".pt2"):
        import ops  # noqa: F401  (the program calls msda:: ops)

        program = torch.export.load(path)
        inputs = [s.arg.name for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
        nodes = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
        shapes = {name: list(nodes[name].meta["val"].shape) for name in inputs}
        module = program.module()

        def run_program(*tensors: Tensor) -> tuple[Tensor, ...]:
            _check_static(path, zip(inputs, tensors), shapes)
            return tuple(module(*tensors))

        return run_program
    return onnx_runner(onnx_session(path, threads=threads), path)


def _check_static(source: str | bytes, named_inputs, shapes: dict[str, list]) -> None:
    """One line naming the input and both shapes when a fixed dimension of the export is not met."""
    for name, x in named_inputs:
        want = shapes[name]
        if any(isinstance(d, int) and d != got for d, got in zip(want, x.shape)):
            raise ExportError(
                f"{_name(source)} takes {name} of shape {tuple(want)} (a static export), got {tuple(x.shape)}"
            )


def onnx_session(source: str | bytes, *, providers: list[str] | None = None, threads: int | None = None) -> Any:
    """An onnxruntime session of an ONNX file or its bytes (CPU unless ``providers`` says otherwise)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    try:
        return onnxruntime.InferenceSession(source, options, providers=providers or ["CPUExecutionProvider"])
    except Exception as e:
        raise ExportError(f"{_name(source)}: onnxruntime cannot load it: {_first_line(e)}") from e


def _name(source: str | bytes) -> str:
    return "the ONNX model" if isinstance(source, bytes) else source


def onnx_runner(session: Any, source: str | bytes) -> Callable[..., tuple[Tensor, ...]]:
    """``session`` as a function of the export's input tensors returning its outputs as tensors; a static
    export refuses other input shapes with one line naming both."""
    names = [i.name for i in session.get_inputs()]
    fixed = {i.name: i.shape for i in session.get_inputs()}

    def run(*inputs: Tensor) -> tuple[Tensor, ...]:
        _check_static(source, zip(names, inputs), fixed)
        feeds = {name: x.cpu().numpy() for name, x in zip(names, inputs)}
        return tuple(torch.from_numpy(y) for y in session.run(None, feeds))

    return run


class OnnxDetector:
    """An exported ONNX detector (raw outputs) behind the DeformableDETR call, for ``Predictor``.

    ``detector(images, mask)`` returns {"pred_logits", "pred_boxes"} as the model does, computed by
    onnxruntime on the CPU (or CUDA where ``providers`` asks for it).

    Args:
        source: an ONNX file written by ``pipelines/export.py`` without postprocess, or its bytes.
        providers: onnxruntime execution providers; default CPU.
        threads: intra-op threads; None lets onnxruntime choose.
    """

    def __init__(self, source: str | bytes, *, providers: list[str] | None = None, threads: int | None = None) -> None:
        self.session = onnx_session(source, providers=providers, threads=threads)
        self.run = onnx_runner(self.session, source)
        path = _name(source)
        self.meta = read_onnx_metadata(self.session)
        if self.meta["postprocess_top_k"] is not None:
            raise ExportError(f"{path} was exported with --postprocess; a Predictor takes the raw-output export")
        if self.meta["msda"] != "decomposed":
            raise ExportError(
                f"{path} holds TensorRT plugin nodes (--msda {self.meta['msda']}): build a TensorRT engine from it"
            )
        images = self.session.get_inputs()[0]
        if any(isinstance(d, int) for d in images.shape[2:]):
            raise ExportError(
                f"{path} is a static export ({images.name} of shape {tuple(images.shape)}); a Predictor sizes "
                "each image as it comes: export it without --static"
            )
        self.num_classes = int(self.meta["num_classes"])

    def __call__(self, images: Tensor, mask: Tensor) -> dict[str, Tensor]:
        logits, boxes = self.run(images, mask)
        return {"pred_logits": logits.to(images.device), "pred_boxes": boxes.to(images.device)}
