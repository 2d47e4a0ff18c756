"""pipelines/export.py: box refinement and two-stage as ONNX and torch.export programs against the eager
model at other sizes and batches; bad input refused in one line with nothing written. (The plain model's
ONNX file is checked with batch inference, tests/pipelines/inference/test_infer_onnx.py.)"""

from __future__ import annotations

import onnx
import pytest
import torch
from exports import EXPORT_SIZE, differences, export, write_checkpoint
from run_dirs import write_run

from core.export import MAX_SIDE, MIN_SIDE, ExportError, load_exported, read_onnx_metadata
from pipelines.export import check_shapes
from pipelines.export import main as export_main

pytestmark = pytest.mark.slow  # each export traces the model (20-40 s on 2 cores)

VARIANTS = {"box_refine": dict(with_box_refine=True), "two_stage": dict(with_box_refine=True, two_stage=True)}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    return {name: write_checkpoint(root / f"{name}.pt", **model) for name, model in VARIANTS.items()}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_onnx_matches_eager_at_other_sizes_and_batches(variant, checkpoints, tmp_path, capsys):
    path = export(checkpoints[variant], tmp_path / "model.onnx", "--format", "onnx", "--check")
    assert "check random 1x3x" in capsys.readouterr().out
    model = onnx.load(path)
    assert {n.op_type for n in model.graph.node} >= {"GridSample"}
    assert read_onnx_metadata(model)["category_names"] == {
        "1": "rectangle",
        "3": "ellipse",
        "7": "triangle",
        "8": "diamond",
    }
    for figures in differences(path, checkpoints[variant]):
        assert figures["logits"] <= 1e-4 and figures["boxes"] <= 1e-4, figures


def test_torch_export_program_with_postprocess_keeps_msda_ops_and_matches_eager(checkpoints, tmp_path):
    ckpt = checkpoints["two_stage"]
    path = export(ckpt, tmp_path / "model.pt2", "--format", "torch-export", "--postprocess")
    program = torch.export.load(str(path))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "msda.fused_forward.default" in targets, "the msda op was traced through instead of kept"
    assert "aten.topk.default" in targets  # two-stage's proposal selection and the post-processing's
    for figures in differences(path, ckpt, postprocess=True):
        assert figures["labels"] == 0, figures  # equal detections: same classes in the same order
        assert figures["scores"] <= 1e-5 and figures["boxes"] <= 1e-3, figures  # boxes in pixels (~200)


def test_static_export_refuses_another_size_in_one_line(checkpoints, tmp_path, capsys):
    # Given a run directory, as infer.py is: its best checkpoint is exported.
    run = write_run(
        tmp_path / "run", [("checkpoint_epoch0000", 0.2), ("checkpoint_epoch0001", 0.4)], "checkpoint_epoch0000"
    )
    (run / "checkpoint_epoch0001" / "checkpoint.pt").write_bytes(checkpoints["box_refine"].read_bytes())
    path = export(run, tmp_path / "static.pt2", "--format", "torch-export", "--static")
    assert f"export: --checkpoint is a run directory; using {run / 'checkpoint_epoch0001'}" in capsys.readouterr().out
    run = load_exported(str(path))
    width = -(-EXPORT_SIZE * 4 // 3)
    run(torch.randn(1, 3, EXPORT_SIZE, width), torch.zeros(1, EXPORT_SIZE, width, dtype=torch.bool))
    with pytest.raises(
        ExportError, match=rf"takes images of shape \(1, 3, {EXPORT_SIZE}, {width}\).*got \(1, 3, 97, 130\)"
    ):
        run(torch.randn(1, 3, 97, 130), torch.zeros(1, 97, 130, dtype=torch.bool))


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_bad_input_is_one_line_and_leaves_the_output_as_it_was(checkpoints, tmp_path, capsys):
    out = tmp_path / "model.onnx"
    out.write_bytes(b"an earlier export")
    not_a_checkpoint = tmp_path / "notes.pt"
    not_a_checkpoint.write_text("not a checkpoint")
    base = ["--format", "onnx", "--output", str(out)]

    assert export_main(["--checkpoint", str(not_a_checkpoint), *base]) == 2
    assert "notes.pt" in one_error_line(capsys) and out.read_bytes() == b"an earlier export"

    assert export_main(["--checkpoint", str(checkpoints["box_refine"]), *base, "--opset", "15"]) == 2
    assert "--opset 15 is too old" in one_error_line(capsys) and out.read_bytes() == b"an earlier export"

    assert export_main(["--checkpoint", str(checkpoints["box_refine"]), *base, "--dtype", "bf16"]) == 2
    assert "bf16" in one_error_line(capsys)
    assert export_main(["--checkpoint", "x.pt", *base, "--msda", "trt-plugin", "--check"]) == 2
    assert "TensorRT" in one_error_line(capsys)
    assert export_main(["--checkpoint", "x.pt", *base, "--check", "--check-images", str(tmp_path / "gone.jpg")]) == 2
    assert "--check-images" in one_error_line(capsys) and out.read_bytes() == b"an earlier export"
    static = ["--checkpoint", "x.pt", "--format", "torch-export", "--output", str(tmp_path / "m.pt2"), "--static"]
    assert export_main([*static, "--check", "--check-images", str(not_a_checkpoint)]) == 2
    assert "--check-images needs a dynamic export" in one_error_line(capsys)
    for size in ("64", "3073"):
        assert export_main(["--checkpoint", "x.pt", *base, "--image-size", size]) == 2
        assert (
            f"--image-size must be in 65..3072 (the stride-64 map needs 2 pixels; the example, 4/3 as wide, at most 4096), got {size}"
            == one_error_line(capsys).removeprefix("export: ")
        )
    left = [p.name for p in tmp_path.iterdir() if p.name not in {"model.onnx", "notes.pt"}]
    assert not left, f"files left behind: {left}"


def test_the_checks_sizes_are_sizes_a_dynamic_export_takes():
    for image_size in (MIN_SIDE, 70, 800, MAX_SIDE * 3 // 4):
        shapes = check_shapes(image_size, 2, static=False)
        assert all(MIN_SIDE <= side <= MAX_SIDE for _, h, w in shapes for side in (h, w)), (image_size, shapes)
        assert [n for n, _, _ in shapes] == [1, 3]
    assert check_shapes(70, 2, static=True) == [(2, 70, 94)]


def test_config_the_exporter_cannot_trace_is_one_line(tmp_path, capsys):
    # Two-stage takes its queries from the encoder's positions: 200 queries need more than a 65-pixel
    # image has (142 positions), so the static trace stops at the model's own check.
    ckpt = write_checkpoint(tmp_path / "big.pt", two_stage=True, with_box_refine=True, num_queries=200)
    out = tmp_path / "model.pt2"
    argv = ["--checkpoint", str(ckpt), "--format", "torch-export", "--output", str(out), "--static"]
    assert export_main([*argv, "--image-size", "65"]) == 2
    line = one_error_line(capsys)
    assert "could not trace" in line and "num_queries=200 > S=142" in line, line
    assert not out.exists()
