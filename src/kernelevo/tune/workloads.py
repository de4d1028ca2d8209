"""Workloads: the op calls a tuning run measures.

Presets come from real model architectures (no weights needed): the matmul shapes of each
transformer block's projections and MLP, and the attention shapes of prefill at several
lengths and of decode at several context sizes. A linear layer y = x W^T with W stored
[out, in] is a matmul with M = tokens, N = out, K = in and transpose_b set, exactly as
`ke.matmul(x, w, transpose_b=True)` runs it. `from_config` derives the same from any
Hugging Face / mlx-lm config.json; `from_shapes_file` reads explicit shapes.

Every workload has a training set, on which rules are fitted, and a held-out set, on which
the written program is judged and which nothing is fitted to: other models' dimensions
and other token counts, so a rule that only memorised the training shapes shows it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..features import DTYPES, attention_features, matmul_features

#: The largest size any one dimension may have (M, N, K, batch, heads, lengths, head_dim,
#: window): 2^20 = 1,048,576, above every model dimension, vocabulary and context length in
#: use, and far below what would overflow anything.
MAX_DIM = 1 << 20
#: The most elements one operand may hold: the tuner allocates every operand of a shape and
#: times it, and 2^31 elements (8 GiB of f32) is more than any machine it runs on should be
#: asked to hold for one operand.
MAX_ELEMENTS = 1 << 31

_MAX_DIM_WHY = (f"at most {MAX_DIM} (2^20: above any model dimension, vocabulary or context "
                f"length; the tuner allocates every operand)")


def _shown(value, *, say_string: bool = True) -> str:
    """A value as the JSON it came from, cut short (strings marked as such where a number
    was wanted)."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return text + " (a string)" if isinstance(value, str) and say_string else text


def _positive_int(name: str, value, *, zero: bool = False) -> int:
    """An integer field: 1..MAX_DIM (0..MAX_DIM with `zero`); bools, floats and strings
    are refused, not converted."""
    least = 0 if zero else 1
    kind = "a non-negative integer" if zero else "a positive integer"
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be {kind}, got {_shown(value)}")
    if value < least:
        raise ValueError(f"{name} must be {kind}, got {value}")
    if value > MAX_DIM:
        raise ValueError(f"{name} must be {_MAX_DIM_WHY}, got {value}")
    return value


#: a size of a call: a positive integer (non-negative with zero=True) of at most MAX_DIM
check_size = _positive_int


def _elements(what: str, *dims: int) -> None:
    n = 1
    for d in dims:
        n *= d
    if n > MAX_ELEMENTS:
        raise ValueError(f"{what} would hold {n} elements, more than 2^31 ({MAX_ELEMENTS}; 8 GiB of "
                         f"f32): the tuner allocates every operand, and no call this large is tuned")


def _dtype(value) -> str:
    if not isinstance(value, str) or value not in DTYPES:
        shown = repr(value) if isinstance(value, str) and len(value) < 40 else _shown(value)
        raise ValueError(f"unsupported dtype {shown}; expected one of {', '.join(DTYPES)}")
    return value


def check_shape(shape: "Shape") -> None:
    """Raises ValueError naming the field where a shape means nothing: a size that is not a
    positive integer (at most MAX_DIM), an operand of more than MAX_ELEMENTS elements, an
    unknown dtype or mask, heads not a multiple of kv_heads."""
    if isinstance(shape, MatmulShape):
        M, N, K, batch = (_positive_int(n, getattr(shape, n)) for n in ("M", "N", "K", "batch"))
        _dtype(shape.dtype)
        if not isinstance(shape.transpose_b, bool):
            raise ValueError(f"transpose_b must be true or false, got {_shown(shape.transpose_b)}")
        _elements("operand a (batch x M x K)", batch, M, K)
        _elements("operand b (batch x K x N)", batch, K, N)
        _elements("the product (batch x M x N)", batch, M, N)
        return
    batch, heads, kv_heads, q_len, kv_len, head_dim = (
        _positive_int(n, getattr(shape, n)) for n in ("batch", "heads", "kv_heads", "q_len", "kv_len", "head_dim"))
    _positive_int("window", shape.window, zero=True)
    _dtype(shape.dtype)
    if not isinstance(shape.mask, str) or shape.mask not in ("none", "causal"):
        raise ValueError(f"mask must be \"none\" or \"causal\" (the masks the tuner times), got "
                         f"{_shown(shape.mask, say_string=False)}")
    softcap = shape.softcap
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not (
            math.isfinite(softcap) and softcap >= 0):
        raise ValueError(f"softcap must be a finite number >= 0 (0: off), got {_shown(softcap)}")
    if heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    _elements("q (batch x heads x q_len x head_dim)", batch, heads, q_len, head_dim)
    _elements("k and v (batch x kv_heads x kv_len x head_dim)", batch, kv_heads, kv_len, head_dim)
    _elements("the scores (batch x heads x q_len x kv_len)", batch, heads, q_len, kv_len)


