// The torch side of ouvert's kernels: the ops ouvert::block_matmul, block_rows and block_experts, the
// choice of instruction set at load, and threads from torch's own pool (at::parallel_for), so
// torch.set_num_threads holds. Fake (meta) implementations live in ouvert/kernels/__init__.py.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "kernels.h"

namespace ouvert_kernels {

struct Isa {
  std::string name;
  decltype(&scalar::matmul) matmul;
  decltype(&scalar::dequantize) dequantize;
  decltype(&scalar::quantize_rows) quantize_rows;
  decltype(&scalar::matmul_q8) matmul_q8;
  decltype(&avx512_bf16::matmul_bf16) matmul_bf16;  // bfloat16 pairs on vdpbf16ps, or nullptr
};

#define OUVERT_ISA(ns, bf16) Isa{#ns, ns::matmul, ns::dequantize, ns::quantize_rows, ns::matmul_q8, bf16}
static const Isa kScalar = OUVERT_ISA(scalar, nullptr);
static const Isa kAvx2 = OUVERT_ISA(avx2, nullptr);
static const Isa kAvx512 = OUVERT_ISA(avx512, nullptr);
static const Isa kAvx512Vnni = OUVERT_ISA(avx512_vnni, nullptr);
static const Isa kAvx512Bf16 = OUVERT_ISA(avx512_bf16, avx512_bf16::matmul_bf16);

// Q8_0, Q4_0, Q4_1, Q4_K, Q5_K and Q6_K weights take integer dot products on activations quantized to 8
// bits per block of 32 (llama.cpp's way), unless OUVERT_INT_DOTS=0 or use_integer_dots(false).
static bool g_int_dots = [] {
  const char* v = std::getenv("OUVERT_INT_DOTS");
  return !(v && std::string(v) == "0");
}();
static bool integer_path(int64_t qtype) {
  return g_int_dots && (qtype == Q8_0 || qtype == Q4_0 || qtype == Q4_1 || qtype == Q4_K || qtype == Q5_K ||
                       qtype == Q6_K);
}

static bool cpu_has(const std::string& isa) {
  __builtin_cpu_init();
  if (isa == "scalar") return true;
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (isa == "avx2") return avx2;
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl");
  if (isa == "avx512") return avx512;
  const bool vnni = avx512 && __builtin_cpu_supports("avx512vnni");
  if (isa == "avx512_vnni") return vnni;
  if (isa == "avx512_bf16") return vnni && __builtin_cpu_supports("avx512bf16");
  return false;
}

static const Isa* by_name(const std::string& name) {
  if (name == "scalar") return &kScalar;
  if (name == "avx2") return &kAvx2;
  if (name == "avx512") return &kAvx512;
  if (name == "avx512_vnni") return &kAvx512Vnni;
  if (name == "avx512_bf16") return &kAvx512Bf16;
  return nullptr;
}

// The best the CPU has, unless OUVERT_ISA names another (which the CPU must have).
static const Isa* best() {
  if (const char* forced = std::getenv("OUVERT_ISA")) {
    const Isa* isa = by_name(forced);
    TORCH_CHECK(isa && cpu_has(forced), "OUVERT_ISA=", forced, ": not an instruction set this CPU has ",
                "(scalar, avx2, avx512, avx512_vnni, avx512_bf16)");
    return isa;
  }
  for (const char* name : {"avx512_bf16", "avx512_vnni", "avx512", "avx2"})
    if (cpu_has(name)) return by_name(name);
  return &kScalar;
}

static const Isa* g_isa = best();

std::string isa() { return g_isa->name; }

std::vector<std::string> available() {
  std::vector<std::string> out;
  for (const char* name : {"avx512_bf16", "avx512_vnni", "avx512", "avx2", "scalar"})
    if (cpu_has(name)) out.push_back(name);
  return out;
}

void set_isa(const std::string& name) {
  const Isa* isa = by_name(name);
  TORCH_CHECK(isa && cpu_has(name), name, ": not an instruction set this CPU has");
  g_isa = isa;
}

// Values per block and bytes per block of each type.
static std::pair<int64_t, int64_t> block_size(int64_t qtype) {
  switch (qtype) {
    case F32: return {1, 4};
    case F16: case BF16: return {1, 2};
    case Q8_0: return {32, 34};
    case Q4_0: return {32, 18};
    case Q4_1: return {32, 20};
    case Q4_K: return {256, 144};
    case Q5_K: return {256, 176};
    case Q6_K: return {256, 210};
  }
  TORCH_CHECK(false, "ggml type ", qtype, " has no kernel");
}

static int64_t row_values(const at::Tensor& w, int64_t qtype) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte && w.is_contiguous() && w.device().is_cpu(),
              "weight blocks: a contiguous 2-d uint8 CPU tensor, one row of blocks per output row");
  auto [values, bytes] = block_size(qtype);
  TORCH_CHECK(w.size(1) % bytes == 0, "weight rows of ", w.size(1), " bytes do not hold whole blocks of type ",
              qtype);
  return w.size(1) / bytes * values;
}

