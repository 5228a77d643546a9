// Selective scan (Mamba-1) forward and backward for the CPU.
//
// Layouts (prepared by adaptive_mamba/ops/selective_scan.py):
//   u, delta, out : (B, D, L) contiguous float32; delta already has its bias and softplus applied
//   A             : (D, N)
//   Bt, Ct        : (B, G, L, N)   -- B/C transposed so that one time step's N values are contiguous
//   Dskip         : (D,)           -- empty tensor when absent
//   h0            : (B, D, N)      -- empty when absent (zero initial state)
// computing h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t,  out_t = <h_t, C_t> + Dskip u_t.
// The elementwise parts around it (delta bias + softplus, the silu(z) gate) are vectorised torch ops
// in the Python wrapper, so this file holds only the sequential part.
//
// One (batch, channel) pair is one independent recurrence over L steps; pairs run in parallel.
// The N-wide inner loops are written so the compiler vectorises them (one AVX-512 register for N = 16),
// with a polynomial exp because exp dominates the cost. The backward recomputes the states of one
// (batch, channel) pair into a thread-local (L, N) buffer instead of storing (B, D, L, N) in the forward.
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

// exp(x) for float, accurate to ~2 ulp on [-87, 88]; written branch-free so loops over it vectorise.
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

struct Args {
  int64_t batch, dim, len, nstate, groups;
  const float *u, *delta, *A, *Bt, *Ct, *Dskip, *h0;
};

Args make_args(const torch::Tensor& u, const torch::Tensor& delta, const torch::Tensor& A,
               const torch::Tensor& Bt, const torch::Tensor& Ct, const torch::Tensor& Dskip,
               const torch::Tensor& h0) {
  auto ptr = [](const torch::Tensor& t) -> const float* { return t.numel() ? t.data_ptr<float>() : nullptr; };
  return Args{u.size(0), u.size(1), u.size(2), A.size(1), Bt.size(1),
              ptr(u), ptr(delta), ptr(A), ptr(Bt), ptr(Ct), ptr(Dskip), ptr(h0)};
}

// kN > 0: state size known at compile time (fully unrolled, vectorised); kN == 0: runtime size.
template <int kN>
void forward_pair(const Args& a, int64_t b, int64_t d, float* out, float* last) {
  const int64_t N = kN > 0 ? kN : a.nstate, L = a.len;
  const int64_t g = d / (a.dim / a.groups);
  const int64_t row = (b * a.dim + d) * L;
  const float* u = a.u + row;
  const float* dl = a.delta + row;
  const float* Bp = a.Bt + (b * a.groups + g) * L * N;
  const float* Cp = a.Ct + (b * a.groups + g) * L * N;
  const float* Ad = a.A + d * N;
  const float skip = a.Dskip ? a.Dskip[d] : 0.0f;
  float h[kN > 0 ? kN : 256];
  for (int64_t n = 0; n < N; ++n) h[n] = a.h0 ? a.h0[(b * a.dim + d) * N + n] : 0.0f;
  for (int64_t t = 0; t < L; ++t) {
    const float dt = dl[t];
    const float du = dt * u[t];
    const float* Bt = Bp + t * N;
    const float* Ct = Cp + t * N;
    float y = 0.0f;
#pragma omp simd reduction(+ : y)
    for (int64_t n = 0; n < N; ++n) {
      h[n] = fast_exp(dt * Ad[n]) * h[n] + du * Bt[n];
      y += h[n] * Ct[n];
    }
    out[row + t] = y + skip * u[t];
  }
  for (int64_t n = 0; n < N; ++n) last[(b * a.dim + d) * N + n] = h[n];
}

struct Grads {
  float *du, *ddelta;  // (B, D, L), written per pair
  float *dB, *dC;      // (B, G, L, N) partial sums of this worker
  double *dA, *dD;     // (D, N), (D,) owned by the worker that owns channel d
};

