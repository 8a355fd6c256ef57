// Winograd F(m, r) 1-D convolution for CPU with the input transform, the n point matmuls and the
// output transform fused per block of tiles, so the transformed input (n/m times the activation)
// and the n point products never leave the core's caches.
//
//   y[b, (t m + i) P + p, o] = bias[o] + sum_j AT[i, j] sum_c U[p, j, c, o] sum_s BT[j, s] x[b, t m + s - pad_p, c]
//
// for phase p < P (P = 1: a plain conv; P = 2: the two polyphase convs of a nearest-upsampled conv,
// interleaved), tile t, output i < m, point j < n = m + r - 1. U holds the filters transformed by G
// (G g, the Winograd filter transform) and packed as column panels [P, n, Cout/panel, Cin, panel]
// (panel = 32 columns with AVX-512, 16 with AVX2), once per weights (winograd_conv.py: pack).
//
// Why: XLA runs the same algorithm (layers/conv.py) as separate passes over memory: the input
// transform writes n/m times the activation, one batched matmul reads it and writes as much, the
// output transform reads that back. At the DiffuSETS decoder's shapes those passes took ~40% of the
// decode. Here a group of MR tiles is transformed into a 200 kB buffer (L2), every point's
// [MR, Cin] x [Cin, panel] product runs from it with MR x panel accumulators in registers, and is folded
// into the group's m outputs at once (winograd_conv.py has the measured figures).
#include <algorithm>
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

template <typename V>
inline V Load(const float* p) { V v; std::memcpy(&v, p, sizeof(v)); return v; }
template <typename V>
inline void Store(float* p, V v) { std::memcpy(p, &v, sizeof(v)); }

struct Problem {
  const float* x;      // [B, L, Cin]
  const float* u;      // [P, n, panels, Cin, kPanel]
  const float* bias;   // [Cout]
  float bt[kMaxN][kMaxN];  // [n, n]
  float at[kMaxN][kMaxN];  // [m, n]
  std::vector<int64_t> pads;  // [P] zeros before each phase's input
  float* y;            // [B, P * out_length, Cout]
  int64_t batch, length, cin, cout, phases, m, n, out_length, tiles, panels, groups;
};

// The input transform of group `group`'s kRows tiles of phase p into spectra [n, Cin, kRows] (rows
// past the last tile are zero): spectra[j, c, q] = sum_s BT[j, s] x[b, t m + s - pad, c], zero
// outside [0, L). Channel-major, so the point products read one stream.
void InputTransform(const Problem& pr, int64_t group, int64_t p, float* spectra) {
  const int64_t n = pr.n, cin = pr.cin, rows_total = pr.batch * pr.tiles;
  for (int q = 0; q < kRows; ++q) {
    const int64_t row = group * kRows + q;
    const float* in[kMaxN];
    bool any = false;
    if (row < rows_total) {
      const int64_t b = row / pr.tiles, start = (row % pr.tiles) * pr.m - pr.pads[p];
      for (int64_t s = 0; s < n; ++s) {
        const int64_t pos = start + s;
        in[s] = (pos >= 0 && pos < pr.length) ? pr.x + (b * pr.length + pos) * cin : nullptr;
        any |= in[s] != nullptr;
      }
    }
    if (!any) {
      for (int64_t j = 0; j < n; ++j)
        for (int64_t c = 0; c < cin; ++c) spectra[(j * cin + c) * kRows + q] = 0.f;
      continue;
    }
    int64_t c = 0;
    for (; c + kLanes <= cin; c += kLanes) {
      Vec d[kMaxN];
      for (int64_t s = 0; s < n; ++s) d[s] = in[s] ? Load<Vec>(in[s] + c) : Vec{};
      for (int64_t j = 0; j < n; ++j) {
        Vec acc{};
        for (int64_t s = 0; s < n; ++s) acc += pr.bt[j][s] * d[s];
        float lanes[kLanes];
        Store(lanes, acc);
        float* dst = spectra + (j * cin + c) * kRows + q;
        for (int l = 0; l < kLanes; ++l) dst[l * kRows] = lanes[l];
      }
    }
    for (; c < cin; ++c) {
      for (int64_t j = 0; j < n; ++j) {
        float acc = 0.f;
        for (int64_t s = 0; s < n; ++s) acc += in[s] ? pr.bt[j][s] * in[s][c] : 0.f;
        spectra[(j * cin + c) * kRows + q] = acc;
      }
    }
  }
}

