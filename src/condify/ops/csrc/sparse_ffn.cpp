// condify CPU kernels: the dynamic expert FFN (expert_mlp) and the fused router + selection + experts
// (sparse_ffn), for few tokens (decode, small batches), where the FFN is memory-bound and reading only the
// selected experts' weights is the whole game.
//
// Design (the PowerInfer batch-1 loop, written for condify's contiguous expert blocks):
// - per token the router (both layers) and the selection rule run first, then a plan: the active experts
//   and, for each, the tokens that selected it;
// - the active experts (union of the tokens' selections) are split across threads with at::parallel_for
//   (so torch.set_num_threads is respected); each thread reads its experts' contiguous gate/up rows once,
//   computes the hidden activations for every token that selected the expert (the rows stay in L1),
//   and adds the down projection into its own fp32 accumulator (no locks, no atomics on the hot path);
// - the accumulators are summed at the end (thread 0 accumulates straight into the output);
// - w_down column-major (w_down.t() contiguous, the layout dynamic-k stores): an expert's down block is
//   contiguous and each neuron adds one contiguous row (an axpy); row-major w_down also works (each
//   output row reads the expert's s contiguous columns);
// - weights fp32 or bf16 (converted to fp32 in registers), fp32 accumulation, output in x's dtype;
// - inner loops use GCC/clang vector types of 16 floats (AVX-512 here, AVX2 pairs or NEON elsewhere with
//   -march=native), several independent accumulators (rows x tokens) so FMAs run at throughput, and at
//   decode a software prefetch of the next rows (measured x1.47 -> x1.70 fp32, x2.3 -> x3.0 bf16 on the
//   SmolLM2 FFN at 50 %, one thread); at batch > 1 the down projection keeps each 16-float output chunk of
//   four tokens in registers across an expert's neurons (experts-only x1.18 -> x1.50 on the 4096/14336
//   bf16 FFN at 8 tokens).
//
// Activations: 0 relu, 1 silu, 2 gelu (erf), 3 gelu_tanh. Selection rules of sparse_ffn:
// 0 "tau_max": expert e runs iff score_e >= tau * max score (the argmax always runs);
// 1 "sigmoid": expert e runs iff sigmoid(score_e) >= threshold.
// Router: scores = |W2 relu(W1 x + b1) + b2| when W2 is given (dynamic-k), else W1 x + b1 (lte).

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

using bf16_t = uint16_t;  // storage of c10::BFloat16

inline float to_f32(float v) { return v; }
inline float to_f32(bf16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// 16 floats (one cache line of fp32) as a GCC/clang vector: compiles to AVX-512, AVX2 pairs, NEON quads...
typedef float f32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));