// float32 to bfloat16, rounded to nearest even as torch's .bfloat16() rounds; NaN stays NaN.
static uint16_t round_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// y (M, N) = x (M, K) W^T for contiguous float32 x, W (N, row_bytes) in type qtype, on the chosen ISA,
// output rows split among torch's threads (each computed whole by one thread).
static void product(int64_t qtype, const float* xp, int64_t M, int64_t K, const uint8_t* wp, int64_t row_bytes,
                    int64_t N, float* yp) {
  const Isa* isa = g_isa;
  // Enough output rows per task to amortize the task.
  const int64_t grain = std::max<int64_t>(1, std::min<int64_t>(64, N / (4 * at::get_num_threads())));
  if (integer_path(qtype)) {
    const int64_t nb = K / 32;
    std::vector<int8_t> q(M * K);
    std::vector<float> d(M * nb);
    std::vector<int32_t> s(M * nb);
    isa->quantize_rows(xp, M, K, q.data(), d.data(), s.data());
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
      isa->matmul_q8(int(qtype), q.data(), d.data(), s.data(), M, K, wp, row_bytes, n0, n1, yp, N);
    });
  } else if (qtype == BF16 && isa->matmul_bf16) {
    std::vector<uint16_t> xb(M * K);
    for (int64_t i = 0; i < M * K; i++) xb[i] = round_bf16(xp[i]);
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
      isa->matmul_bf16(xb.data(), M, K, wp, row_bytes, n0, n1, yp, N);
    });
  } else {
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
      std::vector<float> scratch(kScratchRows * K);
      isa->matmul(int(qtype), xp, M, K, K, wp, row_bytes, n0, n1, yp, N, scratch.data());
    });
  }
}

// y = x W^T: x (..., K) float32 or bfloat16, W (N, row bytes) in type qtype; y in x's dtype.
at::Tensor block_matmul(const at::Tensor& x, const at::Tensor& w, int64_t qtype) {
  const int64_t K = row_values(w, qtype), N = w.size(0);
  TORCH_CHECK(x.size(-1) == K, "input has ", x.size(-1), " features, the weight ", K);
  TORCH_CHECK(x.device().is_cpu(), "block_matmul runs on the CPU");
  const at::Tensor xf = x.reshape({-1, K}).to(at::kFloat).contiguous();
  const int64_t M = xf.size(0);
  at::Tensor y = at::empty({M, N}, xf.options());
  product(qtype, xf.data_ptr<float>(), M, K, w.data_ptr<uint8_t>(), w.size(1), N, y.data_ptr<float>());
  auto shape = x.sizes().vec();
  shape.back() = N;
  return y.view(shape).to(x.scalar_type());
}

