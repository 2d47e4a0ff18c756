"""COCO category ids <-> the detection head's labels: raw ids (the authors' 91 classes) or contiguous ranks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np


@dataclass(frozen=True)
class CategoryMap:
    """COCO category ids <-> head labels. raw: label = id, num_classes = max id + 1 (91 for COCO);
    contiguous: label = rank of the id, num_classes = number of categories."""

    category_ids: tuple[int, ...]  # sorted
    names: tuple[str, ...]
    mode: Literal["raw", "contiguous"] = "raw"

    @classmethod
    def from_categories(
        cls, categories: Sequence[Mapping[str, Any]], mode: Literal["raw", "contiguous"]
    ) -> CategoryMap:
        pairs = sorted((int(c["id"]), str(c["name"])) for c in categories)
        return cls(tuple(i for i, _ in pairs), tuple(n for _, n in pairs), mode)

    @property
    def num_classes(self) -> int:
        if not self.category_ids:
            return 0
        return self.category_ids[-1] + 1 if self.mode == "raw" else len(self.category_ids)

    def label_to_category_id(self) -> list[int]:
        """Index = label, value = COCO id (identity in raw mode, -1 where no category)."""
        if self.mode == "contiguous":
            return list(self.category_ids)
        table = [-1] * self.num_classes
        for i in self.category_ids:
            table[i] = i
        return table

    def labels(self, category_ids: np.ndarray) -> np.ndarray:
        """(K,) COCO ids -> (K,) int64 labels."""
        ids = np.asarray(category_ids, dtype=np.int64)
        if self.mode == "raw":
            return ids.copy()
        lut = np.full(self.category_ids[-1] + 1 if self.category_ids else 1, -1, dtype=np.int64)
        lut[list(self.category_ids)] = np.arange(len(self.category_ids))
        out = lut[np.clip(ids, 0, len(lut) - 1)]
        if ids.size and ((ids >= len(lut)) | (out < 0)).any():
            raise ValueError(
                f"category ids {sorted(set(ids[(ids >= len(lut)) | (out < 0)].tolist()))} "
                f"are not in {list(self.category_ids)}"
            )
        return out

    def category_ids_of(self, labels: np.ndarray) -> np.ndarray:
        """(K,) labels -> (K,) COCO ids, for pycocotools."""
        return np.asarray(self.label_to_category_id(), dtype=np.int64)[np.asarray(labels, dtype=np.int64)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "category_ids": list(self.category_ids),
            "names": list(self.names),
            "num_classes": self.num_classes,
            "label_to_category_id": self.label_to_category_id(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CategoryMap:
        return cls(tuple(d["category_ids"]), tuple(d["names"]), d["mode"])
