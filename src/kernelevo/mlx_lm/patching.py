"""patch(model): run an mlx-lm model's linear layers and attention on kernelevo's kernels.

What is replaced, in place, and undone by `Patch.unpatch()`:

- `nn.Linear` layers with f32/f16/bf16 weights: one `kernelevo.matmul(x, W, transpose_b=True,
  bias=b)` each, the bias fused into the epilogue. Done by giving the layer object a
  subclass of its class (same weights, same parameters, still an `nn.Linear`).
- MLPs whose code is one of the known gated forms (`down(swiglu(gate(x), up(x)))`,
  `down(gelu_approx(gate(x)) * up(x))`, `down(gelu(gate(x)) * up(x))`): the gate's
  activation is fused into its product's epilogue as well.
- `nn.Embedding.as_linear` (a tied output head, in a model without an `lm_head`): one
  `kernelevo.matmul`.
- `scaled_dot_product_attention` as mlx-lm's model modules import it from
  `mlx_lm.models.base`: `kernelevo.attention` with the model's mask ("causal", a boolean or
  an additive array, or none); a quantized KV cache and attention sinks stay MLX's.
- `nn.RMSNorm` and `nn.RoPE` (the classes themselves, not subclasses or look-alikes):
  `kernelevo.rms_norm` and `kernelevo.rope`, one pass each on the CPU where MLX's CPU
  back-end runs a chain of generic ops (on a GPU they run MLX's kernels).
- Attention that a model computes in its own code, where kernelevo has a replacement
  written against that exact code (Gemma-2: logit softcapping): `kernelevo.attention` with
  `softcap`.

Everything else stays MLX's and is listed in `Patch.skipped` with the reason: quantized
layers, subclasses of nn.Linear with their own call, other linear-like layers, attention
the model computes itself. A call kernelevo's op refuses (a ValueError while building the
graph, e.g. a mask dtype it does not take) runs MLX's op instead and is counted in
`Patch.fallbacks`, so a patched model keeps working.

The attention name is replaced in the model's modules, so while a patch is in force every
model of those architectures in the process uses it; patches of several models share it.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import math
import re
import sys
import textwrap
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import activations as mlx_lm_activations
from mlx_lm.models import base as mlx_lm_base

from ..ops import _ext
from ..ops import attention as ke_attention
from ..ops import attention_op, matmul_op
from ..ops import matmul as ke_matmul
from ..ops import rms_norm as ke_rms_norm
from ..ops import rope as ke_rope
from ..ops._runtime import stream_backend

FLOAT_DTYPES = (mx.float32, mx.float16, mx.bfloat16)
SDPA_NAME = "scaled_dot_product_attention"
MLX_SDPA = mlx_lm_base.scaled_dot_product_attention  # mlx-lm's own, before any patch

# ---- what patched calls report while something records -------------------------------


@dataclass
class Call:
    """One call a patched layer built: its op, features, kernel configuration, and (when
    the recorder keeps them) the arguments, so that it can be replayed."""

    op: str  # "matmul", "attention", "rms_norm" or "rope"
    features: dict
    config: tuple[str, dict] | None  # (family, parameters) the extension chose
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    @property
    def family(self) -> str:
        return self.config[0] if self.config else "mlx"


class Recorder:
    """Collects the calls patched layers build while `recording()` is in force."""

    def __init__(self, keep_arguments: bool = False):
        self.keep_arguments = keep_arguments
        self.calls: list[Call] = []

    def add(self, op: str, features: dict, out: mx.array, args: tuple, kwargs: dict,
            config: tuple[str, dict] | None = None) -> None:
        keep = self.keep_arguments
        self.calls.append(Call(op, features, config or _ext.config_of(out), args if keep else (),
                               kwargs if keep else {}))

    def families(self) -> Counter:
        """Calls per kernel family, e.g. {"matmul gemv": 196, "attention decode": 28}."""
        return Counter(f"{c.op} {c.family}" for c in self.calls)


_recorder: Recorder | None = None


@contextmanager
def recording(keep_arguments: bool = False):
    """Records every call the patched layers build inside the block (not thread-safe: one
    recorder at a time per process)."""
    global _recorder
    previous, _recorder = _recorder, Recorder(keep_arguments)
    try:
        yield _recorder
    finally:
        _recorder = previous


# ---- the replacements ----------------------------------------------------------------

# (op, first line of the refusal) -> calls that went to MLX's op instead
FALLBACKS: Counter = Counter()


def linear(x: mx.array, weight: mx.array, bias: mx.array | None = None,
           activation: str | None = None) -> mx.array:
    """activation(x @ weight.T + bias) as one kernelevo.matmul. Leading axes with more than
    one row in all are folded into the rows, so that the weight is read once."""
    folded = x.ndim > 2 and math.prod(x.shape[:-2]) > 1
    if folded:
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])
    y = ke_matmul(x, weight, transpose_b=True, bias=bias, activation=activation)
    if _recorder is not None:
        epilogue = matmul_op.epilogue_kind(bias, activation)
        _recorder.add("matmul", matmul_op.call_features(x, weight, transpose_b=True, epilogue=epilogue),
                      y, (x, weight), {"bias": bias, "activation": activation})
    return y.reshape(*lead, y.shape[-1]) if folded else y


class KernelevoLinear(nn.Linear):
    """nn.Linear whose product and bias run as one kernelevo.matmul."""

    def __call__(self, x: mx.array) -> mx.array:
        return linear(x, self["weight"], self.get("bias"))


ROWWISE_ONE_PASS = ("one-pass", {})  # the "configuration" of ke.rms_norm / ke.rope on the CPU


def _rowwise_config() -> tuple[str, dict] | None:
    return ROWWISE_ONE_PASS if stream_backend(None) == "cpu" else None


def rms_norm(x: mx.array, weight: mx.array | None, eps: float) -> mx.array:
    y = ke_rms_norm(x, weight, eps)
    if _recorder is not None:
        _recorder.add("rms_norm", {"rows": x.size // x.shape[-1], "dims": x.shape[-1]}, y,
                      (x, weight), {"eps": eps}, _rowwise_config())
    return y


def rope(x: mx.array, dims: int, *, traditional: bool, base, scale: float, offset) -> mx.array:
    kwargs = dict(traditional=traditional, base=base, scale=scale, offset=offset)
    y = ke_rope(x, dims, **kwargs)
    if _recorder is not None:
        _recorder.add("rope", {"shape": tuple(x.shape), "dims": dims}, y, (x, dims), kwargs,
                      _rowwise_config())
    return y


class KernelevoRMSNorm(nn.RMSNorm):
    """nn.RMSNorm run by kernelevo.rms_norm."""

    def __call__(self, x: mx.array) -> mx.array:
        return rms_norm(x, self["weight"], self.eps)


class KernelevoRoPE(nn.RoPE):
    """nn.RoPE run by kernelevo.rope."""

    def __call__(self, x: mx.array, offset=0) -> mx.array:
        return rope(x, self.dims, traditional=self.traditional, base=self.base, scale=self.scale,
                    offset=offset)


class KernelevoEmbedding(nn.Embedding):
    """nn.Embedding whose `as_linear` (a tied output head) runs as one kernelevo.matmul."""

    def as_linear(self, x: mx.array) -> mx.array:
        return linear(x, self["weight"])


def attention(queries, keys, values, *, scale: float, mask=None, softcap: float | None = None,
              mlx_attention=None):
    """kernelevo.attention, or `mlx_attention()` where kernelevo's op refuses the call."""
    try:
        out = ke_attention(queries, keys, values, scale=scale, mask=mask, softcap=softcap)
    except ValueError as error:
        FALLBACKS[("attention", str(error).splitlines()[0])] += 1
        return mlx_attention()
    if _recorder is not None:
        _recorder.add("attention", attention_op.call_features(queries, keys, values, mask=mask,
                                                              softcap=softcap),
                      out, (queries, keys, values), {"scale": scale, "mask": mask, "softcap": softcap})
    return out