// Head by head: y[b, h, t] = x[b, h, t] W_h^T for x (B, H, T, K) float32 or bfloat16 and w (H, N, row
// bytes), each head's rows contiguous (the heads themselves may be strided: a view of a wider
// weight): MLA's absorbed heads in one op instead of H. y (B, H, T, N) in x's dtype.
at::Tensor block_matmul_heads(const at::Tensor& x, const at::Tensor& w, int64_t qtype) {
  TORCH_CHECK(w.dim() == 3, "head weights: (heads, rows, bytes)");
  TORCH_CHECK(x.dim() == 4 && x.size(1) == w.size(0), "block_matmul_heads: x (B, heads, T, features)");
  const int64_t H = w.size(0), N = w.size(1), K = row_values(w.select(0, 0), qtype);  // each head as one weight
  TORCH_CHECK(x.size(3) == K, "input has ", x.size(3), " features, the weight ", K);
  const at::Tensor xf = x.to(at::kFloat).transpose(0, 1).contiguous();  // (H, B, T, K): a head's rows together
  const int64_t M = xf.size(1) * xf.size(2);
  at::Tensor y = at::empty({H, xf.size(1), xf.size(2), N}, xf.options());
  for (int64_t h = 0; h < H; h++)
    product(qtype, xf.data_ptr<float>() + h * M * K, M, K, w.data_ptr<uint8_t>() + h * w.stride(0), w.size(2), N,
            y.data_ptr<float>() + h * M * N);
  return y.transpose(0, 1).to(x.scalar_type());
}

// Routed experts: y[t] = sum over token t's k experts, in increasing expert id, of
// weight[t, j] * down_e(silu(gate_e(x_t)) * up_e(x_t)). x (N, D) float32; expert_idx, weight (N, k);
// gate, up (E, H, bytes), down (E, D, bytes). Token-expert pairs are grouped by expert, each expert's
// tokens one product on the kernels (whose rows do not depend on the other rows, so a token gets the
// same numbers however many share its experts), and each token's sum runs in expert order: the
// batch invariance the serving engine needs, with no Python per expert.
at::Tensor block_experts(const at::Tensor& x, const at::Tensor& expert_idx, const at::Tensor& weight,
                         const at::Tensor& gate, const at::Tensor& up, const at::Tensor& down,
                         std::vector<int64_t> qtypes) {
  TORCH_CHECK(qtypes.size() == 3, "block_experts: one type each for gate, up and down");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "block_experts: x (tokens, features) float32");
  for (const at::Tensor* w : {&gate, &up, &down})
    TORCH_CHECK(w->dim() == 3 && w->scalar_type() == at::kByte && w->is_contiguous(),
                "block_experts: stacked weights (experts, rows, bytes) uint8");
  const at::Tensor xc = x.contiguous();
  const at::Tensor idx = expert_idx.to(at::kLong).contiguous();
  const at::Tensor wt = weight.to(at::kFloat).contiguous();
  const int64_t N = xc.size(0), D = xc.size(1), k = idx.size(1), E = gate.size(0), H = gate.size(1);
  const auto [gv, gb] = block_size(qtypes[0]);
  const auto [dv, db] = block_size(qtypes[2]);
  TORCH_CHECK(gate.size(2) / gb * gv == D && up.sizes() == gate.sizes() && down.size(1) == D &&
              down.size(2) / db * dv == H, "block_experts: shapes do not agree");
  const int64_t* ip = idx.data_ptr<int64_t>();
  for (int64_t p = 0; p < N * k; p++) TORCH_CHECK(ip[p] >= 0 && ip[p] < E, "expert ", ip[p], " out of range 0..", E - 1);
  std::vector<int64_t> pairs(N * k);
  for (int64_t p = 0; p < N * k; p++) pairs[p] = p;
  std::stable_sort(pairs.begin(), pairs.end(), [&](int64_t a, int64_t b) { return ip[a] < ip[b]; });
  at::Tensor y = at::zeros({N, D}, xc.options());
  const float* xp = xc.data_ptr<float>();
  const float* wp = wt.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  std::vector<float> xs, g, u, o;
  for (int64_t start = 0; start < N * k;) {
    const int64_t e = ip[pairs[start]];
    int64_t end = start;
    while (end < N * k && ip[pairs[end]] == e) end++;
    const int64_t M = end - start;
    xs.resize(M * D), g.resize(M * H), u.resize(M * H), o.resize(M * D);
    for (int64_t r = 0; r < M; r++) std::memcpy(&xs[r * D], xp + pairs[start + r] / k * D, D * sizeof(float));
    product(qtypes[0], xs.data(), M, D, gate.data_ptr<uint8_t>() + e * H * gate.size(2), gate.size(2), H, g.data());
    product(qtypes[1], xs.data(), M, D, up.data_ptr<uint8_t>() + e * H * up.size(2), up.size(2), H, u.data());
    for (int64_t i = 0; i < M * H; i++) g[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];  // silu(gate) * up
    product(qtypes[2], g.data(), M, H, down.data_ptr<uint8_t>() + e * D * down.size(2), down.size(2), D, o.data());
    for (int64_t r = 0; r < M; r++) {
      const int64_t pair = pairs[start + r];
      float* yt = yp + pair / k * D;
      for (int64_t i = 0; i < D; i++) yt[i] += o[r * D + i] * wp[pair];
    }
    start = end;
  }
  return y;
}

