// Selective scan (Mamba-1) and the causal depthwise conv + SiLU in front of it: forward and backward, CPU.
//
// Scan (layouts prepared by adaptive_mamba/ops/selective_scan.py):
//   u, delta, z   : (B, D, L) float32, ANY strides -- (B, D, L) contiguous, or the (B, L, D) activations of the
//                   model seen through a transpose: no copy or layout change is needed between conv, scan and gate
//   A             : (D, N) contiguous; delta already has its bias and softplus applied
//   Bm, Cm        : (B, G, N, L) with the N stride 1 (one step's N values contiguous), other strides free
//   Dskip         : (D,)     -- empty tensor when absent
//   z             : gate     -- empty tensor when absent
//   h0            : (B, D, N) contiguous -- empty when absent (zero initial state)
// computing h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t,  y_t = <h_t, C_t> + Dskip u_t,  out_t = y_t silu(z_t).
//
// Work unit: one batch row and a block of up to kK = 16 channels of one B/C group. At each step the kK channels
// are updated together: the inner loops run over the block's channels (one AVX-512 register), with B_t / C_t
// values broadcast, so no horizontal reduction is needed in the forward. exp dominates the cost, hence the
// polynomial exp. The backward recomputes the block's states into a per-thread (L + 1, N, kK) buffer instead
// of storing (B, D, L, N) in the forward.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#if defined(__SSE__)
#include <xmmintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int kK = 16;       // channels per block
constexpr int kMaxN = 256;   // largest d_state

// States decay towards zero; once they are denormal, x86 arithmetic on them is ~100x slower. Flush them to
// zero (FTZ + DAZ) while a kernel runs on this thread, and restore the caller's mode afterwards.
class FlushDenormals {
 public:
#if defined(__SSE__)
  FlushDenormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | 0x8040); }
  ~FlushDenormals() { _mm_setcsr(saved_); }

 private:
  unsigned int saved_;
#endif
};

// exp(x) for float, accurate to ~2 ulp on [-87, 88]; written branch-free so loops over it vectorise.
inline float fast_exp(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float k = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - k * 0.693359375f + k * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(float));
  return e * scale;
}

inline float sigmoid(float x) { return 1.0f / (1.0f + fast_exp(-x)); }

// A (B, D, L) float32 tensor of any strides.
struct Strided {
  float* p;
  int64_t sb, sd, st;
  float& at(int64_t b, int64_t d, int64_t t) const { return p[b * sb + d * sd + t * st]; }
};

Strided strided(const torch::Tensor& t) {
  if (!t.numel()) return Strided{nullptr, 0, 0, 0};
  return Strided{t.data_ptr<float>(), t.stride(0), t.stride(1), t.stride(2)};
}

// B or C: (B, G, N, L) with the N stride 1.
struct StepMajor {
  const float* p;
  int64_t sb, sg, st;
  const float* step(int64_t b, int64_t g, int64_t t) const { return p + b * sb + g * sg + t * st; }
};

StepMajor step_major(const torch::Tensor& t) {
  return StepMajor{t.data_ptr<float>(), t.stride(0), t.stride(1), t.stride(3)};
}

struct Scan {
  int64_t batch, dim, len, nstate, groups, per_group, blocks_per_group;
  Strided u, delta, z;
  StepMajor Bm, Cm;
  const float *A, *Dskip, *h0;

  int64_t blocks() const { return groups * blocks_per_group; }
  // block -> (group, first channel, number of channels): blocks never straddle a B/C group
  void block(int64_t i, int64_t& g, int64_t& d0, int64_t& nk) const {
    g = i / blocks_per_group;
    const int64_t j = i % blocks_per_group;
    d0 = g * per_group + j * kK;
    nk = std::min<int64_t>(kK, per_group - j * kK);
  }
};