def kernelevo_sdpa(queries, keys, values, cache, scale: float, mask, sinks=None):
    """mlx_lm.models.base.scaled_dot_product_attention on kernelevo.attention; the
    quantized-cache and attention-sink paths stay MLX's."""
    if sinks is not None or hasattr(cache, "bits"):
        return MLX_SDPA(queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks)
    return attention(queries, keys, values, scale=scale, mask=mask,
                     mlx_attention=lambda: MLX_SDPA(queries, keys, values, cache, scale=scale, mask=mask))


# Gated MLPs: the source of `__call__` (as ast.unparse prints it) -> the name its module
# must bind to the activation, that object, and the epilogue activation that equals it.
MLP_FORMS = {
    "return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))":
        ("swiglu", mlx_lm_activations.swiglu, "silu"),
    "return self.down_proj(nn.gelu_approx(self.gate_proj(x)) * self.up_proj(x))":
        ("nn", nn, "gelu_tanh"),
    "return self.down_proj(nn.gelu(self.gate_proj(x)) * self.up_proj(x))":
        ("nn", nn, "gelu"),
}


def _mlp_activation(cls: type) -> tuple[str | None, str]:
    """(the epilogue activation a gated MLP class's call equals, "") or (None, why not)."""
    call = getattr(cls, "__call__", None)
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(call)))
    except (OSError, TypeError, SyntaxError):
        return None, "its source is not available"
    fn = tree.body[0]
    if not isinstance(fn, ast.FunctionDef) or [a.arg for a in fn.args.args] != ["self", "x"] \
            or len(fn.body) != 1:
        return None, "its call is not one of the gated forms kernelevo fuses"
    form = MLP_FORMS.get(ast.unparse(fn.body[0]))
    if form is None:
        return None, "its call is not one of the gated forms kernelevo fuses"
    name, expected, activation = form
    if sys.modules[call.__module__].__dict__.get(name) is not expected:
        return None, f"{name} in {call.__module__} is not mlx-lm's/MLX's own"
    return activation, ""


