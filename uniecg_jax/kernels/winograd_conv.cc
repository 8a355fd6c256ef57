// Winograd F(m, r) 1-D convolution for CPU with the input transform, the n point matmuls and the
// output transform fused per block of tiles, so the transformed input (n/m times the activation)
// and the n point products never leave the core's caches.
//
//   y[b, (t m + i) P + p, o] = bias[o] + res[b, (t m + i) P + p, o]
//                              + sum_j AT[i, j] sum_c U[p, j, c, o] sum_s BT[j, s] a[b, t m + s - pad_p, c]
//
// for phase p < P (P = 1: a plain conv; P = 2: the two polyphase convs of a nearest-upsampled conv,
// interleaved), tile t, output i < m, point j < n = m + r - 1. U holds the filters transformed by G
// (G g, the Winograd filter transform) and packed as column panels [P, n, Cout/panel, Cin, panel]
// (panel = 32 columns with AVX-512, 16 with AVX2), once per weights (winograd_conv.py: pack).
// A residual block's neighbours ride along, so none of them makes a pass over memory of its own:
// - prologue: a = x, or a = silu(x * scale[b] + shift[b]) (a GroupNorm folded into per-sample
//   channel maps, then SiLU), applied as x is read; the zero padding pads a, not x;
// - epilogue: the residual res (or nothing) added as y is written, and y's moments per sample and
//   channel (mean, summed squared deviations; from f64 sums) for the GroupNorm that reads y next.
//
// Why: XLA runs the same algorithm (layers/conv.py) as separate passes over memory: the input
// transform writes n/m times the activation, one batched matmul reads it and writes as much, the
// output transform reads that back. At the DiffuSETS decoder's shapes those passes took ~40% of the
// decode. Here a group of MR tiles is transformed into a 200 kB buffer (L2), every point's
// [MR, Cin] x [Cin, panel] product runs from it with MR x panel accumulators in registers, and is
// folded into the group's m outputs at once (winograd_conv.py has the measured figures).
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "shared_work.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kMaxN = 16;       // points per tile at most (n = m + r - 1)
constexpr int kBlock = 4;       // groups per work item: each filter panel is read once per block
typedef float Vec16 __attribute__((vector_size(64)));  // one AVX-512 register
typedef float Vec8 __attribute__((vector_size(32)));   // one AVX2 register

#if defined(__AVX512F__)
typedef Vec16 Vec;
constexpr int kRows = 12;       // tiles per group: 12 x 32 accumulators = 24 of 32 zmm registers
#else
typedef Vec8 Vec;
constexpr int kRows = 6;        // 6 x 16 accumulators = 12 of 16 ymm registers
#endif
constexpr int kLanes = sizeof(Vec) / sizeof(float);
constexpr int kVecs = 2;                     // accumulator vectors per row
constexpr int64_t kPanel = kVecs * kLanes;   // output columns per packed filter panel

typedef int32_t VecInt __attribute__((vector_size(sizeof(Vec))));

template <typename V>
inline V Load(const float* p) { V v; std::memcpy(&v, p, sizeof(v)); return v; }
template <typename V>
inline void Store(float* p, V v) { std::memcpy(p, &v, sizeof(v)); }

// exp(v) lane by lane: v = k ln2 + f with |f| <= ln2 / 2, exp(f) by Cephes expf's polynomial
// (~1 ulp), times 2^k built in the exponent bits. v is clamped to [-87, 88] (2^k stays a normal
// float); below that exp is < 2e-38 and SiLU's result is 0 to f32 precision anyway.
inline Vec Exp(Vec v) {
  v = v < -87.f ? Vec{} - 87.f : v;
  v = v > 88.f ? Vec{} + 88.f : v;
  const Vec k = (v * 1.44269504088896341f + 12582912.f) - 12582912.f;   // round to nearest
  const Vec f = (v - k * 0.693359375f) + k * 2.12194440e-4f;             // Cody-Waite ln2
  Vec p = 1.9875691500e-4f * f + 1.3981999507e-3f;
  p = p * f + 8.3334519073e-3f;
  p = p * f + 4.1665795894e-2f;
  p = p * f + 1.6666665459e-1f;
  p = p * f + 5.0000001201e-1f;
  p = p * (f * f) + f + 1.f;
  const VecInt bits = (__builtin_convertvector(k, VecInt) + 127) << 23;
  return p * reinterpret_cast<const Vec&>(bits);
}

// silu(v) = v / (1 + exp(-v)), lane by lane.
inline Vec Silu(Vec v) { return v / (1.f + Exp(-v)); }