Scan make_scan(const torch::Tensor& u, const torch::Tensor& delta, const torch::Tensor& A, const torch::Tensor& Bm,
               const torch::Tensor& Cm, const torch::Tensor& Dskip, const torch::Tensor& z, const torch::Tensor& h0) {
  TORCH_CHECK(u.scalar_type() == torch::kFloat32 && delta.scalar_type() == torch::kFloat32,
              "selective_scan_cpu expects float32 tensors");
  TORCH_CHECK(A.size(1) <= kMaxN, "selective_scan_cpu supports d_state <= ", kMaxN, ", got ", A.size(1));
  TORCH_CHECK(u.size(1) % Bm.size(1) == 0, "d_inner (", u.size(1), ") must be divisible by the number of B/C groups (",
              Bm.size(1), ")");
  TORCH_CHECK(Bm.stride(2) == 1 && Cm.stride(2) == 1, "selective_scan_cpu expects B and C with the N stride 1");
  TORCH_CHECK(A.is_contiguous() && (!h0.numel() || h0.is_contiguous()), "A and h0 must be contiguous");
  auto ptr = [](const torch::Tensor& t) -> const float* { return t.numel() ? t.data_ptr<float>() : nullptr; };
  const int64_t per_group = u.size(1) / Bm.size(1);
  return Scan{u.size(0), u.size(1), u.size(2), A.size(1), Bm.size(1), per_group, (per_group + kK - 1) / kK,
              strided(u), strided(delta), strided(z), step_major(Bm), step_major(Cm), ptr(A), ptr(Dskip), ptr(h0)};
}

// Per block constants: A transposed to (N, kK) (zero in unused lanes), the skip and the initial state.
struct Block {
  int64_t b, g, d0, nk;
  float A[kMaxN][kK], skip[kK], h0[kMaxN][kK];

  Block(const Scan& s, int64_t b_, int64_t i) : b(b_) {
    s.block(i, g, d0, nk);
    for (int64_t n = 0; n < s.nstate; ++n)
      for (int k = 0; k < kK; ++k) {
        A[n][k] = k < nk ? s.A[(d0 + k) * s.nstate + n] : 0.0f;
        h0[n][k] = (k < nk && s.h0) ? s.h0[((b * s.dim) + d0 + k) * s.nstate + n] : 0.0f;
      }
    for (int k = 0; k < kK; ++k) skip[k] = (k < nk && s.Dskip) ? s.Dskip[d0 + k] : 0.0f;
  }
};

// Loads one step's delta and u for the block's lanes (zero in unused lanes).
inline void load_step(const Scan& s, const Block& blk, int64_t t, float* dt, float* uu) {
  for (int k = 0; k < kK; ++k) {
    dt[k] = k < blk.nk ? s.delta.at(blk.b, blk.d0 + k, t) : 0.0f;
    uu[k] = k < blk.nk ? s.u.at(blk.b, blk.d0 + k, t) : 0.0f;
  }
}

// One step of the recurrence for the block; returns <h_t, C_t> per lane in y. Optionally stores h_t.
inline void step_states(const Block& blk, int64_t N, const float* dt, const float* uu, const float* Bt,
                        const float* Ct, float (*h)[kK], float* y, float* store) {
  float du[kK];
#pragma omp simd
  for (int k = 0; k < kK; ++k) {
    du[k] = dt[k] * uu[k];
    y[k] = 0.0f;
  }
  for (int64_t n = 0; n < N; ++n) {
    const float b = Bt[n], c = Ct[n];
#pragma omp simd
    for (int k = 0; k < kK; ++k) {
      h[n][k] = fast_exp(dt[k] * blk.A[n][k]) * h[n][k] + du[k] * b;
      y[k] += h[n][k] * c;
    }
    if (store) std::memcpy(store + n * kK, h[n], sizeof(float) * kK);
  }
}

