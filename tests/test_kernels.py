"""trainlib.kernels against the pure-torch reference: the compiled CPU kernel and the Triton kernels
(run by Triton's interpreter on CPU here, on the GPU where there is one).

Equality is bitwise (on the bit patterns, so -0.0 and NaN payloads count) for every dtype pair:
the kernels compute cast(float32(x) * float32(scale)) with round-to-nearest-even, like torch.
The norm is a reduction, so it is compared within fp32 rounding.
"""
from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import trainlib.kernels as K
from trainlib.kernels import cpu, reference as R

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
CASTS = [(F32, F32), (F32, BF16), (F32, F16), (BF16, F32), (F16, F32), (BF16, BF16), (F16, BF16)]
SCALES = [1.0, 0.5, 1 / 3]
# numpy, which runs Triton's interpreter, warns on the overflow and NaN arithmetic these tests do on purpose
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton")
INT_VIEW = {F32: torch.int32, F16: torch.int16, BF16: torch.int16, torch.float64: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(INT_VIEW[t.dtype])


def assert_bitwise(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    diff = (bits(a) != bits(b)).reshape(-1).nonzero().flatten()
    if diff.numel():
        i = int(diff[0])
        raise AssertionError(f"{diff.numel()} elements differ, first at flat index {i}: "
                             f"{a.reshape(-1)[i].item()} vs {b.reshape(-1)[i].item()}")


def make_tensors(dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    """Odd sizes, an empty tensor, a 0-d tensor and a transposed (non-contiguous) one."""
    g = torch.Generator().manual_seed(seed)
    ts = [torch.randn(n, generator=g) * 10 for n in (5, 0, 1000, 4097, 3)]
    ts += [torch.randn((), generator=g), torch.randn(30, 41, generator=g).t(), torch.randn(2, 3, 7, generator=g)]
    return [t.to(dtype) for t in ts]


# Triton's interpreter must be switched on before `triton` is first imported (its own library
# functions are decorated at import), so the "triton" cases run in a child pytest started with
# TRITON_INTERPRET=1 (test_triton_backend_under_the_interpreter); this process never sets it.
TRITON_CHILD = os.environ.get("TRAINLIB_TEST_TRITON_CHILD") == "1"


@pytest.fixture(params=["cpu", "triton"])
def backend(request, monkeypatch):
    if request.param == "triton":
        if not TRITON_CHILD:
            pytest.skip("run by test_triton_backend_under_the_interpreter in a child process")
        pytest.importorskip("numpy")
        pytest.importorskip("triton")
    elif not cpu.available():
        pytest.skip("the CPU kernels could not be built here (no compiler?)")
    monkeypatch.setenv("TRAINLIB_KERNELS", request.param)
    assert K.backend_for(torch.zeros(1)) == request.param
    return request.param


def test_triton_backend_under_the_interpreter():
    """Every backend-parametrised test below, for "triton", in a child with TRITON_INTERPRET=1."""
    if TRITON_CHILD:
        pytest.skip("this is the child")
    for mod in ("numpy", "triton"):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"{mod} is not installed (pip install 'trainlib[test]')")
    env = {**os.environ, "TRITON_INTERPRET": "1", "TRAINLIB_TEST_TRITON_CHILD": "1", "TRAINLIB_KERNELS": ""}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__,
                           "-k", "triton and not gpu and not under_the_interpreter"],
                          env=env, capture_output=True, text=True, timeout=240)
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, tail
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed and int(passed.group(1)) >= 20 and "skipped" not in proc.stdout, tail


@pytest.mark.parametrize("src_dtype,flat_dtype", CASTS)
def test_pack_unpack_match_reference_bitwise(backend, src_dtype, flat_dtype):
    ts = make_tensors(src_dtype)
    total = sum(t.numel() for t in ts)
    # the interpreter is slow: scale 0.5 (an exponent shift) adds little to 1/3 there
    for scale in SCALES if backend == "cpu" else [1.0, 1 / 3]:
        out, ref = torch.empty(total, dtype=flat_dtype), torch.empty(total, dtype=flat_dtype)
        assert K.pack(ts, out, scale) is out
        assert_bitwise(out, R.pack(ts, ref, scale))
        # unpack into fresh tensors shaped like the inputs, the transposed one included
        outs = [torch.full_like(t.t() if t.dim() == 2 else t, float("nan")) for t in ts]
        outs = [o.t() if o.dim() == 2 else o for o in outs]
        refs = [torch.empty_like(t) for t in ts]
        K.unpack(ref, outs, scale)
        R.unpack(ref, refs, scale)
        for o, r in zip(outs, refs):
            assert_bitwise(o, r)


