// Python bindings of the CPU kernels (one extension module, one source file per kernel).

#include <torch/extension.h>

#include <tuple>
#include <vector>

void sign_delta_matmul(const at::Tensor& x, at::Tensor& y, const at::Tensor& packed, const at::Tensor& scales,
                       const std::vector<int64_t>& starts, const std::vector<int64_t>& lengths,
                       const std::vector<int64_t>& slots, const std::vector<double>& alphas,
                       int64_t gemm_min_tokens, int64_t row_tile, int64_t isa_cap);
int64_t best_isa();
void masked_delta_matmul(const at::Tensor& x, at::Tensor& y, const std::vector<at::Tensor>& masks,
                         const std::vector<at::Tensor>& values, const std::vector<at::Tensor>& offsets,
                         const std::vector<int64_t>& starts, const std::vector<int64_t>& lengths,
                         const std::vector<double>& alphas, int64_t gemm_min_tokens, int64_t isa_cap);
void sign_lut_matmul_jobs(const at::Tensor& x, at::Tensor& y, const std::vector<at::Tensor>& luts,
                          const std::vector<at::Tensor>& scales, const std::vector<int64_t>& cols,
                          const std::vector<int64_t>& ns, const std::vector<int64_t>& parts,
                          const std::vector<int64_t>& seg_begin, const std::vector<int64_t>& seg_end,
                          const std::vector<int64_t>& starts, const std::vector<int64_t>& lengths,
                          const std::vector<int64_t>& slots, const std::vector<double>& alphas,
                          int64_t gemm_min_tokens, int64_t isa_cap, int64_t table_bits, int64_t fuse_planes);
void sign_lut_matmul(const at::Tensor& x, at::Tensor& y, const at::Tensor& lut, const at::Tensor& scales,
                     const std::vector<int64_t>& starts, const std::vector<int64_t>& lengths,
                     const std::vector<int64_t>& slots, const std::vector<double>& alphas,
                     int64_t gemm_min_tokens, int64_t isa_cap, int64_t table_bits);
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& ctx_lens, int64_t block_size,
                                  double scale, int64_t window);

int64_t stream_read(const std::vector<at::Tensor>& buffers);

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps);
void rotary(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
std::tuple<at::Tensor, at::Tensor> greedy_rows(const at::Tensor& logits);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // the long-running kernels release the GIL (they touch no Python object once their arguments are
  // converted): the server's other threads run meanwhile
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("sign_delta_matmul", &sign_delta_matmul, "segmented 1-bit delta matmul (in place on y)", nogil);
  m.def("sign_lut_matmul", &sign_lut_matmul, "segmented 1-bit delta matmul by table lookup (lut layout)", nogil);
  m.def("masked_delta_matmul", &masked_delta_matmul,
        "segments' DARE deltas (bitmask + kept values) added into y (in place)", nogil);
  m.def("sign_lut_matmul_jobs", &sign_lut_matmul_jobs,
        "several LUT-layout delta matmuls over one x (fused parts, planes) with shared tables", nogil);
  m.def("best_isa", &best_isa, "0 = scalar, 1 = AVX2, 2 = AVX-512 (what this CPU supports)");
  m.def("stream_read", &stream_read, "read the buffers once as 64-bit words (memory-speed floor); their XOR", nogil);
  m.def("rms_norm", &rms_norm, "RMSNorm over rows");
  m.def("rotary", &rotary, "rotate-half RoPE in place");
  m.def("greedy_rows", &greedy_rows, "argmax and finiteness of every logits row in one pass");
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention over the paged KV cache", nogil);
}