inline f32x16 load16(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline f32x16 load16(const bf16_t* p) {
  u16x16 h;
  std::memcpy(&h, p, sizeof(h));
  const u32x16 w = __builtin_convertvector(h, u32x16) << 16;
  f32x16 v;
  std::memcpy(&v, &w, sizeof(v));
  return v;
}
inline void store16(float* p, f32x16 v) { std::memcpy(p, &v, sizeof(v)); }
typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x4 __attribute__((vector_size(16)));
inline float hsum(f32x16 v) {  // halving tree (extracts + adds), not 15 dependent scalar adds
  f32x8 a, b;
  std::memcpy(&a, &v, sizeof(a));
  std::memcpy(&b, reinterpret_cast<const char*>(&v) + sizeof(a), sizeof(b));
  a += b;
  f32x4 c, d;
  std::memcpy(&c, &a, sizeof(c));
  std::memcpy(&d, reinterpret_cast<const char*>(&a) + sizeof(c), sizeof(d));
  c += d;
  return (c[0] + c[2]) + (c[1] + c[3]);
}

// out[r][t] = rows[r] . xs[t] over n elements: NR weight rows against NT tokens, NR*NT independent
// accumulators (enough FMA chains to run at throughput), each weight vector loaded once for NT tokens.
// Software prefetch, decode only (a single core streaming weights keeps more DRAM misses in flight):
// while a pass reads its rows, the rows `pf` elements further (the next pass's, same expert) are
// requested. pf = 0: none. g_prefetch switches it off for A/B measurements.
bool g_prefetch = true;

template <typename W, int NR, int NT>
inline void dots(const W* const* rows, const float* const* xs, int64_t n, float* out /* NR x NT */,
                 int64_t pf = 0) {
  if (!g_prefetch) pf = 0;
  f32x16 acc[NR][NT];
  for (int r = 0; r < NR; ++r)
    for (int t = 0; t < NT; ++t) acc[r][t] = f32x16{};
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) {
    if (pf)
      for (int r = 0; r < NR; ++r) __builtin_prefetch(rows[r] + k + pf, 0, 3);
    f32x16 xv[NT];
    for (int t = 0; t < NT; ++t) xv[t] = load16(xs[t] + k);
    for (int r = 0; r < NR; ++r) {
      const f32x16 w = load16(rows[r] + k);
      for (int t = 0; t < NT; ++t) acc[r][t] += w * xv[t];
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int t = 0; t < NT; ++t) {
      float v = hsum(acc[r][t]);
      for (int64_t q = k; q < n; ++q) v += to_f32(rows[r][q]) * xs[t][q];
      out[r * NT + t] = v;
    }
}

// the NR rows against n tokens (xs), four tokens at a time; out is NR x n
template <typename W, int NR>
inline void dots_tokens(const W* const* rows, const float* const* xs, int64_t n, int64_t d, float* out,
                        int64_t pf = 0) {
  float o[NR * 4];
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    dots<W, NR, 4>(rows, xs + i, d, o);
    for (int r = 0; r < NR; ++r)
      for (int t = 0; t < 4; ++t) out[r * n + i + t] = o[r * 4 + t];
  }
  const int64_t rest = n - i;  // 0..3 tokens left: one pass with that many accumulators per row
  if (rest == 3) dots<W, NR, 3>(rows, xs + i, d, o);
  if (rest == 2) dots<W, NR, 2>(rows, xs + i, d, o);
  if (rest == 1) dots<W, NR, 1>(rows, xs + i, d, o, n == 1 ? pf : 0);
  for (int r = 0; r < NR; ++r)
    for (int64_t t = 0; t < rest; ++t) out[r * n + i + t] = o[r * rest + t];
}

// ys[t] += a[t] * w over n elements, for NT outputs sharing one weight row
template <typename W, int NT>
inline void axpys(float* const* ys, const W* w, const float* a, int64_t n, int64_t pf = 0) {
  if (!g_prefetch) pf = 0;
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) {
    if (pf) __builtin_prefetch(w + k + pf, 0, 3);
    const f32x16 wv = load16(w + k);
    for (int t = 0; t < NT; ++t) store16(ys[t] + k, load16(ys[t] + k) + a[t] * wv);
  }
  for (; k < n; ++k)
    for (int t = 0; t < NT; ++t) ys[t][k] += a[t] * to_f32(w[k]);
}

// Down projection of one expert for NT tokens (batch > 1), w_down column-major: each 16-float chunk of the
// NT output rows stays in registers across the expert's s neurons (dblk: s rows of d_out; h[j * ld + t]:
// neuron j's activation for token t), so the accumulators are loaded and stored once per expert instead
// of once per neuron (store-bound otherwise once the rows leave L1, e.g. d = 4096).
template <typename W, int NT>
inline void down_block(float* const* ys, const W* dblk, const float* h, int64_t ld, int64_t s, int64_t d_out) {
  int64_t k = 0;
  for (; k + 16 <= d_out; k += 16) {
    f32x16 acc[NT];
    for (int t = 0; t < NT; ++t) acc[t] = load16(ys[t] + k);
    for (int64_t j = 0; j < s; ++j) {
      const f32x16 w = load16(dblk + j * d_out + k);
      for (int t = 0; t < NT; ++t) acc[t] += h[j * ld + t] * w;
    }
    for (int t = 0; t < NT; ++t) store16(ys[t] + k, acc[t]);
  }
  for (; k < d_out; ++k)
    for (int t = 0; t < NT; ++t) {
      float a = ys[t][k];
      for (int64_t j = 0; j < s; ++j) a += h[j * ld + t] * to_f32(dblk[j * d_out + k]);
      ys[t][k] = a;
    }
}

