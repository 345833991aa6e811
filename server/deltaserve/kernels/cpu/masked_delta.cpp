// DARE's stored form applied as it is stored: y[s:s+l, n] += alpha * sum_k D[n, k] * x[s:s+l, k],
// where the delta D is held as a bitmask and its kept values (deltaserve.deltas.types.MaskedDelta):
//   mask int32 [N, W] (bit j of word w = column 32 w + j, set = kept; bits past K are zero),
//   values [nnz] in fp32, fp16 or bf16, the kept weights in row-major order,
//   offsets int64 [N + 1], offsets[n] = index in values of row n's first kept weight.
// Semantics: those of masked_delta_matmul_ref (kernels/reference.py): fp32 products and sums
// (in another order than the reference's BLAS), y fp32 with unit column stride, x fp32 [T, K]
// contiguous.
//
// Decode segments (fewer than gemm_min_tokens tokens): with AVX-512 each mask word's kept values
// (popcount(word) consecutive values) are loaded with masked loads, converted to fp32 and expanded
// to their 32 column lanes in registers (vexpandps), then multiplied with x's 32 columns for up to
// 8 tokens at once (the expansion is shared by those tokens); without AVX-512, a scalar loop
// walks the set bits. Rows are split between threads (the row offsets make rows independent).
// One token streams the mask and values (0.8-1.2 ms at 4096 x 4096, p = 0.9, 2 cores, against
// 3.8 for a dense fp32 product), two rows at a time (their x loads shared; 0.88x the time of a
// row at a time in the engine's DARE decode step); with several tokens the products of the dropped (zero) lanes make that
// loop FMA-bound (8 tokens ~3 ms there; blocking K so that x stays in L1 was measured slower), so
// segments of several tokens whose kept weights are few enough (prefer_scatter) walk the kept
// weights instead: x's segment transposed once, each kept weight adds value * x[k, 16 tokens] per
// FMA. Segments of gemm_min_tokens or more: tiles of 64 rows expanded to dense fp32, BLAS.
//
// Bytes read per weight: 1/8 (mask) + (1 - p) * value size, e.g. 0.325 at p = 0.9 with fp16
// values against 4 for a dense fp32 delta.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kTileRows = 64;       // rows expanded per tile on the BLAS path
constexpr int64_t kMaxTokens = 8;       // tokens sharing one expansion of a word
constexpr int64_t kMinThreadBytes = 128 * 1024;  // mask + values a thread, at least

enum ValueType { kF32 = 0, kF16 = 1, kBF16 = 2 };

float value_at(const void* values, int64_t i, int vt) {
  if (vt == kF32) return static_cast<const float*>(values)[i];
  const uint16_t h = static_cast<const uint16_t*>(values)[i];
  if (vt == kBF16) {
    const uint32_t u = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
}

// scalar: one row (its first kept weight at values[first]), tokens [0, nt) of x (row stride K),
// set bits walked one by one; sums[t] = the row's dot product with token t
void row_scalar(const int32_t* mask, int64_t W, const void* values, int64_t first, int vt, const float* x,
                int64_t K, int64_t nt, float* sums) {
  std::fill(sums, sums + nt, 0.f);
  int64_t i = first;
  for (int64_t w = 0; w < W; ++w) {
    uint32_t m = static_cast<uint32_t>(mask[w]);
    while (m) {
      const int64_t k = 32 * w + __builtin_ctz(m);
      const float v = value_at(values, i++, vt);
      for (int64_t t = 0; t < nt; ++t) sums[t] += v * x[t * K + k];
      m &= m - 1;
    }
  }
}

// fn(std::integral_constant<int, VT>{}) for the value type vt: one template instance per type
template <typename Fn>
void by_type(int vt, Fn&& fn) {
  if (vt == kF32)
    fn(std::integral_constant<int, kF32>{});
  else if (vt == kF16)
    fn(std::integral_constant<int, kF16>{});
  else
    fn(std::integral_constant<int, kBF16>{});
}

bool has_avx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("f16c");
}

