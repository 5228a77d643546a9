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
// polynomial exp. The states are not stored ((B, D, L, N) would not fit in memory at long L): the forward keeps
// the state at the start of every kChunk steps when a backward will follow (1/kChunk of them), and the backward
// recomputes one chunk at a time from the end, so its working set stays in cache.
// The backward also takes the gradient of the last state (dlast, empty when none) and returns the gradient of
// the initial state, so a sequence split into pieces gets exact gradients through the states it carries.
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

// Loads one step's values of the block's channels into lanes (zero in unused lanes), and stores them back.
inline void gather(const Strided& v, const Block& blk, int64_t t, float* dst) {
  const float* p = &v.at(blk.b, blk.d0, t);
  if (v.sd == 1 && blk.nk == kK) {
    std::memcpy(dst, p, sizeof(float) * kK);
    return;
  }
  for (int k = 0; k < kK; ++k) dst[k] = k < blk.nk ? p[k * v.sd] : 0.0f;
}

inline void scatter(const Strided& v, const Block& blk, int64_t t, const float* src) {
  float* p = &v.at(blk.b, blk.d0, t);
  if (v.sd == 1 && blk.nk == kK) {
    std::memcpy(p, src, sizeof(float) * kK);
    return;
  }
  for (int64_t k = 0; k < blk.nk; ++k) p[k * v.sd] = src[k];
}

// One step of the recurrence for the block; y <- <h_t, C_t> per lane. Optionally stores h_t and exp(dt A).
inline void step_states(const Block& blk, int64_t N, const float* dt, const float* uu, const float* Bt,
                        const float* Ct, float (*h)[kK], float* y, float* store, float* decay_store) {
  float du[kK], ex[kK];
#pragma omp simd
  for (int k = 0; k < kK; ++k) {
    du[k] = dt[k] * uu[k];
    y[k] = 0.0f;
  }
  for (int64_t n = 0; n < N; ++n) {
    const float b = Bt[n], c = Ct[n];
    float* hn = h[n];
#pragma omp simd
    for (int k = 0; k < kK; ++k) {
      ex[k] = fast_exp(dt[k] * blk.A[n][k]);
      hn[k] = ex[k] * hn[k] + du[k] * b;
      y[k] += hn[k] * c;
    }
    if (store) std::memcpy(store + n * kK, hn, sizeof(float) * kK);
    if (decay_store) std::memcpy(decay_store + n * kK, ex, sizeof(float) * kK);
  }
}

// silu(z) per lane.
inline void silu(const float* z, float* out) {
#pragma omp simd
  for (int k = 0; k < kK; ++k) out[k] = z[k] * sigmoid(z[k]);
}

constexpr int64_t kChunk = 64;  // steps between kept states; the backward holds one chunk's states (L2-resident)

int64_t chunks(int64_t len) { return (len + kChunk - 1) / kChunk; }

// Kept states: (B, blocks, chunks, N, kK), the state entering each chunk, lanes as in the block.
float* kept_state(float* ckpt, const Scan& s, int64_t b, int64_t i, int64_t chunk) {
  return ckpt + ((b * s.blocks() + i) * chunks(s.len) + chunk) * s.nstate * kK;
}

// ckpt: where to keep the state entering every chunk, or nullptr (no backward will follow).
void forward_block(const Scan& s, const Block& blk, int64_t i, const Strided& out, float* last, float* ckpt) {
  const int64_t N = s.nstate;
  float h[kMaxN][kK], dt[kK], uu[kK], y[kK], gate[kK];
  std::memcpy(h, blk.h0, sizeof(float) * kK * N);
  for (int64_t t = 0; t < s.len; ++t) {
    if (ckpt && t % kChunk == 0) std::memcpy(kept_state(ckpt, s, blk.b, i, t / kChunk), h, sizeof(float) * kK * N);
    gather(s.delta, blk, t, dt);
    gather(s.u, blk, t, uu);
    step_states(blk, N, dt, uu, s.Bm.step(blk.b, blk.g, t), s.Cm.step(blk.b, blk.g, t), h, y, nullptr, nullptr);
#pragma omp simd
    for (int k = 0; k < kK; ++k) y[k] += blk.skip[k] * uu[k];
    if (s.z.p) {
      gather(s.z, blk, t, gate);
      silu(gate, gate);
#pragma omp simd
      for (int k = 0; k < kK; ++k) y[k] *= gate[k];
    }
    scatter(out, blk, t, y);
  }
  for (int64_t k = 0; k < blk.nk; ++k)
    for (int64_t n = 0; n < N; ++n) last[(blk.b * s.dim + blk.d0 + k) * N + n] = h[n][k];
}