template <typename W>
inline float dot(const W* w, const float* x, int64_t n) {
  float o;
  const W* rows[1] = {w};
  const float* xs[1] = {x};
  dots<W, 1, 1>(rows, xs, n, &o);
  return o;
}

inline float act_fn(float z, int act) {
  switch (act) {
    case 0:
      return z > 0.f ? z : 0.f;
    case 1:
      return z / (1.f + std::exp(-z));
    case 2:
      return 0.5f * z * (1.f + std::erf(z * 0.70710678118654752f));
    default: {
      const float c = 0.7978845608028654f;
      return 0.5f * z * (1.f + std::tanh(c * (z + 0.044715f * z * z * z)));
    }
  }
}

struct FFN {
  const void* up;
  const void* gate;    // nullptr: no GLU
  const void* down;
  const void* b_up;    // nullptr: no bias
  const void* b_gate;
  bool down_colmajor;  // down stored as (I, d_out) contiguous
  int64_t d, inter, d_out, s, act;
};

// Active experts in CSR form: expert ids[i] runs for tokens toks[off[i] .. off[i+1]).
struct Plan {
  std::vector<int32_t> ids, off, toks;
};

Plan plan_from_mask(const bool* mask, int64_t T, int64_t E) {
  Plan p;
  p.off.push_back(0);
  if (T == 1) {
    for (int64_t e = 0; e < E; ++e)
      if (mask[e]) {
        p.ids.push_back(static_cast<int32_t>(e));
        p.toks.push_back(0);
        p.off.push_back(static_cast<int32_t>(p.toks.size()));
      }
    return p;
  }
  for (int64_t e = 0; e < E; ++e) {
    const size_t before = p.toks.size();
    for (int64_t t = 0; t < T; ++t)
      if (mask[t * E + e]) p.toks.push_back(static_cast<int32_t>(t));
    if (p.toks.size() != before) {
      p.ids.push_back(static_cast<int32_t>(e));
      p.off.push_back(static_cast<int32_t>(p.toks.size()));
    }
  }
  return p;
}

