// Segmented 1-bit delta matmul on the CPU, straight from packed sign bits.
//
// Semantics (same as deltaserve.kernels.reference.sign_delta_matmul_ref), for
// every segment g with tokens [s, s + l), slot t, alpha a and every output row n:
//     y[s:s+l, n] += (a * scales[t, n]) * (x[s:s+l] @ Sign_t.T)[:, n]     (fp32 accumulation)
// packed: int32 [S, N, W], W = ceil(K / 32); bit j of word w = column 32w + j,
// set = +1, clear = -1 (layout in deltaserve/deltas/types.py); scales: fp32 [S, N].
//
// Decode-shaped segments (few tokens): a GEMV that never leaves the packed
// form. Each sign flips the IEEE sign bit of x (xor), so every term is exact
// and the sum is an ordinary fp32 sum of +-x. Variants: AVX-512 (mask
// registers straight from the bits), AVX2 (variable shifts move bit j to the
// sign position of lane j), and portable scalar code; chosen at run time.
// Prefill-shaped segments (many tokens): tiles of rows are unpacked to +-1
// fp32 in a small buffer and multiplied with the BLAS GEMM (compute-bound).
// Work is split over output rows with OpenMP (at::parallel_for).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include "emit.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int kMaxTokens = 4;  // tokens per GEMV pass (register blocking)

enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

Isa detect_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
  return Isa::kScalar;
}

// acc[t] = sum_k sign(n, k) * xs[t][k] for one row; xs rows are zero-padded to 32 * W.
template <int TB>
void row_dot_scalar(const float* const* xs, const uint32_t* words, int64_t W, float* acc) {
  float sums[TB] = {};
  for (int64_t w = 0; w < W; ++w) {
    const uint32_t bits = words[w];
    for (int j = 0; j < 32; ++j) {
      // clear bit -> flip the sign bit of x
      const uint32_t flip = ((~bits >> j) & 1u) << 31;
      for (int t = 0; t < TB; ++t) {
        uint32_t u;
        std::memcpy(&u, xs[t] + 32 * w + j, 4);
        u ^= flip;
        float f;
        std::memcpy(&f, &u, 4);
        sums[t] += f;
      }
    }
  }
  for (int t = 0; t < TB; ++t) acc[t] = sums[t];
}

template <int TB>
__attribute__((target("avx2,fma"))) void row_dot_avx2(const float* const* xs, const uint32_t* words,
                                                       int64_t W, float* acc) {
  // lane j of chunk c holds column 8c + j; shifting left by 31 - (8c + j) puts its bit at bit 31
  const __m256i sh0 = _mm256_setr_epi32(31, 30, 29, 28, 27, 26, 25, 24);
  const __m256i sh1 = _mm256_sub_epi32(sh0, _mm256_set1_epi32(8));
  const __m256i sh2 = _mm256_sub_epi32(sh0, _mm256_set1_epi32(16));
  const __m256i sh3 = _mm256_sub_epi32(sh0, _mm256_set1_epi32(24));
  const __m256i sign = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  __m256 s[TB][4];
  for (int t = 0; t < TB; ++t)
    for (int c = 0; c < 4; ++c) s[t][c] = _mm256_setzero_ps();
  for (int64_t w = 0; w < W; ++w) {
    const __m256i wv = _mm256_set1_epi32(static_cast<int>(words[w]));
    // sign bit set where the weight bit is clear (-1)
    const __m256 m0 = _mm256_castsi256_ps(_mm256_andnot_si256(_mm256_sllv_epi32(wv, sh0), sign));
    const __m256 m1 = _mm256_castsi256_ps(_mm256_andnot_si256(_mm256_sllv_epi32(wv, sh1), sign));
    const __m256 m2 = _mm256_castsi256_ps(_mm256_andnot_si256(_mm256_sllv_epi32(wv, sh2), sign));
    const __m256 m3 = _mm256_castsi256_ps(_mm256_andnot_si256(_mm256_sllv_epi32(wv, sh3), sign));
    for (int t = 0; t < TB; ++t) {
      const float* xp = xs[t] + 32 * w;
      s[t][0] = _mm256_add_ps(s[t][0], _mm256_xor_ps(_mm256_loadu_ps(xp), m0));
      s[t][1] = _mm256_add_ps(s[t][1], _mm256_xor_ps(_mm256_loadu_ps(xp + 8), m1));
      s[t][2] = _mm256_add_ps(s[t][2], _mm256_xor_ps(_mm256_loadu_ps(xp + 16), m2));
      s[t][3] = _mm256_add_ps(s[t][3], _mm256_xor_ps(_mm256_loadu_ps(xp + 24), m3));
    }
  }
  for (int t = 0; t < TB; ++t) {
    const __m256 v = _mm256_add_ps(_mm256_add_ps(s[t][0], s[t][1]), _mm256_add_ps(s[t][2], s[t][3]));
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    acc[t] = _mm_cvtss_f32(h);
  }
}

