"""Keys of ``samadapt finetune`` (``samadapt finetune --help`` prints them)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from samadapt.config import key, required
from samadapt.data.splits import check_split_keys
from samadapt.keys import (
    DataKeys,
    LayerDecayKeys,
    PromptKeys,
    SegmenterKeys,
    TrainKeys,
    check_layer_decay,
    check_slicing,
)
from samadapt.supervised import SupervisedKeys


@dataclass(kw_only=True)
class FinetuneConfig(SegmenterKeys, SupervisedKeys, DataKeys, TrainKeys, LayerDecayKeys, PromptKeys):
    data: str = required("labeled manifest (.jsonl/.csv) or a packaged one such as demo:brain")
    out: Path = required("output folder (resumes from out/state/ when rerun)")
    class_weights: str | None = key(None, "comma list of K loss weights, background first (softmax only)")
    embedding_cache: bool = key(True, "encoder=frozen: compute image embeddings once and train the decoder on them")
    embedding_views: int = key(
        0, "encoder=frozen + cache: augmented views per slice to embed (0 = none)", bounds="[0, 64]"
    )
    export_merged: bool = key(False, "also write sam_merged.pth (LoRA merged into plain SAM weights)")

    def __post_init__(self) -> None:
        check_slicing(self, one_plane=True)
        check_split_keys(self)
        check_layer_decay(self)
        if self.class_weights is not None:
            weights = self.class_weights.split(",")
            if len(weights) != self.num_classes:
                raise ValueError(f"class_weights has {len(weights)} values but num_classes={self.num_classes}")
            try:
                [float(w) for w in weights]
            except ValueError:
                raise ValueError(f"class_weights={self.class_weights!r}: expected numbers like 0.2,1,3") from None
            if self.prompt != "none" or self.num_classes == 2:
                raise ValueError("class_weights needs prompt=none and num_classes > 2 (softmax) — drop class_weights")
        # Checked before training, not after it: plain SAM weights hold neither a class head nor adapters.
        if self.export_merged and (self.prompt == "none" or "adapter" in (self.encoder, self.decoder)):
            raise ValueError(
                "export_merged=true needs prompt=box|point and no adapters — plain SAM weights cannot "
                "hold the automatic mode's class head or bottleneck adapters"
            )

    @property
    def trains_on_embeddings(self) -> bool:
        """Whether training reads cached image embeddings (frozen encoder + cache) instead of running the encoder."""
        return self.encoder == "frozen" and self.embedding_cache

    @property
    def class_weight_values(self) -> list[float] | None:
        return None if self.class_weights is None else [float(w) for w in self.class_weights.split(",")]