struct Grads {
  Strided du, ddelta, dz;
  float *dB, *dC;      // (B, G, L, N) partial sums of this worker
  double *dA, *dD;     // (D, N), (D,): a channel's rows are owned by the worker that owns its block
  const float* dlast;  // (B, D, N) gradient of the last state, or nullptr
  float* dh0;          // (B, D, N) gradient of the initial state (each block writes its own rows)
};

// Per-thread buffers of the backward: one chunk's states, decays and outputs <h_t, C_t> (recomputed per block),
// and the chunk's dB / dC contributions per lane, summed over the blocks of the range before the one horizontal
// sum per (t, n) (instead of one per block: that reduction was the costliest part of the backward's inner loop).
struct Scratch {
  std::vector<float> hs, decays, ys, dB_lanes, dC_lanes;
  explicit Scratch(int64_t nstate)
      : hs((kChunk + 1) * nstate * kK), decays(kChunk * nstate * kK), ys(kChunk * kK),
        dB_lanes(kChunk * nstate * kK), dC_lanes(kChunk * nstate * kK) {}
};

// Backward of the blocks [i0, i1) of batch row b, all of one B/C group, chunk by chunk from the last: each block
// recomputes the chunk's states from the kept one, then walks back carrying gs = dLoss/dh_t.
void backward_range(const Scan& s, int64_t b, int64_t i0, int64_t i1, float* ckpt, const Strided& dout,
                    Scratch& sc, const Grads& gr) {
  const int64_t N = s.nstate, L = s.len, step = N * kK, nb = i1 - i0;
  std::vector<Block> blks;
  blks.reserve(nb);
  for (int64_t i = i0; i < i1; ++i) blks.emplace_back(s, b, i);
  // per block: gs, dA (float within a row, summed into double at the end), dD (double)
  std::vector<float> gs_all(nb * step), dA_all(nb * step, 0.0f);
  std::vector<double> dD_all(nb * kK, 0.0);
  for (int64_t j = 0; j < nb; ++j) {
    const int64_t rows = (b * s.dim + blks[j].d0) * N;
    for (int64_t n = 0; n < N; ++n)
      for (int k = 0; k < kK; ++k)
        gs_all[j * step + n * kK + k] = (k < blks[j].nk && gr.dlast) ? gr.dlast[rows + k * N + n] : 0.0f;
  }
  const int64_t g = blks[0].g, bg = (b * s.groups + g) * L * N;
  float h[kMaxN][kK], dt[kK], uu[kK], zz[kK], dy[kK], du[kK], ddt[kK];
  for (int64_t t0 = ((L - 1) / kChunk) * kChunk; L > 0 && t0 >= 0; t0 -= kChunk) {
    const int64_t t1 = std::min(L, t0 + kChunk);
    std::fill(sc.dB_lanes.begin(), sc.dB_lanes.end(), 0.0f);
    std::fill(sc.dC_lanes.begin(), sc.dC_lanes.end(), 0.0f);
    for (int64_t j = 0; j < nb; ++j) {
      const Block& blk = blks[j];
      float(*gs)[kK] = reinterpret_cast<float(*)[kK]>(gs_all.data() + j * step);
      float(*dA_acc)[kK] = reinterpret_cast<float(*)[kK]>(dA_all.data() + j * step);
      double* dD_acc = dD_all.data() + j * kK;
      std::memcpy(h, kept_state(ckpt, s, b, i0 + j, t0 / kChunk), sizeof(float) * step);
      std::memcpy(sc.hs.data(), h, sizeof(float) * step);
      for (int64_t t = t0; t < t1; ++t) {
        gather(s.delta, blk, t, dt);
        gather(s.u, blk, t, uu);
        step_states(blk, N, dt, uu, s.Bm.step(b, g, t), s.Cm.step(b, g, t), h, sc.ys.data() + (t - t0) * kK,
                    sc.hs.data() + (t - t0 + 1) * step, sc.decays.data() + (t - t0) * step);
      }
      for (int64_t t = t1 - 1; t >= t0; --t) {
        gather(s.delta, blk, t, dt);
        gather(s.u, blk, t, uu);
        gather(dout, blk, t, dy);
        if (s.z.p) {  // out = y silu(z): dz needs y_t = <h_t, C_t> + skip u_t, dy the gate
          const float* y = sc.ys.data() + (t - t0) * kK;
          gather(s.z, blk, t, zz);
#pragma omp simd
          for (int k = 0; k < kK; ++k) {
            const float sg = sigmoid(zz[k]);
            const float gate = zz[k] * sg;
            zz[k] = dy[k] * (y[k] + blk.skip[k] * uu[k]) * sg * (1.0f + zz[k] * (1.0f - sg));
            dy[k] *= gate;
          }
          scatter(gr.dz, blk, t, zz);
        }
        for (int k = 0; k < kK; ++k) {
          du[k] = dy[k] * blk.skip[k];
          ddt[k] = 0.0f;
          dD_acc[k] += static_cast<double>(dy[k]) * uu[k];
        }
        const float* ht = sc.hs.data() + (t - t0 + 1) * step;
        const float* hprev = sc.hs.data() + (t - t0) * step;
        const float* dec = sc.decays.data() + (t - t0) * step;
        const float* Bt = s.Bm.step(b, g, t);
        const float* Ct = s.Cm.step(b, g, t);
        float* dBl = sc.dB_lanes.data() + (t - t0) * step;
        float* dCl = sc.dC_lanes.data() + (t - t0) * step;
        for (int64_t n = 0; n < N; ++n) {
          const float bn = Bt[n], cn = Ct[n];
          const float* hn = ht + n * kK;
          const float* hp = hprev + n * kK;
          const float* en = dec + n * kK;
          float* dBn = dBl + n * kK;
          float* dCn = dCl + n * kK;
#pragma omp simd
          for (int k = 0; k < kK; ++k) {
            const float a = blk.A[n][k];
            const float gn = gs[n][k] + dy[k] * cn;
            const float dd = gn * hp[k] * en[k];  // dLoss/d(dt * A) through the decay
            ddt[k] += dd * a + gn * bn * uu[k];
            dA_acc[n][k] += dd * dt[k];
            dBn[k] += gn * dt[k] * uu[k];
            dCn[k] += dy[k] * hn[k];
            du[k] += gn * dt[k] * bn;
            gs[n][k] = gn * en[k];
          }
        }
        scatter(gr.ddelta, blk, t, ddt);
        scatter(gr.du, blk, t, du);
      }
    }
    for (int64_t t = t0; t < t1; ++t)  // the chunk's dB_t / dC_t: lanes summed once for all blocks of the range
      for (int64_t n = 0; n < N; ++n) {
        const float* bl = sc.dB_lanes.data() + (t - t0) * step + n * kK;
        const float* cl = sc.dC_lanes.data() + (t - t0) * step + n * kK;
        float sB = 0.0f, sC = 0.0f;
#pragma omp simd reduction(+ : sB, sC)
        for (int k = 0; k < kK; ++k) {
          sB += bl[k];
          sC += cl[k];
        }
        gr.dB[bg + t * N + n] += sB;
        gr.dC[bg + t * N + n] += sC;
      }
  }
  for (int64_t j = 0; j < nb; ++j) {
    const Block& blk = blks[j];
    const int64_t rows = (b * s.dim + blk.d0) * N;
    for (int64_t k = 0; k < blk.nk; ++k) {
      for (int64_t n = 0; n < N; ++n) {
        gr.dA[(blk.d0 + k) * N + n] += dA_all[j * step + n * kK + k];
        gr.dh0[rows + k * N + n] = gs_all[j * step + n * kK + k];
      }
      gr.dD[blk.d0 + k] += dD_all[j * kK + k];
    }
  }
}

}  // namespace

