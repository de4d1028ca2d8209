"""The Apple files: the shipped ones send every call to MLX's own op (kernelevo's Metal
kernels are untimed on an Apple GPU), and the seeds tune and evolve start from choose what
MLX 0.32 itself chooses on each device class.

Each expected seed configuration below was worked out by hand from MLX's dispatch code
(mlx/backend/metal/matmul.cpp: GEMM_TPARAM_MACRO, steel_gemm_splitk, gemv, gemv_wide_config;
mlx/backend/metal/scaled_dot_product_attention.cpp: use_fallback, sdpa_vector_2pass)."""

from types import SimpleNamespace

import pytest

from kernelevo import chips, heuristics
from kernelevo.chips import apple_from_device_info
from kernelevo.dsl import check, format_program, parse
from kernelevo.features import attention_features, matmul_features
from kernelevo.paths import shipped_heuristics_dir

CHIPS = {
    "m1": apple_from_device_info("applegpu_g13g", "Apple M1"),
    "m3": apple_from_device_info("applegpu_g15g", "Apple M3"),
    "m2-pro": apple_from_device_info("applegpu_g14s", "Apple M2 Pro"),
    "m3-max": apple_from_device_info("applegpu_g15c", "Apple M3 Max"),
    "m2-ultra": apple_from_device_info("applegpu_g14d", "Apple M2 Ultra"),
}


def chosen(chip, op, features):
    """What the seed program for the chip chooses."""
    program = heuristics.seed_program("metal", CHIPS[chip])
    return program.select(op, features).config.to_dsl()


def shipped(chip, op, features):
    """What the shipped (in force, untuned) program for the chip chooses."""
    return heuristics.active("metal", chip).program.select(op, features).config.to_dsl()


def mm(M, N, K, dtype="f16", tb=False, ta=False, batch=1):
    return matmul_features(M, N, K, dtype=dtype, transpose_a=ta, transpose_b=tb, batch=batch)