// acc[q] = spectra_j[:, q] . panel for the group's kRows rows (one point j): kRows x kPanel
// accumulators in registers, one filter row and kRows broadcasts per input channel.
inline void PointProduct(const float* spectra_j, const float* panel, int64_t cin,
                         Vec acc[kRows][kVecs]) {
  for (int q = 0; q < kRows; ++q)
    for (int v = 0; v < kVecs; ++v) acc[q][v] = Vec{};
  const float* a = spectra_j;
  const float* w = panel;
#pragma GCC unroll 4
  for (int64_t c = 0; c < cin; ++c, w += kPanel, a += kRows) {
    Vec wv[kVecs];
    for (int v = 0; v < kVecs; ++v) wv[v] = Load<Vec>(w + v * kLanes);
    for (int q = 0; q < kRows; ++q) {
      const float aq = a[q];
      for (int v = 0; v < kVecs; ++v) acc[q][v] += aq * wv[v];   // FMA (-ffp-contract=fast)
    }
  }
}

// Groups [first, first + count) of phase p: transform each, then per filter panel every point's
// products for every group (the panel stays in cache across the block), folded into the m outputs
// and written (with bias) where they fall inside the output.
void Block(const Problem& pr, int64_t first, int64_t count, int64_t p, float* spectra, Vec* outs) {
  const int64_t n = pr.n, m = pr.m, cin = pr.cin, rows_total = pr.batch * pr.tiles;
  const int64_t out_rows = pr.phases * pr.out_length, group_size = n * cin * kRows;
  for (int64_t g = 0; g < count; ++g) InputTransform(pr, first + g, p, spectra + g * group_size);
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
        PointProduct(spectra + g * group_size + j * cin * kRows, panel_j, cin, acc);
        for (int64_t i = 0; i < m; ++i) {
          const float a = pr.at[i][j];
          if (a == 0.f) continue;
          for (int q = 0; q < kRows; ++q)
            for (int v = 0; v < kVecs; ++v) out(g, q, i, v) += a * acc[q][v];
        }
      }
    }
    for (int64_t g = 0; g < count; ++g) {
      for (int q = 0; q < kRows; ++q) {
        const int64_t row = (first + g) * kRows + q;
        if (row >= rows_total) break;
        const int64_t b = row / pr.tiles, t = row % pr.tiles;
        for (int64_t i = 0; i < m && t * m + i < pr.out_length; ++i) {
          float* dst = pr.y + (b * out_rows + (t * m + i) * pr.phases + p) * pr.cout + col;
          if (width == kPanel) {
            for (int v = 0; v < kVecs; ++v) Store(dst + v * kLanes, out(g, q, i, v));
          } else {
            float row_out[kPanel];
            for (int v = 0; v < kVecs; ++v) Store(row_out + v * kLanes, out(g, q, i, v));
            std::memcpy(dst, row_out, width * 4);
          }
        }
      }
    }
  }
}

ffi::Error WinogradConv(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> u,
                        ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> bt,
                        ffi::Buffer<ffi::F32> at, ffi::Span<const int64_t> pads,
                        ffi::ResultBuffer<ffi::F32> y) {
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
  // Work items: (phase, block of kBlock groups), each with its own transform buffer per thread.
  const int64_t blocks = (pr.groups + kBlock - 1) / kBlock, items = blocks * pr.phases;
  const int64_t helpers = std::min<int64_t>(std::max<int64_t>(1, pool.num_threads()), items) - 1;
  uniecg::RunShared(pool, helpers, items, 1, [problem, blocks] {
    return [problem, blocks, spectra = std::vector<float>(kBlock * problem->n * problem->cin * kRows),
            outs = std::vector<Vec>(kBlock * kRows * problem->m * kVecs)](
               int64_t begin, int64_t end) mutable {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t first = item % blocks * kBlock;
        Block(*problem, first, std::min<int64_t>(kBlock, problem->groups - first), item / blocks,
              spectra.data(), outs.data());
      }
    };
  });
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
                                  .Attr<ffi::Span<const int64_t>>("pads")
                                  .Ret<ffi::Buffer<ffi::F32>>());