@dataclass(frozen=True)
class MatmulShape:
    M: int
    N: int
    K: int
    dtype: str = "bf16"
    batch: int = 1
    transpose_b: bool = True
    label: str = field(default="", compare=False)

    op = "matmul"

    def features(self) -> dict:
        return matmul_features(self.M, self.N, self.K, batch=self.batch, dtype=self.dtype,
                               transpose_b=self.transpose_b)

    @property
    def key(self) -> str:
        """Stable identity in the database."""
        return (f"M{self.M}_N{self.N}_K{self.K}_b{self.batch}_{self.dtype}"
                f"_t{int(self.transpose_b)}")

    @property
    def flops(self) -> float:
        return 2.0 * self.M * self.N * self.K * self.batch

    def __str__(self) -> str:
        return (f"{self.M}x{self.N}x{self.K} {self.dtype}"
                + (f" batch {self.batch}" if self.batch > 1 else "")
                + (" (b transposed)" if self.transpose_b else ""))


@dataclass(frozen=True)
class AttentionShape:
    batch: int
    heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    dtype: str = "bf16"
    mask: str = "none"  # none | causal
    softcap: float = 0.0
    window: int = 0
    label: str = field(default="", compare=False)

    op = "attention"

    def features(self) -> dict:
        return attention_features(batch=self.batch, heads=self.heads, kv_heads=self.kv_heads,
                                  q_len=self.q_len, kv_len=self.kv_len, head_dim=self.head_dim,
                                  dtype=self.dtype, mask=self.mask, softcap=self.softcap,
                                  window=self.window)

    @property
    def key(self) -> str:
        return (f"B{self.batch}_H{self.heads}_G{self.kv_heads}_Q{self.q_len}_S{self.kv_len}"
                f"_D{self.head_dim}_{self.dtype}_{self.mask}_c{self.softcap:g}_w{self.window}")

    @property
    def flops(self) -> float:
        return 4.0 * self.batch * self.heads * self.q_len * self.kv_len * self.head_dim

    def __str__(self) -> str:
        extra = "".join([f" {self.mask}" if self.mask != "none" else "",
                         f" softcap {self.softcap:g}" if self.softcap else "",
                         f" window {self.window}" if self.window else ""])
        kind = "decode" if self.q_len <= 8 else "prefill"
        return (f"{kind} q{self.q_len} kv{self.kv_len} {self.heads}/{self.kv_heads}x{self.head_dim}"
                f" b{self.batch} {self.dtype}{extra}")


Shape = MatmulShape | AttentionShape


def shape_of(op: str, features: dict) -> Shape | None:
    """The tuning shape of a call's features, where one describes it (the tuner times
    x @ W and x @ W.T without epilogue, and attention without array masks)."""
    f = features
    if op == "matmul":
        if f["transpose_a"] or f["epilogue"] != "none":
            return None
        return MatmulShape(f["M"], f["N"], f["K"], f["dtype"], f["batch"], f["transpose_b"])
    if f["mask"] not in ("none", "causal"):
        return None
    return AttentionShape(f["batch"], f["heads"], f["kv_heads"], f["q_len"], f["kv_len"],
                          f["head_dim"], f["dtype"], f["mask"], f["softcap"], f["window"])