// Returns out (strides of u), the last state (B, D, N) and, with keep_states (a backward will follow), the state
// entering every kChunk steps for selective_scan_bwd (empty otherwise).
std::vector<torch::Tensor> selective_scan_fwd(torch::Tensor u, torch::Tensor delta, torch::Tensor A, torch::Tensor Bm,
                                              torch::Tensor Cm, torch::Tensor Dskip, torch::Tensor z, torch::Tensor h0,
                                              bool keep_states) {
  const Scan s = make_scan(u, delta, A, Bm, Cm, Dskip, z, h0);
  auto out = torch::empty_like(u);
  auto last = torch::empty({s.batch, s.dim, s.nstate}, u.options());
  auto kept = keep_states ? torch::empty({s.batch, s.blocks(), chunks(s.len), s.nstate, kK}, u.options())
                          : torch::empty({0}, u.options());
  const Strided o = strided(out);
  float* l = last.data_ptr<float>();
  float* ckpt = keep_states ? kept.data_ptr<float>() : nullptr;
  at::parallel_for(0, s.batch * s.blocks(), 1, [&](int64_t begin, int64_t end) {
    FlushDenormals ftz;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / s.blocks(), blk = i % s.blocks();
      forward_block(s, Block(s, b, blk), blk, o, l, ckpt);
    }
  });
  return {out, last, kept};
}