// One expert for its tokens: hidden activations (scratch g/u: s x n, neuron-major), then the down
// projection into acc. xs: the expert's tokens' input rows (fp32), ys: their accumulator rows.
template <typename W>
void run_expert(const FFN& f, int64_t e, const float* const* xs, float* const* ys, int64_t n,
                float* __restrict g, float* __restrict u) {
  const int64_t d = f.d, s = f.s, d_out = f.d_out;
  const W* up = static_cast<const W*>(f.up);
  const W* gate = static_cast<const W*>(f.gate);
  const W* bu = static_cast<const W*>(f.b_up);
  const W* bg = static_cast<const W*>(f.b_gate);
  const W* down = static_cast<const W*>(f.down);
  const int64_t r0 = e * s;
  int64_t j = 0;
  if (gate) {
    if (n == 1) {  // decode: two neurons (4 rows) per pass, 4 accumulators
      for (; j + 2 <= s; j += 2) {
        const W* rows[4] = {up + (r0 + j) * d, gate + (r0 + j) * d, up + (r0 + j + 1) * d,
                            gate + (r0 + j + 1) * d};
        float o[4];
        dots<W, 4, 1>(rows, xs, d, o, j + 4 <= s ? 2 * d : 0);
        u[j] = o[0], g[j] = o[1], u[j + 1] = o[2], g[j + 1] = o[3];
      }
    }
    for (; j < s; ++j) {
      const W* rows[2] = {up + (r0 + j) * d, gate + (r0 + j) * d};
      float o[2 * 64];
      for (int64_t i0 = 0; i0 < n; i0 += 64) {  // tokens in chunks of 64 (o on the stack)
        const int64_t m = std::min<int64_t>(64, n - i0);
        dots_tokens<W, 2>(rows, xs + i0, m, d, o);
        for (int64_t i = 0; i < m; ++i) u[j * n + i0 + i] = o[i], g[j * n + i0 + i] = o[m + i];
      }
    }
  } else {
    if (n == 1) {
      for (; j + 4 <= s; j += 4) {
        const W* rows[4] = {up + (r0 + j) * d, up + (r0 + j + 1) * d, up + (r0 + j + 2) * d,
                            up + (r0 + j + 3) * d};
        dots<W, 4, 1>(rows, xs, d, u + j, j + 8 <= s ? 4 * d : 0);
      }
    }
    for (; j < s; ++j) {
      const W* rows[1] = {up + (r0 + j) * d};
      dots_tokens<W, 1>(rows, xs, n, d, u + j * n);
    }
  }
  const int act = static_cast<int>(f.act);
  for (int64_t jj = 0; jj < s; ++jj) {
    const float bur = bu ? to_f32(bu[r0 + jj]) : 0.f;
    const float bgr = bg ? to_f32(bg[r0 + jj]) : 0.f;
    float* uj = u + jj * n;
    if (gate) {
      const float* gj = g + jj * n;
      for (int64_t i = 0; i < n; ++i) uj[i] = (uj[i] + bur) * act_fn(gj[i] + bgr, act);
    } else {
      for (int64_t i = 0; i < n; ++i) uj[i] = act_fn(uj[i] + bur, act);
    }
  }
  if (f.down_colmajor && n == 1) {  // decode: row r of w_down.t() (neuron r's output column) as an axpy
    for (int64_t jj = 0; jj < s; ++jj) {
      const W* dr = down + (r0 + jj) * d_out;
      if (u[jj] != 0.f)  // ReLU zeros cost nothing
        axpys<W, 1>(ys, dr, u + jj, d_out, jj + 1 < s ? d_out : 0);
    }
  } else if (f.down_colmajor) {  // batch: four tokens at a time, output chunks in registers
    const W* dblk = down + r0 * d_out;
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) down_block<W, 4>(ys + i, dblk, u + i, n, s, d_out);
    if (n - i == 3) down_block<W, 3>(ys + i, dblk, u + i, n, s, d_out);
    if (n - i == 2) down_block<W, 2>(ys + i, dblk, u + i, n, s, d_out);
    if (n - i == 1) down_block<W, 1>(ys + i, dblk, u + i, n, s, d_out);
  } else {  // row-major: output o reads the expert's s contiguous columns of row o
    const int64_t ld = f.inter;
    std::vector<float> hrow(static_cast<size_t>(s));
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t jj = 0; jj < s; ++jj) hrow[jj] = u[jj * n + i];
      float* y = ys[i];
      for (int64_t o = 0; o < d_out; ++o) y[o] += dot(down + o * ld + r0, hrow.data(), s);
    }
  }
}

// out (T x d_out fp32, zeroed) += the selected experts of every token.
template <typename W>
void run_plan(const FFN& f, const float* x, int64_t T, const Plan& p, float* out) {
  const int64_t n_act = static_cast<int64_t>(p.ids.size());
  if (n_act == 0) return;
  const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_act));
  const int64_t per = T * f.d_out;
  // accumulators of threads 1..nt-1 (thread 0 writes into out); zeroed by their owner on first use
  std::vector<float> scratch(nt > 1 ? static_cast<size_t>((nt - 1) * per) : 0);
  std::vector<char> used(static_cast<size_t>(nt), 0);
  int64_t max_n = 0;
  for (int64_t i = 0; i < n_act; ++i) max_n = std::max<int64_t>(max_n, p.off[i + 1] - p.off[i]);
  at::parallel_for(0, n_act, 1, [&](int64_t b, int64_t end) {
    int64_t tid = at::get_thread_num();
    if (tid >= nt) tid = nt - 1;  // cannot happen with the OpenMP backend; defensive
    float* acc = tid == 0 ? out : scratch.data() + (tid - 1) * per;
    if (tid != 0 && !used[tid]) std::fill(acc, acc + per, 0.f);
    used[tid] = 1;
    std::vector<float> gbuf(static_cast<size_t>(max_n * f.s)), ubuf(static_cast<size_t>(max_n * f.s));
    std::vector<const float*> xs(static_cast<size_t>(max_n));
    std::vector<float*> ys(static_cast<size_t>(max_n));
    for (int64_t i = b; i < end; ++i) {
      const int64_t n = p.off[i + 1] - p.off[i];
      const int32_t* toks = p.toks.data() + p.off[i];
      for (int64_t q = 0; q < n; ++q) {
        xs[q] = x + toks[q] * f.d;
        ys[q] = acc + toks[q] * f.d_out;
      }
      run_expert<W>(f, p.ids[i], xs.data(), ys.data(), n, gbuf.data(), ubuf.data());
    }
  });
  for (int64_t t = 1; t < nt; ++t) {
    if (!used[t]) continue;
    const float* a = scratch.data() + (t - 1) * per;
#pragma omp simd
    for (int64_t k = 0; k < per; ++k) out[k] += a[k];
  }
}