void forward_block(const Scan& s, const Block& blk, Strided out, float* last) {
  const int64_t N = s.nstate;
  float h[kMaxN][kK], dt[kK], uu[kK], y[kK];
  std::memcpy(h, blk.h0, sizeof(float) * kK * N);
  for (int64_t t = 0; t < s.len; ++t) {
    load_step(s, blk, t, dt, uu);
    step_states(blk, N, dt, uu, s.Bm.step(blk.b, blk.g, t), s.Cm.step(blk.b, blk.g, t), h, y, nullptr);
    for (int64_t k = 0; k < blk.nk; ++k) {
      float v = y[k] + blk.skip[k] * uu[k];
      if (s.z.p) {
        const float zz = s.z.at(blk.b, blk.d0 + k, t);
        v *= zz * sigmoid(zz);
      }
      out.at(blk.b, blk.d0 + k, t) = v;
    }
  }
  for (int64_t k = 0; k < blk.nk; ++k)
    for (int64_t n = 0; n < N; ++n) last[(blk.b * s.dim + blk.d0 + k) * N + n] = h[n][k];
}

struct Grads {
  Strided du, ddelta, dz;
  float *dB, *dC;      // (B, G, L, N) partial sums of this worker
  double *dA, *dD;     // (D, N), (D,): a channel's rows are owned by the worker that owns its block
};

void backward_block(const Scan& s, const Block& blk, Strided dout, std::vector<float>& hs, const Grads& gr) {
  const int64_t N = s.nstate, L = s.len, b = blk.b;
  const int64_t step = N * kK;
  // 1. Recompute the states (row 0: the initial state, row t + 1: h_t); the gate's gradient needs y_t.
  float h[kMaxN][kK], dt[kK], uu[kK], y[kK];
  std::memcpy(h, blk.h0, sizeof(float) * step);
  std::memcpy(hs.data(), blk.h0, sizeof(float) * step);
  for (int64_t t = 0; t < L; ++t) {
    load_step(s, blk, t, dt, uu);
    step_states(blk, N, dt, uu, s.Bm.step(b, blk.g, t), s.Cm.step(b, blk.g, t), h, y, hs.data() + (t + 1) * step);
    if (s.z.p)
      for (int64_t k = 0; k < blk.nk; ++k) {
        const float zz = s.z.at(b, blk.d0 + k, t), sg = sigmoid(zz);
        gr.dz.at(b, blk.d0 + k, t) = dout.at(b, blk.d0 + k, t) * (y[k] + blk.skip[k] * uu[k]) * sg * (1.0f + zz * (1.0f - sg));
      }
  }

  // 2. Walk back in time carrying gs = dLoss/dh_t.
  float gs[kMaxN][kK], dA_acc[kMaxN][kK], dy[kK], du[kK], ddt[kK];
  std::memset(gs, 0, sizeof(float) * step);
  std::memset(dA_acc, 0, sizeof(float) * step);
  double dD_acc[kK] = {0.0};
  const int64_t bg = (b * s.groups + blk.g) * L * N;
  for (int64_t t = L - 1; t >= 0; --t) {
    load_step(s, blk, t, dt, uu);
    for (int k = 0; k < kK; ++k) {
      float g = k < blk.nk ? dout.at(b, blk.d0 + k, t) : 0.0f;
      if (s.z.p && k < blk.nk) {
        const float zz = s.z.at(b, blk.d0 + k, t);
        g *= zz * sigmoid(zz);
      }
      dy[k] = g;
      du[k] = g * blk.skip[k];
      ddt[k] = 0.0f;
      dD_acc[k] += static_cast<double>(g) * uu[k];
    }
    const float* ht = hs.data() + (t + 1) * step;
    const float* hprev = hs.data() + t * step;
    const float* Bt = s.Bm.step(b, blk.g, t);
    const float* Ct = s.Cm.step(b, blk.g, t);
    float* dBt = gr.dB + bg + t * N;
    float* dCt = gr.dC + bg + t * N;
    for (int64_t n = 0; n < N; ++n) {
      const float bn = Bt[n], cn = Ct[n];
      const float* hn = ht + n * kK;
      const float* hp = hprev + n * kK;
      float sB = 0.0f, sC = 0.0f;
#pragma omp simd reduction(+ : sB, sC)
      for (int k = 0; k < kK; ++k) {
        const float a = blk.A[n][k];
        const float gn = gs[n][k] + dy[k] * cn;
        const float decay = fast_exp(dt[k] * a);
        const float dd = gn * hp[k] * decay;  // dLoss/d(dt * A) through the decay
        ddt[k] += dd * a + gn * bn * uu[k];
        dA_acc[n][k] += dd * dt[k];
        sB += gn * dt[k] * uu[k];
        sC += dy[k] * hn[k];
        du[k] += gn * dt[k] * bn;
        gs[n][k] = gn * decay;
      }
      dBt[n] += sB;
      dCt[n] += sC;
    }
    for (int64_t k = 0; k < blk.nk; ++k) {
      gr.ddelta.at(b, blk.d0 + k, t) = ddt[k];
      gr.du.at(b, blk.d0 + k, t) = du[k];
    }
  }
  for (int64_t k = 0; k < blk.nk; ++k) {
    for (int64_t n = 0; n < N; ++n) gr.dA[(blk.d0 + k) * N + n] += dA_acc[n][k];
    gr.dD[blk.d0 + k] += dD_acc[k];
  }
}

}  // namespace