// Returns du, ddelta, dA, dB, dC, dD, dz, dh0 (float32; dB/dC as (B, G, L, N); dD / dz empty when absent; dh0
// (B, D, N) always, the initial state's gradient). dlast: (B, D, N) contiguous, or empty.
// kept: the states selective_scan_fwd kept for these inputs.
// `workers` splits the channel blocks into that many contiguous ranges; each range owns a private (B, G, L, N)
// accumulator for dB and dC (channels of one group share B and C), summed at the end.
std::vector<torch::Tensor> selective_scan_bwd(torch::Tensor u, torch::Tensor delta, torch::Tensor A, torch::Tensor Bm,
                                              torch::Tensor Cm, torch::Tensor Dskip, torch::Tensor z, torch::Tensor h0,
                                              torch::Tensor kept, torch::Tensor dout, torch::Tensor dlast,
                                              int64_t workers) {
  const Scan s = make_scan(u, delta, A, Bm, Cm, Dskip, z, h0);
  TORCH_CHECK(kept.is_contiguous() && kept.numel() == s.batch * s.blocks() * chunks(s.len) * s.nstate * kK,
              "selective_scan_cpu backward expects the states kept by the forward (fwd with keep_states=True)");
  TORCH_CHECK(dout.scalar_type() == torch::kFloat32, "selective_scan_cpu expects a float32 gradient");
  TORCH_CHECK(!dlast.numel() || (dlast.is_contiguous() && dlast.numel() == s.batch * s.dim * s.nstate),
              "selective_scan_cpu expects the last state's gradient as a contiguous (B, D, N) tensor");
  workers = std::max<int64_t>(1, std::min<int64_t>(workers, s.blocks()));
  auto du = torch::empty_like(u);
  auto ddelta = torch::empty_like(delta);
  // like u (not z): z is often a non-dense slice, and dz then joins du-shaped gradients in a (B, L, D) cat
  auto dz = z.numel() ? torch::empty_like(u) : torch::empty({0}, u.options());
  auto dB_parts = torch::zeros({workers, s.batch, s.groups, s.len, s.nstate}, u.options());
  auto dC_parts = torch::zeros({workers, s.batch, s.groups, s.len, s.nstate}, u.options());
  auto f64 = u.options().dtype(torch::kFloat64);
  auto dA = torch::zeros({s.dim, s.nstate}, f64);
  auto dD = torch::zeros({s.dim}, f64);
  auto dh0 = torch::empty({s.batch, s.dim, s.nstate}, u.options());
  const float* dl = dlast.numel() ? dlast.data_ptr<float>() : nullptr;
  const Strided go = strided(dout);
  const int64_t part = s.batch * s.groups * s.len * s.nstate;
  float* ckpt = kept.data_ptr<float>();
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    FlushDenormals ftz;
    Scratch scratch(s.nstate);
    for (int64_t w = begin; w < end; ++w) {
      const Grads gr{strided(du), strided(ddelta), strided(dz), dB_parts.data_ptr<float>() + w * part,
                     dC_parts.data_ptr<float>() + w * part, dA.data_ptr<double>(), dD.data_ptr<double>(), dl,
                     dh0.data_ptr<float>()};
      const int64_t i0 = w * s.blocks() / workers, i1 = (w + 1) * s.blocks() / workers;
      for (int64_t b = 0; b < s.batch; ++b)
        for (int64_t i = i0; i < i1;) {  // the range's blocks of one B/C group at a time
          const int64_t group_end = std::min(i1, (i / s.blocks_per_group + 1) * s.blocks_per_group);
          backward_range(s, b, i, group_end, ckpt, go, scratch, gr);
          i = group_end;
        }
    }
  });
  return {du, ddelta, dA.to(torch::kFloat32), dB_parts.sum(0), dC_parts.sum(0),
          s.Dskip ? dD.to(torch::kFloat32) : torch::empty({0}, u.options()), dz, dh0};
}

