"""SAM model registry (:mod:`.registry`) and checkpoint I/O (:mod:`.checkpoints`).

Names are resolved lazily so that importing a light submodule (e.g. the CLI's ``checkpoint`` command
parser) does not import torch.
"""

from __future__ import annotations

import importlib

_LAZY = {
    **dict.fromkeys(("ARCHS", "build_sam", "native_image_size"), "samadapt.models.registry"),
    **dict.fromkeys(("detect_arch", "export_state_dict", "load_safetensors", "load_sam", "load_state_dict",
                     "save_safetensors", "save_sam_checkpoint", "save_sam_safetensors"), "samadapt.models.checkpoints"),
}
__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'samadapt.models' has no attribute {name!r}")