// the 32 values of mask word m (kept values at v, popcount(m) of them) in their column lanes, as
// two 16-lane fp32 vectors: each half's values are loaded with a masked load (nothing past them is
// touched, so no read past the end of values), converted to fp32 and expanded with vexpandps.
// (Expanding the 32 half-precision values first with one vpexpandw, then converting, takes twice
// the time on Zen 4: measured 2.5 against 1.3 ms for a 4096 x 4096 row sweep at p = 0.9.)
template <int VT>
__attribute__((target("avx512f,avx512bw,avx512vl,bmi2"))) inline void expand_word(const void* v, uint32_t m, __m512* lo,
                                                                         __m512* hi) {
  const uint32_t mlo = m & 0xFFFFu, mhi = m >> 16;
  const uint32_t plo = static_cast<uint32_t>(__builtin_popcount(mlo)), phi = static_cast<uint32_t>(__builtin_popcount(mhi));
  const __mmask16 llo = static_cast<__mmask16>(_bzhi_u32(0xFFFFu, plo));
  const __mmask16 lhi = static_cast<__mmask16>(_bzhi_u32(0xFFFFu, phi));
  __m512 flo, fhi;
  if (VT == kF32) {
    const float* f = static_cast<const float*>(v);
    flo = _mm512_maskz_loadu_ps(llo, f);
    fhi = _mm512_maskz_loadu_ps(lhi, f + plo);
  } else {
    const uint16_t* h = static_cast<const uint16_t*>(v);
    const __m256i rlo = _mm256_maskz_loadu_epi16(llo, h), rhi = _mm256_maskz_loadu_epi16(lhi, h + plo);
    if (VT == kF16) {
      flo = _mm512_cvtph_ps(rlo);
      fhi = _mm512_cvtph_ps(rhi);
    } else {  // bf16: the upper half of an fp32
      flo = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(rlo), 16));
      fhi = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(rhi), 16));
    }
  }
  *lo = _mm512_maskz_expand_ps(static_cast<__mmask16>(mlo), flo);
  *hi = _mm512_maskz_expand_ps(static_cast<__mmask16>(mhi), fhi);
}

// a mask of the first n of 16 lanes (n clamped to [0, 16])
__attribute__((target("bmi2"))) inline __mmask16 first_lanes(int64_t n) {
  return static_cast<__mmask16>(_bzhi_u32(0xFFFFu, static_cast<uint32_t>(std::clamp<int64_t>(n, 0, 16))));
}

// x's 32 columns of mask word w as two 16-lane vectors; past K (the last, partial word of a
// row) nothing is read
__attribute__((target("avx512f,avx512bw,avx512vl,bmi2"))) inline void load_x_word(const float* x, int64_t w,
                                                                                  int64_t K, __m512* lo,
                                                                                  __m512* hi) {
  const int64_t rest = K - 32 * w;
  if (rest >= 32) {
    *lo = _mm512_loadu_ps(x + 32 * w);
    *hi = _mm512_loadu_ps(x + 32 * w + 16);
    return;
  }
  *lo = _mm512_maskz_loadu_ps(first_lanes(rest), x + 32 * w);
  *hi = _mm512_maskz_loadu_ps(first_lanes(rest - 16), x + 32 * w + 16);
}