MATMUL = [
    # a vector times a transposed weight (x @ W.T): the row-major gemv kernel
    ("m1", mm(1, 4096, 4096, tb=True), "gemv bm=8 bn=1 sm=1 sn=32 tm=4 tn=4"),
    # a vector times a row-major matrix: the transposed-matrix kernel
    ("m1", mm(1, 4096, 4096), "gemv bm=1 bn=16 sm=8 sn=4 tm=4 tn=4"),
    ("m1", mm(1, 4096, 16384), "gemv bm=1 bn=16 sm=4 sn=8 tm=4 tn=4"),
    ("m1", mm(1, 300, 40, tb=True), "gemv bm=1 bn=1 sm=8 sn=4 tm=4 tn=4"),
    ("m1", mm(1, 2, 4096, tb=True), "gemv bm=1 bn=8 sm=1 sn=32 tm=1 tn=4"),
    # four rows: split-K on M1; the wide gemv from M3 on
    ("m1", mm(4, 4096, 4096, tb=True), "splitk bm=16 bn=32 bk=16 wm=2 wn=2 parts=2"),
    ("m3", mm(4, 4096, 4096, tb=True), "gemv_wide vecs=4 lanes=32 split_passes=yes"),
    ("m3", mm(12, 4096, 4096, tb=True), "gemv_wide vecs=4 lanes=16 split_passes=yes"),
    ("m3", mm(12, 70000, 4096, tb=True), "gemv_wide vecs=4 lanes=16 split_passes=no"),
    ("m3", mm(12, 4096, 4096, dtype="f32", tb=True), "splitk bm=16 bn=32 bk=16 wm=2 wn=2 parts=2"),
    ("m1", mm(512, 512, 512, dtype="f32"), "splitk bm=32 bn=32 bk=16 wm=2 wn=2 parts=2"),
    ("m1", mm(16, 16, 8192, dtype="f32"), "splitk bm=16 bn=16 bk=16 wm=2 wn=2 parts=32"),
    # large products: tiles by device class
    ("m1", mm(2048, 2048, 2048, dtype="bf16", tb=True), "gemm bm=64 bn=32 bk=32 wm=2 wn=2 swizzle=0 epilogue=fused"),
    ("m1", mm(2048, 2048, 2048, dtype="bf16"), "gemm bm=64 bn=64 bk=16 wm=1 wn=2 swizzle=0 epilogue=fused"),
    ("m1", mm(2048, 2048, 2048, dtype="f32"), "gemm bm=64 bn=64 bk=16 wm=2 wn=2 swizzle=0 epilogue=fused"),
    ("m2-pro", mm(2048, 2048, 2048, dtype="bf16", tb=True), "gemm bm=64 bn=64 bk=16 wm=2 wn=2 swizzle=0 epilogue=fused"),
    ("m3-max", mm(2048, 2048, 2048, dtype="f32"), "gemm bm=64 bn=64 bk=16 wm=2 wn=2 swizzle=0 epilogue=fused"),
    ("m2-ultra", mm(2048, 2048, 2048, dtype="bf16", tb=True), "gemm bm=64 bn=64 bk=16 wm=1 wn=2 swizzle=0 epilogue=fused"),
    ("m2-ultra", mm(2048, 2048, 8192, dtype="f16", tb=True), "gemm bm=64 bn=32 bk=32 wm=2 wn=2 swizzle=0 epilogue=fused"),
    ("m2-ultra", mm(2048, 2048, 8192, dtype="f16"), "gemm bm=32 bn=64 bk=16 wm=1 wn=2 swizzle=0 epilogue=fused"),
    ("m2-ultra", mm(256, 1024, 256, dtype="f32", tb=True), "gemm bm=32 bn=64 bk=16 wm=1 wn=2 swizzle=0 epilogue=fused"),
    ("m2-ultra", mm(256, 1024, 256, dtype="f32"), "gemm bm=64 bn=32 bk=32 wm=2 wn=2 swizzle=0 epilogue=fused"),
    # split-K thresholds: 1024 tiles on base/Max, 2048 on Pro/Ultra
    ("m3-max", mm(512, 1024, 4096, dtype="f32"), "gemm bm=64 bn=64 bk=16 wm=2 wn=2 swizzle=0 epilogue=fused"),
    ("m2-pro", mm(512, 1024, 4096, dtype="f32"), "splitk bm=32 bn=32 bk=16 wm=2 wn=2 parts=2"),
    ("m1", mm(64, 64, 512, dtype="f32", batch=2), "gemm bm=64 bn=64 bk=16 wm=2 wn=2 swizzle=0 epilogue=fused"),
]


@pytest.mark.parametrize("chip,features,expected", MATMUL)
def test_seed_matmul_matches_mlx(chip, features, expected):
    assert chosen(chip, "matmul", features) == expected


def at(q_len, kv_len, heads=32, kv_heads=8, head_dim=128, mask="none"):
    return attention_features(batch=1, heads=heads, kv_heads=kv_heads, q_len=q_len, kv_len=kv_len,
                              head_dim=head_dim, dtype="f16", mask=mask)