SPLITS = ("train", "held-out", "all")


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    shapes: tuple[Shape, ...]  # the training set
    held_out: tuple[Shape, ...] = ()
    source: str = ""  # how to name it again on the command line (`--model path`, ...)

    def for_op(self, op: str) -> tuple[Shape, ...]:
        return tuple(s for s in self.shapes if s.op == op)

    def split(self, which: str) -> tuple[Shape, ...]:
        if which == "train":
            return self.shapes
        if which == "held-out":
            return self.held_out
        if which == "all":
            return self.shapes + self.held_out
        raise ValueError(f"unknown split {which!r}; expected one of {', '.join(SPLITS)}")

    def labelled(self) -> list[tuple[str, Shape]]:
        """(split, shape) for every shape, training first."""
        return [("train", s) for s in self.shapes] + [("held-out", s) for s in self.held_out]


@dataclass(frozen=True)
class Architecture:
    """What a workload needs to know of a transformer."""

    name: str
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    softcap: float = 0.0  # attention logit soft-capping
    window: int = 0  # sliding window (0: none)

    def linear_layers(self) -> dict[str, tuple[int, int]]:
        """Projection name -> (out features N, in features K)."""
        return {
            "q_proj": (self.heads * self.head_dim, self.hidden),
            "kv_proj": (self.kv_heads * self.head_dim, self.hidden),
            "o_proj": (self.hidden, self.heads * self.head_dim),
            "gate_up_proj": (self.intermediate, self.hidden),
            "down_proj": (self.hidden, self.intermediate),
        }


def model_shapes(arch: Architecture, *, tokens: tuple[int, ...] = (1, 16, 128),
                 dtypes: tuple[str, ...] = ("bf16",), prefill: tuple[int, ...] = (512,),
                 contexts: tuple[int, ...] = (1024, 4096), seen: set | None = None) -> list[Shape]:
    """The calls of a model's blocks: projections at each token count, prefill and decode
    attention. Shapes in `seen` are left out (and what is returned is added to it)."""
    shapes: list[Shape] = []
    seen = set() if seen is None else seen
    for dtype in dtypes:
        assert dtype in DTYPES, dtype
        for m in tokens:
            for name, (n, k) in arch.linear_layers().items():
                shape = MatmulShape(m, n, k, dtype, label=f"{arch.name} {name}, {m} tokens, {dtype}")
                if shape not in seen:
                    seen.add(shape)
                    shapes.append(shape)
        common = dict(batch=1, heads=arch.heads, kv_heads=arch.kv_heads, head_dim=arch.head_dim,
                      dtype=dtype, softcap=arch.softcap)
        attention = []
        for length in prefill:
            window = arch.window if 0 < arch.window < length else 0
            attention.append(AttentionShape(q_len=length, kv_len=length, mask="causal", window=window,
                                            label=f"{arch.name} prefill {length}, {dtype}", **common))
        for context in contexts:
            window = arch.window if 0 < arch.window < context else 0
            attention.append(AttentionShape(q_len=1, kv_len=context, window=window,
                                            label=f"{arch.name} decode at {context}, {dtype}", **common))
        for shape in attention:
            if shape not in seen:
                seen.add(shape)
                shapes.append(shape)
    return shapes


#: token counts of the held-out sets: between and beyond the training ones
HELD_OUT_TOKENS = (8, 24, 48, 96)