bool is_bf16(const at::Tensor& t) { return t.scalar_type() == at::kBFloat16; }

void check_weight(const at::Tensor& w, const at::Tensor& ref, const char* name) {
  TORCH_CHECK(w.device().is_cpu(), "condify sparse_ffn kernel: ", name, " must be a CPU tensor");
  TORCH_CHECK(w.scalar_type() == ref.scalar_type(), "condify sparse_ffn kernel: ", name, " has dtype ",
              w.scalar_type(), ", expected ", ref.scalar_type());
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16,
              "condify sparse_ffn kernel: weights must be float32 or bfloat16, got ", w.scalar_type());
}

FFN make_ffn(const at::Tensor& w_up, const at::Tensor& w_down, int64_t s, int64_t act,
             const c10::optional<at::Tensor>& w_gate, const c10::optional<at::Tensor>& b_up,
             const c10::optional<at::Tensor>& b_gate) {
  check_weight(w_up, w_up, "w_up");
  check_weight(w_down, w_up, "w_down");
  TORCH_CHECK(w_up.dim() == 2 && w_up.is_contiguous(), "w_up must be a contiguous (I, d) matrix");
  TORCH_CHECK(w_down.dim() == 2 && w_down.size(1) == w_up.size(0), "w_down must be (d_out, I)");
  FFN f{};
  f.inter = w_up.size(0);
  f.d = w_up.size(1);
  f.d_out = w_down.size(0);
  f.s = s;
  f.act = act;
  TORCH_CHECK(s > 0 && f.inter % s == 0, "expert_size must divide the intermediate size");
  TORCH_CHECK(act >= 0 && act <= 3, "activation id must be 0..3");
  f.down_colmajor = !w_down.is_contiguous();
  TORCH_CHECK(w_down.is_contiguous() || w_down.t().is_contiguous(),
              "w_down must be contiguous or column-major");
  if (w_down.is_contiguous() && w_down.t().is_contiguous()) f.down_colmajor = false;  // 1 x I or d x 1
  f.up = w_up.data_ptr();
  f.down = w_down.data_ptr();
  f.gate = nullptr;
  if (w_gate.has_value()) {
    check_weight(*w_gate, w_up, "w_gate");
    TORCH_CHECK(w_gate->sizes() == w_up.sizes() && w_gate->is_contiguous(),
                "w_gate must be contiguous and shaped like w_up");
    f.gate = w_gate->data_ptr();
  }
  f.b_up = nullptr;
  f.b_gate = nullptr;
  if (b_up.has_value()) {
    check_weight(*b_up, w_up, "b_up");
    TORCH_CHECK(b_up->numel() == f.inter && b_up->is_contiguous(), "b_up must be a contiguous (I,) vector");
    f.b_up = b_up->data_ptr();
  }
  if (b_gate.has_value()) {
    TORCH_CHECK(f.gate != nullptr, "b_gate given without w_gate");
    check_weight(*b_gate, w_up, "b_gate");
    TORCH_CHECK(b_gate->numel() == f.inter && b_gate->is_contiguous(), "b_gate must be a contiguous (I,)");
    f.b_gate = b_gate->data_ptr();
  }
  return f;
}

// x as a contiguous fp32 (T, d) tensor (no copy when it already is one)
at::Tensor as_f32(const at::Tensor& x) { return x.to(at::kFloat).contiguous(); }

at::Tensor finish(at::Tensor out32, const at::Tensor& x) {
  return x.scalar_type() == at::kFloat ? out32 : out32.to(x.scalar_type());
}

at::Tensor experts_from_plan(const FFN& f, const at::Tensor& xf, const at::Tensor& x, bool bf16,
                             const Plan& p) {
  const int64_t T = xf.size(0);
  at::Tensor out = at::zeros({T, f.d_out}, x.options().dtype(at::kFloat));
  if (bf16)
    run_plan<bf16_t>(f, xf.data_ptr<float>(), T, p, out.data_ptr<float>());
  else
    run_plan<float>(f, xf.data_ptr<float>(), T, p, out.data_ptr<float>());
  return finish(out, x);
}