// ------------------------------------------------------------------------------------------------------------
namespace {

constexpr int64_t kConvRows = 64;  // time steps per parallel work item
constexpr int64_t kMaxConv = 16;   // longest filter

struct Rows {  // (B, L, D) with the channel stride 1
  float* p;
  int64_t sb, st;
  float* row(int64_t b, int64_t t) const { return p + b * sb + t * st; }
};

Rows rows(const torch::Tensor& t) { return Rows{t.data_ptr<float>(), t.stride(0), t.stride(1)}; }

// The filter taps transposed to (K, D), so that every loop runs over whole rows of contiguous channels: the
// activations are rows of 2-4 KiB (x is a slice of in_proj's output), read front to back, each page once.
struct ConvWeights {
  int64_t D, K;
  std::vector<float> w, bias;

  ConvWeights(const torch::Tensor& weight, const torch::Tensor& b) : D(weight.size(0)), K(weight.size(1)),
      w(K * D), bias(D, 0.0f) {
    const float* wp = weight.data_ptr<float>();
    for (int64_t d = 0; d < D; ++d)
      for (int64_t k = 0; k < K; ++k) w[k * D + d] = wp[d * K + k];
    if (b.numel()) std::memcpy(bias.data(), b.data_ptr<float>(), sizeof(float) * D);
  }

  // pre = bias + sum_k w[k] x[t - (K - 1) + k] at one step (zero padding before t = 0).
  void pre(const Rows& x, int64_t b, int64_t t, float* out) const {
    std::memcpy(out, bias.data(), sizeof(float) * D);
    for (int64_t k = std::max<int64_t>(0, K - 1 - t); k < K; ++k) {
      const float* xr = x.row(b, t - (K - 1) + k);
      const float* wk = w.data() + k * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) out[d] += wk[d] * xr[d];
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

// Work items: (batch row, kConvRows steps).
int64_t conv_items(int64_t L) { return (L + kConvRows - 1) / kConvRows; }

}  // namespace

// Causal depthwise conv1d + SiLU on (B, L, D) activations (the channel stride 1, other strides free), the layout
// in_proj produces: out[b, t, d] = silu(bias[d] + sum_k w[d, k] x[b, t - (K - 1) + k, d]). Parallel over blocks
// of kConvRows steps.
torch::Tensor conv1d_silu_fwd(torch::Tensor x, torch::Tensor w, torch::Tensor bias) {
  check_conv(x, w);
  const int64_t B = x.size(0), L = x.size(1), D = x.size(2), per_row = conv_items(L);
  auto out = torch::empty({B, L, D}, x.options());
  const Rows xr = rows(x), o = rows(out);
  const ConvWeights cw(w, bias);
  at::parallel_for(0, B * per_row, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> pre(D);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / per_row, t0 = (item % per_row) * kConvRows;
      for (int64_t t = t0; t < std::min(L, t0 + kConvRows); ++t) {
        cw.pre(xr, b, t, pre.data());
        float* orow = o.row(b, t);
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) orow[d] = pre[d] * sigmoid(pre[d]);
      }
    }
  });
  return out;
}