def model_workload(arch: Architecture, *, tokens: tuple[int, ...] = (1, 16, 128),
                   dtypes: tuple[str, ...] = ("bf16",), prefill: tuple[int, ...] = (512,),
                   contexts: tuple[int, ...] = (1024, 4096), description: str = "",
                   held_out: tuple[tuple[Architecture, dict], ...] | None = None) -> Workload:
    """A model's workload. Held out by default: the same model at HELD_OUT_TOKENS tokens
    and decode at other contexts; or, given `held_out`, those (architecture, options)."""
    seen: set = set()
    train = model_shapes(arch, tokens=tokens, dtypes=dtypes, prefill=prefill, contexts=contexts,
                         seen=seen)
    if held_out is None:
        held_out = ((arch, dict(tokens=HELD_OUT_TOKENS, prefill=(),
                                contexts=tuple(2 * c for c in contexts))),)
    others: list[Shape] = []
    for other, options in held_out:
        others += model_shapes(other, **{"dtypes": dtypes, **options}, seen=seen)
    return Workload(arch.name, description or f"{arch.name}: projections at {tokens} tokens, "
                    f"prefill {prefill}, decode at {contexts}, {'/'.join(dtypes)}", tuple(train),
                    tuple(others))


ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (
    Architecture("qwen3-0.6b", hidden=1024, intermediate=3072, heads=16, kv_heads=8, head_dim=128),
    Architecture("qwen3-1.7b", hidden=2048, intermediate=6144, heads=16, kv_heads=8, head_dim=128),
    Architecture("qwen3-4b", hidden=2560, intermediate=9728, heads=32, kv_heads=8, head_dim=128),
    Architecture("llama-3-8b", hidden=4096, intermediate=14336, heads=32, kv_heads=8, head_dim=128),
    Architecture("mistral-7b", hidden=4096, intermediate=14336, heads=32, kv_heads=8, head_dim=128,
                 window=4096),
    Architecture("gemma-2-2b", hidden=2304, intermediate=9216, heads=8, kv_heads=4, head_dim=256,
                 softcap=50.0, window=4096),
)}


def _tiny() -> Workload:
    return Workload("tiny", "a few small shapes: a quick check of the machinery, not a tuning workload", (
        MatmulShape(1, 256, 128, "f32", label="decode"),
        MatmulShape(33, 96, 80, "f32", label="odd"),
        MatmulShape(64, 128, 256, "bf16", label="small"),
    ))


PRESETS: dict[str, Workload] = {
    "qwen3-0.6b": model_workload(
        ARCHITECTURES["qwen3-0.6b"], tokens=(1, 16, 128), dtypes=("bf16", "f32"),
        prefill=(256, 1024), contexts=(1024, 4096),
        # Held out: the larger Qwen3 models' layers at other token counts, and their decode
        held_out=((ARCHITECTURES["qwen3-1.7b"], dict(tokens=(1, 8, 48), prefill=(), contexts=(2048,))),
                  (ARCHITECTURES["qwen3-4b"], dict(tokens=(24, 96, 192), prefill=(512,), contexts=(8192,)))),
        description="Qwen3-0.6B (hidden 1024, 16/8 heads of 128, MLP 3072): projections at 1, 16 "
                    "and 128 tokens, prefill at 256 and 1024, decode at 1k and 4k context; bf16 and "
                    "f32. Held out: Qwen3-1.7B at 1, 8 and 48 tokens and decode at 2k, Qwen3-4B at "
                    "24, 96 and 192 tokens, prefill 512 and decode at 8k"),
    "llama-3-8b": model_workload(ARCHITECTURES["llama-3-8b"], tokens=(1, 8, 64),
                                 prefill=(512, 2048), contexts=(2048, 8192)),
    "mistral-7b": model_workload(ARCHITECTURES["mistral-7b"], tokens=(1, 8, 64),
                                 prefill=(512, 2048), contexts=(2048, 8192)),
    "gemma-2-2b": model_workload(ARCHITECTURES["gemma-2-2b"], tokens=(1, 16, 64),
                                 prefill=(512,), contexts=(1024, 8192)),
    "tiny": _tiny(),
}
PRESETS = {name: replace(w, source=f"--workload {name}") for name, w in PRESETS.items()}
DEFAULT_WORKLOAD = "qwen3-0.6b"
#: One line per preset, for `kernelevo tune --help`
PRESET_SUMMARIES: dict[str, str] = {
    "qwen3-0.6b": "the default: Qwen3-0.6B's layers and attention, bf16+f32 (~12 min, 2 cores)",
    "llama-3-8b": "Llama-3-8B's layers at 1/8/64 tokens, prefill, decode at 2k/8k; bf16",
    "mistral-7b": "Mistral-7B (sliding window 4096), the same token counts; bf16",
    "gemma-2-2b": "Gemma-2-2B (head_dim 256, softcap 50, window 4096); bf16",
    "tiny": "three small matmuls: a quick check of the machinery, not a tuning",
}
assert set(PRESET_SUMMARIES) == set(PRESETS)


