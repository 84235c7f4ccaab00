"""One rule for derived random seeds, so no two draws share a seed by accident of a hand-mixed formula."""

from __future__ import annotations

import hashlib


def derived_seed(seed: int, *parts: object) -> int:
    """A seed in [0, 2**32) fixed by the run's ``seed`` and what the draw is for (``"sampler", epoch``;
    ``"micro_batch", step, rank``; a batch's case ids ...). Stable across processes, runs and Python versions
    (sha256 of the parts' text, not ``hash()``); 2**32 fits every consumer (torch, numpy, MONAI)."""
    text = "\x1f".join(map(str, (seed, *parts)))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
