"""Exports a checkpoint as a torch.export program (.pt2) or an ONNX model (entry script).

    python pipelines/export.py --checkpoint runs/demo-<time> --format onnx --output model.onnx --check
    python pipelines/export.py --checkpoint r50_deformable_detr-checkpoint.pth --format torch-export \\
        --output model.pt2 --dtype bf16
    python pipelines/export.py --checkpoint ... --format onnx --msda trt-plugin --dtype fp16 --output trt.onnx

Any checkpoint core reads (a run's, a sweep's best trial, the authors' .pth), local or remote. The
export is dynamic in batch, height and width (sides 65 to 4096) unless --static. Its inputs are the
normalized images (N, 3, H, W) float32 and the padding mask (N, H, W) bool, plus with --postprocess the
original sizes (N, 2) int64; its outputs are logits and boxes, or with --postprocess the top-k scores,
labels and boxes in pixels. The file carries the classes and input size, so `Predictor.from_onnx` and
`infer.py --engine onnxruntime` need nothing else. --check loads the written file back and compares it
with the eager model on random inputs at other sizes and batches (and on --check-images), printing the
largest differences; it fails past the tolerance of the dtype.
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # `python pipelines/export.py`: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse
import io
import json
import time
from dataclasses import asdict

# Largest |exported - eager| a --check accepts, per dtype (float32: both run the same arithmetic).
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 1e-1}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint file, checkpoint folder, or run directory: its best checkpoint (local, s3, gs, http)",
    )
    p.add_argument("--format", required=True, choices=["onnx", "torch-export"])
    p.add_argument("--output", required=True, help="local file to write (.onnx or .pt2)")
    p.add_argument("--image-size", type=int, default=800, help="the example input's short side (default 800)")
    p.add_argument("--static", action="store_true", help="fix batch and image size to the example's")
    p.add_argument("--batch-size", type=int, default=1, help="batch of a --static export")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the newest onnxruntime runs)")
    p.add_argument("--postprocess", action="store_true", help="top-k detections in pixels inside the graph")
    p.add_argument("--top-k", type=int, default=100, help="detections per image with --postprocess")
    p.add_argument(
        "--msda",
        choices=["decomposed", "trt-plugin"],
        default="decomposed",
        help="ONNX form of the attention: standard ops, or TensorRT's MultiscaleDeformableAttnPlugin_TRT",
    )
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="the dtype the model runs in")
    p.add_argument("--check", action="store_true", help="compare the written file with the eager model")
    p.add_argument("--check-images", nargs="*", default=[], help="image files the check also runs")
    return p.parse_args(argv)


def validate_args(args: argparse.Namespace) -> None:
    """Combinations the export cannot make, refused before any work (ValueError, one line)."""
    if args.format == "torch-export" and args.msda != "decomposed":
        raise ValueError("--msda applies to --format onnx (torch.export keeps the msda:: ops)")
    if args.format == "torch-export" and args.opset is not None:
        raise ValueError("--opset applies to --format onnx")
    if args.format == "onnx" and args.dtype == "bf16":
        raise ValueError("--dtype bf16 applies to --format torch-export; ONNX runtimes run fp32 or fp16")
    if args.msda == "trt-plugin" and args.check:
        raise ValueError("--check runs the file in onnxruntime, which has no TensorRT plugin; check it in TensorRT")
    if args.opset is not None:
        from ops.onnx import MIN_OPSET

        if args.opset < MIN_OPSET:
            raise ValueError(f"--opset {args.opset} is too old: the attention needs GridSample, opset >= {MIN_OPSET}")
    if args.check_images and args.static:
        raise ValueError("--check-images needs a dynamic export: a --static one takes only its example's size")
    for path in args.check_images:
        if not os.path.isfile(path):
            raise ValueError(f"--check-images {path!r}: no such file")
    from core.export import ExportError, example_size

    try:
        example_size(args.image_size)
    except ExportError as e:
        raise ValueError(str(e)) from None
    if args.batch_size < 1 or args.top_k < 1:
        raise ValueError(f"--batch-size and --top-k must be >= 1, got {args.batch_size} and {args.top_k}")
    suffix = ".onnx" if args.format == "onnx" else ".pt2"
    if not args.output.endswith(suffix):
        raise ValueError(f"--output of --format {args.format} must end in {suffix}, got {args.output!r}")


def check_shapes(image_size: int, batch_size: int, static: bool) -> list[tuple[int, int, int]]:
    """(batch, height, width) of the check's random batches: the example's with --static, else two others
    within the sizes a dynamic export takes."""
    from core.export import MAX_SIDE, MIN_SIDE, example_size

    if static:
        return [(batch_size, *example_size(image_size))]
    h = image_size
    cases = [(1, h + 37, h * 4 // 3 - 21), (3, h * 3 // 4 + 5, h + 11)]
    return [(n, min(max(h, MIN_SIDE), MAX_SIDE), min(max(w, MIN_SIDE), MAX_SIDE)) for n, h, w in cases]


def check_inputs(args: argparse.Namespace, detector, input_size) -> list[tuple[str, tuple]]:
    """(description, inputs) the check runs: random batches (``check_shapes``) and the given images at the
    checkpoint's input size."""
    import torch

    from core.predictor import prepare_image
    from core.preprocess import pad_and_normalize_batch, to_rgb_array

    generator = torch.Generator().manual_seed(1)
    runs = []
    for n, h, w in check_shapes(args.image_size, args.batch_size, args.static):
        images = torch.randn(n, 3, h, w, generator=generator)
        mask = torch.zeros(n, h, w, dtype=torch.bool)
        if n > 1 and not args.static:
            mask[1, :, w - w // 5 :] = True  # one padded image: the mask is an input, not a constant
            images[1, :, :, w - w // 5 :] = 0
        runs.append((f"random {n}x3x{h}x{w}", _with_sizes(detector, images, mask)))
    for path in args.check_images:
        with open(path, "rb") as f:
            prepared = prepare_image(to_rgb_array(f.read()), input_size)
        images, mask = pad_and_normalize_batch([prepared.pixels], input_size.pixel_mean, input_size.pixel_std)
        runs.append((os.path.basename(path), _with_sizes(detector, images, mask, (prepared.height, prepared.width))))
    return runs


def _with_sizes(detector, images, mask, size: tuple[int, int] | None = None) -> tuple:
    import torch

    if detector.postprocess is None:
        return images, mask
    h, w = size or images.shape[-2:]
    return images, mask, torch.tensor([[h, w]] * images.shape[0], dtype=torch.int64)


def run_check(args: argparse.Namespace, detector, input_size) -> bool:
    """Prints the largest differences of the written file against eager; True when within tolerance."""
    import torch

    from core.export import load_exported, output_names

    exported = load_exported(args.output)
    names = output_names(detector)
    ok = True
    for what, inputs in check_inputs(args, detector, input_size):
        with torch.inference_mode():
            want = detector(*inputs)
        got = exported(*inputs)
        figures = []
        for name, a, b in zip(names, got, want):
            if name == "labels":
                differ = int((a != b).sum())
                figures.append(f"labels differing {differ}/{b.numel()}")
                ok &= differ == 0
            else:
                diff = float((a.float() - b.float()).abs().max())
                figures.append(f"{name} max|diff| {diff:.2e}")
                ok &= diff <= TOLERANCE[args.dtype]
        print(f"export: check {what}: " + ", ".join(figures))
    return ok


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        validate_args(args)
    except ValueError as e:
        print(f"export: {e}", file=sys.stderr)
        return 2
    import torch

    from core.build import build_detector
    from core.checkpoint import load_model_weights
    from core.export import (
        DTYPES,
        METADATA_KEY,
        ExportableDetector,
        ExportError,
        attach_onnx_metadata,
        export_onnx,
        export_program,
        metadata,
        newest_opset,
    )
    from core.predictor import checkpoint_class_info, checkpoint_input_size
    from pipelines.raytrain.preflight import open_checkpoint_arg
    from pipelines.storage import write_bytes

    try:
        _, ckpt = open_checkpoint_arg(args.checkpoint, "export")
        classes, input_size = checkpoint_class_info(ckpt), checkpoint_input_size(ckpt)
        model = build_detector(ckpt.config, load_backbone_weights=False)
        load_model_weights(model, ckpt.model)
        num_classes = int(model.class_embed[0].out_features)
        detector = ExportableDetector(
            model,
            postprocess=args.postprocess,
            top_k=args.top_k,
            valid_classes=classes.valid_classes(num_classes),
            label_map=classes.label_map,
            dtype=DTYPES[args.dtype],
        )
        started = time.perf_counter()
        program = export_program(detector, image_size=args.image_size, static=args.static, batch_size=args.batch_size)
        meta = metadata(
            detector,
            category_names=classes.names,
            label_map=classes.label_map,
            input_size=asdict(input_size),
            msda=args.msda if args.format == "onnx" else None,
        )
        if args.format == "onnx":
            import onnx

            opset = newest_opset() if args.opset is None else args.opset
            onnx_model = export_onnx(program, opset=opset, msda=args.msda)
            attach_onnx_metadata(onnx_model, meta)
            onnx.checker.check_model(onnx_model)
            data = onnx_model.SerializeToString()
        else:
            buffer = io.BytesIO()
            torch.export.save(program, buffer, extra_files={f"{METADATA_KEY}.json": json.dumps(meta)})
            data = buffer.getvalue()
        write_bytes(args.output, data)  # whole or not at all: an earlier file stays until the rename
    except (ExportError, ValueError) as e:
        print(f"export: {e}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - started
    size_mb = len(data) / 2**20
    form = f"onnx opset {opset}, msda {args.msda}" if args.format == "onnx" else "torch.export"
    shape = "static" if args.static else "dynamic batch, height, width"
    print(f"export: wrote {args.output} ({form}, {args.dtype}, {shape}) in {seconds:.1f} s, {size_mb:.1f} MiB")
    if args.check:
        try:
            ok = run_check(args, detector, input_size)
        except (ExportError, ValueError, OSError) as e:  # an image that does not decode, say
            print(f"export: check failed: {e}", file=sys.stderr)
            return 1
        if not ok:
            print(f"export: check failed: differences above {TOLERANCE[args.dtype]:g} ({args.dtype})", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