def _config_int(cfg: dict, where: str, key: str, *, zero: bool = False) -> int:
    return _positive_int(f"{where}{key}", cfg[key], zero=zero)


def _kind(value) -> str:
    """What a JSON value is, in words."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"the number {_shown(value)}"
    if isinstance(value, str):
        return f"the string {_shown(value, say_string=False)}"
    return "a list" if isinstance(value, list) else "an object"


def architecture_from_config(config: dict, name: str = "model") -> Architecture:
    """Reads a Hugging Face / mlx-lm config.json (also nested `text_config`s). Raises
    ValueError naming the key where the config is not one of a transformer."""
    if not isinstance(config, dict):
        raise ValueError(f"must be a JSON object (a model's config.json), got {_kind(config)}")
    where = ""
    cfg = config
    if config.get("text_config") is not None:
        cfg, where = config["text_config"], "text_config."
        if not isinstance(cfg, dict):
            raise ValueError(f"text_config must be a JSON object, got {_kind(cfg)}")

    def need(*keys, zero: bool = False) -> int:
        for key in keys:
            if cfg.get(key) is not None:
                return _config_int(cfg, where, key, zero=zero)
        raise ValueError(f"the config has none of {', '.join(where + k for k in keys)}")

    def optional(key: str, default: int, *, zero: bool = False) -> int:
        if cfg.get(key) is None:
            return default
        return _config_int(cfg, where, key, zero=zero)

    hidden = need("hidden_size", "d_model", "n_embd", "dim")
    heads = need("num_attention_heads", "n_heads", "n_head", "num_heads")
    kv_key = next((k for k in ("num_key_value_heads", "n_kv_heads") if cfg.get(k) is not None), None)
    kv_heads = _config_int(cfg, where, kv_key) if kv_key else heads
    if cfg.get("head_dim") is not None:
        head_dim = _config_int(cfg, where, "head_dim")
    elif hidden % heads:
        raise ValueError(f"{where}hidden_size {hidden} is not a multiple of {where}num_attention_heads "
                         f"{heads}, and there is no {where}head_dim")
    else:
        head_dim = hidden // heads
    intermediate = need("intermediate_size", "ffn_dim", "n_inner", "hidden_dim")
    softcap = cfg.get("attn_logit_softcapping")
    if softcap is None:
        softcap = 0.0
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not (
            math.isfinite(softcap) and softcap >= 0):
        raise ValueError(f"{where}attn_logit_softcapping must be a finite number >= 0, got {_shown(softcap)}")
    use_window = cfg.get("use_sliding_window", True)
    if use_window is not None and not isinstance(use_window, bool):
        raise ValueError(f"{where}use_sliding_window must be true or false, got {_shown(use_window)}")
    window = optional("sliding_window", 0, zero=True) if use_window is not False else 0
    if heads % kv_heads:
        raise ValueError(f"{where}num_attention_heads {heads} is not a multiple of "
                         f"{where}num_key_value_heads {kv_heads}")
    model_type = cfg.get("model_type")
    label = model_type if isinstance(model_type, str) and model_type.strip() else name
    return Architecture(label.strip()[:60] or "model", hidden, intermediate, heads, kv_heads,
                        head_dim, float(softcap), window)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ValueError(f"cannot read {path}: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise ValueError(f"cannot read {path}: not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not JSON: {err}") from None
    except RecursionError:
        raise ValueError(f"{path} is not JSON this reader accepts: nested too deeply") from None


def from_config(path: Path | str) -> Workload:
    """The workload of a model from its config.json."""
    path = Path(path)
    config = _read_json(path)
    try:
        arch = architecture_from_config(config, path.parent.name or "model")
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    workload = replace(model_workload(arch, tokens=(1, 16, 128), prefill=(512,), contexts=(1024, 4096),
                          description=f"{path}: {arch.name} (hidden {arch.hidden}, {arch.heads}/"
                                      f"{arch.kv_heads} heads of {arch.head_dim}, MLP {arch.intermediate}); "
                                      f"held out: {', '.join(map(str, HELD_OUT_TOKENS))} tokens, decode "
                                      f"at 2k and 8k"), source=f"--model {path}")
    for shape in workload.shapes + workload.held_out:
        try:
            check_shape(shape)
        except ValueError as error:
            raise ValueError(f"{path}: the model's {shape.label or shape.op}: {error}") from None
    return workload


#: The fields of each op's entries in a shapes file, and their defaults (None: required)
SHAPE_FIELDS: dict[str, dict[str, object]] = {
    "matmul": {"M": None, "N": None, "K": None, "dtype": "bf16", "batch": 1, "transpose_b": True},
    "attention": {"batch": 1, "heads": None, "kv_heads": None, "q_len": None, "kv_len": None,
                  "head_dim": None, "dtype": "bf16", "mask": "none", "softcap": 0.0, "window": 0},
}


def shape_from_entry(entry) -> tuple[str, Shape]:
    """(split, shape) of one entry of a shapes file; ValueError naming the field otherwise."""
    if not isinstance(entry, dict):
        raise ValueError(f"must be a JSON object such as {{\"op\": \"matmul\", \"M\": 16, \"N\": 4096, "
                         f"\"K\": 4096}}, got {_kind(entry)}")
    entry = dict(entry)
    op = entry.pop("op", "matmul")
    if not isinstance(op, str) or op not in SHAPE_FIELDS:
        raise ValueError(f"op must be \"matmul\" or \"attention\", got {_shown(op, say_string=False)}")
    split = entry.pop("split", "train")
    if not isinstance(split, str) or split not in ("train", "held-out"):
        raise ValueError(f"split must be \"train\" or \"held-out\", got {_shown(split, say_string=False)}")
    label = entry.pop("label", "")
    if not isinstance(label, str):
        raise ValueError(f"label must be a string, got {_shown(label)}")
    fields = SHAPE_FIELDS[op]
    unknown = [k for k in entry if k not in fields]
    if unknown:
        raise ValueError(f"unknown field {_shown(unknown[0], say_string=False)} for {op}; {op} entries take "
                         f"{', '.join(fields)} (and op, split, label)")
    missing = [k for k, default in fields.items() if default is None and k not in entry]
    if missing:
        raise ValueError(f"{op} entries need {', '.join(missing)}")
    values = {k: entry.get(k, default) for k, default in fields.items()}
    shape = (MatmulShape if op == "matmul" else AttentionShape)(**values, label=label)
    check_shape(shape)
    return split, shape


def from_shapes_file(path: Path | str) -> Workload:
    """Explicit shapes, as JSON: a list of objects, each {"op": "matmul", "M":, "N":, "K":,
    "dtype":, "batch":, "transpose_b":} or {"op": "attention", "batch":, "heads":,
    "kv_heads":, "q_len":, "kv_len":, "head_dim":, "dtype":, "mask":, "softcap":, "window":},
    with "split": "held-out" on the shapes to judge on rather than fit to. Defaults: op
    matmul, dtype bf16, batch 1, transpose_b true (b stored [N, K], as a linear layer's
    weight), mask none, softcap 0, window 0; every other field is required."""
    path = Path(path)
    entries = _read_json(path)
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path} must hold a non-empty JSON list of shapes, e.g. "
                         f"[{{\"op\": \"matmul\", \"M\": 16, \"N\": 4096, \"K\": 4096}}]")
    splits: dict[str, list[Shape]] = {"train": [], "held-out": []}
    for i, entry in enumerate(entries):
        try:
            split, shape = shape_from_entry(entry)
        except ValueError as err:
            raise ValueError(f"{path} entry {i + 1}: {err}") from None
        splits[split].append(shape)
    if not splits["train"]:
        raise ValueError(f"{path} has no training shapes (entries without \"split\": \"held-out\")")
    return Workload(path.stem, f"{len(splits['train'])} training and {len(splits['held-out'])} "
                    f"held-out shapes from {path}", tuple(splits["train"]), tuple(splits["held-out"]),
                    source=f"--shapes {path}")