_fused_mlp_classes: dict[type, type] = {}


def _fused_mlp_class(cls: type, activation: str) -> type:
    hit = _fused_mlp_classes.get(cls)
    if hit is None:
        def __call__(self, x):
            gate = self.gate_proj
            h = linear(x, gate["weight"], gate.get("bias"), activation) * self.up_proj(x)
            return self.down_proj(h)

        hit = _fused_mlp_classes[cls] = type(
            f"Kernelevo{cls.__name__}", (cls,),
            {"__call__": __call__, "__module__": __name__, "__qualname__": f"Kernelevo{cls.__name__}",
             "__doc__": f"{cls.__module__}.{cls.__qualname__} with the gate's {activation} "
                        f"fused into its product (kernelevo)"})
    return hit


def _gemma2_attention_call(self, x, mask=None, cache=None):
    """mlx_lm.models.gemma2.Attention.__call__ (mlx-lm 0.32.2) with its attention (scores,
    softcap, mask, softmax, values) as one kernelevo.attention."""
    if cache is not None and hasattr(cache, "bits"):
        return type(self).__mro__[1].__call__(self, x, mask, cache)
    B, L, D = x.shape
    queries, keys, values = self.q_proj(x), self.k_proj(x), self.v_proj(x)
    queries = queries.reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
    keys = keys.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
    values = values.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
    if cache is not None:
        queries = self.rope(queries, offset=cache.offset)
        keys = self.rope(keys, offset=cache.offset)
        keys, values = cache.update_and_fetch(keys, values)
    else:
        queries = self.rope(queries)
        keys = self.rope(keys)
    output = attention(queries, keys, values, scale=self.scale, mask=mask,
                       softcap=self.attn_logit_softcapping,
                       mlx_attention=lambda: _mlx_gemma2_attention(self, queries, keys, values, mask))
    output = output.transpose(0, 2, 1, 3).reshape(B, L, -1)
    return self.o_proj(output)


