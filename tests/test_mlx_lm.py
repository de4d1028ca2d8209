"""kernelevo.mlx_lm: real mlx-lm models (tiny configs, random weights) patched with kernelevo's
ops — the round trip, logits parity per family and dtype, what is skipped, bench-model and
tune --model DIR end to end."""

import json
import os
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import kernelevo as ke
from kernelevo.mlx_lm import PRESETS, build_model, check_logits, patch, recording
from kernelevo.mlx_lm import patching
from kernelevo.mlx_lm.models import resolve_source
from kernelevo.mlx_lm.record import record_calls, workload_from_model_dir
from kernelevo.tune.correctness import TOLERANCE
from kernelevo.tune.workloads import AttentionShape, MatmulShape

FAMILIES = ["tiny-qwen3", "tiny-llama", "tiny-mistral", "tiny-gemma2", "tiny-gemma3"]


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "kernelevo.cli", *args], capture_output=True,
                          text=True, env=dict(os.environ), timeout=timeout)


def snapshot(model):
    """Everything patch() may touch: each module's class, each parameter array (identity
    and value), and the attention name in every mlx-lm model module."""
    classes = {path: type(m) for path, m in model.named_modules()}
    params = {k: (id(v), np.array(v.astype(mx.float32))) for k, v in tree_flatten(model.parameters())}
    names = {name: mod.__dict__.get(patching.SDPA_NAME) for name, mod in sys.modules.items()
             if name.startswith("mlx_lm.models.")}
    return classes, params, names


def assert_same(before, after):
    classes, params, names = before
    classes2, params2, names2 = after
    assert classes == classes2
    assert names == names2
    assert params.keys() == params2.keys()
    for key, (ident, value) in params.items():
        assert params2[key][0] == ident, key
        np.testing.assert_array_equal(params2[key][1], value)


@pytest.mark.parametrize("family", FAMILIES)
def test_patch_unpatch_round_trip_leaves_the_model_identical(family):
    model = build_model(family, "bf16")
    before = snapshot(model)
    handle = patch(model)
    during = snapshot(model)
    assert any(cls is patching.KernelevoLinear for cls in during[0].values())
    assert any(fn is patching.kernelevo_sdpa for fn in during[2].values())
    handle.unpatch()
    assert_same(before, snapshot(model))
    handle.unpatch()  # idempotent
    with patch(model) as again:
        assert again.active
    assert not again.active
    assert_same(before, snapshot(model))


def test_a_model_is_patched_once_at_a_time():
    model = build_model("tiny-qwen3", "f32")
    with patch(model):
        with pytest.raises(ValueError, match="already patched"):
            patch(model)
    patch(model).unpatch()  # after unpatching, again