// AVX-512: one row, NT tokens of x (row stride K); sums[t] = the row's dot product with token t.
// With 1-2 tokens, two accumulators a token (columns 0-15 and 16-31 of a word): two FMA chains.
template <int VT, int NT>
__attribute__((target("avx512f,avx512bw,avx512vl,bmi2"))) void row_avx512(const int32_t* mask, int64_t W,
                                                                          const void* values, int64_t first,
                                                                          const float* x, int64_t K, float* sums) {
  constexpr int64_t esize = VT == kF32 ? 4 : 2;
  const char* v = static_cast<const char*>(values) + first * esize;
  __m512 alo[NT], ahi[NT];
  for (int t = 0; t < NT; ++t) alo[t] = ahi[t] = _mm512_setzero_ps();
  for (int64_t w = 0; w < W; ++w) {
    const uint32_t m = static_cast<uint32_t>(mask[w]);
    __m512 lo, hi;
    expand_word<VT>(v, m, &lo, &hi);
    v += __builtin_popcount(m) * esize;
    for (int t = 0; t < NT; ++t) {
      __m512 xlo, xhi;
      load_x_word(x + t * K, w, K, &xlo, &xhi);
      alo[t] = _mm512_fmadd_ps(lo, xlo, alo[t]);
      __m512& a = NT <= 2 ? ahi[t] : alo[t];  // with 3+ tokens their chains are enough
      a = _mm512_fmadd_ps(hi, xhi, a);
    }
  }
  for (int t = 0; t < NT; ++t) sums[t] = _mm512_reduce_add_ps(_mm512_add_ps(alo[t], ahi[t]));
}

// AVX-512, one token (the common decode case): rows [n0, n1) two at a time, sharing each word's x
// loads and keeping four FMA chains; y is the token's output row
template <int VT>
__attribute__((target("avx512f,avx512bw,avx512vl,bmi2"))) void rows_one_token(const int32_t* mask, int64_t W,
                                                                              const void* values,
                                                                              const int64_t* offsets, int64_t n0,
                                                                              int64_t n1, const float* x, int64_t K,
                                                                              float* y, float alpha) {
  constexpr int64_t esize = VT == kF32 ? 4 : 2;
  const char* base = static_cast<const char*>(values);
  int64_t n = n0;
  for (; n + 1 < n1; n += 2) {
    const int32_t* m0 = mask + n * W;
    const int32_t* m1 = m0 + W;
    const char* v0 = base + offsets[n] * esize;
    const char* v1 = base + offsets[n + 1] * esize;
    __m512 a0 = _mm512_setzero_ps(), b0 = a0, a1 = a0, b1 = a0;
    for (int64_t w = 0; w < W; ++w) {
      __m512 xlo, xhi;
      load_x_word(x, w, K, &xlo, &xhi);
      const uint32_t w0 = static_cast<uint32_t>(m0[w]), w1 = static_cast<uint32_t>(m1[w]);
      __m512 lo, hi;
      expand_word<VT>(v0, w0, &lo, &hi);
      v0 += __builtin_popcount(w0) * esize;
      a0 = _mm512_fmadd_ps(lo, xlo, a0);
      b0 = _mm512_fmadd_ps(hi, xhi, b0);
      expand_word<VT>(v1, w1, &lo, &hi);
      v1 += __builtin_popcount(w1) * esize;
      a1 = _mm512_fmadd_ps(lo, xlo, a1);
      b1 = _mm512_fmadd_ps(hi, xhi, b1);
    }
    y[n] += alpha * _mm512_reduce_add_ps(_mm512_add_ps(a0, b0));
    y[n + 1] += alpha * _mm512_reduce_add_ps(_mm512_add_ps(a1, b1));
  }
  if (n < n1) {
    float sum;
    row_avx512<VT, 1>(mask + n * W, W, values, offsets[n], x, K, &sum);
    y[n] += alpha * sum;
  }
}

template <int VT>
void row_avx512_n(int64_t nt, const int32_t* mask, int64_t W, const void* values, int64_t first, const float* x,
                  int64_t K, float* sums) {
  switch (nt) {
    case 1: row_avx512<VT, 1>(mask, W, values, first, x, K, sums); break;
    case 2: row_avx512<VT, 2>(mask, W, values, first, x, K, sums); break;
    case 3: row_avx512<VT, 3>(mask, W, values, first, x, K, sums); break;
    case 4: row_avx512<VT, 4>(mask, W, values, first, x, K, sums); break;
    case 5: row_avx512<VT, 5>(mask, W, values, first, x, K, sums); break;
    case 6: row_avx512<VT, 6>(mask, W, values, first, x, K, sums); break;
    case 7: row_avx512<VT, 7>(mask, W, values, first, x, K, sums); break;
    default: row_avx512<VT, 8>(mask, W, values, first, x, K, sums); break;
  }
}

