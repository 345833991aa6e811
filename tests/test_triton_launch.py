"""The Python side of the Triton launches, checked on CPU tensors without launching anything:
grid sizes, segment buckets, autotune keys and configs, dtype handling, argument lists and the
decode/prefill switch. A GPU run must not be the first to meet a mistake here."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from deltaserve.kernels import ops, triton_sign
from deltaserve.kernels.triton_aot import kernel_configs
from deltaserve.kernels.triton_registry import ACT, KERNELS
from test_kernels_cases import make_case

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
KERNEL_FNS = {"decode": triton_sign._decode_kernel, "prefill": triton_sign._prefill_kernel}
CONFIGS = {"decode": triton_sign.DECODE_CONFIGS, "prefill": triton_sign.PREFILL_CONFIGS}


@pytest.mark.parametrize(("lengths", "want"), [
    ((), None), ((0, 0), None), ((1,) * 16, "decode"), ((1, 0, 1), "decode"), ((2,), "prefill"),
    ((8, 0, 1), "prefill"), ((1, 0, 20), "prefill"), ((ops.DECODE_MAX_TOKENS,), "decode"),
    ((ops.DECODE_MAX_TOKENS + 1,), "prefill"),
])
def test_decode_prefill_switch(lengths, want):
    assert ops.triton_kernel_for(lengths) == want


@pytest.mark.parametrize(("count", "want"), [(1, 1), (2, 2), (3, 4), (16, 16), (17, 32), (1000, 1024)])
def test_bucket_is_the_next_power_of_two(count, want):
    assert triton_sign.bucket(count) == want


@pytest.mark.parametrize("n", [1, 5, 16, 515, 4096, 14336])
@pytest.mark.parametrize("segments", [1, 7, 64])
def test_grids_cover_every_output_exactly_once(n, segments):
    for cfg in triton_sign.DECODE_CONFIGS:
        bn = cfg.kwargs["BLOCK_N"]
        g, tiles = triton_sign.decode_grid(segments, n, bn)
        assert g == segments and (tiles - 1) * bn < n <= tiles * bn
    for max_len in (1, 9, 64, 130):
        for cfg in triton_sign.PREFILL_CONFIGS:
            bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
            g, m_tiles, n_tiles = triton_sign.prefill_grid(segments, max_len, n, bm, bn)
            assert g == segments
            assert (m_tiles - 1) * bm < max_len <= m_tiles * bm
            assert (n_tiles - 1) * bn < n <= n_tiles * bn


def test_dot_precision_per_dtype():
    assert triton_sign.dot_precision(torch.float32) == "ieee"  # fp32 inputs must not round to TF32
    assert triton_sign.dot_precision(torch.bfloat16) == triton_sign.dot_precision(torch.float16) == "tf32"


@pytest.mark.parametrize("name", ["decode", "prefill"])
def test_autotune_keys_and_configs_name_kernel_arguments(name):
    fn, configs = KERNEL_FNS[name], CONFIGS[name]
    args = set(fn.arg_names)
    constexprs = {fn.arg_names[p.num] for p in fn.params if p.is_constexpr}
    assert set(triton_sign.AUTOTUNE_KEYS[name]) <= args - constexprs  # keys are runtime shape arguments
    block_args = {a for a in constexprs if a.startswith("BLOCK_")}
    for cfg in configs:
        assert set(cfg.kwargs) == block_args, cfg  # every config sets every tile size, nothing else
        assert all(v > 0 and v & (v - 1) == 0 for v in cfg.kwargs.values()), cfg  # tl.arange needs 2^k
        assert cfg.num_warps in (1, 2, 4, 8, 16)


def test_registry_matches_the_kernels():
    for spec in KERNELS:
        module = __import__(spec.module, fromlist=[spec.function])
        fn = getattr(module, spec.function)
        for dtype in ("bfloat16", "float16", "float32"):
            for cfg in kernel_configs(spec):
                named = [n for n, _ in spec.arg_types] + list(cfg.kwargs) + list(spec.dtype_constexprs(dtype))
                assert sorted(named) == sorted(fn.arg_names), spec.name
        pointers = [n for n, t in spec.arg_types if t.startswith("*")]
        assert all(n.endswith("_ptr") for n in pointers)
        # activations in x and y; the LUT kernel reads fp32 tables built from x instead of x
        act = {"x_ptr", "y_ptr"} if "x_ptr" in fn.arg_names else {"y_ptr"}
        assert {n for n, t in spec.arg_types if t == ACT} == act


class _Recorder:
    """Stands in for a jit/autotuned kernel: `kernel[grid](*args, **kw)` records instead of launching."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kw: self.calls.append((grid, args, kw))