template <int kN>
void backward_pair(const Args& a, const float* dout, int64_t b, int64_t d, std::vector<float>& hs, const Grads& gr) {
  const int64_t N = kN > 0 ? kN : a.nstate, L = a.len;
  const int64_t g = d / (a.dim / a.groups);
  const int64_t row = (b * a.dim + d) * L;
  const int64_t bg = (b * a.groups + g) * L * N;
  const float* u = a.u + row;
  const float* dl = a.delta + row;
  const float* Bp = a.Bt + bg;
  const float* Cp = a.Ct + bg;
  const float* Ad = a.A + d * N;
  const float skip = a.Dskip ? a.Dskip[d] : 0.0f;

  // 1. Recompute the states h_t of this pair (the forward did not store them).
  float h[kN > 0 ? kN : 256], h_init[kN > 0 ? kN : 256];
  for (int64_t n = 0; n < N; ++n) h_init[n] = h[n] = a.h0 ? a.h0[(b * a.dim + d) * N + n] : 0.0f;
  for (int64_t t = 0; t < L; ++t) {
    const float dt = dl[t];
    const float du = dt * u[t];
    float* ht = hs.data() + t * N;
#pragma omp simd
    for (int64_t n = 0; n < N; ++n) {
      h[n] = fast_exp(dt * Ad[n]) * h[n] + du * Bp[t * N + n];
      ht[n] = h[n];
    }
  }

  // 2. Walk back in time carrying gs = dLoss/dh_t.
  float gs[kN > 0 ? kN : 256], dA_acc[kN > 0 ? kN : 256];
  for (int64_t n = 0; n < N; ++n) gs[n] = dA_acc[n] = 0.0f;
  double dD_acc = 0.0;
  for (int64_t t = L - 1; t >= 0; --t) {
    const float dt = dl[t];
    const float ut = u[t];
    const float* ht = hs.data() + t * N;
    const float* hprev = t > 0 ? hs.data() + (t - 1) * N : h_init;
    const float* Bt = Bp + t * N;
    const float* Ct = Cp + t * N;
    const float dy = dout[row + t];
    dD_acc += static_cast<double>(dy) * ut;
    float du = dy * skip, ddt = 0.0f;
    float* dBt = gr.dB + bg + t * N;
    float* dCt = gr.dC + bg + t * N;
#pragma omp simd reduction(+ : du, ddt)
    for (int64_t n = 0; n < N; ++n) {
      dCt[n] += dy * ht[n];
      const float gn = gs[n] + dy * Ct[n];
      const float decay = fast_exp(dt * Ad[n]);
      const float dd = gn * hprev[n] * decay;  // dLoss/d(dt * A) through the decay
      ddt += dd * Ad[n] + gn * Bt[n] * ut;
      dA_acc[n] += dd * dt;
      dBt[n] += gn * dt * ut;
      du += gn * dt * Bt[n];
      gs[n] = gn * decay;
    }
    gr.ddelta[row + t] = ddt;
    gr.du[row + t] = du;
  }
  for (int64_t n = 0; n < N; ++n) gr.dA[d * N + n] += dA_acc[n];
  gr.dD[d] += dD_acc;
}

template <typename Fn>
void dispatch_nstate(int64_t n, Fn&& fn) {
  switch (n) {
    case 4: fn(std::integral_constant<int, 4>{}); break;
    case 8: fn(std::integral_constant<int, 8>{}); break;
    case 16: fn(std::integral_constant<int, 16>{}); break;
    case 32: fn(std::integral_constant<int, 32>{}); break;
    case 64: fn(std::integral_constant<int, 64>{}); break;
    default: fn(std::integral_constant<int, 0>{}); break;
  }
}

