"""Pictures of a run: loss and AP curves from metrics.jsonl, validation images with true and predicted boxes."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.raytrain.run_dir import RunDir, latest_history

log = logging.getLogger(__name__)


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    if len(values) < 3 or window <= 1:
        return values
    window = min(window, len(values))
    kernel = np.ones(window) / window
    padded = np.concatenate([np.full(window - 1, values[0]), values])
    return np.convolve(padded, kernel, mode="valid")


def plot_curves(records: Sequence[dict[str, Any]], out_dir: str | os.PathLike) -> list[Path]:
    """loss.png (training loss and its main terms against images seen) and ap.png (AP against epoch).

    Returns:
        The files written; none when matplotlib is missing (logged) or there is nothing to plot.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no curves drawn (pip install matplotlib)")
        return []
    out_dir = Path(out_dir)
    written = []
    steps = latest_history(records, "step", "global_step")
    if steps:
        x = np.array([r["global_step"] for r in steps], dtype=float)
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        window = max(1, len(steps) // 50)
        for key in ("loss",):
            y = np.array([r.get(key, np.nan) for r in steps], dtype=float)
            axes[0].plot(x, y, alpha=0.25, color="C0")
            axes[0].plot(x, _smooth(y, window), color="C0", label=f"{key} (smoothed)")
        axes[0].set_xlabel("optimizer step")
        axes[0].set_ylabel("weighted loss")
        axes[0].set_title("training loss")
        axes[0].legend()
        for i, key in enumerate(("loss_ce", "loss_bbox", "loss_giou")):
            y = np.array([r.get(key, np.nan) for r in steps], dtype=float)
            axes[1].plot(x, _smooth(y, window), color=f"C{i + 1}", label=key)
        axes[1].set_xlabel("optimizer step")
        axes[1].set_title("last decoder layer terms (unweighted, smoothed)")
        axes[1].legend()
        fig.tight_layout()
        path = out_dir / "loss.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    evals = latest_history(records, "eval", "epoch")
    if evals:
        fig, ax = plt.subplots(figsize=(6, 4))
        if len(evals) == 1:
            # One evaluation is no curve: the six COCO numbers of that epoch as bars.
            r = evals[0]
            keys = [k for k in ("AP", "AP50", "AP75", "APs", "APm", "APl") if k in r]
            values = [100 * max(r[k], 0.0) for k in keys]  # -1 means "no such objects": drawn as 0
            bars = ax.bar(keys, values, color="C0")
            ax.bar_label(bars, labels=[f"{v:.1f}" if r[k] >= 0 else "n/a" for k, v in zip(keys, values)])
            ax.set_title(f"validation AP after epoch {r['epoch'] + 1} (one evaluation)")
        else:
            epochs = [r["epoch"] + 1 for r in evals]
            for key in ("AP", "AP50", "AP75"):
                ax.plot(epochs, [100 * r[key] for r in evals], marker="o", label=key)
            ax.set_xlabel("epoch")
            ax.set_title("validation AP")
            ax.legend()
        ax.set_ylabel("COCO AP (%)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / "ap.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def draw_detections(item: dict[str, Any], path: str | os.PathLike, min_side: int = 400) -> Path:
    """One validation image with true boxes (green) and predictions (red, with class and score).

    Args:
        item: as collected by ``engine.evaluate``: "image" (h, w, 3) uint8, "true_boxes", "true_labels",
            "pred_boxes", "pred_scores", "pred_labels" (boxes xyxy in the image's pixels), "label_names",
            and "score_threshold" (the drawing threshold, said on the image when no prediction passed it).
        path: PNG to write.
        min_side: small images are scaled up so the boxes and text stay readable.
    """
    from PIL import Image, ImageDraw

    image = Image.fromarray(np.asarray(item["image"], dtype=np.uint8))
    scale = max(1.0, min_side / max(1, min(image.size)))
    if scale > 1:
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(image)
    names = {int(k): v for k, v in item.get("label_names", {}).items()}

    def name(label: int) -> str:
        return names.get(int(label), str(int(label)))

    for box, label in zip(np.asarray(item["true_boxes"]).reshape(-1, 4), np.asarray(item["true_labels"]).reshape(-1)):
        draw.rectangle([float(v) * scale for v in box], outline=(0, 200, 0), width=2)
        draw.text((box[0] * scale + 2, box[3] * scale - 12), name(label), fill=(0, 200, 0))
    for box, score, label in zip(
        np.asarray(item["pred_boxes"]).reshape(-1, 4),
        np.asarray(item["pred_scores"]).reshape(-1),
        np.asarray(item["pred_labels"]).reshape(-1),
    ):
        draw.rectangle([float(v) * scale for v in box], outline=(230, 30, 30), width=2)
        draw.text((box[0] * scale + 2, box[1] * scale + 1), f"{name(label)} {score:.2f}", fill=(230, 30, 30))
    if len(np.asarray(item["pred_scores"]).reshape(-1)) == 0:
        threshold = item.get("score_threshold")
        note = "no prediction" + (f" scored >= {threshold:g}" if threshold is not None else " passed the threshold")
        draw.rectangle([0, 0, 8 + 6 * len(note), 16], fill=(255, 255, 255))
        draw.text((4, 2), note, fill=(230, 30, 30))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def write_final_outputs(run_dir: RunDir, vis: Sequence[dict[str, Any]]) -> list[Path]:
    """Curves from metrics.jsonl and the drawn validation images; returns the files written."""
    written = plot_curves(run_dir.read_metrics(), run_dir.path)
    for i, item in enumerate(vis):
        written.append(draw_detections(item, run_dir.file(f"val_images/{i:02d}_image{item['image_id']}.png")))
    return written