def test_two_patched_models_share_the_attention_name_until_both_are_undone():
    a, b = build_model("tiny-qwen3", "f32"), build_model("tiny-qwen3", "f32", seed=1)
    import mlx_lm.models.qwen3 as qwen3

    first, second = patch(a), patch(b)
    first.unpatch()
    assert qwen3.scaled_dot_product_attention is patching.kernelevo_sdpa  # b still patched
    second.unpatch()
    assert qwen3.scaled_dot_product_attention is patching.MLX_SDPA


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_patched_logits_agree_with_stock(family, dtype):
    model = build_model(family, dtype)
    check = check_logits(model, prompt_tokens=24, decode_tokens=4)
    assert check.ok, str(check)
    assert check.dtype == dtype and check.tolerance == TOLERANCE[dtype]
    if dtype == "f32":
        assert check.vs_stock <= TOLERANCE["f32"]  # f32 never needs the second criterion
    layers = PRESETS[family]["num_hidden_layers"]
    assert check.counts["attention"] == layers
    assert check.counts["linear"] >= 7 * layers
    assert sum(n for kind, n in check.counts.items() if kind.startswith("mlp")) == layers
    # the embedding is replaced only where it is also the output head
    assert ("embedding as_linear" in check.counts) == PRESETS[family].get("tie_word_embeddings", True)
    # nn.RMSNorm and nn.RoPE themselves are replaced; Gemma's own norm (1 + weight) is not
    gemma = family.startswith("tiny-gemma")
    assert ("rms_norm" in check.counts) == (not gemma)
    if not gemma:
        assert check.counts["rms_norm"] >= 2 * layers + 1
    # nn.RoPE where the model uses it (Llama's preset has llama3 scaling: its own class)
    assert check.counts.get("rope", 0) == (0 if family == "tiny-llama" else layers)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_patched_model_runs_kernelevo_kernels_in_prefill_and_decode(family):
    model = build_model(family, "bf16")
    with patch(model) as handle:
        phases = record_calls(model, prompt_tokens=20)
    layers = PRESETS[family]["num_hidden_layers"]
    for phase, calls in phases.items():
        families = {c.family for c in calls}
        assert "mlx" not in families, phase  # every recorded call is a kernelevo primitive
        assert sum(c.op == "attention" for c in calls) == layers
    assert {c.family for c in phases["decode"] if c.op == "matmul"} == {"gemv"}
    assert not handle.fallbacks
    if family == "tiny-gemma2":
        assert all(c.features["softcap"] == 50.0 for c in phases["prefill"] if c.op == "attention")
    if family == "tiny-gemma3":  # windowed layers get mlx-lm's boolean window masks
        masks = [c.features["mask"] for c in phases["prefill"] if c.op == "attention"]
        assert masks.count("bool") == 2 and masks.count("causal") == 1


def test_the_logits_check_catches_a_wrong_kernel(monkeypatch):
    real = patching.ke_matmul
    monkeypatch.setattr(patching, "ke_matmul", lambda *a, **k: real(*a, **k) * 1.25)
    for dtype in ("f32", "bf16"):
        check = check_logits(build_model("tiny-qwen3", dtype))
        assert not check.ok, str(check)


def test_the_logits_check_catches_wrong_attention(monkeypatch):
    real = patching.ke_attention
    monkeypatch.setattr(patching, "ke_attention", lambda q, k, v, **kw: real(q, k[:, :, :1], v[:, :, :1], **kw
                                                                              | {"mask": None}))
    check = check_logits(build_model("tiny-llama", "bf16"))
    assert not check.ok, str(check)