void check_inputs(const torch::Tensor& u, const torch::Tensor& A, const torch::Tensor& Bt) {
  TORCH_CHECK(u.scalar_type() == torch::kFloat32, "selective_scan_cpu expects float32 tensors");
  TORCH_CHECK(A.size(1) <= 256, "selective_scan_cpu supports d_state <= 256, got ", A.size(1));
  TORCH_CHECK(u.size(1) % Bt.size(1) == 0, "d_inner (", u.size(1), ") must be divisible by the number of B/C groups (", Bt.size(1), ")");
}

}  // namespace

std::vector<torch::Tensor> selective_scan_fwd(torch::Tensor u, torch::Tensor delta, torch::Tensor A, torch::Tensor Bt,
                                              torch::Tensor Ct, torch::Tensor Dskip, torch::Tensor h0) {
  check_inputs(u, A, Bt);
  const Args a = make_args(u, delta, A, Bt, Ct, Dskip, h0);
  auto out = torch::empty_like(u);
  auto last = torch::empty({a.batch, a.dim, a.nstate}, u.options());
  float* o = out.data_ptr<float>();
  float* l = last.data_ptr<float>();
  dispatch_nstate(a.nstate, [&](auto kn) {
    at::parallel_for(0, a.batch * a.dim, 1, [&](int64_t begin, int64_t end) {
      FlushDenormals ftz;
      for (int64_t i = begin; i < end; ++i) forward_pair<decltype(kn)::value>(a, i / a.dim, i % a.dim, o, l);
    });
  });
  return {out, last};
}

// Returns du, ddelta, dA, dBt, dCt, dD (float32; dD empty when Dskip was absent).
// `workers` splits the channels into that many contiguous ranges; each range owns a private (B, G, L, N)
// accumulator for dB and dC (channels of one group share B and C), summed at the end.
std::vector<torch::Tensor> selective_scan_bwd(torch::Tensor u, torch::Tensor delta, torch::Tensor A, torch::Tensor Bt,
                                              torch::Tensor Ct, torch::Tensor Dskip, torch::Tensor h0,
                                              torch::Tensor dout, int64_t workers) {
  check_inputs(u, A, Bt);
  const Args a = make_args(u, delta, A, Bt, Ct, Dskip, h0);
  workers = std::max<int64_t>(1, std::min<int64_t>(workers, a.dim));
  auto du = torch::empty_like(u);
  auto ddelta = torch::empty_like(u);
  auto dB_parts = torch::zeros({workers, a.batch, a.groups, a.len, a.nstate}, u.options());
  auto dC_parts = torch::zeros({workers, a.batch, a.groups, a.len, a.nstate}, u.options());
  auto f64 = u.options().dtype(torch::kFloat64);
  auto dA = torch::zeros({a.dim, a.nstate}, f64);
  auto dD = torch::zeros({a.dim}, f64);
  dout = dout.contiguous();
  const float* go = dout.data_ptr<float>();
  const int64_t part = a.batch * a.groups * a.len * a.nstate;
  dispatch_nstate(a.nstate, [&](auto kn) {
    at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
      FlushDenormals ftz;
      std::vector<float> hs(a.len * a.nstate);
      for (int64_t w = begin; w < end; ++w) {
        const Grads gr{du.data_ptr<float>(), ddelta.data_ptr<float>(), dB_parts.data_ptr<float>() + w * part,
                       dC_parts.data_ptr<float>() + w * part, dA.data_ptr<double>(), dD.data_ptr<double>()};
        const int64_t d0 = w * a.dim / workers, d1 = (w + 1) * a.dim / workers;
        for (int64_t b = 0; b < a.batch; ++b)
          for (int64_t d = d0; d < d1; ++d) backward_pair<decltype(kn)::value>(a, go, b, d, hs, gr);
      }
    });
  });
  return {du, ddelta, dA.to(torch::kFloat32), dB_parts.sum(0), dC_parts.sum(0),
          a.Dskip ? dD.to(torch::kFloat32) : torch::empty({0}, u.options())};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fwd", &selective_scan_fwd, "selective scan forward (CPU)");
  m.def("bwd", &selective_scan_bwd, "selective scan backward (CPU, recomputes states)");
}