at::Tensor expert_mlp_cpu(const at::Tensor& x, const at::Tensor& w_up, const at::Tensor& w_down,
                          const at::Tensor& mask, int64_t expert_size, int64_t act,
                          const c10::optional<at::Tensor>& w_gate, const c10::optional<at::Tensor>& b_up,
                          const c10::optional<at::Tensor>& b_gate) {
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu(), "x must be a (T, d) CPU tensor");
  FFN f = make_ffn(w_up, w_down, expert_size, act, w_gate, b_up, b_gate);
  TORCH_CHECK(x.size(1) == f.d, "x width does not match w_up");
  const int64_t E = f.inter / f.s;
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 2 && mask.size(0) == x.size(0) &&
                  mask.size(1) == E,
              "mask must be a (T, E) bool tensor");
  at::Tensor m = mask.contiguous();
  at::Tensor xf = as_f32(x);
  Plan p = plan_from_mask(m.data_ptr<bool>(), x.size(0), E);
  return experts_from_plan(f, xf, x, is_bf16(w_up), p);
}

// rows [r0, r1) of the (n_rows, d) matrix w against the T tokens x: out[t * ld + r] = w_r . x_t + b_r
template <typename R>
void matvec_rows(const R* w, const R* b, const float* x, int64_t T, int64_t d, int64_t r0, int64_t r1,
                 float* out, int64_t ld) {
  std::vector<const float*> xs(static_cast<size_t>(T));
  for (int64_t t = 0; t < T; ++t) xs[t] = x + t * d;
  std::vector<float> o(static_cast<size_t>(4 * T));
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) {
    const R* rows[4] = {w + r * d, w + (r + 1) * d, w + (r + 2) * d, w + (r + 3) * d};
    dots_tokens<R, 4>(rows, xs.data(), T, d, o.data(), r + 8 <= r1 ? 4 * d : 0);
    for (int q = 0; q < 4; ++q)
      for (int64_t t = 0; t < T; ++t) out[t * ld + r + q] = o[q * T + t] + (b ? to_f32(b[r + q]) : 0.f);
  }
  for (; r < r1; ++r) {
    const R* rows[1] = {w + r * d};
    dots_tokens<R, 1>(rows, xs.data(), T, d, o.data());
    for (int64_t t = 0; t < T; ++t) out[t * ld + r] = o[t] + (b ? to_f32(b[r]) : 0.f);
  }
}

// scores (T x E fp32) of the router
template <typename R>
void router_scores(const float* x, int64_t T, int64_t d, const R* w1, const R* b1, int64_t n1, const R* w2,
                   const R* b2, int64_t E, float* scores) {
  if (w2 == nullptr) {  // one layer (lte): n1 == E
    at::parallel_for(0, E, 32, [&](int64_t b, int64_t e) { matvec_rows(w1, b1, x, T, d, b, e, scores, E); });
    return;
  }
  std::vector<float> h(static_cast<size_t>(T * n1));
  at::parallel_for(0, n1, 32, [&](int64_t b, int64_t e) { matvec_rows(w1, b1, x, T, d, b, e, h.data(), n1); });
  for (float& v : h) v = v > 0.f ? v : 0.f;
  matvec_rows(w2, b2, h.data(), T, n1, 0, E, scores, E);
  for (int64_t k = 0; k < T * E; ++k) scores[k] = std::fabs(scores[k]);
}

void select_rows(const float* scores, int64_t T, int64_t E, int64_t rule, double threshold, bool* mask) {
  const float thr = static_cast<float>(threshold);
  for (int64_t t = 0; t < T; ++t) {
    const float* sc = scores + t * E;
    bool* m = mask + t * E;
    if (rule == 0) {
      int64_t arg = 0;
      float mx = sc[0];
      for (int64_t e = 1; e < E; ++e)
        if (sc[e] > mx || (std::isnan(sc[e]) && !std::isnan(mx))) {
          mx = sc[e];
          arg = e;
        }
      const float cut = mx * thr;
      for (int64_t e = 0; e < E; ++e) m[e] = sc[e] >= cut;
      m[arg] = true;
    } else {
      for (int64_t e = 0; e < E; ++e) m[e] = 1.f / (1.f + std::exp(-sc[e])) >= thr;
    }
  }
}