def _mlx_gemma2_attention(self, queries, keys, values, mask):
    """Gemma-2's attention as its mlx-lm code computes it (for calls kernelevo refuses)."""
    B, _, L, _ = queries.shape
    queries = queries * self.scale
    if self.repeats > 1:
        queries = queries.reshape(B, self.n_kv_heads, self.repeats, L, self.head_dim)
        keys, values = mx.expand_dims(keys, 2), mx.expand_dims(values, 2)
    scores = queries @ keys.swapaxes(-1, -2)
    scores = mx.tanh(scores / self.attn_logit_softcapping) * self.attn_logit_softcapping
    if mask is not None:
        if mask.dtype == mx.bool_:
            scores = mx.where(mask, scores, mx.array(mx.finfo(scores.dtype).min, scores.dtype))
        else:
            scores = scores + mask
    out = mx.softmax(scores, precise=True, axis=-1) @ values
    return out.reshape(B, self.n_heads, L, self.head_dim) if self.repeats > 1 else out


# Attention classes that compute attention in their own code: "module.Class" -> (sha256
# prefix of the source of the `__call__` the replacement was written against, replacement).
# A different source (another mlx-lm version) is not replaced: it is listed as skipped.
ATTENTION_CLASSES = {
    "mlx_lm.models.gemma2.Attention": ("a62901768129867d", _gemma2_attention_call),
}

_attention_classes: dict[type, type] = {}


def _source_hash(fn) -> str | None:
    try:
        return hashlib.sha256(inspect.getsource(fn).encode()).hexdigest()[:16]
    except (OSError, TypeError):
        return None


def _attention_class(cls: type) -> tuple[type | None, str]:
    known = ATTENTION_CLASSES.get(f"{cls.__module__}.{cls.__qualname__}")
    if known is None:
        return None, ""
    digest, call = known
    if _source_hash(cls.__call__) != digest:
        return None, ("its code differs from the mlx-lm version kernelevo's replacement was "
                      "written against (mlx-lm 0.32.2): stays MLX's")
    hit = _attention_classes.get(cls)
    if hit is None:
        hit = _attention_classes[cls] = type(
            f"Kernelevo{cls.__name__}", (cls,),
            {"__call__": call, "__module__": __name__, "__qualname__": f"Kernelevo{cls.__name__}"})
    return hit, ""


# ---- the attention name in model modules, shared by all patches in force ---------------

_sdpa_patches: dict[str, int] = {}  # module name -> patches in force that replaced its name


def _patch_sdpa(module_name: str) -> bool:
    module = sys.modules[module_name]
    if _sdpa_patches.get(module_name):
        _sdpa_patches[module_name] += 1
        return True
    if module.__dict__.get(SDPA_NAME) is not MLX_SDPA:
        return False
    setattr(module, SDPA_NAME, kernelevo_sdpa)
    _sdpa_patches[module_name] = 1
    return True


def _unpatch_sdpa(module_name: str) -> None:
    _sdpa_patches[module_name] -= 1
    if _sdpa_patches[module_name] == 0:
        del _sdpa_patches[module_name]
        setattr(sys.modules[module_name], SDPA_NAME, MLX_SDPA)


# mlx-lm's name called bare (as imported) or through its module; not mx.fast's.
_SDPA_CALL = re.compile(r"(?<![\w.])(base\.)?scaled_dot_product_attention\s*\(")


def _calls_sdpa(cls: type) -> bool:
    """Whether the class's own call calls mlx-lm's scaled_dot_product_attention."""
    try:
        return _SDPA_CALL.search(inspect.getsource(cls.__call__)) is not None
    except (OSError, TypeError):
        return False


# ---- the handle ------------------------------------------------------------------------


@dataclass(frozen=True)
class Skipped:
    path: str  # the module's path in the model ("" for the model itself)
    what: str  # its class
    reason: str

    def __str__(self) -> str:
        return f"{self.path or '<model>'} ({self.what}): {self.reason}"


_patched_models: set[int] = set()