// Returns out (strides of u) and the last state (B, D, N).
std::vector<torch::Tensor> selective_scan_fwd(torch::Tensor u, torch::Tensor delta, torch::Tensor A, torch::Tensor Bm,
                                              torch::Tensor Cm, torch::Tensor Dskip, torch::Tensor z, torch::Tensor h0) {
  const Scan s = make_scan(u, delta, A, Bm, Cm, Dskip, z, h0);
  auto out = torch::empty_like(u);
  auto last = torch::empty({s.batch, s.dim, s.nstate}, u.options());
  const Strided o = strided(out);
  float* l = last.data_ptr<float>();
  at::parallel_for(0, s.batch * s.blocks(), 1, [&](int64_t begin, int64_t end) {
    FlushDenormals ftz;
    for (int64_t i = begin; i < end; ++i) forward_block(s, Block(s, i / s.blocks(), i % s.blocks()), o, l);
  });
  return {out, last};
}

// Returns du, ddelta, dA, dB, dC, dD, dz (float32; dB/dC as (B, G, L, N); dD / dz empty when absent).
// `workers` splits the channel blocks into that many contiguous ranges; each range owns a private (B, G, L, N)
// accumulator for dB and dC (channels of one group share B and C), summed at the end.
std::vector<torch::Tensor> selective_scan_bwd(torch::Tensor u, torch::Tensor delta, torch::Tensor A, torch::Tensor Bm,
                                              torch::Tensor Cm, torch::Tensor Dskip, torch::Tensor z, torch::Tensor h0,
                                              torch::Tensor dout, int64_t workers) {
  const Scan s = make_scan(u, delta, A, Bm, Cm, Dskip, z, h0);
  TORCH_CHECK(dout.scalar_type() == torch::kFloat32, "selective_scan_cpu expects a float32 gradient");
  workers = std::max<int64_t>(1, std::min<int64_t>(workers, s.blocks()));
  auto du = torch::empty_like(u);
  auto ddelta = torch::empty_like(delta);
  auto dz = z.numel() ? torch::empty_like(z) : torch::empty({0}, u.options());
  auto dB_parts = torch::zeros({workers, s.batch, s.groups, s.len, s.nstate}, u.options());
  auto dC_parts = torch::zeros({workers, s.batch, s.groups, s.len, s.nstate}, u.options());
  auto f64 = u.options().dtype(torch::kFloat64);
  auto dA = torch::zeros({s.dim, s.nstate}, f64);
  auto dD = torch::zeros({s.dim}, f64);
  const Strided go = strided(dout);
  const int64_t part = s.batch * s.groups * s.len * s.nstate;
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    FlushDenormals ftz;
    std::vector<float> hs((s.len + 1) * s.nstate * kK);
    for (int64_t w = begin; w < end; ++w) {
      const Grads gr{strided(du), strided(ddelta), strided(dz), dB_parts.data_ptr<float>() + w * part,
                     dC_parts.data_ptr<float>() + w * part, dA.data_ptr<double>(), dD.data_ptr<double>()};
      const int64_t i0 = w * s.blocks() / workers, i1 = (w + 1) * s.blocks() / workers;
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t b = 0; b < s.batch; ++b) backward_block(s, Block(s, b, i), go, hs, gr);
    }
  });
  return {du, ddelta, dA.to(torch::kFloat32), dB_parts.sum(0), dC_parts.sum(0),
          s.Dskip ? dD.to(torch::kFloat32) : torch::empty({0}, u.options()), dz};
}

