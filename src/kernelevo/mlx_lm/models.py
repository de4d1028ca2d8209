"""mlx-lm models to patch and benchmark, built from a preset, a config.json or a local model
directory, with random weights where none are present (no hub access, ever).

Presets are the configurations of published models (their config.json, trimmed to what
mlx-lm reads) and tiny ones of each supported family for tests.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..tune.correctness import MX_DTYPES

_QWEN3 = dict(model_type="qwen3", rms_norm_eps=1e-6, vocab_size=151936, max_position_embeddings=40960,
              rope_theta=1000000.0, tie_word_embeddings=True, head_dim=128)
_LLAMA3 = dict(model_type="llama", rms_norm_eps=1e-5, vocab_size=128256, max_position_embeddings=131072,
               rope_theta=500000.0, tie_word_embeddings=True,
               rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                             "original_max_position_embeddings": 8192, "rope_type": "llama3"})

PRESETS: dict[str, dict] = {
    # Published configurations (Hugging Face config.json of each model).
    "qwen3-0.6b": dict(_QWEN3, hidden_size=1024, num_hidden_layers=28, intermediate_size=3072,
                       num_attention_heads=16, num_key_value_heads=8),
    "qwen3-1.7b": dict(_QWEN3, hidden_size=2048, num_hidden_layers=28, intermediate_size=6144,
                       num_attention_heads=16, num_key_value_heads=8),
    "qwen3-4b": dict(_QWEN3, hidden_size=2560, num_hidden_layers=36, intermediate_size=9728,
                     num_attention_heads=32, num_key_value_heads=8),
    "llama-3.2-1b": dict(_LLAMA3, hidden_size=2048, num_hidden_layers=16, intermediate_size=8192,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64),
    "llama-3.2-3b": dict(_LLAMA3, hidden_size=3072, num_hidden_layers=28, intermediate_size=8192,
                         num_attention_heads=24, num_key_value_heads=8, head_dim=128),
    # Tiny models of each family kernelevo patches (tests, CI, a quick look).
    "tiny-qwen3": dict(_QWEN3, hidden_size=64, num_hidden_layers=2, intermediate_size=160,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=320),
    "tiny-llama": dict(_LLAMA3, hidden_size=64, num_hidden_layers=2, intermediate_size=160,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=320,
                       tie_word_embeddings=False, attention_bias=True, mlp_bias=True),
    "tiny-mistral": dict(model_type="mistral", hidden_size=64, num_hidden_layers=2,
                         intermediate_size=160, num_attention_heads=4, num_key_value_heads=1,
                         head_dim=16, rms_norm_eps=1e-5, vocab_size=320, rope_theta=1000000.0,
                         tie_word_embeddings=False, max_position_embeddings=32768),
    "tiny-gemma2": dict(model_type="gemma2", hidden_size=64, num_hidden_layers=2,
                        intermediate_size=160, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=16, rms_norm_eps=1e-6, vocab_size=320, rope_theta=10000.0,
                        attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                        query_pre_attn_scalar=16),
    # sliding window 8 in layers 0, 1 of every 3 (global in layer 2): prompts over 8 tokens
    # exercise the windowed masks and the rotating cache.
    "tiny-gemma3": dict(model_type="gemma3_text", hidden_size=64, num_hidden_layers=3,
                        intermediate_size=160, num_attention_heads=4, num_key_value_heads=1,
                        head_dim=16, rms_norm_eps=1e-6, vocab_size=320, sliding_window=8,
                        sliding_window_pattern=3, query_pre_attn_scalar=16,
                        max_position_embeddings=32768),
}


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: its name, its config, and the directory holding its weights
    (None: random weights)."""

    name: str
    config: dict
    weights_dir: Path | None = None

    @property
    def description(self) -> str:
        c = self.config.get("text_config", self.config)
        weights = f"weights from {self.weights_dir}" if self.weights_dir else "random weights"
        return (f"{self.name} ({c.get('model_type')}, {c.get('num_hidden_layers')} layers, hidden "
                f"{c.get('hidden_size')}; {weights})")


def resolve_source(source: str | Path) -> ModelSource:
    """A preset name, a config.json file, or an mlx-lm model directory (weights used when it
    has model*.safetensors). Raises ValueError, saying what was expected, otherwise."""
    text = str(source)
    if text.lower() in PRESETS:
        return ModelSource(text.lower(), dict(PRESETS[text.lower()]))
    path = Path(source)
    if path.is_dir():
        config_path = path / "config.json"
        if not config_path.is_file():
            raise ValueError(f"{path} is a directory without a config.json: not an mlx-lm model directory")
        weights = sorted(path.glob("model*.safetensors"))
        return ModelSource(path.name, _read_config(config_path), path if weights else None)
    if path.is_file():
        return ModelSource(path.parent.name or path.stem, _read_config(path))
    raise ValueError(f"{text!r} is neither a preset ({', '.join(PRESETS)}), a config.json file "
                     f"nor a model directory")


def _read_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read {path}: {error}") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise ValueError(f"{path} is not a model config: it has no model_type")
    _check_dimensions(config, f"{path}: ")
    return config


#: the fields of a config that size a model's layers (what random weights are built from)
DIMENSIONS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
              "head_dim", "vocab_size", "num_hidden_layers")


def _check_dimensions(config: dict, where: str) -> None:
    """Refuses, naming the field, a dimension that is not a positive integer of at most
    2^20 (in the config or its text_config), before mlx-lm allocates anything from it."""
    from ..tune.workloads import check_size

    for prefix, cfg in (("", config), ("text_config.", config.get("text_config"))):
        if not isinstance(cfg, dict):
            continue
        for key in DIMENSIONS:
            if cfg.get(key) is not None:
                check_size(f"{where}{prefix}{key}", cfg[key])


def build_model(source: ModelSource | str | Path, dtype: str | None = "bf16", seed: int = 0) -> nn.Module:
    """The mlx-lm model of a source, evaluated. Random weights (seeded) are cast to `dtype`;
    loaded weights keep theirs unless `dtype` is given. Raises ValueError for a model type
    mlx-lm does not know or a config it cannot build."""
    from mlx_lm.utils import load_model

    if not isinstance(source, ModelSource):
        source = resolve_source(source)
    if dtype is not None and dtype not in MX_DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(MX_DTYPES)}")
    mx.random.seed(seed)
    try:
        if source.weights_dir is not None:
            model, _ = load_model(source.weights_dir, lazy=True, strict=True)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                (Path(tmp) / "config.json").write_text(json.dumps(source.config))
                model, _ = load_model(Path(tmp), lazy=True, strict=False)
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, ZeroDivisionError) as error:
        raise ValueError(f"mlx-lm cannot build {source.name}: {type(error).__name__}: {error}") from None
    if source.weights_dir is None or dtype is not None:
        model.set_dtype(MX_DTYPES[dtype or "bf16"])
    # One array at a time, so that random f32 initial values never all exist at once.
    for _, value in tree_flatten(model.parameters()):
        mx.eval(value)
    return model


def parameter_count(model: nn.Module) -> int:
    return sum(math.prod(v.shape) for _, v in tree_flatten(model.parameters()))


def parameter_bytes(model: nn.Module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))
