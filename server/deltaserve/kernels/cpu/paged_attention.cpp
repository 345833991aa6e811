// Decode attention straight over the paged KV cache on the CPU (no gather of the history).
//
// Semantics (same as deltaserve.kernels.attention.paged_decode_attention_ref): for every
// sequence b with ctx_lens[b] = L keys, query head j attends, with kv head h = j / (Hq / Hkv)
// (grouped-query attention as transformers' repeat_kv), to the keys of positions
// [max(0, L - window), L) (window 0 = all), position p being row
// block_tables[b][p / block_size] * block_size + p % block_size of k_cache/v_cache:
//     out[b, j] = softmax(scale * q[b, j] . K_p) @ V_p           (fp32 throughout)
// q: [B, Hq, D]; k_cache, v_cache: [rows, Hkv, D] contiguous; out: [B, Hq, D] (q's dtype).
// One work item = (sequence, kv head): its query heads share every key and value read.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

// Hot loops: an AVX2+FMA version (8 fp32 lanes; bf16/fp16 rows widened on load) chosen at
// run time from CPUID, and a portable scalar version with the same fp32 arithmetic order per lane.

template <typename T>
inline float load1(const T* p) { return static_cast<float>(*p); }

template <typename T>
__attribute__((target("avx2,fma,f16c"))) inline __m256 load8(const T* p);
template <>
__attribute__((target("avx2,fma,f16c"))) inline __m256 load8<float>(const float* p) { return _mm256_loadu_ps(p); }
template <>
__attribute__((target("avx2,fma,f16c"))) inline __m256 load8<at::BFloat16>(const at::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
template <>
__attribute__((target("avx2,fma,f16c"))) inline __m256 load8<at::Half>(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

__attribute__((target("avx2,fma"))) inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// scores[g] = scale * q[g] . k for the G query heads of one kv head (q: fp32 [G, D]).
template <typename T>
__attribute__((target("avx2,fma,f16c"))) void dots_avx2(const float* q, const T* k, int64_t G, int64_t D,
                                                        float scale, float* scores, int64_t stride) {
  const int64_t D8 = D & ~int64_t{7};
  for (int64_t g = 0; g < G; ++g) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t d = 0; d < D8; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * D + d), load8(k + d), acc);
    float s = hsum8(acc);
    for (int64_t d = D8; d < D; ++d) s += q[g * D + d] * load1(k + d);
    scores[g * stride] = scale * s;
  }
}

// acc[g] += p[g] * v for the G query heads (acc: fp32 [G, D]).
template <typename T>
__attribute__((target("avx2,fma,f16c"))) void axpys_avx2(const float* p, int64_t pstride, const T* v, int64_t G,
                                                         int64_t D, float* acc) {
  const int64_t D8 = D & ~int64_t{7};
  for (int64_t d = 0; d < D8; d += 8) {
    const __m256 vv = load8(v + d);
    for (int64_t g = 0; g < G; ++g) {
      float* a = acc + g * D + d;
      _mm256_storeu_ps(a, _mm256_fmadd_ps(_mm256_set1_ps(p[g * pstride]), vv, _mm256_loadu_ps(a)));
    }
  }
  for (int64_t d = D8; d < D; ++d)
    for (int64_t g = 0; g < G; ++g) acc[g * D + d] += p[g * pstride] * load1(v + d);
}

template <typename T>
void dots_scalar(const float* q, const T* k, int64_t G, int64_t D, float scale, float* scores, int64_t stride) {
  for (int64_t g = 0; g < G; ++g) {
    float s = 0.f;
    for (int64_t d = 0; d < D; ++d) s += q[g * D + d] * load1(k + d);
    scores[g * stride] = scale * s;
  }
}

template <typename T>
void axpys_scalar(const float* p, int64_t pstride, const T* v, int64_t G, int64_t D, float* acc) {
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d = 0; d < D; ++d) acc[g * D + d] += p[g * pstride] * load1(v + d);
}