// Returns dx (B, L, D) contiguous, dw (D, K), dbias (D,) (empty when bias is). Each work item (kConvRows steps
// of one batch row) computes dLoss/dpre for its steps and the K - 1 after them, so it writes its rows of dx
// alone; dw and dbias are summed per thread (float within an item, double across items), then over threads.
std::vector<torch::Tensor> conv1d_silu_bwd(torch::Tensor x, torch::Tensor w, torch::Tensor bias, torch::Tensor dout) {
  check_conv(x, w);
  TORCH_CHECK(dout.scalar_type() == torch::kFloat32 && dout.stride(2) == 1, "conv1d_silu expects a float32 gradient "
              "with the channel stride 1");
  const int64_t B = x.size(0), L = x.size(1), D = x.size(2), K = w.size(1), per_row = conv_items(L);
  auto dx = torch::empty({B, L, D}, x.options());
  const int64_t threads = at::get_num_threads();
  auto dw_parts = torch::zeros({threads, K, D}, x.options().dtype(torch::kFloat64));
  auto db_parts = torch::zeros({threads, D}, x.options().dtype(torch::kFloat64));
  const Rows xr = rows(x), g = rows(dout), dxr = rows(dx);
  const ConvWeights cw(w, bias);
  at::parallel_for(0, B * per_row, 1, [&](int64_t begin, int64_t end) {
    double* dw_acc = dw_parts.data_ptr<double>() + at::get_thread_num() * K * D;
    double* db_acc = db_parts.data_ptr<double>() + at::get_thread_num() * D;
    std::vector<float> gp((kConvRows + K - 1) * D), dwl(K * D), dbl(D);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / per_row, t0 = (item % per_row) * kConvRows;
      const int64_t t1 = std::min(L, t0 + kConvRows), t2 = std::min(L, t1 + K - 1);
      std::fill(dwl.begin(), dwl.end(), 0.0f);
      std::fill(dbl.begin(), dbl.end(), 0.0f);
      for (int64_t t = t0; t < t2; ++t) {  // dLoss/dpre = dout * silu'(pre)
        float* gt = gp.data() + (t - t0) * D;
        cw.pre(xr, b, t, gt);
        const float* grow = g.row(b, t);
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) {
          const float sg = sigmoid(gt[d]);
          gt[d] = grow[d] * sg * (1.0f + gt[d] * (1.0f - sg));
        }
        if (t >= t1) continue;  // the steps after the item only feed its dx
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) dbl[d] += gt[d];
        for (int64_t k = std::max<int64_t>(0, K - 1 - t); k < K; ++k) {
          const float* xrow = xr.row(b, t - (K - 1) + k);
          float* dwk = dwl.data() + k * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) dwk[d] += gt[d] * xrow[d];
        }
      }
      for (int64_t t = t0; t < t1; ++t) {  // dx[t] = sum_k w[k] dpre[t + (K - 1) - k]
        float* dxrow = dxr.row(b, t);
        std::fill(dxrow, dxrow + D, 0.0f);
        for (int64_t k = std::max<int64_t>(0, t + K - t2); k < K; ++k) {
          const float* gs = gp.data() + (t + (K - 1) - k - t0) * D;
          const float* wk = cw.w.data() + k * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) dxrow[d] += wk[d] * gs[d];
        }
      }
      for (int64_t i = 0; i < K * D; ++i) dw_acc[i] += dwl[i];
      for (int64_t d = 0; d < D; ++d) db_acc[d] += dbl[d];
    }
  });
  auto dw = dw_parts.sum(0).t().contiguous().to(torch::kFloat32);  // (K, D) -> (D, K)
  return {dx, dw, bias.numel() ? db_parts.sum(0).to(torch::kFloat32) : torch::empty({0}, x.options())};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fwd", &selective_scan_fwd, "selective scan forward (CPU)");
  m.def("bwd", &selective_scan_bwd, "selective scan backward (CPU, recomputes states; gradients of the initial and last state)");
  m.def("conv1d_silu_fwd", &conv1d_silu_fwd, "causal depthwise conv1d + SiLU forward on (B, L, D) (CPU)");
  m.def("conv1d_silu_bwd", &conv1d_silu_bwd, "causal depthwise conv1d + SiLU backward on (B, L, D) (CPU)");
}