// AVX-512, several tokens and few kept weights: one row against a token block of 16 NB tokens of
// the segment's transposed x (xt [K, ld]); each kept weight (k, v) adds v * xt[k, block] to the
// block's accumulators, so the work is the kept weights', not the row's (1 - p of it)
template <int VT, int NB>
__attribute__((target("avx512f,avx512bw,avx512vl,bmi2,f16c"))) void row_scatter(const int32_t* mask, int64_t W,
                                                                               const void* values, int64_t first,
                                                                               const float* xt, int64_t ld,
                                                                               float* out) {
  __m512 acc[NB];
  for (int j = 0; j < NB; ++j) acc[j] = _mm512_setzero_ps();
  int64_t i = first;
  for (int64_t w = 0; w < W; ++w) {
    uint32_t m = static_cast<uint32_t>(mask[w]);
    while (m) {
      const int64_t k = 32 * w + __builtin_ctz(m);
      m &= m - 1;
      float v;
      if (VT == kF32) {
        v = static_cast<const float*>(values)[i];
      } else if (VT == kF16) {
        v = _cvtsh_ss(static_cast<const uint16_t*>(values)[i]);
      } else {
        const uint32_t u = static_cast<uint32_t>(static_cast<const uint16_t*>(values)[i]) << 16;
        std::memcpy(&v, &u, 4);
      }
      ++i;
      const __m512 b = _mm512_set1_ps(v);
      const float* xr = xt + k * ld;
      for (int j = 0; j < NB; ++j) acc[j] = _mm512_fmadd_ps(b, _mm512_loadu_ps(xr + 16 * j), acc[j]);
    }
  }
  for (int j = 0; j < NB; ++j) _mm512_storeu_ps(out + 16 * j, acc[j]);
}

template <int VT>
void row_scatter_n(int nb, const int32_t* mask, int64_t W, const void* values, int64_t first, const float* xt,
                   int64_t ld, float* out) {
  switch (nb) {
    case 1: row_scatter<VT, 1>(mask, W, values, first, xt, ld, out); break;
    case 2: row_scatter<VT, 2>(mask, W, values, first, xt, ld, out); break;
    case 3: row_scatter<VT, 3>(mask, W, values, first, xt, ld, out); break;
    default: row_scatter<VT, 4>(mask, W, values, first, xt, ld, out); break;
  }
}

// row n of the delta, dense fp32, into out[0, K)
void expand_row(const int32_t* mask, int64_t W, const void* values, int64_t first, int vt, int64_t K, float* out) {
  std::fill(out, out + K, 0.f);
  int64_t i = first;
  for (int64_t w = 0; w < W; ++w) {
    uint32_t m = static_cast<uint32_t>(mask[w]);
    while (m) {
      out[32 * w + __builtin_ctz(m)] = value_at(values, i++, vt);
      m &= m - 1;
    }
  }
}

}  // namespace