// ------------------------------------------------------------------------------------------------------------
namespace {

constexpr int64_t kConvChunk = 64;  // channels per parallel work item
constexpr int64_t kMaxConv = 16;    // longest filter

struct Rows {  // (B, L, D) with the channel stride 1
  float* p;
  int64_t sb, st;
  float* row(int64_t b, int64_t t) const { return p + b * sb + t * st; }
};

Rows rows(const torch::Tensor& t) { return Rows{t.data_ptr<float>(), t.stride(0), t.stride(1)}; }

// One chunk of channels [d0, d1): its filter taps transposed to (K, chunk) so the inner loops are contiguous.
struct ConvChunk {
  int64_t d0, n, K;
  float w[kMaxConv][kConvChunk], bias[kConvChunk];

  ConvChunk(const torch::Tensor& weight, const torch::Tensor& b, int64_t c) : d0(c * kConvChunk), K(weight.size(1)) {
    n = std::min(kConvChunk, weight.size(0) - d0);
    const float* wp = weight.data_ptr<float>();
    for (int64_t k = 0; k < K; ++k)
      for (int64_t j = 0; j < n; ++j) w[k][j] = wp[(d0 + j) * K + k];
    for (int64_t j = 0; j < n; ++j) bias[j] = b.numel() ? b.data_ptr<float>()[d0 + j] : 0.0f;
  }

  // pre = bias + sum_k w[k] x[t - (K - 1) + k] at one step (zero padding before t = 0).
  void pre(const Rows& x, int64_t b, int64_t t, float* out) const {
    std::memcpy(out, bias, sizeof(float) * n);
    for (int64_t k = std::max<int64_t>(0, K - 1 - t); k < K; ++k) {
      const float* xr = x.row(b, t - (K - 1) + k) + d0;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) out[j] += w[k][j] * xr[j];
    }
  }
};

void check_conv(const torch::Tensor& x, const torch::Tensor& w) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.stride(2) == 1, "conv1d_silu expects float32 (B, L, D) input "
              "with the channel stride 1");
  TORCH_CHECK(w.is_contiguous() && w.dim() == 2 && w.size(0) == x.size(2), "conv1d_silu expects a contiguous (D, K) "
              "weight");
  TORCH_CHECK(w.size(1) <= kMaxConv, "conv1d_silu supports d_conv <= ", kMaxConv, ", got ", w.size(1));
}

int64_t conv_chunks(const torch::Tensor& w) { return (w.size(0) + kConvChunk - 1) / kConvChunk; }

}  // namespace

// Causal depthwise conv1d + SiLU on (B, L, D) activations (the channel stride 1, other strides free), the layout
// in_proj produces: out[b, t, d] = silu(bias[d] + sum_k w[d, k] x[b, t - (K - 1) + k, d]). The inner loops run
// over contiguous channels; parallel over channel chunks (each owns its weight gradients).
torch::Tensor conv1d_silu_fwd(torch::Tensor x, torch::Tensor w, torch::Tensor bias) {
  check_conv(x, w);
  const int64_t B = x.size(0), L = x.size(1);
  auto out = torch::empty({B, L, x.size(2)}, x.options());
  const Rows xr = rows(x), o = rows(out);
  at::parallel_for(0, conv_chunks(w), 1, [&](int64_t begin, int64_t end) {
    float pre[kConvChunk];
    for (int64_t c = begin; c < end; ++c) {
      const ConvChunk ch(w, bias, c);
      for (int64_t b = 0; b < B; ++b)
        for (int64_t t = 0; t < L; ++t) {
          ch.pre(xr, b, t, pre);
          float* orow = o.row(b, t) + ch.d0;
#pragma omp simd
          for (int64_t j = 0; j < ch.n; ++j) orow[j] = pre[j] * sigmoid(pre[j]);
        }
    }
  });
  return out;
}