def _launch(monkeypatch, fn, case, config):
    rec = _Recorder()
    pinned = {} if config is None else config.all_kwargs()
    monkeypatch.setattr(triton_sign, "_launcher", lambda name, cfg: (rec, pinned))
    y = case.y.clone()
    out = fn(case.x, y, case.packed, case.scales, case.segments, config=config)
    assert out is y
    return rec.calls


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lengths", [[1] * 16, [1, 0, 3, 2, 8], [64, 0, 17, 130, 1]])
def test_launch_arguments_on_cpu_tensors(monkeypatch, dtype, lengths):
    case = make_case(k=1000, n=515, lengths=lengths, slots=6, dtype=dtype, seed=3)
    segs = case.segments
    for name, fn in (("decode", triton_sign.sign_delta_decode), ("prefill", triton_sign.sign_delta_prefill)):
        kernel = KERNEL_FNS[name]
        for config in (None, *CONFIGS[name]):
            calls = _launch(monkeypatch, fn, case, config)
            assert len(calls) == 1
            grid, args, kw = calls[0]
            bound = dict(zip(kernel.arg_names, args, strict=False)) | kw
            meta = config.all_kwargs() if config is not None else CONFIGS[name][0].all_kwargs()
            assert set(bound) | set(meta) >= set(kernel.arg_names)
            assert bound["x_ptr"] is case.x and bound["y_ptr"].dtype == dtype
            assert bound["packed_ptr"].dtype == torch.int32 and bound["packed_ptr"].is_contiguous()
            assert bound["scales_ptr"].dtype == torch.float32
            assert bound["starts_ptr"] is segs.starts and bound["alphas_ptr"] is segs.alphas
            for a in kernel.arg_names:
                if isinstance(bound.get(a), int):
                    assert 0 <= bound[a] < 2**31, a  # i32 arguments
            assert bound["N"] == 515 and bound["K"] == 1000
            assert bound["stride_xt"] == case.x.stride(0) and bound["stride_ps"] == case.packed.stride(0)
            g = len(segs)
            max_len = max(lengths)
            if name == "decode":
                assert bound["KW"] == 32 and bound["G_BUCKET"] == triton_sign.bucket(g)
                assert grid(meta) == triton_sign.decode_grid(g, 515, meta["BLOCK_N"])
            else:
                assert bound["M_BUCKET"] == triton_sign.bucket(max_len)
                assert bound["DOT_PRECISION"] == triton_sign.dot_precision(dtype)
                want = triton_sign.prefill_grid(g, max_len, 515, meta["BLOCK_M"], meta["BLOCK_N"])
                assert grid(meta) == want
            if config is not None:
                assert {k: kw[k] for k in config.kwargs} == config.kwargs


def test_no_launch_for_empty_segments(monkeypatch):
    case = make_case(k=64, n=16, lengths=[0, 0], slots=2)
    assert _launch(monkeypatch, triton_sign.sign_delta_prefill, case, None) == []
    case = make_case(k=64, n=16, lengths=[], slots=2)
    assert _launch(monkeypatch, triton_sign.sign_delta_decode, case, None) == []


@pytest.mark.parametrize(("lengths", "want"), [
    ([1] * 16, {"decode": [1] * 16}),
    ([1, 0, 1], {"decode": [1, 0, 1]}),
    ([64, 0, 17, 130, 2], {"prefill": [64, 0, 17, 130, 2]}),
    ([64, 0, 1, 17, 130, 8, 1], {"decode": [1, 1], "prefill": [64, 17, 130, 8]}),  # decode beside prefill
    ([0, 0], {}),
])
def test_dispatch_sends_each_segment_to_its_kernel(monkeypatch, lengths, want):
    called = {}

    def record(name):
        def fn(x, y, packed, scales, segments):
            assert name not in called
            called[name] = list(segments.lengths_list)
            assert segments.lengths.tolist() == called[name]  # device arrays match the host lists
            return y
        return fn

    monkeypatch.setattr(triton_sign, "sign_delta_decode", record("decode"))
    monkeypatch.setattr(triton_sign, "sign_delta_prefill", record("prefill"))
    case = make_case(k=64, n=16, lengths=lengths, slots=3, dtype=torch.bfloat16)
    assert ops._triton(case.x, case.y, case.packed, case.scales, case.segments) is case.y
    assert called == want


def test_segments_split_keeps_order_and_metadata():
    from deltaserve.kernels.segments import Segments

    segs = Segments.build([0, 5, 5, 45, 46], [5, 0, 40, 1, 9], [2, 0, 1, 3, 2], [1.0, 0.5, -1.0, 2.0, 0.25])
    short, long = segs.split(8)
    assert (short.starts_list, short.lengths_list, short.slots_list, short.alphas_list) == (
        (0, 45), (5, 1), (2, 3), (1.0, 2.0))
    assert (long.starts_list, long.lengths_list, long.slots_list, long.alphas_list) == (
        (5, 46), (40, 9), (1, 2), (-1.0, 0.25))
    for part in (short, long):
        for name in ("starts", "lengths", "slots", "alphas"):
            assert getattr(part, name).tolist() == list(getattr(part, f"{name}_list"))
        assert part.starts.dtype == torch.int32 and part.alphas.dtype == torch.float32
    assert segs.split(8) is segs.split(8)  # split once per step, however many layers ask



def test_mismatched_devices_and_strides_are_refused_before_launch(monkeypatch):
    case = make_case(k=64, n=16, lengths=[2], slots=1)
    strided = type(case)(case.x.t().contiguous().t(), case.y, case.packed, case.scales, case.segments)
    with pytest.raises(ValueError, match="unit column stride"):
        _launch(monkeypatch, triton_sign.sign_delta_decode, strided, None)


def test_autotuner_times_configs_with_the_short_benchmark():
    """Off the interpreter the autotuned kernels time each config with 5 / 20 ms (not Triton's
    25 / 100 ms), so a step meeting a new shape key stalls less."""
    import os

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("under the interpreter the autotuner keeps the first config")
    from deltaserve.kernels import triton_decode

    triton_sign._tuned.cache_clear()
    triton_decode._tuned.cache_clear()
    try:
        kernels = [triton_sign._tuned("decode"), triton_sign._tuned("prefill"), triton_decode._tuned("lut")]
        for tuned in kernels:
            assert tuned.do_bench.keywords == {"warmup": 5, "rep": 20}
    finally:
        triton_sign._tuned.cache_clear()
        triton_decode._tuned.cache_clear()