// Rows `rows` of W as float32, (len(rows), K): an embedding lookup from blocks.
at::Tensor block_rows(const at::Tensor& w, int64_t qtype, const at::Tensor& rows) {
  const int64_t K = row_values(w, qtype), N = w.size(0);
  const at::Tensor r = rows.reshape({-1}).to(at::kLong).contiguous();
  const int64_t n = r.size(0);
  const int64_t* rp = r.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; i++) TORCH_CHECK(rp[i] >= 0 && rp[i] < N, "row ", rp[i], " out of range 0..", N - 1);
  at::Tensor out = at::empty({n, K}, w.options().dtype(at::kFloat));
  float* op = out.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const Isa* isa = g_isa;
  at::parallel_for(0, n, 16, [&](int64_t i0, int64_t i1) {
    isa->dequantize(int(qtype), wp, w.size(1), K, rp + i0, i1 - i0, op + i0 * K);
  });
  auto shape = rows.sizes().vec();
  shape.push_back(K);
  return out.view(shape);
}

}  // namespace ouvert_kernels

TORCH_LIBRARY_FRAGMENT(ouvert, m) {
  m.def("block_matmul(Tensor x, Tensor w, int qtype) -> Tensor");
  m.def("block_rows(Tensor w, int qtype, Tensor rows) -> Tensor");
  m.def("block_matmul_heads(Tensor x, Tensor w, int qtype) -> Tensor");
  m.def("block_experts(Tensor x, Tensor expert_idx, Tensor weight, Tensor gate, Tensor up, Tensor down, "
        "int[] qtypes) -> Tensor");
}

TORCH_LIBRARY_IMPL(ouvert, CPU, m) {
  m.impl("block_matmul", &ouvert_kernels::block_matmul);
  m.impl("block_rows", &ouvert_kernels::block_rows);
  m.impl("block_matmul_heads", &ouvert_kernels::block_matmul_heads);
  m.impl("block_experts", &ouvert_kernels::block_experts);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("use_integer_dots", [](bool on) { ouvert_kernels::g_int_dots = on; },
        "Q8_0 / Q4_0 / Q4_1: integer dot products on 8-bit activations (true) or float products (false)");
  m.def("integer_dots", [] { return ouvert_kernels::g_int_dots; });
  m.def("isa", &ouvert_kernels::isa, "the instruction set the kernels run on now");
  m.def("available", &ouvert_kernels::available, "the instruction sets this CPU can run, best first");
  m.def("set_isa", &ouvert_kernels::set_isa, "run the kernels on another instruction set this CPU has");
}