def test_quantized_layers_stay_mlx_and_are_listed():
    model = build_model("tiny-qwen3", "bf16")
    nn.quantize(model, group_size=32, bits=4, class_predicate=lambda path, m: isinstance(m, nn.Linear)
                and ".mlp." in path)
    with patch(model) as handle:
        quantized = [s for s in handle.skipped if "quantized" in s.reason]
        assert sorted(s.path for s in quantized) == sorted(
            f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj", "down_proj"))
        assert all(s.what.endswith("QuantizedLinear") for s in quantized)
        assert handle.counts["linear"] == 8  # q, k, v, o of two layers
        assert not any(k.startswith("mlp") for k in handle.counts)  # gate is quantized: not fused
        assert any("gate_proj is not a replaced" in s.reason for s in handle.skipped)
        assert "quantized" in handle.summary()
    assert check_logits(model).ok


def test_the_summary_says_what_patching_costs_where_the_default_device_is_a_gpu(monkeypatch):
    """On a GPU the heuristics may send every call to MLX's own ops; the summary says that
    such calls only add kernelevo's Python (measured 0.73x stock on an H100, RESULTS.md)."""
    model = build_model("tiny-qwen3", "bf16")
    with patch(model) as handle:
        monkeypatch.setattr(patching, "stream_backend", lambda stream: "cpu")
        assert "GPU" not in handle.summary()
        monkeypatch.setattr(patching, "stream_backend", lambda stream: "cuda")
        assert "default device is a GPU (cuda)" in handle.summary()


def test_an_architecture_kernelevo_does_not_list_is_patched_as_far_as_possible():
    # GPT-2: biased linears (fused), attention through mlx-lm's name, an ungated MLP.
    config = dict(model_type="gpt2", n_ctx=64, n_embd=64, n_head=4, n_layer=2, n_positions=64,
                  layer_norm_epsilon=1e-5, vocab_size=320)
    from kernelevo.mlx_lm.models import ModelSource

    model = build_model(ModelSource("tiny-gpt2", config), "f32")
    check = check_logits(model)
    assert check.ok, str(check)
    assert check.counts["linear"] == 8 and check.counts["attention"] == 2


class OwnLinear(nn.Linear):
    def __call__(self, x):
        return super().__call__(x) * 2


class OwnAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def __call__(self, x):
        scores = mx.softmax(x @ x.swapaxes(-1, -2), axis=-1)
        return self.proj(scores @ x)


class OwnModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = OwnAttention()
        self.special = OwnLinear(8, 8)

    def __call__(self, x):
        return self.special(self.attn(x))


def test_what_kernelevo_cannot_replace_is_listed_and_keeps_working():
    model = OwnModel()
    x = mx.random.normal((1, 5, 8))
    expected = model(x)
    with patch(model) as handle:
        reasons = {s.path: s.reason for s in handle.skipped}
        assert "own code" in reasons["attn"] and "subclass" in reasons["special"]
        assert handle.counts == {"linear": 1}  # attn.proj
        np.testing.assert_allclose(np.array(model(x)), np.array(expected), rtol=1e-5, atol=1e-5)


def test_a_changed_gemma2_attention_is_not_replaced(monkeypatch):
    monkeypatch.setitem(patching.ATTENTION_CLASSES, "mlx_lm.models.gemma2.Attention",
                        ("0" * 16, patching._gemma2_attention_call))
    model = build_model("tiny-gemma2", "f32")
    with patch(model) as handle:
        assert "attention" not in handle.counts
        assert any("differs from the mlx-lm version" in s.reason for s in handle.skipped)
    assert check_logits(model).ok


def test_a_call_kernelevo_refuses_runs_mlx_and_is_counted(monkeypatch):
    def refuse(*args, **kwargs):
        raise ValueError("[kernelevo.attention] refused for the test")

    monkeypatch.setattr(patching, "ke_attention", refuse)
    model = build_model("tiny-qwen3", "f32")
    check = check_logits(model)
    assert check.ok and check.vs_stock <= TOLERANCE["f32"]
    with patch(model) as handle:
        model(mx.array([[1, 2, 3]]))
        assert handle.fallbacks[("attention", "[kernelevo.attention] refused for the test")] == 2


def test_a_quantized_kv_cache_keeps_mlx_attention():
    from mlx_lm.models.cache import QuantizedKVCache

    from kernelevo.mlx_lm.models import ModelSource

    # head_dim 32: the smallest MLX quantizes in groups of
    model = build_model(ModelSource("qwen3-d32", dict(PRESETS["tiny-qwen3"], head_dim=32)), "f32")
    tokens = mx.array([list(range(1, 40))])
    stock = model(tokens, cache=[QuantizedKVCache(group_size=32, bits=8) for _ in range(2)])
    with patch(model), recording() as recorder:
        ours = model(tokens, cache=[QuantizedKVCache(group_size=32, bits=8) for _ in range(2)])
    assert not [c for c in recorder.calls if c.op == "attention"]
    assert [c for c in recorder.calls if c.op == "matmul"]
    # The projections differ from MLX's by f32 rounding, which can move a key across an
    # 8-bit quantization step (1/255 of its group's range): agreement to that level.
    error = np.abs(np.array(ours) - np.array(stock)).max() / np.abs(np.array(stock)).max()
    assert error < 1e-2


def test_the_linear_folds_batches_and_fuses_bias_and_activation():
    rng = np.random.default_rng(0)
    x = mx.array(rng.standard_normal((3, 5, 64)).astype(np.float32))
    w = mx.array(rng.standard_normal((96, 64)).astype(np.float32))
    b = mx.array(rng.standard_normal(96).astype(np.float32))
    with recording() as recorder:
        y = patching.linear(x, w, b, "silu")
    assert y.shape == (3, 5, 96)
    assert recorder.calls[0].features["M"] == 15 and recorder.calls[0].features["batch"] == 1
    assert recorder.calls[0].features["epilogue"] == "mixed"
    np.testing.assert_allclose(np.array(y), np.array(nn.silu(x @ w.T + b)), rtol=2e-5, atol=2e-5)


def test_gated_mlp_forms_are_recognised_and_others_are_not():
    import mlx_lm.models.gemma2 as gemma2
    import mlx_lm.models.llama as llama
    import mlx_lm.models.qwen3 as qwen3

    assert patching._mlp_activation(qwen3.MLP) == ("silu", "")
    assert patching._mlp_activation(llama.MLP) == ("silu", "")
    assert patching._mlp_activation(gemma2.MLP) == ("gelu_tanh", "")

    class Other(qwen3.MLP):
        def __call__(self, x):
            return self.down_proj(nn.relu(self.gate_proj(x)) * self.up_proj(x))

    activation, reason = patching._mlp_activation(Other)
    assert activation is None and "gated forms" in reason


def test_presets_and_sources_resolve_and_bad_sources_are_clear_errors(tmp_path):
    assert resolve_source("Qwen3-0.6B").config["hidden_size"] == 1024
    with pytest.raises(ValueError, match="neither a preset"):
        resolve_source("no-such-model")
    with pytest.raises(ValueError, match="without a config.json"):
        resolve_source(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read"):
        resolve_source(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-arch"}))
    with pytest.raises(ValueError, match="mlx-lm cannot build"):
        build_model(tmp_path)
    # sizes are refused, naming the field, before anything is allocated from them
    for key, value in (("hidden_size", -64), ("vocab_size", 10**9), ("num_attention_heads", 2.5),
                       ("intermediate_size", "256")):
        (tmp_path / "config.json").write_text(json.dumps({**PRESETS["tiny-qwen3"], key: value}))
        with pytest.raises(ValueError, match=f"config.json: {key} must be"):
            resolve_source(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**PRESETS["tiny-qwen3"], "text_config": {"hidden_size": 0}}))
    with pytest.raises(ValueError, match="text_config.hidden_size must be a positive integer"):
        resolve_source(tmp_path)


def test_a_model_directory_with_weights_loads_them(tmp_path):
    model = build_model("tiny-llama", "f32", seed=3)
    model.save_weights(str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(PRESETS["tiny-llama"]))
    source = resolve_source(tmp_path)
    assert source.weights_dir == tmp_path and "weights from" in source.description
    loaded = build_model(source, dtype=None, seed=99)  # the seed must not matter
    for (k, a), (_, b) in zip(tree_flatten(model.parameters()), tree_flatten(loaded.parameters())):
        np.testing.assert_array_equal(np.array(a), np.array(b), err_msg=k)


def test_workload_from_model_dir_records_a_real_prefill_and_decode(tmp_path):
    config = PRESETS["tiny-qwen3"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    workload = workload_from_model_dir(tmp_path, prompt_tokens=24)
    h, heads, kv, d, mlp = (config[k] for k in ("hidden_size", "num_attention_heads",
                                                "num_key_value_heads", "head_dim", "intermediate_size"))
    matmuls = {(s.M, s.N, s.K) for s in workload.shapes if isinstance(s, MatmulShape)}
    for m in (24, 1):
        assert {(m, heads * d, h), (m, kv * d, h), (m, h, heads * d), (m, mlp, h), (m, h, mlp),
                (m, config["vocab_size"], h)} == {s for s in matmuls if s[0] == m}
    attention = [s for s in workload.shapes if isinstance(s, AttentionShape)]
    assert [(s.q_len, s.kv_len, s.mask) for s in attention] == [(24, 24, "causal"), (1, 25, "none")]
    assert all(s.dtype == "bf16" and (s.heads, s.kv_heads, s.head_dim) == (heads, kv, d) for s in attention)
    # the q and o projections (both 64x64) of two layers
    assert "x4 per pass" in next(s.label for s in workload.shapes if s.op == "matmul")
    with pytest.raises(ValueError, match="not a directory"):
        workload_from_model_dir(tmp_path / "config.json")


@pytest.mark.slow
def test_tune_model_dir_tunes_the_recorded_shapes(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(PRESETS["tiny-qwen3"]))
    result = run_cli("tune", "--backend", "cpu", "--model", str(tmp_path / "m"), "--candidates", "1",
                     "--reps", "1", "--strategy", "random",
                     "--output", str(tmp_path / "out.kevo"))
    assert result.returncode == 0, result.stderr
    assert "recorded through kernelevo.mlx_lm" in result.stdout
    assert "m decode" in result.stdout and (tmp_path / "out.kevo").is_file()
    # A config.json still goes the old way (shapes derived from the config).
    derived = run_cli("tune", "--backend", "cpu", "--model", str(tmp_path / "nope.json"))
    assert derived.returncode == 2 and "cannot read" in derived.stderr


def test_bench_model_runs_end_to_end_on_a_tiny_config(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(PRESETS["tiny-gemma3"]))
    result = run_cli("bench-model", str(config), "-p", "12", "-g", "4", "--rounds", "2", "--no-wait",
                     "--plot", str(tmp_path / "bench.png"), "--json", str(tmp_path / "bench.json"))
    assert result.returncode == 0, result.stderr
    assert "logits ok" in result.stdout and "round 2/2" in result.stdout
    assert "kernels per decode pass" in result.stdout and "bound:" in result.stdout
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["median"]["patched"]["generation_tps"]["n"] == 2
    assert len(data["runs"]) == 4 and {r["variant"] for r in data["runs"]} == {"stock", "patched"}
    assert all(r["prompt_tokens"] == 12 and r["generated_tokens"] == 3 for r in data["runs"])
    decode = data["kernels"]["decode"]
    assert sum(n for kind, n in decode.items() if kind.startswith("attention ")) == 3
    assert decode["matmul gemv"] == 22  # 7 linears in each of 3 layers, and the tied head
    assert data["ratio"]["generation_tps"]["median"] > 0
    assert set(data["token_breakdown_s"]["patched"]) == {"token", "linears", "attention", "norms and rope",
                                                         "patched", "rest"}


@pytest.mark.parametrize("args, message", [
    (["no-such-model"], "neither a preset"),
    (["tiny-qwen3", "--dtype", "f64"], "unknown dtype"),
    (["tiny-qwen3", "-g", "1"], "--generation-tokens"),
])
def test_bench_model_bad_input_is_a_clear_error(args, message):
    result = run_cli("bench-model", *args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_import_kernelevo_does_not_import_mlx_lm():
    code = "import sys, kernelevo, kernelevo.cli; print('mlx_lm' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_without_mlx_lm_the_model_commands_say_what_to_install(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(PRESETS["tiny-qwen3"]))
    code = ("import sys; sys.modules['mlx_lm'] = None; from kernelevo.cli import main; "
            "sys.argv = ['kernelevo'] + sys.argv[1:]; main()")
    for args in (["bench-model", "tiny-qwen3"], ["tune", "--backend", "cpu", "--model", str(tmp_path)]):
        result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 2, result.stderr
        assert "needs mlx-lm" in result.stderr and "Traceback" not in result.stderr