inline float SiluScalar(float v) {
  Vec lanes = Vec{} + v;
  return Silu(lanes)[0];
}

struct Problem {
  const float* x;      // [B, L, Cin]
  const float* u;      // [P, n, panels, Cin, kPanel]
  const float* bias;   // [Cout]
  const float* scale;  // [B, Cin] or null: the input is silu(x * scale[b] + shift[b])
  const float* shift;  // [B, Cin]
  const float* residual;  // [B, P * out_length, Cout] or null: added to the output
  float bt[kMaxN][kMaxN];  // [n, n]
  float at[kMaxN][kMaxN];  // [m, n]
  std::vector<int64_t> pads;  // [P] zeros before each phase's input
  float* y;            // [B, P * out_length, Cout]
  // Per participating thread, its f64 sums [B, 2, Cout] (`used` once it has claimed work).
  std::vector<double> thread_sums;
  std::unique_ptr<std::atomic<bool>[]> used;
  std::atomic<int64_t> next_thread{0};
  int64_t batch, length, cin, cout, phases, m, n, out_length, tiles, panels, groups;
};

// a[c] = silu(x[c] * scale[c] + shift[c]) for c < cin: independent lanes, so it runs at the
// vector units' throughput (~9 cycles per 8 lanes on Zen 3), not at Exp's latency.
void Activate(const float* x, const float* scale, const float* shift, int64_t cin, float* a) {
  int64_t c = 0;
  for (; c + kLanes <= cin; c += kLanes)
    Store(a + c, Silu(Load<Vec>(x + c) * Load<Vec>(scale + c) + Load<Vec>(shift + c)));
  for (; c < cin; ++c) a[c] = SiluScalar(x[c] * scale[c] + shift[c]);
}

// The input transform of group `group`'s kRows tiles of phase p into spectra [n, kRows, Cin] (rows
// past the last tile are zero): spectra[j, q, c] = sum_s BT[j, s] a[b, t m + s - pad, c], zero
// outside [0, L). Row-major, so the transform writes whole vectors (with the rows innermost it
// wrote lane by lane: 6% slower at 128 channels) and the point products read kRows streams. With
// an activation, a row's inputs are activated into `activated` [2, n, Cin] (alternating halves,
// ~L1-sized) first, each input once: a row that continues the previous one (same sample, next
// tile) points its first n - m inputs at that row's last.
void InputTransform(const Problem& pr, int64_t group, int64_t p, float* spectra, float* activated) {
  const int64_t n = pr.n, m = pr.m, cin = pr.cin, rows_total = pr.batch * pr.tiles;
  for (int q = 0; q < kRows; ++q) {
    const int64_t row = group * kRows + q, b = row / pr.tiles;
    const float* in[kMaxN];
    bool any = false;
    if (row < rows_total) {
      const int64_t start = (row % pr.tiles) * m - pr.pads[p];
      for (int64_t s = 0; s < n; ++s) {
        const int64_t pos = start + s;
        in[s] = (pos >= 0 && pos < pr.length) ? pr.x + (b * pr.length + pos) * cin : nullptr;
        any |= in[s] != nullptr;
      }
    }
    if (!any) {
      for (int64_t j = 0; j < n; ++j)
        std::fill_n(spectra + (j * kRows + q) * cin, cin, 0.f);
      continue;
    }
    if (pr.scale) {   // zero padding (null) stays zero: it pads the activation, not x
      const bool follows = q > 0 && row % pr.tiles != 0;
      for (int64_t s = 0; s < n; ++s) {
        float* a = activated + ((q % 2) * n + s) * cin;
        if (follows && s < n - m) {
          in[s] = in[s] ? activated + (((q + 1) % 2) * n + s + m) * cin : nullptr;
        } else if (in[s]) {
          Activate(in[s], pr.scale + b * cin, pr.shift + b * cin, cin, a);
          in[s] = a;
        }
      }
    }
    int64_t c = 0;
    for (; c + kLanes <= cin; c += kLanes) {
      Vec d[kMaxN];
      for (int64_t s = 0; s < n; ++s) d[s] = in[s] ? Load<Vec>(in[s] + c) : Vec{};
      for (int64_t j = 0; j < n; ++j) {
        Vec acc{};
        for (int64_t s = 0; s < n; ++s) acc += pr.bt[j][s] * d[s];
        Store(spectra + (j * kRows + q) * cin + c, acc);
      }
    }
    for (; c < cin; ++c) {
      for (int64_t j = 0; j < n; ++j) {
        float acc = 0.f;
        for (int64_t s = 0; s < n; ++s) acc += in[s] ? pr.bt[j][s] * in[s][c] : 0.f;
        spectra[(j * kRows + q) * cin + c] = acc;
      }
    }
  }
}

