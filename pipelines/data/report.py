"""The data report of a run: per split, the images read and the bad input skipped or repaired, by kind."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)

# What a flagged kind means for the person reading the report.
FLAG_NOTES = {
    "exif_orientation": "pixels used as stored, ignoring the tag, as COCO's sizes and boxes are: if the "
    "annotations were drawn on the rotated view, rotate these files or their annotations",
}


def data_report(infos: Mapping[str, Any]) -> dict[str, Any]:
    """The data_report.json of a run: per split, what was read and what was skipped.

    Args:
        infos: split -> `pipelines.data.DatasetInfo`. Its skips found inside decode tasks are those
            of the epochs run so far, so call this again when the run ends.

    Returns:
        {split: {"source", "num_images", "skipped", "counts", "examples", "fixed", "flagged",
        "found_while_decoding"}}: `num_images` passed the annotation and file checks; `skipped` is the
        total of `counts` (images and annotations by kind); `fixed` counts silent-safe repairs such as
        boxes clipped to the image; `flagged` counts images kept as they are but worth a look (an EXIF
        orientation tag); `found_while_decoding` lists every (kind, file) skipped or flagged while
        reading pixels, which a resumed run starts from (``DatasetInfo.restore_found``).
    """
    out = {}
    for split, info in infos.items():
        try:
            bad, found = info.bad_input_report(), info.found_while_decoding()
        except Exception as e:  # the ledger actor is gone: report what was found before reading pixels
            log.warning("%s: bad input found while decoding is unavailable (%s)", split, e)
            bad, found = info.bad_input, {}
        out[split] = {
            "source": info.source,
            "num_images": info.num_images,
            "skipped": bad.total,
            **bad.to_dict(),
            "found_while_decoding": found,
        }
    return out


def format_data_report(report: Mapping[str, Any], on_bad_input: str) -> str:
    """A data_report.json as a block for the console: per split, counts by kind and a few examples."""
    lines = [f"data (data.on_bad_input={on_bad_input}):"]
    for split, r in report.items():
        lines.append(
            f"  {split}: {r['num_images']} images from {r['source']}; "
            + (f"{r['skipped']} bad inputs skipped" if r["skipped"] else "no bad input skipped")
        )
        for kind, n in sorted(r["counts"].items()):
            lines.append(f"    {kind}: {n}  e.g. {'; '.join(r['examples'].get(kind, []))}")
        for kind, n in sorted(r.get("fixed", {}).items()):
            lines.append(f"    {kind}: {n} (repaired, kept)")
        for kind, n in sorted(r.get("flagged", {}).items()):
            lines.append(
                f"    {kind}: {n} (kept, {FLAG_NOTES.get(kind, 'check them')})  e.g. {'; '.join(r['examples'].get(kind, []))}"
            )
    return "\n".join(lines)
