"""onnxruntime on the CPU against our PyTorch CPU path (its C++ kernel), same weights, same inputs, same
threads, in one run: ``python bench/export.py [--backbone resnet50] [--height 800 --width 1066]``.

Exports the plain model (random weights: speed does not depend on their values) to ONNX with the
decomposed attention, then times batch-1 inference of both, rounds alternating, and prints seconds per
image, the ratio (PyTorch time / onnxruntime time: above 1 means onnxruntime is faster), the export's
time and file size, and the largest output difference.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from core.build import build_detector
from core.config import DetrConfig, ModelConfig
from core.export import ExportableDetector, attach_onnx_metadata, export_onnx, export_program, load_exported, metadata
from ops import cpu_kernel_available
from pipelines.presets import PRESETS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--height", type=int, default=800)
    p.add_argument("--width", type=int, default=1066)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="timed calls of each, alternating")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="the tiny preset's model, 96x128, 1 round, a static export: checks it runs",
    )
    args = p.parse_args(argv)
    if args.smoke:
        args.height, args.width, args.rounds = 96, 128, 1
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    ok, why = cpu_kernel_available()
    print(f"bench/export: PyTorch CPU path {'with the C++ kernel' if ok else 'on the reference (' + why + ')'}")
    torch.manual_seed(0)
    model_cfg = ModelConfig(**(PRESETS["tiny"]["model"] if args.smoke else {"backbone": args.backbone}))
    model = build_detector(DetrConfig(model=model_cfg), load_backbone_weights=False)
    detector = ExportableDetector(model)
    started = time.perf_counter()
    # The smoke's export is static: it traces 3x faster, and the dynamic export of this tiny model is
    # tested against eager by tests/pipelines/inference/test_infer_onnx.py.
    onnx_model = export_onnx(export_program(detector, image_size=args.height, static=args.smoke))
    export_s = time.perf_counter() - started
    meta = metadata(detector, category_names={}, label_map=None, input_size={})
    attach_onnx_metadata(onnx_model, meta)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        import onnx

        onnx.save(onnx_model, path)
        size_mb = os.path.getsize(path) / 2**20
        run_onnx = load_exported(path, threads=args.threads)
        images = torch.randn(1, 3, args.height, args.width)
        mask = torch.zeros(1, args.height, args.width, dtype=torch.bool)
        with torch.inference_mode():
            want = detector(images, mask)  # warm-up of both, and the agreement figure
        got = run_onnx(images, mask)
        diff = max(float((a - b).abs().max()) for a, b in zip(got, want))
        times = {"pytorch": [], "onnxruntime": []}
        for _ in range(args.rounds):
            for name, fn in (("pytorch", detector), ("onnxruntime", run_onnx)):
                t = time.perf_counter()
                with torch.inference_mode():
                    fn(images, mask)
                times[name].append(time.perf_counter() - t)
    best = {k: min(v) for k, v in times.items()}
    print(
        f"bench/export: {model_cfg.backbone} {args.height}x{args.width} batch 1, {args.threads} threads, "
        f"best of {args.rounds}: PyTorch {best['pytorch']:.2f} s/image, onnxruntime {best['onnxruntime']:.2f} s/image, "
        f"ratio {best['pytorch'] / best['onnxruntime']:.2f}x; export {export_s:.0f} s, {size_mb:.0f} MiB; "
        f"max |diff| {diff:.1e}"
    )


if __name__ == "__main__":
    main()