class Patch:
    """What `patch(model)` replaced and skipped; `unpatch()` restores the model exactly.

    `replaced` maps a kind ("linear", "mlp activation fused", "embedding as_linear",
    "attention") to the paths of the modules concerned; `counts` gives their numbers.
    `fallbacks` counts calls, since the patch, that kernelevo's ops refused and MLX ran."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.replaced: dict[str, list[str]] = {}
        self.skipped: list[Skipped] = []
        self.attention_modules: list[str] = []  # modules whose attention name was replaced
        self._undo: list = []
        self._fallbacks_before = Counter(FALLBACKS)
        self.active = True

    def _replace(self, kind: str, path: str) -> None:
        self.replaced.setdefault(kind, []).append(path)

    def _swap_class(self, module: nn.Module, cls: type) -> None:
        original = module.__class__
        module.__class__ = cls
        self._undo.append(lambda: setattr(module, "__class__", original))

    @property
    def counts(self) -> dict[str, int]:
        return {kind: len(paths) for kind, paths in self.replaced.items()}

    @property
    def fallbacks(self) -> Counter:
        return FALLBACKS - self._fallbacks_before

    def unpatch(self) -> None:
        """Restores every class and name this patch replaced (idempotent)."""
        if not self.active:
            return
        while self._undo:
            self._undo.pop()()
        _patched_models.discard(id(self.model))
        self.active = False

    def __enter__(self) -> "Patch":
        return self

    def __exit__(self, *exc) -> bool:
        self.unpatch()
        return False

    def summary(self) -> str:
        lines = [f"replaced: {', '.join(f'{n} {k}' for k, n in self.counts.items()) or 'nothing'}"]
        if self.attention_modules:
            lines.append(f"attention name replaced in: {', '.join(self.attention_modules)}")
        reasons = Counter((s.what, s.reason) for s in self.skipped)
        for (what, reason), n in reasons.items():
            lines.append(f"skipped {n} x {what}: {reason}")
        for (op, reason), n in self.fallbacks.items():
            lines.append(f"fell back to MLX in {n} {op} calls: {reason}")
        backend = stream_backend(None)
        if backend != "cpu":
            lines.append(f"note: MLX's default device is a GPU ({backend}): a call the heuristics send to "
                         f"MLX's own op gains nothing and adds kernelevo's Python (a few us a call), "
                         f"which a host-bound decode pays in full; `kernelevo bench-model` shows which "
                         f"kernels ran and what patching does to tokens/s")
        return "\n".join(lines)

    def __repr__(self) -> str:
        state = "active" if self.active else "undone"
        return f"<kernelevo Patch ({state}) {self.counts} skipped {len(self.skipped)}>"


def _float_weights(module: nn.Module) -> str:
    """"" when the module's weight (and bias) are f32/f16/bf16, else the reason not."""
    for name in ("weight", "bias"):
        value = module.get(name)
        if value is not None and value.dtype not in FLOAT_DTYPES:
            return f"{name} is {value.dtype}: kernelevo runs f32, f16 and bf16"
    return ""


def is_patched(model: nn.Module) -> bool:
    return id(model) in _patched_models