namespace {

struct Segment {
  const int32_t* mask;
  const void* values;
  const int64_t* offsets;
  int vt;
  int64_t N, W, start, length, bytes;
  float alpha;
  bool scatter;  // walk the kept weights against xt (else expand each word for up to 8 tokens)
  const float* xt;  // scatter: the segment's x transposed, [K, ld], zero past its tokens
  int64_t ld;
};

constexpr int64_t kScatterBlock = 64;  // tokens of a scatter pass (4 accumulators)

// whether walking the kept weights costs less than expanding every word (operation counts of
// the two AVX-512 loops: ~10 per word plus 2 FMAs a token, against ~2 per word plus ~6 per kept
// weight and one FMA per 16 tokens; one token at p = 0.9 expands, at p = 0.99 walks)
bool prefer_scatter(int64_t kept, int64_t words, int64_t tokens) {
  const int64_t expand = words * (10 + 2 * tokens);
  const int64_t scatter = 2 * words + kept * (6 + (tokens + 15) / 16);
  return scatter < expand;
}

int value_type(const at::Tensor& values) {
  switch (values.scalar_type()) {
    case at::kFloat: return kF32;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    default: TORCH_CHECK(false, "values must be fp32, fp16 or bf16");
  }
  return kF32;
}

// a long segment: tiles of 64 rows expanded to dense fp32 and multiplied with BLAS
void blas_segment(const Segment& s, const at::Tensor& x, at::Tensor& y) {
  const int64_t K = x.size(1);
  const at::Tensor xs = x.narrow(0, s.start, s.length);
  at::parallel_for(0, (s.N + kTileRows - 1) / kTileRows, 1, [&](int64_t b0, int64_t b1) {
    at::Tensor tile = at::empty({kTileRows, K}, x.options());
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * kTileRows, rows = std::min(kTileRows, s.N - r0);
      for (int64_t r = 0; r < rows; ++r)
        expand_row(s.mask + (r0 + r) * s.W, s.W, s.values, s.offsets[r0 + r], s.vt, K, tile.data_ptr<float>() + r * K);
      at::Tensor out = y.narrow(0, s.start, s.length).narrow(1, r0, rows);
      out.addmm_(xs, tile.narrow(0, 0, rows).t(), 1.0, s.alpha);
    }
  });
}

}  // namespace