ATTENTION = [
    ("m1", at(1, 8192), "decode_split blocks=64 pack_gqa=yes scale_at=q"),
    ("m1", at(1, 8192, heads=8), "decode simdgroups=32 pack_gqa=no scale_at=q"),
    ("m1", at(1, 2048), "decode simdgroups=32 pack_gqa=no scale_at=q"),
    ("m1", at(1, 8192, heads=16, kv_heads=8), "decode_split blocks=32 pack_gqa=yes scale_at=q"),
    ("m2-pro", at(1, 2048, heads=8), "decode_split blocks=64 pack_gqa=yes scale_at=q"),
    ("m2-pro", at(1, 8192), "decode_split blocks=64 pack_gqa=yes scale_at=q"),
    ("m2-pro", at(1, 8192, heads=64), "decode_split blocks=128 pack_gqa=yes scale_at=q"),
    ("m2-pro", at(1, 40000, heads=64), "decode_split blocks=512 pack_gqa=yes scale_at=q"),
    ("m2-ultra", at(1, 8192), "decode_split blocks=128 pack_gqa=yes scale_at=q"),
    ("m2-ultra", at(1, 16384, heads=16), "decode_split blocks=256 pack_gqa=yes scale_at=q"),
    ("m2-ultra", at(1, 70000, heads=64), "decode_split blocks=1024 pack_gqa=yes scale_at=q"),
    ("m3-max", at(1, 2048, heads=8), "decode simdgroups=32 pack_gqa=no scale_at=q"),
    # the vector kernels' limits: MLX runs its unfused path
    ("m1", at(8, 8192, heads=64), "mlx"),
    ("m1", at(1, 4096, head_dim=80), "mlx"),
    ("m1", at(4, 2, heads=8), "mlx"),
    # prefill
    ("m1", at(1024, 1024, mask="causal"), "flash bq=32 bk=16 wm=4 wn=1 skip_masked_blocks=yes scale_at=q"),
    ("m2-ultra", at(1024, 1024, head_dim=64), "flash bq=32 bk=32 wm=4 wn=1 skip_masked_blocks=yes scale_at=q"),
    ("m1", at(1024, 1024, head_dim=256), "mlx"),
    ("m1", at(2048, 1024, mask="causal"), "mlx"),
]


@pytest.mark.parametrize("chip,features,expected", ATTENTION)
def test_seed_attention_matches_mlx(chip, features, expected):
    assert chosen(chip, "attention", features) == expected


def test_every_apple_chip_has_a_file_and_only_unknown_ones_get_the_generic_rules():
    for arch, name in [("applegpu_g13g", "Apple M1"), ("applegpu_g16s", "Apple M4 Pro"),
                       ("applegpu_g15c", "Apple M3 Max"), ("applegpu_g14d", "Apple M2 Ultra"),
                       ("applegpu_g17g", "Apple M5"), ("applegpu_g17s", "Apple M5 Pro")]:
        source = heuristics.find_source("metal", apple_from_device_info(arch, name))
        assert source.origin == "shipped"
    unknown = apple_from_device_info("applegpu_g99g", "Apple M9")
    assert heuristics.find_source("metal", unknown).origin == "generic"


# ---- what an untuned Mac runs: MLX's own op, on every Apple chip class -----------------

#: every Apple chip id the fact tables know (M1-M5, each variant), generation-17 (NAX) ones
#: included, a phone-class GPU and an unrecognised generation
EVERY_APPLE_CHIP = ([chips.from_id(f"apple-{m}" + (f"-{v}" if v else ""))
                     for m in chips.APPLE_GENERATIONS.values() for v in ("", "pro", "max", "ultra")]
                    + [apple_from_device_info("applegpu_g16p", "Apple M4"),
                       apple_from_device_info("applegpu_g18s", "Apple M6 Pro"),
                       apple_from_device_info("applegpu_g99g", "Apple M9")])

SPREAD = ([("matmul", f) for _, f, _ in MATMUL]
          + [("matmul", mm(M, N, K, dtype=d, tb=tb, batch=b)) for M, N, K, d, tb, b in [
              (1, 1, 1, "f32", False, 1), (7, 13, 5, "bf16", True, 3), (8192, 8192, 8192, "bf16", True, 1),
              (3, 5, 65536, "f16", False, 1), (4096, 1, 4096, "f32", True, 1)]]
          + [("attention", f) for _, f, _ in ATTENTION]
          + [("attention", attention_features(batch=2, heads=16, kv_heads=16, q_len=q, kv_len=k, head_dim=d,
                                              dtype=dt, mask=mask, softcap=sc, window=w))
             for q, k, d, dt, mask, sc, w in [(1, 1, 64, "f32", "none", 0.0, 0), (4096, 4096, 128, "bf16", "causal", 0.0, 0),
                                             (64, 32, 64, "f16", "none", 0.0, 16), (1, 32768, 256, "bf16", "none", 30.0, 0),
                                             (300, 300, 80, "f16", "causal", 0.0, 128)]])