template <int TB>
__attribute__((target("avx512f"))) void row_dot_avx512(const float* const* xs, const uint32_t* words,
                                                        int64_t W, float* acc) {
  const __m512i sign = _mm512_set1_epi32(static_cast<int>(0x80000000u));
  // two accumulators per token and half-word keep the add latency hidden
  __m512 s[TB][4];
  for (int t = 0; t < TB; ++t)
    for (int c = 0; c < 4; ++c) s[t][c] = _mm512_setzero_ps();
  int64_t w = 0;
  for (; w + 1 < W; w += 2) {
    const uint32_t b0 = ~words[w];
    const uint32_t b1 = ~words[w + 1];
    const __mmask16 k0 = static_cast<__mmask16>(b0), k1 = static_cast<__mmask16>(b0 >> 16);
    const __mmask16 k2 = static_cast<__mmask16>(b1), k3 = static_cast<__mmask16>(b1 >> 16);
    for (int t = 0; t < TB; ++t) {
      const float* xp = xs[t] + 32 * w;
      const __m512i x0 = _mm512_loadu_si512(xp), x1 = _mm512_loadu_si512(xp + 16);
      const __m512i x2 = _mm512_loadu_si512(xp + 32), x3 = _mm512_loadu_si512(xp + 48);
      s[t][0] = _mm512_add_ps(s[t][0], _mm512_castsi512_ps(_mm512_mask_xor_epi32(x0, k0, x0, sign)));
      s[t][1] = _mm512_add_ps(s[t][1], _mm512_castsi512_ps(_mm512_mask_xor_epi32(x1, k1, x1, sign)));
      s[t][2] = _mm512_add_ps(s[t][2], _mm512_castsi512_ps(_mm512_mask_xor_epi32(x2, k2, x2, sign)));
      s[t][3] = _mm512_add_ps(s[t][3], _mm512_castsi512_ps(_mm512_mask_xor_epi32(x3, k3, x3, sign)));
    }
  }
  for (; w < W; ++w) {
    const uint32_t b0 = ~words[w];
    const __mmask16 k0 = static_cast<__mmask16>(b0), k1 = static_cast<__mmask16>(b0 >> 16);
    for (int t = 0; t < TB; ++t) {
      const float* xp = xs[t] + 32 * w;
      const __m512i x0 = _mm512_loadu_si512(xp), x1 = _mm512_loadu_si512(xp + 16);
      s[t][0] = _mm512_add_ps(s[t][0], _mm512_castsi512_ps(_mm512_mask_xor_epi32(x0, k0, x0, sign)));
      s[t][1] = _mm512_add_ps(s[t][1], _mm512_castsi512_ps(_mm512_mask_xor_epi32(x1, k1, x1, sign)));
    }
  }
  for (int t = 0; t < TB; ++t) {
    acc[t] = _mm512_reduce_add_ps(
        _mm512_add_ps(_mm512_add_ps(s[t][0], s[t][1]), _mm512_add_ps(s[t][2], s[t][3])));
  }
}

template <int TB>
void row_dot(Isa isa, const float* const* xs, const uint32_t* words, int64_t W, float* acc) {
  switch (isa) {
    case Isa::kAvx512: row_dot_avx512<TB>(xs, words, W, acc); return;
    case Isa::kAvx2: row_dot_avx2<TB>(xs, words, W, acc); return;
    default: row_dot_scalar<TB>(xs, words, W, acc); return;
  }
}

void row_dot_any(Isa isa, int tb, const float* const* xs, const uint32_t* words, int64_t W, float* acc) {
  switch (tb) {
    case 1: row_dot<1>(isa, xs, words, W, acc); return;
    case 2: row_dot<2>(isa, xs, words, W, acc); return;
    case 3: row_dot<3>(isa, xs, words, W, acc); return;
    default: row_dot<4>(isa, xs, words, W, acc); return;
  }
}

// Unpack rows of signs into +-1 fp32: out [rows, 32 * W].
void unpack_rows_scalar(const uint32_t* words, int64_t rows, int64_t W, float* out) {
  const uint32_t one = 0x3f800000u;  // 1.0f
  for (int64_t r = 0; r < rows; ++r) {
    const uint32_t* wr = words + r * W;
    float* o = out + r * 32 * W;
    for (int64_t w = 0; w < W; ++w) {
      const uint32_t bits = wr[w];
      for (int j = 0; j < 32; ++j) {
        const uint32_t u = one | (((~bits >> j) & 1u) << 31);
        std::memcpy(o + 32 * w + j, &u, 4);
      }
    }
  }
}