// Returns dx (B, L, D) contiguous, dw (D, K), dbias (D,) (empty when bias is).
std::vector<torch::Tensor> conv1d_silu_bwd(torch::Tensor x, torch::Tensor w, torch::Tensor bias, torch::Tensor dout) {
  check_conv(x, w);
  TORCH_CHECK(dout.scalar_type() == torch::kFloat32 && dout.stride(2) == 1, "conv1d_silu expects a float32 gradient "
              "with the channel stride 1");
  const int64_t B = x.size(0), L = x.size(1), D = x.size(2), K = w.size(1);
  auto dx = torch::zeros({B, L, D}, x.options());
  auto dw = torch::zeros({D, K}, x.options().dtype(torch::kFloat64));
  auto db = torch::zeros({D}, x.options().dtype(torch::kFloat64));
  const Rows xr = rows(x), g = rows(dout), dxr = rows(dx);
  at::parallel_for(0, conv_chunks(w), 1, [&](int64_t begin, int64_t end) {
    float gp[kConvChunk];
    for (int64_t c = begin; c < end; ++c) {
      const ConvChunk ch(w, bias, c);
      for (int64_t b = 0; b < B; ++b) {
        float dwl[kMaxConv][kConvChunk] = {{0.0f}}, dbl[kConvChunk] = {0.0f};  // this row's sums, then to double
        for (int64_t t = 0; t < L; ++t) {
          ch.pre(xr, b, t, gp);
          const float* grow = g.row(b, t) + ch.d0;
#pragma omp simd
          for (int64_t j = 0; j < ch.n; ++j) {  // dLoss/dpre = dout * silu'(pre)
            const float sg = sigmoid(gp[j]);
            gp[j] = grow[j] * sg * (1.0f + gp[j] * (1.0f - sg));
            dbl[j] += gp[j];
          }
          for (int64_t k = std::max<int64_t>(0, K - 1 - t); k < K; ++k) {
            const int64_t ts = t - (K - 1) + k;
            const float* xrow = xr.row(b, ts) + ch.d0;
            float* dxrow = dxr.row(b, ts) + ch.d0;
#pragma omp simd
            for (int64_t j = 0; j < ch.n; ++j) {
              dxrow[j] += ch.w[k][j] * gp[j];
              dwl[k][j] += gp[j] * xrow[j];
            }
          }
        }
        double* dwp = dw.data_ptr<double>();
        double* dbp = db.data_ptr<double>();
        for (int64_t j = 0; j < ch.n; ++j) {
          for (int64_t k = 0; k < K; ++k) dwp[(ch.d0 + j) * K + k] += dwl[k][j];
          dbp[ch.d0 + j] += dbl[j];
        }
      }
    }
  });
  return {dx, dw.to(torch::kFloat32), bias.numel() ? db.to(torch::kFloat32) : torch::empty({0}, x.options())};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fwd", &selective_scan_fwd, "selective scan forward (CPU)");
  m.def("bwd", &selective_scan_bwd, "selective scan backward (CPU, recomputes states)");
  m.def("conv1d_silu_fwd", &conv1d_silu_fwd, "causal depthwise conv1d + SiLU forward on (B, L, D) (CPU)");
  m.def("conv1d_silu_bwd", &conv1d_silu_bwd, "causal depthwise conv1d + SiLU backward on (B, L, D) (CPU)");
}