@pytest.mark.parametrize("chip", EVERY_APPLE_CHIP, ids=lambda c: f"{c.id}:{c.isa[0]}")
def test_every_apple_chip_runs_mlx_until_a_rule_is_measured(chip):
    """kernelevo's Metal kernels have never been timed on an Apple GPU: the shipped files
    send every call to MLX's own op, so an untuned Mac is never slower than stock MLX."""
    for op, features in SPREAD:
        assert shipped(chip, op, features) == "mlx", (chip.id, op, features)


@pytest.mark.parametrize("path", sorted(shipped_heuristics_dir().glob("apple-*.kevo")), ids=lambda p: p.name)
def test_shipped_apple_files_route_everything_to_mlx_and_say_where_the_seeds_are(path):
    program = parse(path.read_text(), str(path))
    for section in program.sections:
        assert [rule.config.family for rule in section.rules] == ["mlx"], (path.name, section.op)
    assert "seeds/" in path.read_text() and "MLX" in path.read_text()


SEED_FILES = sorted((shipped_heuristics_dir() / "seeds").glob("*.kevo"))


def test_there_is_a_seed_for_every_shipped_apple_class():
    names = {p.name for p in SEED_FILES}
    assert names == {"apple-base.kevo", "apple-pro.kevo", "apple-max.kevo", "apple-ultra.kevo"}


@pytest.mark.parametrize("path", SEED_FILES, ids=lambda p: p.name)
def test_seed_files_check_clean_and_are_canonical(path):
    text = path.read_text()
    program = parse(text, str(path))
    assert program.target == "metal"
    assert check(program, text, str(path)) == []
    assert format_program(program) == text


@pytest.mark.parametrize("arch,name,seed", [
    ("applegpu_g13g", "Apple M1", "apple-base.kevo"), ("applegpu_g14s", "Apple M2 Pro", "apple-pro.kevo"),
    ("applegpu_g15c", "Apple M3 Max", "apple-max.kevo"), ("applegpu_g14d", "Apple M2 Ultra", "apple-ultra.kevo"),
    ("applegpu_g17g", "Apple M5", "apple-base.kevo"), ("applegpu_g17s", "Apple M5 Pro", "apple-pro.kevo"),
])
def test_seed_program_is_the_mlx_restating_seed_on_a_mac(arch, name, seed):
    chip = apple_from_device_info(arch, name)
    source = heuristics.seed_source("metal", chip)
    assert source.origin == "seed" and source.path.name == seed and source.path.parent.name == "seeds"
    program = heuristics.seed_program("metal", chip)
    assert program.path == str(source.path)
    # ... and it chooses kernelevo kernels where the shipped program chooses MLX's op
    features = mm(2048, 2048, 2048, dtype="bf16", tb=True)
    assert program.select("matmul", features).config.family == "gemm"
    assert shipped(chip, "matmul", features) == "mlx"


def test_seed_program_elsewhere_is_the_shipped_program():
    for backend, chip in [("cpu", chips.detect("cpu")), ("cuda", chips.from_id("nvidia-h100"))]:
        source = heuristics.seed_source(backend, chip)
        assert source == heuristics.find_source(backend, chip, include_tuned=False)
        assert source.origin in ("shipped", "generic")
        assert heuristics.seed_program(backend, chip).path == str(source.path)


# ---- generation 17 (M5): MLX's NAX kernels ----------------------------------------------

@pytest.mark.parametrize("arch,name", [("applegpu_g17g", "Apple M5"), ("applegpu_g17s", "Apple M5 Pro"),
                                       ("applegpu_g17c", "Apple M5 Max"), ("applegpu_g17d", "Apple M5 Ultra")])
def test_a_generation_17_chip_is_its_own_class_and_runs_mlx(arch, name):
    chip = apple_from_device_info(arch, name)
    assert chip.id.startswith("apple-m5") and chip.has_nax == 1 and chip.known
    source = heuristics.find_source("metal", chip)
    assert source.origin == "shipped" and source.path.name == "apple-nax.kevo"
    assert shipped(chip, "matmul", mm(4096, 4096, 4096, dtype="bf16", tb=True)) == "mlx"
    assert shipped(chip, "matmul", mm(1, 4096, 4096, tb=True)) == "mlx"
    assert shipped(chip, "attention", at(2048, 2048, mask="causal")) == "mlx"
    assert shipped(chip, "attention", at(1, 8192)) == "mlx"