// acc[q] = spectra_j[q, :] . panel for the group's kRows rows (one point j): kRows x kPanel
// accumulators in registers, one filter row and kRows broadcasts (one per row's stream) per input
// channel.
inline void PointProduct(const float* spectra_j, const float* panel, int64_t cin,
                         Vec acc[kRows][kVecs]) {
  for (int q = 0; q < kRows; ++q)
    for (int v = 0; v < kVecs; ++v) acc[q][v] = Vec{};
  const float* w = panel;
#pragma GCC unroll 4
  for (int64_t c = 0; c < cin; ++c, w += kPanel) {
    Vec wv[kVecs];
    for (int v = 0; v < kVecs; ++v) wv[v] = Load<Vec>(w + v * kLanes);
    for (int q = 0; q < kRows; ++q) {
      const float aq = spectra_j[q * cin + c];
      for (int v = 0; v < kVecs; ++v) acc[q][v] += aq * wv[v];   // FMA (-ffp-contract=fast)
    }
  }
}

// Groups [first, first + count) of phase p: transform each, then per filter panel every point's
// products for every group (the panel stays in cache across the block), folded into the m outputs
// and written (with bias and residual) where they fall inside the output; each output is added to
// moment_sums [B, 2, Cout] (sum, sum of squares per sample and channel).
void Block(const Problem& pr, int64_t first, int64_t count, int64_t p, float* spectra, Vec* outs,
           float* activated, double* moment_sums) {
  const int64_t n = pr.n, m = pr.m, cin = pr.cin, rows_total = pr.batch * pr.tiles;
  const int64_t out_rows = pr.phases * pr.out_length, group_size = n * cin * kRows;
  for (int64_t g = 0; g < count; ++g)
    InputTransform(pr, first + g, p, spectra + g * group_size, activated);
  // outs[g, q, i, v]: the block's outputs for one panel
  auto out = [&](int64_t g, int q, int64_t i, int v) -> Vec& {
    return outs[((g * kRows + q) * m + i) * kVecs + v];
  };
  for (int64_t panel = 0; panel < pr.panels; ++panel) {
    const int64_t col = panel * kPanel, width = std::min<int64_t>(kPanel, pr.cout - col);
    Vec bias[kVecs];
    float bias_row[kPanel] = {};
    std::memcpy(bias_row, pr.bias + col, width * 4);
    for (int v = 0; v < kVecs; ++v) bias[v] = Load<Vec>(bias_row + v * kLanes);
    for (int64_t g = 0; g < count; ++g)
      for (int q = 0; q < kRows; ++q)
        for (int64_t i = 0; i < m; ++i)
          for (int v = 0; v < kVecs; ++v) out(g, q, i, v) = bias[v];
    for (int64_t j = 0; j < n; ++j) {
      const float* panel_j = pr.u + ((p * n + j) * pr.panels + panel) * cin * kPanel;
      for (int64_t g = 0; g < count; ++g) {
        Vec acc[kRows][kVecs];
        PointProduct(spectra + g * group_size + j * kRows * cin, panel_j, cin, acc);
        for (int64_t i = 0; i < m; ++i) {
          const float a = pr.at[i][j];
          if (a == 0.f) continue;
          for (int q = 0; q < kRows; ++q)
            for (int v = 0; v < kVecs; ++v) out(g, q, i, v) += a * acc[q][v];
        }
      }
    }
    // Write (plus the residual) and sum each sample's outputs and their squares per channel: in
    // f32 registers over the block's run of rows of one sample, shifted by the run's first output
    // (so the sums stay near the spread, not the mean, and lose nothing to it), then unshifted
    // into this thread's f64 sums (~3x cheaper per output than summing in f64 throughout).
    Vec shift[kVecs], sum[kVecs], squares[kVecs];
    int64_t summed = -1, run = 0;   // the sample in sum / squares, and its outputs in this run
    auto flush = [&] {
      if (run == 0) return;
      float lanes[3][kPanel];
      for (int v = 0; v < kVecs; ++v) {
        Store(lanes[0] + v * kLanes, shift[v]), Store(lanes[1] + v * kLanes, sum[v]);
        Store(lanes[2] + v * kLanes, squares[v]);
      }
      double* sums = moment_sums + summed * 2 * pr.cout + col;
      for (int64_t k = 0; k < width; ++k) {   // x = shift + d: sum x, sum x^2 from sum d, sum d^2
        const double shift_k = lanes[0][k], sum_k = lanes[1][k];
        sums[k] += run * shift_k + sum_k;
        sums[pr.cout + k] += run * shift_k * shift_k + 2.0 * shift_k * sum_k + lanes[2][k];
      }
      run = 0;
    };
    for (int64_t g = 0; g < count; ++g) {
      for (int q = 0; q < kRows; ++q) {
        const int64_t row = (first + g) * kRows + q;
        if (row >= rows_total) break;
        const int64_t b = row / pr.tiles, t = row % pr.tiles;
        if (b != summed) flush(), summed = b;
        for (int64_t i = 0; i < m && t * m + i < pr.out_length; ++i) {
          const int64_t at = (b * out_rows + (t * m + i) * pr.phases + p) * pr.cout + col;
          const float* residual = pr.residual ? pr.residual + at : nullptr;
          float row_out[kPanel] = {};   // a partial panel goes through here (zeros past width)
          const bool whole = width == kPanel;
          if (residual && !whole) std::memcpy(row_out, residual, width * 4);
          float* dst = whole ? pr.y + at : row_out;
          for (int v = 0; v < kVecs; ++v) {
            Vec value = out(g, q, i, v);
            if (residual) value += Load<Vec>((whole ? residual : row_out) + v * kLanes);
            if (run == 0) shift[v] = value, sum[v] = squares[v] = Vec{};
            const Vec d = value - shift[v];
            sum[v] += d, squares[v] += d * d;
            Store(dst + v * kLanes, value);
          }
          if (!whole) std::memcpy(pr.y + at, row_out, width * 4);
          ++run;
        }
      }
    }
    flush();
  }
}