def test_pack_then_unpack_round_trips(backend):
    ts = make_tensors(F32, seed=1)
    flat = torch.empty(sum(t.numel() for t in ts), dtype=F32)
    K.pack(ts, flat, 0.5)
    outs = [torch.empty_like(t) for t in ts]
    K.unpack(flat, outs, 2.0)  # 0.5 and 2.0 are exact in binary: the round trip is exact
    for o, t in zip(outs, ts):
        assert_bitwise(o, t)


@pytest.mark.parametrize("src_dtype,dst_dtype", CASTS)
def test_scale_cast_matches_reference(backend, src_dtype, dst_dtype):
    src = (torch.randn(9001, generator=torch.Generator().manual_seed(2)) * 100).to(src_dtype)
    for scale in SCALES:
        dst = torch.empty(9001, dtype=dst_dtype)
        assert K.scale_cast(src, dst, scale) is dst
        assert_bitwise(dst, R.scale_cast(src, torch.empty_like(dst), scale))
    if src_dtype == dst_dtype:  # in place: dst is src, or another view of the same memory
        x = src.clone()
        K.scale_cast(x, x, 1 / 3)
        assert_bitwise(x, R.scale_cast(src, torch.empty_like(src), 1 / 3))
        y = src[:9000].clone()
        K.scale_cast(y, y.view(90, 100), 0.5)
        assert_bitwise(y, R.scale_cast(src[:9000], torch.empty(9000, dtype=src_dtype), 0.5))


def special_values() -> torch.Tensor:
    """Around every rounding edge of bf16/fp16: subnormals, overflow, ties, signed zeros, inf/nan."""
    f16_max, f16_tiny = 65504.0, 2.0 ** -24
    vals = [0.0, -0.0, 1.0, -1.0, f16_max, 65519.0, 65520.0, -65520.0, 1e5, f16_tiny, f16_tiny / 2, f16_tiny * 0.75,
            6.1e-5, 6.097e-5, 3e-8, 1e-45, -1e-45, 1.17549435e-38, 3.4028235e38, -3.4028235e38, 1 + 2 ** -8,
            1 + 2 ** -9, 1 + 3 * 2 ** -9, 1 + 2 ** -11, 1 + 3 * 2 ** -11, float("inf"), float("-inf")]
    g = torch.Generator().manual_seed(3)
    spread = torch.randn(4000, generator=g) * torch.pow(2.0, torch.randint(-30, 30, (4000,), generator=g).float())
    return torch.cat([torch.tensor(vals, dtype=F32), spread])


@pytest.mark.parametrize("dst_dtype", [BF16, F16])
def test_downcast_rounding_edges(backend, dst_dtype):
    x = special_values()
    got = K.scale_cast(x, torch.empty(x.numel(), dtype=dst_dtype))
    assert_bitwise(got, x.to(dst_dtype))


def test_every_half_and_bf16_bit_pattern_upcasts_exactly(backend):
    pattern = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    for dtype in (F16, BF16):
        src = pattern.view(dtype)
        got = K.scale_cast(src, torch.empty(src.numel(), dtype=F32))
        ref = src.float()
        nan = ref.isnan()
        assert torch.equal(got.isnan(), nan)
        assert_bitwise(got[~nan], ref[~nan])


def test_nan_stays_nan(backend):
    x = torch.tensor([float("nan"), 1.0, -float("nan")])
    for dtype in (F32, F16, BF16):
        out = K.pack([x], torch.empty(3, dtype=dtype), 0.5)
        assert out.isnan().tolist() == [True, False, True]