template <typename T>
void decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                      const at::Tensor& block_tables, const at::Tensor& ctx_lens, int64_t block_size,
                      double scale, int64_t window, at::Tensor& out) {
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k_cache.size(1);
  const int64_t G = Hq / Hkv, tstride = block_tables.stride(0);
  const T* qp = q.data_ptr<T>();
  const T* kp = k_cache.data_ptr<T>();
  const T* vp = v_cache.data_ptr<T>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* lens = ctx_lens.data_ptr<int32_t>();
  T* op = out.data_ptr<T>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), os0 = out.stride(0), os1 = out.stride(1);
  const float sc = static_cast<float>(scale);
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), acc(G * D), scores;
    for (int64_t it = begin; it < end; ++it) {
      const int64_t b = it / Hkv, h = it % Hkv;
      const int64_t L = lens[b];
      const int64_t first = window > 0 ? std::max<int64_t>(0, L - window) : 0;
      const int64_t n = L - first;
      for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < D; ++d) qf[g * D + d] = load1(qp + b * qs0 + (h * G + g) * qs1 + d);
      scores.assign(G * n, 0.f);
      const int32_t* table = tables + b * tstride;
      for (int64_t i = 0; i < n; ++i) {
        const int64_t p = first + i;
        const int64_t row = static_cast<int64_t>(table[p / block_size]) * block_size + p % block_size;
        const T* k = kp + (row * Hkv + h) * D;
        if (avx2) {
          dots_avx2(qf.data(), k, G, D, sc, scores.data() + i, n);
        } else {
          dots_scalar(qf.data(), k, G, D, sc, scores.data() + i, n);
        }
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      std::vector<float> denom(G);
      for (int64_t g = 0; g < G; ++g) {
        float* s = scores.data() + g * n;
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t i = 0; i < n; ++i) m = std::max(m, s[i]);
        float sum = 0.f;
        for (int64_t i = 0; i < n; ++i) {
          s[i] = std::exp(s[i] - m);
          sum += s[i];
        }
        denom[g] = sum;
      }
      for (int64_t i = 0; i < n; ++i) {
        const int64_t p = first + i;
        const int64_t row = static_cast<int64_t>(table[p / block_size]) * block_size + p % block_size;
        const T* v = vp + (row * Hkv + h) * D;
        if (avx2) {
          axpys_avx2(scores.data() + i, n, v, G, D, acc.data());
        } else {
          axpys_scalar(scores.data() + i, n, v, G, D, acc.data());
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        T* o = op + b * os0 + (h * G + g) * os1;
        const float inv = 1.f / denom[g];
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(acc[g * D + d] * inv);
      }
    }
  });
}

}  // namespace

// q [B, Hq, D] (unit stride on D) -> out [B, Hq, D]; see the header comment for the semantics.
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& ctx_lens, int64_t block_size,
                                  double scale, int64_t window) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3 && v_cache.dim() == 3, "q [B,Hq,D], caches [rows,Hkv,D]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "KV caches must be contiguous");
  TORCH_CHECK(q.stride(2) == 1, "q needs unit stride on head_dim");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && k_cache.scalar_type() == v_cache.scalar_type(),
              "q and the caches must share a dtype");
  TORCH_CHECK(q.size(2) == k_cache.size(2) && k_cache.sizes() == v_cache.sizes(), "head_dim mismatch");
  TORCH_CHECK(q.size(1) % k_cache.size(1) == 0, "query heads must be a multiple of kv heads");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && block_tables.dim() == 2 && block_tables.stride(1) == 1,
              "block_tables must be int32 [B, max_blocks] with unit column stride");
  TORCH_CHECK(ctx_lens.scalar_type() == at::kInt && ctx_lens.is_contiguous() && ctx_lens.numel() == q.size(0),
              "ctx_lens must be int32 [B]");
  TORCH_CHECK(block_tables.size(0) == q.size(0), "one block table per sequence");
  const int32_t* lens = ctx_lens.data_ptr<int32_t>();
  const int64_t rows = k_cache.size(0), width = block_tables.size(1);
  for (int64_t b = 0; b < q.size(0); ++b) {
    TORCH_CHECK(lens[b] >= 1 && (lens[b] + block_size - 1) / block_size <= width, "ctx_lens out of range");
  }
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  for (int64_t b = 0; b < q.size(0); ++b) {
    const int64_t used = (lens[b] + block_size - 1) / block_size;
    for (int64_t i = 0; i < used; ++i) {
      const int64_t blk = tables[b * block_tables.stride(0) + i];
      TORCH_CHECK(blk >= 0 && (blk + 1) * block_size <= rows, "block table entry out of range");
    }
  }
  at::Tensor out = at::empty_like(q, at::MemoryFormat::Contiguous);
  switch (q.scalar_type()) {
    case at::kFloat:
      decode_attention<float>(q, k_cache, v_cache, block_tables, ctx_lens, block_size, scale, window, out);
      break;
    case at::kBFloat16:
      decode_attention<at::BFloat16>(q, k_cache, v_cache, block_tables, ctx_lens, block_size, scale, window, out);
      break;
    case at::kHalf:
      decode_attention<at::Half>(q, k_cache, v_cache, block_tables, ctx_lens, block_size, scale, window, out);
      break;
    default:
      TORCH_CHECK(false, "q must be fp32, bf16 or fp16");
  }
  return out;
}