ffi::Error WinogradConv(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> u,
                        ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> scale,
                        ffi::Buffer<ffi::F32> shift, ffi::Buffer<ffi::F32> residual,
                        ffi::Buffer<ffi::F32> bt, ffi::Buffer<ffi::F32> at,
                        ffi::Span<const int64_t> pads, ffi::ResultBuffer<ffi::F32> y,
                        ffi::ResultBuffer<ffi::F32> moments) {
  const auto xd = x.dimensions(), ud = u.dimensions(), yd = y->dimensions();
  const auto btd = bt.dimensions(), atd = at.dimensions();
  if (xd.size() != 3 || ud.size() != 5 || yd.size() != 3 || btd.size() != 2 || atd.size() != 2 ||
      ud[4] != kPanel) {
    return ffi::Error::InvalidArgument(
        "winograd_conv: expected x [B, L, Cin], u [P, n, panels, Cin, panel], y [B, P L', Cout], "
        "bt [n, n], at [m, n]");
  }
  auto problem = std::make_shared<Problem>();
  Problem& pr = *problem;
  pr.batch = xd[0], pr.length = xd[1], pr.cin = xd[2];
  pr.phases = ud[0], pr.n = ud[1], pr.panels = ud[2], pr.cout = yd[2];
  pr.m = atd[0];
  if (btd[0] != pr.n || btd[1] != pr.n || atd[1] != pr.n || pr.n > kMaxN || pr.m > pr.n ||
      ud[3] != pr.cin || yd[0] != pr.batch || yd[1] % pr.phases != 0 ||
      pr.panels != (pr.cout + kPanel - 1) / kPanel ||
      static_cast<int64_t>(pads.size()) != pr.phases) {
    return ffi::Error::InvalidArgument("winograd_conv: shapes disagree");
  }
  const auto sd = scale.dimensions(), hd = shift.dimensions();
  const bool affine = scale.element_count() > 0;
  if (affine ? (sd.size() != 2 || sd[0] != pr.batch || sd[1] != pr.cin ||
                hd.size() != 2 || hd[0] != pr.batch || hd[1] != pr.cin)
             : shift.element_count() != 0) {
    return ffi::Error::InvalidArgument(
        "winograd_conv: scale and shift must both be [B, Cin], or both empty");
  }
  pr.scale = affine ? scale.typed_data() : nullptr;
  pr.shift = affine ? shift.typed_data() : nullptr;
  const auto rd = residual.dimensions(), md = moments->dimensions();
  if (residual.element_count() > 0 &&
      (rd.size() != 3 || rd[0] != yd[0] || rd[1] != yd[1] || rd[2] != yd[2])) {
    return ffi::Error::InvalidArgument("winograd_conv: residual must be [B, P L', Cout] or empty");
  }
  if (md.size() != 3 || md[0] != pr.batch || md[1] != 2 || md[2] != pr.cout) {
    return ffi::Error::InvalidArgument("winograd_conv: moments must be [B, 2, Cout]");
  }
  pr.residual = residual.element_count() > 0 ? residual.typed_data() : nullptr;
  pr.out_length = yd[1] / pr.phases;
  pr.tiles = (pr.out_length + pr.m - 1) / pr.m;
  pr.groups = (pr.batch * pr.tiles + kRows - 1) / kRows;
  pr.x = x.typed_data(), pr.u = u.typed_data(), pr.bias = bias.typed_data();
  pr.y = y->typed_data();
  pr.pads.assign(pads.begin(), pads.end());
  for (int64_t j = 0; j < pr.n; ++j)
    for (int64_t s = 0; s < pr.n; ++s) pr.bt[j][s] = bt.typed_data()[j * pr.n + s];
  for (int64_t i = 0; i < pr.m; ++i)
    for (int64_t j = 0; j < pr.n; ++j) pr.at[i][j] = at.typed_data()[i * pr.n + j];
  // Work items: (phase, block of <= kBlock groups), each with its own transform buffer per thread.
  // The blocks per phase are rounded up to a multiple of the threads and the groups spread evenly
  // over them, so no thread is left with a last block alone (at 512 channels, L 128, batch 16:
  // 59 groups made 15 blocks of 4, 8 for one thread and 7 for the other; now 16 of 3-4).
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t blocks = ((pr.groups + kBlock - 1) / kBlock + threads - 1) / threads * threads;
  const int64_t items = blocks * pr.phases;
  const int64_t helpers = std::min<int64_t>(threads, items) - 1;
  const int64_t sums_size = pr.batch * 2 * pr.cout;
  pr.thread_sums.resize((helpers + 1) * sums_size);   // zeroed by the thread that uses it
  pr.used.reset(new std::atomic<bool>[helpers + 1]);
  for (int64_t k = 0; k <= helpers; ++k) pr.used[k] = false;
  uniecg::RunShared(pool, helpers, items, 1, [problem, blocks, sums_size] {
    const int64_t thread = problem->next_thread++;
    return [problem, blocks, thread, sums_size,
            spectra = std::vector<float>(kBlock * problem->n * problem->cin * kRows),
            outs = std::vector<Vec>(kBlock * kRows * problem->m * kVecs),
            activated = std::vector<float>(problem->scale ? 2 * problem->n * problem->cin : 0)](
               int64_t begin, int64_t end) mutable {
      double* sums = problem->thread_sums.data() + thread * sums_size;
      if (!problem->used[thread]) {
        std::fill(sums, sums + sums_size, 0.0);
        problem->used[thread] = true;
      }
      for (int64_t item = begin; item < end; ++item) {
        const int64_t block = item % blocks, groups = problem->groups;
        const int64_t first = block * groups / blocks, last = (block + 1) * groups / blocks;
        Block(*problem, first, last - first, item / blocks,
              spectra.data(), outs.data(), activated.data(), sums);
      }
    };
  });
  // moments[b, 0, o]: the mean over positions; moments[b, 1, o]: the squared deviations from it,
  // summed (f64 sums, so the difference loses nothing that matters in f32).
  const double count = static_cast<double>(yd[1]);
  float* out = moments->typed_data();
  for (int64_t k = 0; k < pr.batch * pr.cout; ++k) {
    const int64_t b = k / pr.cout, o = k % pr.cout;
    double sum = 0.0, squares = 0.0;
    for (int64_t thread = 0; thread <= helpers; ++thread) {
      if (!pr.used[thread]) continue;
      const double* sums = pr.thread_sums.data() + thread * sums_size + b * 2 * pr.cout;
      sum += sums[o], squares += sums[pr.cout + o];
    }
    out[(b * 2) * pr.cout + o] = static_cast<float>(sum / count);
    out[(b * 2 + 1) * pr.cout + o] = static_cast<float>(std::max(0.0, squares - sum * sum / count));
  }
  return ffi::Error::Success();
}

}  // namespace

// The packed filters' panel width for this build (winograd_conv.py: pack).
extern "C" int64_t UniecgWinogradPanel() { return kPanel; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(UniecgWinogradConv, WinogradConv,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<ffi::Span<const int64_t>>("pads")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