# ---- tune and evolve start from the seed, measured against the shipped program ----------

def _pretend_mac(monkeypatch, chip):
    real = chips.detect
    monkeypatch.setattr(chips, "detect", lambda backend="cpu": chip if backend == "metal" else real(backend))


def test_tune_search_starts_from_the_seed_choice_against_the_shipped_baseline(monkeypatch):
    from kernelevo.paths import database_path
    from kernelevo.tune import runner
    from kernelevo.tune.db import Database
    from kernelevo.tune.workloads import AttentionShape, MatmulShape

    chip = CHIPS["m3"]
    _pretend_mac(monkeypatch, chip)
    given = []

    class Recorder:
        def __init__(self, name, space, seed, exclude, seeds=()):
            given.append((space.op, exclude, seeds))

        def ask(self, n):
            return []

    monkeypatch.setattr(runner, "make_strategy", Recorder)
    shapes = [MatmulShape(2048, 2048, 2048, "bf16"), MatmulShape(4, 4096, 4096, "f16"),
              AttentionShape(1, 32, 8, 1, 8192, 128, "f16")]
    seed = heuristics.seed_program("metal", chip)
    with Database(database_path()) as db:
        tuner = runner.Tuner("metal", db, runner.TuneSettings(candidates=4, confirm=0))
        assert tuner.shipped.path == str(heuristics.find_source("metal", chip, include_tuned=False).path)
        tuner.measurer.control = lambda shape: SimpleNamespace(ok=True)
        for shape in shapes:
            result = tuner._tune_shape(shape)
            assert result.shipped.to_dsl() == "mlx"  # the baseline stays MLX's own op
    assert len(given) == len(shapes)
    for shape, (op, exclude, seeds) in zip(shapes, given):
        expected = seed.select(shape.op, shape.features()).config
        assert op == shape.op and {c.to_dsl() for c in exclude} == {"mlx"}
        assert seeds == (expected,) and expected.family in ("gemm", "gemv_wide", "decode_split")


def test_a_seed_choice_the_search_cannot_use_is_not_passed(monkeypatch):
    """Where the seed too chooses MLX's op (attention MLX's vector kernels cannot serve), the
    search gets no seed (the mlx family has no parameters to search)."""
    from kernelevo.paths import database_path
    from kernelevo.tune import runner
    from kernelevo.tune.db import Database
    from kernelevo.tune.workloads import AttentionShape

    _pretend_mac(monkeypatch, CHIPS["m1"])
    shape = AttentionShape(1, 8, 8, 1, 4096, 80, "f16")
    with Database(database_path()) as db:
        tuner = runner.Tuner("metal", db)
        shipped_config = tuner.measurer.shipped_config(shape)
        assert tuner.seed.select("attention", shape.features()).config.to_dsl() == "mlx"
        assert tuner._seed_configs(shape, shipped_config) == ()


def test_evolve_population_starts_from_the_seed_on_a_mac(monkeypatch):
    from kernelevo.evolve.loop import Evolution
    from kernelevo.paths import database_path
    from kernelevo.tune.db import Database
    from kernelevo.tune.workloads import MatmulShape, Workload

    chip = CHIPS["m2-pro"]
    _pretend_mac(monkeypatch, chip)
    shipped_path = heuristics.find_source("metal", chip, include_tuned=False).path
    workload = Workload("t", "test", (MatmulShape(64, 64, 64, "f16"),))
    with Database(database_path()) as db:
        evo = Evolution("metal", db, workload, [(shipped_path.name, shipped_path.read_text())])
    texts = [t for _, t in evo.seeds]
    assert texts[0] == shipped_path.read_text()
    assert (shipped_heuristics_dir() / "seeds" / "apple-pro.kevo").read_text() in texts
    assert evo.measurer.shipped.path == str(shipped_path)  # scores stay over the shipped program
