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
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..features import DTYPES, attention_features, matmul_features


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


def architecture_from_config(config: dict, name: str = "model") -> Architecture:
    """Reads a Hugging Face / mlx-lm config.json (also nested `text_config`s)."""
    cfg = config.get("text_config", config)

    def need(*keys):
        for key in keys:
            if cfg.get(key) is not None:
                return cfg[key]
        raise ValueError(f"the config has none of {', '.join(keys)}")

    hidden = int(need("hidden_size", "d_model", "n_embd", "dim"))
    heads = int(need("num_attention_heads", "n_heads", "n_head", "num_heads"))
    kv_heads = int(cfg.get("num_key_value_heads") or cfg.get("n_kv_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    intermediate = int(need("intermediate_size", "ffn_dim", "n_inner", "hidden_dim"))
    softcap = float(cfg.get("attn_logit_softcapping") or 0.0)
    window = int(cfg.get("sliding_window") or 0) if cfg.get("use_sliding_window", True) else 0
    if heads % kv_heads:
        raise ValueError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    return Architecture(str(cfg.get("model_type") or name), hidden, intermediate, heads, kv_heads,
                        head_dim, softcap, window)


def from_config(path: Path | str) -> Workload:
    """The workload of a model from its config.json."""
    path = Path(path)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {path}: {err}") from err
    arch = architecture_from_config(config, path.parent.name or "model")
    return replace(model_workload(arch, tokens=(1, 16, 128), prefill=(512,), contexts=(1024, 4096),
                          description=f"{path}: {arch.name} (hidden {arch.hidden}, {arch.heads}/"
                                      f"{arch.kv_heads} heads of {arch.head_dim}, MLP {arch.intermediate}); "
                                      f"held out: {', '.join(map(str, HELD_OUT_TOKENS))} tokens, decode "
                                      f"at 2k and 8k"), source=f"--model {path}")


def from_shapes_file(path: Path | str) -> Workload:
    """Explicit shapes, as JSON: a list of objects, each {"op": "matmul", "M":, "N":, "K":,
    "dtype":, "batch":, "transpose_b":} or {"op": "attention", "batch":, "heads":,
    "kv_heads":, "q_len":, "kv_len":, "head_dim":, "dtype":, "mask":, "softcap":, "window":},
    with "split": "held-out" on the shapes to judge on rather than fit to."""
    path = Path(path)
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {path}: {err}") from err
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path} must hold a non-empty JSON list of shapes")
    splits: dict[str, list[Shape]] = {"train": [], "held-out": []}
    for i, entry in enumerate(entries):
        entry = dict(entry)
        op = entry.pop("op", "matmul")
        split = entry.pop("split", "train")
        if split not in splits:
            raise ValueError(f"{path}: shape {i + 1}: split must be train or held-out, not {split!r}")
        try:
            shape = MatmulShape(**entry) if op == "matmul" else AttentionShape(**entry)
            shape.features()  # validates
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: shape {i + 1}: {err}") from err
        splits[split].append(shape)
    if not splits["train"]:
        raise ValueError(f"{path} has no training shapes (entries without \"split\": \"held-out\")")
    return Workload(path.stem, f"{len(splits['train'])} training and {len(splits['held-out'])} "
                    f"held-out shapes from {path}", tuple(splits["train"]), tuple(splits["held-out"]),
                    source=f"--shapes {path}")