__attribute__((target("avx2"))) void unpack_rows_avx2(const uint32_t* words, int64_t rows, int64_t W,
                                                      float* out) {
  const __m256i sh0 = _mm256_setr_epi32(31, 30, 29, 28, 27, 26, 25, 24);
  const __m256i eight = _mm256_set1_epi32(8);
  const __m256i sign = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  const __m256i one = _mm256_set1_epi32(0x3f800000);
  const int64_t total = rows * W;
  for (int64_t i = 0; i < total; ++i) {
    const __m256i wv = _mm256_set1_epi32(static_cast<int>(words[i]));
    __m256i sh = sh0;
    for (int c = 0; c < 4; ++c) {
      const __m256i m = _mm256_andnot_si256(_mm256_sllv_epi32(wv, sh), sign);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 32 * i + 8 * c), _mm256_or_si256(m, one));
      sh = _mm256_sub_epi32(sh, eight);
    }
  }
}

void unpack_rows(Isa isa, const uint32_t* words, int64_t rows, int64_t W, float* out) {
  if (isa == Isa::kScalar) {
    unpack_rows_scalar(words, rows, W, out);
  } else {
    unpack_rows_avx2(words, rows, W, out);
  }
}

using deltaserve::emit;

struct Segment {
  int64_t start, length, slot;
  float alpha;
  const float* scales;  // the slot's row of scales [N]: output n gets alpha * scales[n]
};

template <typename T>
void run_gemv_segments(Isa isa, const std::vector<Segment>& segs, const float* xpad, int64_t Kp,
                       const uint32_t* packed, int64_t N, int64_t W, T* y, int64_t y_stride) {
  // one work item = (segment, block of rows); each reads its rows' bits once for up to 4 tokens
  constexpr int64_t kRowBlock = 16;
  const int64_t blocks = (N + kRowBlock - 1) / kRowBlock;
  const int64_t items = static_cast<int64_t>(segs.size()) * blocks;
  // small layers run on the calling thread: waking the pool costs more than ~32K words of work
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / (kRowBlock * W));
  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    for (int64_t it = begin; it < end; ++it) {
      const Segment& sg = segs[it / blocks];
      const int64_t r0 = (it % blocks) * kRowBlock;
      const int64_t r1 = std::min(N, r0 + kRowBlock);
      const uint32_t* base = packed + sg.slot * N * W;
      for (int64_t t0 = 0; t0 < sg.length; t0 += kMaxTokens) {
        const int tb = static_cast<int>(std::min<int64_t>(kMaxTokens, sg.length - t0));
        const float* xs[kMaxTokens];
        for (int t = 0; t < tb; ++t) xs[t] = xpad + (sg.start + t0 + t) * Kp;
        float acc[kMaxTokens];
        for (int64_t n = r0; n < r1; ++n) {
          row_dot_any(isa, tb, xs, base + n * W, W, acc);
          const float factor = sg.alpha * sg.scales[n];  // the reference's fp32 product
          for (int t = 0; t < tb; ++t) emit<T>(y + (sg.start + t0 + t) * y_stride + n, factor, acc[t]);
        }
      }
    }
  });
}

template <typename T>
void run_gemm_segment(Isa isa, const Segment& sg, const at::Tensor& xpad, const uint32_t* packed, int64_t N,
                      int64_t W, T* y, int64_t y_stride, int64_t row_tile) {
  const int64_t Kp = 32 * W;
  const at::Tensor xs = xpad.narrow(0, sg.start, sg.length);  // [L, Kp] fp32
  const uint32_t* base = packed + sg.slot * N * W;
  const int64_t tiles = (N + row_tile - 1) / row_tile;
  // one parallel region: each thread unpacks its own tile of rows to +-1 and runs a
  // single-threaded GEMM on it (nested parallelism is off inside at::parallel_for)
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    at::Tensor tile = at::empty({row_tile, Kp}, xpad.options());
    at::Tensor out = at::empty({sg.length, row_tile}, xpad.options());
    for (int64_t it = begin; it < end; ++it) {
      const int64_t r0 = it * row_tile;
      const int64_t rows = std::min(row_tile, N - r0);
      unpack_rows(isa, base + r0 * W, rows, W, tile.data_ptr<float>());
      at::Tensor o = out.narrow(1, 0, rows);
      at::mm_out(o, xs, tile.narrow(0, 0, rows).t());
      const float* op = out.data_ptr<float>();
      for (int64_t t = 0; t < sg.length; ++t)
        for (int64_t r = 0; r < rows; ++r)
          emit<T>(y + (sg.start + t) * y_stride + r0 + r, sg.alpha * sg.scales[r0 + r], op[t * row_tile + r]);
    }
  });
}

