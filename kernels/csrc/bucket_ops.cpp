// Fused gradient-bucket kernels for CPU: pack, unpack, scale+cast, the norm/finite epilogue, and
// unscale+cast fused with that epilogue (mixed precision: fp16/bf16 bucket -> fp32 master gradient).
//
// A plain C ABI on raw pointers (called through ctypes): no torch or pybind headers, so the
// one-time build takes about a second instead of the minute a full torch extension needs.
// Every element is converted inline in one pass: y = cast_out(float(x) * float(scale)), with
// round-to-nearest-even for bf16/fp16 — bit-identical to torch's `(x.float() * s).to(dtype)`.
// Threads: OpenMP, at most `nthreads` (the caller passes torch.get_num_threads()), over chunks
// of 64K elements; work of one chunk or less runs on the calling thread (no fork/join).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
// TL_PORTABLE_ONLY: build without the x86 paths (the tests check the portable code this way).
#if defined(__GNUC__) && defined(__x86_64__) && !defined(TL_PORTABLE_ONLY)
#include <immintrin.h>
#define TL_HAVE_F16C_PATH 1  // compiled for any x86-64; used only where the CPU has F16C
#endif

namespace {

enum DType : int { F32 = 0, F16 = 1, BF16 = 2 };
constexpr int64_t kElemSize[3] = {4, 2, 2};
// Work is cut into chunks of kChunk elements (256 KB of fp32) handed out dynamically: on a
// shared or oversubscribed machine a preempted thread then delays one chunk, not a fixed half of
// the buffer, and the chunk sums of the norm add up in the same order whatever the thread count.
constexpr int64_t kChunk = 1 << 16;

inline uint32_t bits_of(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float float_of(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

inline float bf16_to_f32(uint16_t h) { return float_of(uint32_t(h) << 16); }

// Round to nearest even on the upper 16 bits; NaN becomes the canonical quiet NaN (as c10 does).
inline uint16_t f32_to_bf16(float f) {
  const uint32_t u = bits_of(f);
  const uint16_t r = uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  return (u & 0x7FFFFFFFu) > 0x7F800000u ? uint16_t(0x7FC0) : r;
}

// IEEE half <-> float with exact subnormal handling, branch-free so the loops vectorise. The
// float-arithmetic trick (scale into the half exponent range, let the FPU round, then take the
// bits) is the one in the FP16 library by M. Dukhan, which c10::Half also uses.
inline float f16_to_f32(uint16_t h) {
  const uint32_t w = uint32_t(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = float_of((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = float_of((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t mag = two_w < (1u << 27) ? bits_of(denormalized) : bits_of(normalized);
  return float_of(sign | mag);
}

inline uint16_t f32_to_f16(float f) {
  float base = (std::fabs(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = bits_of(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  base = float_of((bias >> 1) + 0x07800000u) + base;
  const uint32_t b = bits_of(base);
  const uint32_t nonsign = ((b >> 13) & 0x00007C00u) + (b & 0x00000FFFu);
  return uint16_t((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

template <int D> struct Elem;
template <> struct Elem<F32> {
  using T = float;
  static inline float load(T x) { return x; }
  static inline T store(float x) { return x; }
};
template <> struct Elem<F16> {
  using T = uint16_t;
  static inline float load(T x) { return f16_to_f32(x); }
  static inline T store(float x) { return f32_to_f16(x); }
};
template <> struct Elem<BF16> {
  using T = uint16_t;
  static inline float load(T x) { return bf16_to_f32(x); }
  static inline T store(float x) { return f32_to_bf16(x); }
};

#ifdef TL_HAVE_F16C_PATH
// Half precision has no SSE2 conversion, so the portable loops above stay scalar (~8x slower than
// memory). F16C converts 8 values per instruction, round to nearest even, subnormals exact: the
// same results as the portable code (NaN payloads aside) and as torch's own vectorised copies.
const bool kHasF16C = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");

__attribute__((target("avx,f16c"))) inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
__attribute__((target("avx,f16c"))) inline __m256 load8(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
__attribute__((target("avx,f16c"))) inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
__attribute__((target("avx,f16c"))) inline void store8(uint16_t* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}

// IN/OUT in {F32, F16} with at least one F16
template <int IN, int OUT>
__attribute__((target("avx,f16c"))) void convert_f16c(const void* src, void* dst, int64_t n, float scale) {
  using I = typename Elem<IN>::T;
  using O = typename Elem<OUT>::T;
  const I* s = static_cast<const I*>(src);
  O* d = static_cast<O*>(dst);
  const __m256 vs = _mm256_set1_ps(scale);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) store8(d + i, _mm256_mul_ps(load8(s + i), vs));
  for (; i < n; ++i) d[i] = Elem<OUT>::store(Elem<IN>::load(s[i]) * scale);
}
#endif

template <int IN, int OUT>
void convert(const void* src, void* dst, int64_t n, float scale) {
  using I = typename Elem<IN>::T;
  using O = typename Elem<OUT>::T;
  // x * 1.0f == x exactly, so in place at scale 1 there is nothing to do. (Out of place the loop
  // below beats memmove here: glibc's large-copy path was ~30% slower than these plain stores.)
  if (IN == OUT && scale == 1.0f && src == dst) return;
#ifdef TL_HAVE_F16C_PATH
  if ((IN == F16 || OUT == F16) && IN != BF16 && OUT != BF16 && kHasF16C) {
    convert_f16c<IN == F16 ? F16 : F32, OUT == F16 ? F16 : F32>(src, dst, n, scale);
    return;
  }
#endif
  const I* __restrict s = static_cast<const I*>(src);
  O* d = static_cast<O*>(dst);  // may equal src (in-place scale): same index read then written
  for (int64_t i = 0; i < n; ++i) d[i] = Elem<OUT>::store(Elem<IN>::load(s[i]) * scale);
}

using ConvertFn = void (*)(const void*, void*, int64_t, float);
const ConvertFn kConvert[3][3] = {
    {convert<F32, F32>, convert<F32, F16>, convert<F32, BF16>},
    {convert<F16, F32>, convert<F16, F16>, convert<F16, BF16>},
    {convert<BF16, F32>, convert<BF16, F16>, convert<BF16, BF16>},
};

int threads_for(int64_t chunks, int nthreads) {
  return int(std::max<int64_t>(1, std::min<int64_t>(nthreads, chunks)));
}

// Copy between n tensors and one flat buffer laid out back to back. Chunks are cut from the flat
// buffer whatever the tensor sizes, so 1000 small tensors and 50 big ones balance alike; a chunk
// finds its first tensor by binary search in the offsets.
int segments(int n, void* const* ptrs, const int8_t* dtypes, const int64_t* numels, void* flat,
             int flat_dtype, float scale, int nthreads, bool to_flat) {
  std::vector<int64_t> off(size_t(n) + 1, 0);
  for (int i = 0; i < n; ++i) {
    if (dtypes[i] < 0 || dtypes[i] > 2 || numels[i] < 0) return 1;
    off[i + 1] = off[i] + numels[i];
  }
  if (flat_dtype < 0 || flat_dtype > 2) return 1;
  const int64_t total = off[n];
  const int64_t chunks = (total + kChunk - 1) / kChunk;
  const int nt = threads_for(chunks, nthreads);
  char* fbase = static_cast<char*>(flat);
  const int64_t fsize = kElemSize[flat_dtype];
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1) if (nt > 1)
  for (int64_t c = 0; c < chunks; ++c) {
    int64_t pos = c * kChunk;
    const int64_t end = std::min(total, pos + kChunk);
    int64_t i = std::upper_bound(off.begin(), off.end(), pos) - off.begin() - 1;
    while (pos < end && i < n) {
      const int64_t stop = std::min(end, off[i + 1]);
      if (stop > pos) {
        const int d = dtypes[i];
        char* t = static_cast<char*>(ptrs[i]) + (pos - off[i]) * kElemSize[d];
        char* f = fbase + pos * fsize;
        if (to_flat) kConvert[d][flat_dtype](t, f, stop - pos, scale);
        else kConvert[flat_dtype][d](f, t, stop - pos, scale);
        pos = stop;
      }
      ++i;
    }
  }
  return 0;
}

// Sum of squares of one range: float accumulation in blocks of 1024 (16 lanes, so it vectorises),
// block sums added in double, so the error stays at fp32 rounding of each block.
template <int D>
double sum_squares(const void* p, int64_t begin, int64_t end) {
  using T = typename Elem<D>::T;
  const T* x = static_cast<const T*>(p);
  constexpr int64_t kBlock = 1024, kLanes = 16;
  double total = 0.0;
  for (int64_t b = begin; b < end; b += kBlock) {
    const int64_t m = std::min(kBlock, end - b);
    float acc[kLanes] = {0.0f};
    int64_t j = 0;
    for (; j + kLanes <= m; j += kLanes)
      for (int64_t k = 0; k < kLanes; ++k) {
        const float v = Elem<D>::load(x[b + j + k]);
        acc[k] += v * v;
      }
    for (; j < m; ++j) {
      const float v = Elem<D>::load(x[b + j]);
      acc[0] += v * v;
    }
    float s = 0.0f;
    for (int64_t k = 0; k < kLanes; ++k) s += acc[k];
    total += double(s);
  }
  return total;
}

#ifdef TL_HAVE_F16C_PATH
// sum_squares<F16> with F16C: two 8-wide accumulators are exactly the 16 lanes above (lane k sums
// elements j + k), and mul then add (no FMA) as there, so the result is bit-identical.
__attribute__((target("avx,f16c"))) double sum_squares_f16c(const void* p, int64_t begin, int64_t end) {
  const uint16_t* x = static_cast<const uint16_t*>(p);
  constexpr int64_t kBlock = 1024;
  double total = 0.0;
  for (int64_t b = begin; b < end; b += kBlock) {
    const int64_t m = std::min(kBlock, end - b);
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 16 <= m; j += 16) {
      const __m256 v0 = load8(x + b + j), v1 = load8(x + b + j + 8);
      a0 = _mm256_add_ps(a0, _mm256_mul_ps(v0, v0));
      a1 = _mm256_add_ps(a1, _mm256_mul_ps(v1, v1));
    }
    alignas(32) float acc[16];
    _mm256_store_ps(acc, a0);
    _mm256_store_ps(acc + 8, a1);
    for (; j < m; ++j) {
      const float v = f16_to_f32(x[b + j]);
      acc[0] += v * v;
    }
    float s = 0.0f;
    for (int k = 0; k < 16; ++k) s += acc[k];
    total += double(s);
  }
  return total;
}
#endif

using SumFn = double (*)(const void*, int64_t, int64_t);

SumFn sum_for(int dtype) {
#ifdef TL_HAVE_F16C_PATH
  if (dtype == F16 && kHasF16C) return sum_squares_f16c;
#endif
  return dtype == F32 ? sum_squares<F32> : dtype == F16 ? sum_squares<F16> : sum_squares<BF16>;
}

template <int D>
bool any_nonfinite(const void* p, int64_t n) {
  using T = typename Elem<D>::T;
  const T* x = static_cast<const T*>(p);
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(Elem<D>::load(x[i]))) return true;
  return false;
}

// Add the chunk sums in a fixed order (the same bits whatever the thread count). A non-finite
// element makes the sum non-finite, so the exact per-element scan runs only then (or when finite
// squares overflow a block's float sum). Returns 1 if x holds any inf/nan, else 0.
int finish_epilogue(const void* x, int dtype, int64_t n, const std::vector<double>& partial, double* sq_norm) {
  double total = 0.0;
  for (double p : partial) total += p;
  *sq_norm = total;
  if (std::isfinite(total)) return 0;
  const bool bad = dtype == F32 ? any_nonfinite<F32>(x, n)
                   : dtype == F16 ? any_nonfinite<F16>(x, n) : any_nonfinite<BF16>(x, n);
  return bad ? 1 : 0;
}

}  // namespace

extern "C" {

// out_flat[off_i : off_i + numels[i]] = cast(float(src_i) * scale). Returns 0, or 1 on bad codes.
int tl_pack(int n, void* const* srcs, const int8_t* dtypes, const int64_t* numels, void* flat,
            int flat_dtype, float scale, int nthreads) {
  return segments(n, srcs, dtypes, numels, flat, flat_dtype, scale, nthreads, true);
}

// dst_i = cast(float(flat[off_i : off_i + numels[i]]) * scale): the inverse of tl_pack.
int tl_unpack(int n, void* const* dsts, const int8_t* dtypes, const int64_t* numels, const void* flat,
              int flat_dtype, float scale, int nthreads) {
  return segments(n, dsts, dtypes, numels, const_cast<void*>(flat), flat_dtype, scale, nthreads, false);
}

// One pass over x: *sq_norm = sum(float(x)^2); returns 1 if any element is inf or nan, else 0
// (-1 on a bad dtype). A non-finite element makes the sum non-finite, so the exact per-element
// scan runs only then (or when finite squares overflow a block's float sum).
int tl_epilogue(const void* x, int dtype, int64_t n, int nthreads, double* sq_norm) {
  if (dtype < 0 || dtype > 2) return -1;
  const SumFn sum = sum_for(dtype);
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  const int nt = threads_for(chunks, nthreads);
  std::vector<double> partial(size_t(chunks), 0.0);
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1) if (nt > 1)
  for (int64_t c = 0; c < chunks; ++c) partial[size_t(c)] = sum(x, c * kChunk, std::min(n, (c + 1) * kChunk));
  return finish_epilogue(x, dtype, n, partial, sq_norm);
}

// dst = cast(float(src) * scale) fused with tl_epilogue(dst): each 1024-element block is converted
// and then summed while it is still in L1, so memory sees one read of src and one write of dst.
// The blocks are those of tl_epilogue, so *sq_norm has the same bits as tl_epilogue(dst) would.
// dst may be src (same dtype: in-place unscale). Returns 1 if dst holds any inf/nan, else 0
// (-1 on a bad dtype).
int tl_unscale_epilogue(const void* src, int src_dtype, void* dst, int dst_dtype, int64_t n, float scale,
                        int nthreads, double* sq_norm) {
  if (src_dtype < 0 || src_dtype > 2 || dst_dtype < 0 || dst_dtype > 2) return -1;
  const ConvertFn convert_block = kConvert[src_dtype][dst_dtype];
  const SumFn sum = sum_for(dst_dtype);
  const char* s = static_cast<const char*>(src);
  char* d = static_cast<char*>(dst);
  const int64_t ss = kElemSize[src_dtype], ds = kElemSize[dst_dtype];
  constexpr int64_t kBlock = 1024;  // sum_squares's block: partial sums line up with tl_epilogue's
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  const int nt = threads_for(chunks, nthreads);
  std::vector<double> partial(size_t(chunks), 0.0);
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1) if (nt > 1)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t end = std::min(n, (c + 1) * kChunk);
    double total = 0.0;
    for (int64_t b = c * kChunk; b < end; b += kBlock) {
      const int64_t m = std::min(kBlock, end - b);
      convert_block(s + b * ss, d + b * ds, m, scale);
      total += sum(dst, b, b + m);  // one block: the same double adds as sum_squares over the chunk
    }
    partial[size_t(c)] = total;
  }
  return finish_epilogue(dst, dst_dtype, n, partial, sq_norm);
}

}  // extern "C"