std::vector<at::Tensor> sparse_ffn_cpu(const at::Tensor& x, const at::Tensor& r_w1,
                                       const c10::optional<at::Tensor>& r_b1,
                                       const c10::optional<at::Tensor>& r_w2,
                                       const c10::optional<at::Tensor>& r_b2, int64_t rule, double threshold,
                                       const at::Tensor& w_up, const at::Tensor& w_down, int64_t expert_size,
                                       int64_t act, const c10::optional<at::Tensor>& w_gate,
                                       const c10::optional<at::Tensor>& b_up,
                                       const c10::optional<at::Tensor>& b_gate) {
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu(), "x must be a (T, d) CPU tensor");
  TORCH_CHECK(rule == 0 || rule == 1, "rule must be 0 (tau_max) or 1 (sigmoid)");
  FFN f = make_ffn(w_up, w_down, expert_size, act, w_gate, b_up, b_gate);
  const int64_t T = x.size(0), d = f.d, E = f.inter / f.s;
  TORCH_CHECK(x.size(1) == d, "x width does not match w_up");
  check_weight(r_w1, r_w1, "router weight");
  TORCH_CHECK(r_w1.dim() == 2 && r_w1.size(1) == d && r_w1.is_contiguous(),
              "router first weight must be a contiguous (n, d) matrix");
  const int64_t n1 = r_w1.size(0);
  const bool two = r_w2.has_value();
  if (two) {
    check_weight(*r_w2, r_w1, "router second weight");
    TORCH_CHECK(r_w2->dim() == 2 && r_w2->size(0) == E && r_w2->size(1) == n1 && r_w2->is_contiguous(),
                "router second weight must be a contiguous (E, n) matrix");
  } else {
    TORCH_CHECK(n1 == E, "a one-layer router must have E outputs");
  }
  for (const auto* b : {&r_b1, &r_b2})
    if (b->has_value()) {
      check_weight(**b, r_w1, "router bias");
      TORCH_CHECK((*b)->is_contiguous(), "router biases must be contiguous");
    }
  TORCH_CHECK(!r_b1.has_value() || r_b1->numel() == n1, "router first bias has the wrong size");
  TORCH_CHECK(!r_b2.has_value() || r_b2->numel() == E, "router second bias has the wrong size");
  at::Tensor xf = as_f32(x);
  std::vector<float> scores(static_cast<size_t>(T * E));
  auto ptr = [](const c10::optional<at::Tensor>& t) -> const void* {
    return t.has_value() ? t->data_ptr() : nullptr;
  };
  if (is_bf16(r_w1))
    router_scores<bf16_t>(xf.data_ptr<float>(), T, d, static_cast<const bf16_t*>(r_w1.data_ptr()),
                          static_cast<const bf16_t*>(ptr(r_b1)), n1, static_cast<const bf16_t*>(ptr(r_w2)),
                          static_cast<const bf16_t*>(ptr(r_b2)), E, scores.data());
  else
    router_scores<float>(xf.data_ptr<float>(), T, d, r_w1.data_ptr<float>(),
                         static_cast<const float*>(ptr(r_b1)), n1, static_cast<const float*>(ptr(r_w2)),
                         static_cast<const float*>(ptr(r_b2)), E, scores.data());
  at::Tensor mask = at::empty({T, E}, x.options().dtype(at::kBool));
  select_rows(scores.data(), T, E, rule, threshold, mask.data_ptr<bool>());
  Plan p = plan_from_mask(mask.data_ptr<bool>(), T, E);
  return {experts_from_plan(f, xf, x, is_bf16(w_up), p), mask};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "condify compiled CPU kernels (expert_mlp, sparse_ffn)";
  m.def("expert_mlp", &expert_mlp_cpu, "dynamic expert FFN over contiguous expert blocks (CPU)");
  m.def("sparse_ffn", &sparse_ffn_cpu, "router + selection + expert FFN in one call (CPU)");
  m.def("_set_prefetch", [](bool on) { g_prefetch = on; }, "decode software prefetch on/off (tuning)");
}