@pytest.mark.parametrize("dtype", [F32, BF16, F16])
def test_epilogue_flags_nonfinite_anywhere(backend, dtype):
    n = 140_001 if backend == "cpu" else 5_001  # the CPU size spans three 64K-element chunks
    x = (torch.randn(n, generator=torch.Generator().manual_seed(4))).to(dtype)
    bad, sq = K.epilogue(x)
    ref_bad, ref_sq = R.epilogue(x)
    assert bad.dtype == torch.bool and bad.dim() == 0 and sq.dtype == F32 and sq.dim() == 0
    assert not bad and not ref_bad
    torch.testing.assert_close(sq, ref_sq, rtol=2e-5, atol=0)
    for pos in (0, 4095, 4096, n - 1) if backend == "triton" else (0, 1, 65535, 65536, n // 2, n - 1):
        for v in (float("inf"), float("-inf"), float("nan")):
            y = x.clone()
            y[pos] = v
            bad, sq = K.epilogue(y)
            assert bool(bad), f"{v} at {pos} of {n} not flagged"
            assert not torch.isfinite(sq)


@pytest.mark.parametrize("dtype", [F32, BF16, F16, torch.float64])
def test_epilogue_huge_finite_values_are_not_nonfinite(backend, dtype):
    # every dtype the kernels take (float64 through the reference), at its largest finite values:
    # squares overflow the fp32 sum for fp32/bf16 (not for fp16), yet no element is inf/nan, so the
    # flag must say "finite" -- an overflowed sum must not stand in for the per-element scan
    big = torch.finfo(dtype).max
    x = torch.tensor([big, -big, min(3e30, big)], dtype=torch.float64).repeat(1667).to(dtype)  # 5001 elements
    assert torch.isfinite(x).all()
    # the norm's definition: sum(float32(x)^2), an fp32 result (inf once it exceeds fp32's range)
    want = (x.float().double() ** 2).sum().item()
    for impl in (K, R):
        bad, sq = impl.epilogue(x)
        assert not bool(bad), (impl.__name__, dtype)
        if want > torch.finfo(F32).max:
            assert torch.isinf(sq), (impl.__name__, dtype, sq)
        else:
            torch.testing.assert_close(sq, torch.tensor(want, dtype=F32), rtol=2e-5, atol=0)


@pytest.mark.parametrize("src_dtype,dst_dtype", CASTS)
def test_unscale_epilogue_matches_reference(backend, src_dtype, dst_dtype):
    """The mixed-precision epilogue: dst bit for bit as the reference's cast, the flag, and a norm
    that is exactly the one epilogue(dst) computes on the same backend (same partial sums)."""
    n = 9001 if backend == "cpu" else 5001
    src = (torch.randn(n, generator=torch.Generator().manual_seed(6)) * 100).to(src_dtype)
    for scale in (SCALES + [2.0 ** -16]) if backend == "cpu" else [1 / 3]:
        dst, ref = torch.empty(n, dtype=dst_dtype), torch.empty(n, dtype=dst_dtype)
        bad, sq = K.unscale_epilogue(src, dst, scale)
        ref_bad, ref_sq = R.unscale_epilogue(src, ref, scale)
        assert_bitwise(dst, ref)
        assert bad.dtype == torch.bool and bad.dim() == 0 and sq.dtype == F32 and sq.dim() == 0
        assert not bad and not ref_bad
        torch.testing.assert_close(sq, ref_sq, rtol=2e-5, atol=0)
        assert sq.item() == K.epilogue(dst)[1].item()
    if src_dtype == dst_dtype:  # in place: the unscale of a bucket into itself
        x = src.clone()
        bad, sq = K.unscale_epilogue(x, x, 1 / 3)
        assert_bitwise(x, R.scale_cast(src, torch.empty_like(src), 1 / 3))
        assert not bad and sq.item() == K.epilogue(x)[1].item()


def test_unscale_epilogue_flags_what_the_cast_writes(backend):
    """inf/nan anywhere in src, and a finite value that overflows the cast (fp16), are flagged;
    a value beyond fp16's range that fits the fp32 master gradient is not."""
    n = 10_001 if backend == "triton" else 140_001  # CPU: three 64K-element chunks
    x = torch.randn(n, generator=torch.Generator().manual_seed(7))
    for pos in (0, 4096, n - 1) if backend == "triton" else (0, 65536, n - 1):
        for v in (float("inf"), float("-inf"), float("nan")):
            y = x.clone()
            y[pos] = v
            bad, sq = K.unscale_epilogue(y, torch.empty(n, dtype=BF16), 0.5)
            assert bool(bad), f"{v} at {pos} of {n} not flagged"
            assert not torch.isfinite(sq)
    y = x.clone()
    y[n // 2] = 40_000.0  # finite in fp32; times 2 overflows fp16 (max 65504) to inf
    dst = torch.empty(n, dtype=F16)
    bad, sq = K.unscale_epilogue(y, dst, 2.0)
    assert bool(bad) and torch.isinf(dst[n // 2]) and bool(R.unscale_epilogue(y, torch.empty_like(dst), 2.0)[0])
    big = x.half()
    big[n // 2] = 60_000.0
    bad, sq = K.unscale_epilogue(big, torch.empty(n, dtype=F32), 2.0)  # 120000 fits fp32
    assert not bad
    torch.testing.assert_close(sq, R.unscale_epilogue(big, torch.empty(n), 2.0)[1], rtol=2e-5, atol=0)


def test_cast_on_pack_into_mixed_precision_buckets(backend):
    """bf16 and fp16 gradients (one call, mixed) into an fp32 bucket are exact upcasts times the
    scale; fp32 gradients into a bf16 bucket round to nearest even at every edge; and back."""
    g = torch.Generator().manual_seed(8)
    grads = [(torch.randn(n, generator=g) * 10).to(d) for n, d in ((1000, BF16), (4097, F16), (3, BF16), (0, F16))]
    grads.append((torch.randn(17, 9, generator=g)).to(BF16).t())  # non-contiguous
    total = sum(t.numel() for t in grads)
    bucket = K.pack(grads, torch.empty(total, dtype=F32), 0.5)
    # bf16/fp16 -> fp32 is exact and * 0.5 is an exponent shift: the bucket is the formula, bit for bit
    assert_bitwise(bucket, torch.cat([t.float().reshape(-1) * 0.5 for t in grads]))
    assert_bitwise(bucket, R.pack(grads, torch.empty(total, dtype=F32), 0.5))
    x = special_values()
    parts = [x[:7], x[7:4000], x[4000:]]
    low = K.pack(parts, torch.empty(x.numel(), dtype=BF16), 1 / 3)
    assert_bitwise(low, (x * (1 / 3)).to(BF16))
    back = [torch.empty(p.numel(), dtype=BF16) for p in parts]  # fp32 bucket -> bf16 param grads
    K.unpack(x, back, 1 / 3)
    assert_bitwise(torch.cat(back), (x * (1 / 3)).to(BF16))


def test_epilogue_of_a_2d_and_a_noncontiguous_tensor(backend):
    x = torch.randn(64, 33).t()
    bad, sq = K.epilogue(x)
    torch.testing.assert_close(sq, R.epilogue(x)[1], rtol=2e-5, atol=0)
    assert not bad
    # unscale_epilogue from a transposed src into a flat dst, and into a transposed dst
    for dst in (torch.empty(x.numel(), dtype=BF16), torch.empty(64, 33, dtype=BF16).t()):
        ref = torch.empty_like(dst)
        bad, sq = K.unscale_epilogue(x, dst, 0.5)
        ref_bad, ref_sq = R.unscale_epilogue(x, ref, 0.5)
        assert_bitwise(dst, ref)
        assert not bad and not ref_bad
        torch.testing.assert_close(sq, ref_sq, rtol=2e-5, atol=0)


def test_empty_inputs(backend):
    out = torch.empty(0)
    assert K.pack([], out) is out
    K.unpack(out, [])
    zeros = [torch.empty(0), torch.empty(0, 5)]
    K.pack(zeros, out, 0.5)
    K.unpack(out, zeros)
    assert K.scale_cast(torch.empty(0), torch.empty(0, dtype=BF16)).numel() == 0
    bad, sq = K.epilogue(torch.empty(0))
    assert not bad and float(sq) == 0.0
    bad, sq = K.unscale_epilogue(torch.empty(0, dtype=BF16), torch.empty(0))
    assert not bad and float(sq) == 0.0


def test_inplace_pack_of_views_into_the_bucket(backend):
    """Gradients that are views of their bucket: pack(views, bucket, 1/dp) scales in place."""
    flat = torch.randn(10_000)
    shapes, views, off = [(10, 30), (7,), (1,), (99, 97)], [], 0
    for s in shapes:
        n = torch.Size(s).numel()
        views.append(flat[off: off + n].view(s))
        off += n
    expected = R.pack([v.clone() for v in views], torch.empty(off), 1 / 3)
    K.pack(views, flat[:off], 1 / 3)
    assert_bitwise(flat[:off], expected)
    K.unpack(flat[:off], views, 3.0)
    assert_bitwise(flat[:off], R.scale_cast(expected, torch.empty(off), 3.0))


def test_many_small_tensors_across_threads(monkeypatch):
    """Chunks cut through tensors anywhere; results must not depend on the thread count."""
    if not cpu.available():
        pytest.skip("no CPU kernels here")
    monkeypatch.setenv("TRAINLIB_KERNELS", "cpu")
    g = torch.Generator().manual_seed(5)
    ts = [torch.randn(int(n), generator=g) for n in torch.randint(0, 400, (1000,), generator=g)]
    total = sum(t.numel() for t in ts)
    ref = R.pack(ts, torch.empty(total, dtype=BF16), 0.25)
    x = torch.randn(500_000, generator=g)
    before, norms = torch.get_num_threads(), []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            assert_bitwise(K.pack(ts, torch.empty(total, dtype=BF16), 0.25), ref)
            norms.append(K.epilogue(x)[1])
        # chunk sums are added in a fixed order: the norm has the same bits for every thread count
        assert norms[0].item() == norms[1].item() == norms[2].item()
        torch.testing.assert_close(norms[0], R.epilogue(x)[1], rtol=2e-5, atol=0)
    finally:
        torch.set_num_threads(before)


def test_portable_code_without_simd_paths(tmp_path, monkeypatch):
    """Where there is no F16C (Arm, old x86) the portable fp16 code runs: build it alone and check it."""
    cxx = shutil.which(os.environ.get("CXX", "c++"))
    if cxx is None:
        pytest.skip("no C++ compiler")
    so = tmp_path / "bucket_ops_portable.so"
    subprocess.run([cxx, "-O3", "-shared", "-fPIC", "-DTL_PORTABLE_ONLY", str(cpu.SOURCE), "-o", str(so)],
                   check=True, timeout=120)
    monkeypatch.setattr(cpu, "_lib", cpu.bind(ctypes.CDLL(str(so))))
    monkeypatch.setenv("TRAINLIB_KERNELS", "cpu")
    test_downcast_rounding_edges("cpu", F16)
    test_every_half_and_bf16_bit_pattern_upcasts_exactly("cpu")
    x = (torch.randn(100_003) * 50).half()
    torch.testing.assert_close(K.epilogue(x)[1], R.epilogue(x)[1], rtol=2e-5, atol=0)
    ts = make_tensors(F16)
    total = sum(t.numel() for t in ts)
    assert_bitwise(K.pack(ts, torch.empty(total, dtype=F16), 1 / 3), R.pack(ts, torch.empty(total, dtype=F16), 1 / 3))
    y = torch.randn(70_001) * 1e3
    got, ref = torch.empty(y.numel(), dtype=F16), torch.empty(y.numel(), dtype=F16)
    bad, sq = K.unscale_epilogue(y, got, 1 / 3)
    assert_bitwise(got, R.scale_cast(y, ref, 1 / 3))
    assert not bad and sq.item() == K.epilogue(got)[1].item()


COMPILE_FOR_SM90 = """
import sys
import triton
import triton.language as tl
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as e:
    sys.exit(f"SKIP: this triton has no offline compile API ({e})")
import trainlib.kernels.triton_kernels as tk
K = {"BLOCK": tk.BLOCK, "ITERS": tk.ITERS}
jobs = [
    (tk._scale_cast_kernel, {"src": "*fp32", "dst": "*bf16", "n": "i64", "scale": "fp32"}, {}),
    (tk._segments_kernel, {"table": "*i64", "n_chunks": "i32", "flat": "*bf16", "scale": "fp32"},
     {"TENSOR_DT": tl.float32, "TO_FLAT": True}),
    (tk._segments_kernel, {"table": "*i64", "n_chunks": "i32", "flat": "*fp32", "scale": "fp32"},
     {"TENSOR_DT": tl.bfloat16, "TO_FLAT": False}),
    (tk._epilogue_kernel, {"x": "*bf16", "n": "i64", "partial_sq": "*fp32", "partial_bad": "*i32"},
     {"FLT_MAX": tk.FLT_MAX}),
    (tk._unscale_epilogue_kernel, {"src": "*bf16", "dst": "*fp32", "n": "i64", "scale": "fp32",
                                   "partial_sq": "*fp32", "partial_bad": "*i32"}, {"FLT_MAX": tk.FLT_MAX}),
    (tk._unscale_epilogue_kernel, {"src": "*fp32", "dst": "*fp16", "n": "i64", "scale": "fp32",
                                   "partial_sq": "*fp32", "partial_bad": "*i32"}, {"FLT_MAX": tk.FLT_MAX}),
]
for fn, sig, const in jobs:
    const = {**const, **K}
    try:
        src = ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in const}}, constexprs=const)
    except TypeError as e:
        sys.exit(f"SKIP: this triton's ASTSource differs ({e})")
    assert "ptx" in triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm
print("COMPILED", len(jobs))
"""


def test_triton_kernels_compile_for_a_gpu_without_one():
    """The interpreter skips Triton's type checks and lowering; compile to sm_90 PTX/cubin offline
    (no GPU needed) in a clean process to catch what only a real compile would."""
    if TRITON_CHILD:
        pytest.skip("runs in the parent")
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = env.get("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", COMPILE_FOR_SM90], env=env, capture_output=True, text=True,
                          timeout=300)
    out = proc.stdout + proc.stderr
    if "SKIP:" in out:
        pytest.skip(out[out.index("SKIP:"):].splitlines()[0])
    assert proc.returncode == 0 and "COMPILED 6" in proc.stdout, out[-4000:]


def test_bad_input_raises_clear_errors():
    x, y = torch.randn(4), torch.randn(3, 2)
    with pytest.raises(ValueError, match=r"out has 9 elements but the 2 tensors hold 10 .*torch.empty\(10"):
        K.pack([x, y], torch.empty(9))
    with pytest.raises(ValueError, match=r"flat has 11 elements but the 2 tensors hold 10"):
        K.unpack(torch.empty(11), [x, y])
    with pytest.raises(ValueError, match="1-D and contiguous"):
        K.pack([x], torch.empty(2, 2))
    with pytest.raises(ValueError, match="tensor 0 has dtype torch.int64"):
        K.pack([torch.arange(4)], torch.empty(4))
    with pytest.raises(ValueError, match="tensor 1 is on meta"):
        K.pack([x, torch.empty(6, device="meta")], torch.empty(10))
    with pytest.raises(ValueError, match="src has 4 elements but dst has 6"):
        K.scale_cast(x, y)
    flat = torch.zeros(8)
    with pytest.raises(ValueError, match="overlaps the flat buffer outside its own slot"):
        K.pack([flat[1:5], torch.zeros(4)], flat)
    with pytest.raises(ValueError, match="overlap without being the same tensor"):
        K.scale_cast(flat[:4], flat[2:6])
    with pytest.raises(ValueError, match="unscale_epilogue: src has 4 elements but dst has 6"):
        K.unscale_epilogue(x, y)
    with pytest.raises(ValueError, match="unscale_epilogue: src and dst overlap"):
        K.unscale_epilogue(flat[:4], flat[2:6])
    with pytest.raises(ValueError, match=r"unscale_epilogue: dtypes torch.int64 -> torch.float32"):
        K.unscale_epilogue(torch.arange(4), x)


def test_bad_backend_name_is_rejected(monkeypatch):
    monkeypatch.setenv("TRAINLIB_KERNELS", "cuda")
    with pytest.raises(ValueError, match=r"TRAINLIB_KERNELS='cuda' is not one of"):
        K.pack([torch.zeros(1)], torch.empty(1))


def test_dispatch_by_device(monkeypatch):
    monkeypatch.delenv("TRAINLIB_KERNELS", raising=False)
    assert K.backend_for(torch.zeros(1)) == ("cpu" if cpu.available() else "reference")
    assert K.backend_for(torch.zeros(1, device="meta")) == "reference"
    monkeypatch.setenv("TRAINLIB_KERNELS", "reference")
    assert K.backend_for(torch.zeros(1)) == "reference"


def test_float64_takes_the_reference_path():
    x = torch.randn(100, dtype=torch.float64)
    out = K.pack([x], torch.empty(100, dtype=torch.float64), 1 / 3)
    assert_bitwise(out, x * (1 / 3))


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_failed_build_falls_back_to_reference_with_one_warning(tmp_path):
    """No usable compiler (CXX=/bin/false): one warning, then correct results from the reference."""
    logger, seen = logging.getLogger("trainlib"), _Records()
    logger.addHandler(seen)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("CXX", "/bin/false")
            mp.setenv("TRAINLIB_KERNEL_CACHE", str(tmp_path))
            mp.delenv("TRAINLIB_KERNELS", raising=False)
            cpu.reset()
            ts = make_tensors(F32)
            total = sum(t.numel() for t in ts)
            for _ in range(3):
                out = K.pack(ts, torch.empty(total, dtype=BF16), 0.5)
                assert_bitwise(out, R.pack(ts, torch.empty(total, dtype=BF16), 0.5))
            assert K.backend_for(out) == "reference"
    finally:
        logger.removeHandler(seen)
        cpu.reset()  # the next caller builds (or loads from the cache) with the real compiler
    warnings = [r.getMessage() for r in seen.records if "cannot build the CPU kernels" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "/bin/false" in warnings[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_on_gpu_matches_reference(monkeypatch):
    monkeypatch.delenv("TRAINLIB_KERNELS", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    dev = torch.device("cuda")
    assert K.backend_for(torch.zeros(1, device=dev)) == "triton"
    for src_dtype, flat_dtype in CASTS:
        ts = [t.to(dev) for t in make_tensors(src_dtype)] + [torch.randn(1 << 20, device=dev).to(src_dtype)]
        total = sum(t.numel() for t in ts)
        for scale in SCALES:
            out = K.pack(ts, torch.empty(total, dtype=flat_dtype, device=dev), scale)
            assert_bitwise(out.cpu(), R.pack(ts, torch.empty_like(out), scale).cpu())
            outs, refs = [torch.empty_like(t) for t in ts], [torch.empty_like(t) for t in ts]
            K.unpack(out, outs, scale)
            R.unpack(out, refs, scale)
            for o, r in zip(outs, refs):
                assert_bitwise(o.cpu(), r.cpu())
    x = torch.randn(10_000_019, device=dev)
    bad, sq = K.epilogue(x)
    assert not bad and sq.device == x.device
    torch.testing.assert_close(sq, R.epilogue(x)[1], rtol=2e-5, atol=0)
    x[12345] = float("nan")
    assert bool(K.epilogue(x)[0])
    for src_dtype, dst_dtype in CASTS:
        src = (torch.randn(3_000_017, device=dev) * 100).to(src_dtype)
        dst, ref = torch.empty_like(src, dtype=dst_dtype), torch.empty_like(src, dtype=dst_dtype)
        bad, sq = K.unscale_epilogue(src, dst, 2.0 ** -16)
        ref_bad, ref_sq = R.unscale_epilogue(src, ref, 2.0 ** -16)
        assert_bitwise(dst.cpu(), ref.cpu())
        assert not bad and not ref_bad and sq.device == dst.device
        torch.testing.assert_close(sq, ref_sq, rtol=2e-5, atol=0)
    src[777] = float("inf")
    assert bool(K.unscale_epilogue(src, dst, 0.5)[0])


def test_single_fp32_pack_takes_torch_and_matches_the_reference(monkeypatch):
    """Sharded DP packs one gradient per call; that call skips the fused kernel's set-up (torch's own
    multiply) and must stay bit-identical to the reference, in place and out of place."""
    monkeypatch.delenv("TRAINLIB_KERNELS", raising=False)
    calls = []
    monkeypatch.setattr(cpu, "pack", lambda *a: calls.append(a))
    x = torch.randn(1000)
    for scale in (1 / 3, 1.0):
        out = K.pack([x], torch.empty(1000), scale)
        assert_bitwise(out, R.pack([x], torch.empty(1000), scale))
    flat = torch.randn(1000)
    expected = flat * (1 / 3)
    K.pack([flat], flat, 1 / 3)
    assert_bitwise(flat, expected)
    assert calls == []
    # anything else still reaches the fused kernel, and a partial overlap is still an error
    K.pack([x[:500], x[500:]], torch.empty(1000), 0.5)
    K.pack([x.to(torch.bfloat16)], torch.empty(1000), 0.5)
    assert len(calls) == 2 or not cpu.available()
    with pytest.raises(ValueError, match="overlaps the flat buffer outside its own slot"):
        K.pack([flat[1:]], flat[:999], 0.5)