// Every segment g: y[starts[g] : starts[g] + lengths[g]] += alphas[g] * x[...] @ D_g.T, D_g given by
// (masks[g], values[g], offsets[g]) (segments must not overlap, or two threads could add into the
// same output). Short segments' rows go to one parallel region (items of 64 rows of a segment).
void masked_delta_matmul(const at::Tensor& x, at::Tensor& y, const std::vector<at::Tensor>& masks,
                         const std::vector<at::Tensor>& values, const std::vector<at::Tensor>& offsets,
                         const std::vector<int64_t>& starts, const std::vector<int64_t>& lengths,
                         const std::vector<double>& alphas, int64_t gemm_min_tokens, int64_t isa_cap) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be fp32 [T, K], contiguous");
  TORCH_CHECK(y.dim() == 2 && y.scalar_type() == at::kFloat && y.stride(1) == 1 && y.size(0) == x.size(0),
              "y must be fp32 [T, N] with unit column stride");
  const size_t G = masks.size();
  TORCH_CHECK(values.size() == G && offsets.size() == G && starts.size() == G && lengths.size() == G &&
                  alphas.size() == G,
              "one mask, values, offsets, start, length and alpha a segment");
  const int64_t T = x.size(0), K = x.size(1), N = y.size(1), W = (K + 31) / 32;
  const bool avx512 = isa_cap >= 2 && has_avx512();
  std::vector<Segment> decode;
  for (size_t g = 0; g < G; ++g) {
    const at::Tensor &mask = masks[g], &vals = values[g], &offs = offsets[g];
    TORCH_CHECK(mask.dim() == 2 && mask.scalar_type() == at::kInt && mask.is_contiguous() && mask.size(0) == N &&
                    mask.size(1) == W,
                "mask must be int32 [N, ceil(K/32)] matching x [T, K] and y [T, N]");
    TORCH_CHECK(offs.dim() == 1 && offs.scalar_type() == at::kLong && offs.is_contiguous() && offs.size(0) == N + 1,
                "offsets must be int64 [N + 1]");
    TORCH_CHECK(vals.dim() == 1 && vals.is_contiguous(), "values must be 1-D, contiguous");
    const int64_t* off = offs.data_ptr<int64_t>();
    TORCH_CHECK(off[0] == 0 && off[N] == vals.size(0), "offsets do not match the number of values");
    TORCH_CHECK(starts[g] >= 0 && lengths[g] >= 0 && starts[g] + lengths[g] <= T, "segment outside x");
    if (lengths[g] == 0 || alphas[g] == 0.0 || N == 0) continue;
    Segment s{mask.data_ptr<int32_t>(), vals.data_ptr(), off, value_type(vals), N, W, starts[g], lengths[g],
              mask.numel() * 4 + vals.numel() * vals.element_size(), static_cast<float>(alphas[g]), false,
              nullptr, 0};
    if (s.length >= gemm_min_tokens) {
      blas_segment(s, x, y);
      continue;
    }
    s.scatter = avx512 && prefer_scatter(vals.numel(), mask.numel(), s.length);
    decode.push_back(s);
  }
  if (decode.empty()) return;
  // the scatter segments' x, transposed once: [K, ld] with ld = tokens rounded up to 16
  std::vector<at::Tensor> transposed;
  for (Segment& s : decode)
    if (s.scatter) {
      s.ld = (s.length + 15) / 16 * 16;
      at::Tensor xt = at::zeros({K, s.ld}, x.options());
      xt.narrow(1, 0, s.length).copy_(x.narrow(0, s.start, s.length).t());
      transposed.push_back(xt);
      s.xt = xt.data_ptr<float>();
    }
  struct Item {
    int64_t seg, r0;
  };
  std::vector<Item> items;
  int64_t bytes = 0;
  for (size_t g = 0; g < decode.size(); ++g) {
    for (int64_t r0 = 0; r0 < N; r0 += kTileRows) items.push_back({static_cast<int64_t>(g), r0});
    bytes += decode[g].bytes;
  }
  const int64_t grain =
      std::max<int64_t>(1, static_cast<int64_t>(items.size()) * kMinThreadBytes / std::max<int64_t>(1, bytes));
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t ys = y.stride(0);
  at::parallel_for(0, static_cast<int64_t>(items.size()), grain, [&](int64_t i0, int64_t i1) {
    float sums[kMaxTokens];
    alignas(64) float block[kScatterBlock];
    for (int64_t i = i0; i < i1; ++i) {
      const Segment& s = decode[items[i].seg];
      const int64_t r0 = items[i].r0, r1 = std::min(N, r0 + kTileRows);
      // y[t0 + t, n] += alpha * sums[t] for the nt tokens of a pass
      const auto emit = [&](int64_t n, int64_t t0, int64_t nt, const float* sums) {
        for (int64_t t = 0; t < nt; ++t) yp[(t0 + t) * ys + n] += s.alpha * sums[t];
      };
      if (!avx512) {
        for (int64_t n = r0; n < r1; ++n)
          for (int64_t t0 = s.start; t0 < s.start + s.length; t0 += kMaxTokens) {
            const int64_t nt = std::min(kMaxTokens, s.start + s.length - t0);
            row_scalar(s.mask + n * W, W, s.values, s.offsets[n], s.vt, xp + t0 * K, K, nt, sums);
            emit(n, t0, nt, sums);
          }
        continue;
      }
      by_type(s.vt, [&](auto type) {
        constexpr int VT = decltype(type)::value;
        if (s.scatter) {
          for (int64_t n = r0; n < r1; ++n)
            for (int64_t b0 = 0; b0 < s.length; b0 += kScatterBlock) {
              const int64_t nt = std::min(kScatterBlock, s.length - b0);
              row_scatter_n<VT>(static_cast<int>((nt + 15) / 16), s.mask + n * W, W, s.values, s.offsets[n],
                                s.xt + b0, s.ld, block);
              emit(n, s.start + b0, nt, block);
            }
        } else if (s.length == 1) {
          rows_one_token<VT>(s.mask, W, s.values, s.offsets, r0, r1, xp + s.start * K, K, yp + s.start * ys,
                             s.alpha);
        } else {
          for (int64_t n = r0; n < r1; ++n)
            for (int64_t t0 = s.start; t0 < s.start + s.length; t0 += kMaxTokens) {
              const int64_t nt = std::min(kMaxTokens, s.start + s.length - t0);
              row_avx512_n<VT>(nt, s.mask + n * W, W, s.values, s.offsets[n], xp + t0 * K, K, sums);
              emit(n, t0, nt, sums);
            }
        }
      });
    }
  });
}