def patch(model: nn.Module) -> Patch:
    """Replaces, in place, the model's linear layers, gated-MLP activations, tied output head
    and attention with kernelevo's ops (see this module's doc). Returns the handle that
    lists what was replaced and skipped and can `unpatch()`; use it as a context manager
    to unpatch on leaving the block."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch() takes an mlx.nn.Module, not {type(model).__name__}")
    if id(model) in _patched_models:
        raise ValueError("this model is already patched: unpatch() its handle first")
    handle = Patch(model)
    seen: set[int] = set()
    modules = []
    for path, module in model.named_modules():
        if id(module) not in seen:
            seen.add(id(module))
            modules.append((path, module))
    # An embedding is a product only as a tied output head (a model without an lm_head).
    tied = not any(path.split(".")[-1] == "lm_head" for path, _ in modules)
    try:
        for path, module in modules:
            _patch_leaf(handle, path, module, tied)
        for path, module in modules:
            _patch_mlp(handle, path, module)
        _patch_attention(handle, modules)
    except BaseException:
        handle.unpatch()
        raise
    _patched_models.add(id(model))
    return handle


def _patch_leaf(handle: Patch, path: str, module: nn.Module, tied: bool) -> None:
    cls = type(module)
    what = f"{cls.__module__}.{cls.__qualname__}"
    if cls is nn.Embedding and not tied:
        return  # a lookup table only: nothing to replace
    if cls is nn.Linear or cls is nn.Embedding:
        reason = _float_weights(module)
        if reason:
            handle.skipped.append(Skipped(path, what, reason))
        elif cls is nn.Linear:
            handle._swap_class(module, KernelevoLinear)
            handle._replace("linear", path)
        else:
            handle._swap_class(module, KernelevoEmbedding)
            handle._replace("embedding as_linear", path)
    elif cls is nn.RMSNorm or cls is nn.RoPE:
        reason = _float_weights(module)
        if reason:
            handle.skipped.append(Skipped(path, what, reason))
        elif cls is nn.RMSNorm:
            handle._swap_class(module, KernelevoRMSNorm)
            handle._replace("rms_norm", path)
        else:
            handle._swap_class(module, KernelevoRoPE)
            handle._replace("rope", path)
    elif hasattr(module, "bits") or cls.__name__.startswith("Quantized") or cls.__name__.startswith("QQ"):
        handle.skipped.append(Skipped(path, what, "quantized: stays MLX's (quantized_matmul)"))
    elif isinstance(module, (nn.Linear, nn.Embedding)):
        handle.skipped.append(Skipped(path, what, f"a subclass of {cls.__mro__[1].__name__} with "
                                                  f"its own code: stays MLX's"))
    elif cls.__name__.endswith("Linear"):
        handle.skipped.append(Skipped(path, what, "not an nn.Linear: stays MLX's"))
    elif cls.__name__.endswith(("RMSNorm", "RoPE")):
        handle.skipped.append(Skipped(path, what, "its own norm or rotary code, not nn.RMSNorm / "
                                                  "nn.RoPE: stays MLX's"))


def _patch_mlp(handle: Patch, path: str, module: nn.Module) -> None:
    if not all(isinstance(module.get(name), nn.Module) for name in ("gate_proj", "up_proj", "down_proj")):
        return
    cls = type(module)
    what = f"{cls.__module__}.{cls.__qualname__}"
    activation, reason = _mlp_activation(cls)
    if activation is None:
        handle.skipped.append(Skipped(path, what, f"activation not fused: {reason}"))
    elif type(module["gate_proj"]) is not KernelevoLinear:
        handle.skipped.append(Skipped(path, what, "activation not fused: its gate_proj is not a "
                                                  "replaced nn.Linear"))
    else:
        handle._swap_class(module, _fused_mlp_class(cls, activation))
        handle._replace(f"mlp {activation} fused", path)


def _patch_attention(handle: Patch, modules) -> None:
    # The attention name, in every module that defines a class of the model.
    names = {type(m).__module__ for _, m in modules if type(m).__module__.startswith("mlx_lm.")}
    names.add(mlx_lm_base.__name__)
    for name in sorted(names):
        if _patch_sdpa(name):
            handle.attention_modules.append(name)
            handle._undo.append(lambda name=name: _unpatch_sdpa(name))
    patched = set(handle.attention_modules)
    for path, module in modules:
        cls = type(module)
        if "Attention" not in cls.__name__ or cls.__module__.startswith("mlx.nn"):
            continue
        what = f"{cls.__module__}.{cls.__qualname__}"
        replacement, reason = _attention_class(cls)
        if replacement is not None:
            handle._swap_class(module, replacement)
            handle._replace("attention", path)
        elif reason:
            handle.skipped.append(Skipped(path, what, reason))
        elif cls.__module__ in patched and _calls_sdpa(cls):
            handle._replace("attention", path)
        else:
            handle.skipped.append(Skipped(path, what, "computes attention in its own code: stays MLX's"))