template <typename T>
void dispatch_typed(Isa isa, const std::vector<Segment>& gemv, const std::vector<Segment>& gemm,
                    const at::Tensor& xpad, const uint32_t* packed, int64_t N, int64_t W, at::Tensor& y,
                    int64_t row_tile) {
  T* yp = y.data_ptr<T>();
  const int64_t ys = y.stride(0);
  if (!gemv.empty()) run_gemv_segments<T>(isa, gemv, xpad.data_ptr<float>(), 32 * W, packed, N, W, yp, ys);
  for (const Segment& sg : gemm) run_gemm_segment<T>(isa, sg, xpad, packed, N, W, yp, ys, row_tile);
}

}  // namespace

// In-place: y [T, N] (fp32/bf16/fp16, row stride free, unit column stride) += per-segment deltas.
void sign_delta_matmul(const at::Tensor& x, at::Tensor& y, const at::Tensor& packed, const at::Tensor& scales,
                       const std::vector<int64_t>& starts, const std::vector<int64_t>& lengths,
                       const std::vector<int64_t>& slots, const std::vector<double>& alphas,
                       int64_t gemm_min_tokens, int64_t row_tile, int64_t isa_cap) {
  TORCH_CHECK(x.device().is_cpu() && y.device().is_cpu() && packed.device().is_cpu(), "CPU tensors expected");
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && packed.dim() == 3, "x [T,K], y [T,N], packed [S,N,W] expected");
  TORCH_CHECK(packed.scalar_type() == at::kInt && packed.is_contiguous(), "packed must be contiguous int32");
  TORCH_CHECK(y.size(0) == x.size(0) && y.size(1) == packed.size(1), "y must be [T, N]");
  TORCH_CHECK(y.stride(1) == 1, "y must have unit column stride");
  const int64_t K = x.size(1), N = packed.size(1), W = packed.size(2), Kp = 32 * W;
  TORCH_CHECK(K <= Kp && K > Kp - 32, "K does not match the packed words");
  TORCH_CHECK(starts.size() == lengths.size() && lengths.size() == slots.size() && slots.size() == alphas.size(),
              "segment arrays must have equal lengths");

  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == packed.size(0) && scales.size(1) == N,
              "scales must be [S, N]");
  const at::Tensor sc = scales.to(at::kFloat).contiguous();
  std::vector<Segment> gemv, gemm;
  for (size_t g = 0; g < starts.size(); ++g) {
    if (lengths[g] <= 0) continue;
    TORCH_CHECK(starts[g] >= 0 && starts[g] + lengths[g] <= x.size(0), "segment out of range");
    TORCH_CHECK(slots[g] >= 0 && slots[g] < packed.size(0), "slot out of range");
    Segment s{starts[g], lengths[g], slots[g], static_cast<float>(alphas[g]), sc.data_ptr<float>() + slots[g] * N};
    (lengths[g] >= gemm_min_tokens ? gemm : gemv).push_back(s);
  }
  if (gemv.empty() && gemm.empty()) return;

  at::Tensor xpad;
  if (K == Kp && x.scalar_type() == at::kFloat && x.is_contiguous()) {
    xpad = x;
  } else {
    xpad = at::zeros({x.size(0), Kp}, x.options().dtype(at::kFloat));
    xpad.narrow(1, 0, K).copy_(x);
  }
  Isa isa = detect_isa();
  if (static_cast<int64_t>(isa) > isa_cap) isa = static_cast<Isa>(isa_cap);
  const uint32_t* pk = reinterpret_cast<const uint32_t*>(packed.data_ptr<int32_t>());
  switch (y.scalar_type()) {
    case at::kFloat: dispatch_typed<float>(isa, gemv, gemm, xpad, pk, N, W, y, row_tile); break;
    case at::kBFloat16: dispatch_typed<at::BFloat16>(isa, gemv, gemm, xpad, pk, N, W, y, row_tile); break;
    case at::kHalf: dispatch_typed<at::Half>(isa, gemv, gemm, xpad, pk, N, W, y, row_tile); break;
    default: TORCH_CHECK(false, "y must be fp32, bf16 or fp16");
  }
}

int64_t best_isa() { return static_cast<int64_t>(detect_isa()); }
