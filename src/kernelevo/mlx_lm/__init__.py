"""kernelevo inside mlx-lm models: patch a model's linear layers and attention with
kernelevo's kernels, check its logits, benchmark it, record its call shapes.

    from kernelevo.mlx_lm import patch
    handle = patch(model)            # in place; handle.counts, handle.skipped
    ...
    handle.unpatch()                 # or: with patch(model): ...

Needs the optional extra `mlx-lm` (`pip install "kernelevo[mlx-lm]"`); `import kernelevo`
never imports it. See docs/models.md.
"""

from __future__ import annotations

try:
    import mlx_lm  # noqa: F401
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("kernelevo.mlx_lm needs mlx-lm: pip install \"kernelevo[mlx-lm]\"") from error

from .models import PRESETS, ModelSource, build_model, resolve_source
from .parity import LogitsCheck, check_logits
from .patching import Patch, Recorder, Skipped, patch, recording

__all__ = ["PRESETS", "LogitsCheck", "ModelSource", "Patch", "Recorder", "Skipped", "build_model",
           "check_logits", "patch", "recording", "resolve_source"]
