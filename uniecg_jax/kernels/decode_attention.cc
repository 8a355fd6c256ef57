// Single-query attention over a KV cache for CPU decoding (one new token per row):
//   out[b, k, g] = softmax_s(q[b, k, g] . K[b, k, s] * scale) . V[b, k, s]
// over the slots s < num_slots whose key_mask[b, s] is set (the others weigh exactly 0, as the
// masked scores of layers/attention.grouped_attention underflow to 0 there).
//
// Why: XLA:CPU runs decoding's two attention contractions as B x K tiny batched matrix-vector
// products at ~12 GB/s of cache, over every slot of the cache whether written yet or not; here each
// (row, kv head) reads only the written slots' keys and values once (all G query heads of the kv
// head share each read), with the (row, kv head) pairs shared among XLA's intra-op threads.
// Built and loaded by decode_attention.py (through native.py, like small_batch_matmul.cc).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "shared_work.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float Vec8 __attribute__((vector_size(32)));   // 8 floats: one AVX2 register

inline Vec8 Load8(const float* p) { Vec8 v; std::memcpy(&v, p, sizeof(v)); return v; }

// a . b over `dim` floats (dim % 16 == 0), two vector accumulators, lanes summed at the end.
inline float Dot(const float* a, const float* b, int64_t dim) {
  Vec8 acc0{}, acc1{};
  for (int64_t i = 0; i < dim; i += 16) {
    acc0 += Load8(a + i) * Load8(b + i);
    acc1 += Load8(a + i + 8) * Load8(b + i + 8);
  }
  acc0 += acc1;
  float lanes[8];
  std::memcpy(lanes, &acc0, sizeof(lanes));
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}

struct Work {
  const float *q, *k, *v;
  const int32_t* mask;
  float* out;
  int64_t pairs, heads, groups, slots, dim, num_slots;
  float scale;

  // (row, kv head) pair p: q/out [G, Dh] at p * G * Dh; K/V [S, Dh] at p * S * Dh.
  void Pair(int64_t p, std::vector<float>& scores) {
    const int64_t row = p / heads, n = num_slots;
    const float* q_p = q + p * groups * dim;
    const float* k_p = k + p * slots * dim;
    const float* v_p = v + p * slots * dim;
    const int32_t* mask_row = mask + row * slots;
    float* out_p = out + p * groups * dim;
    scores.assign(groups * n, 0.0f);
    // Scores: each key slot is read once for all G query heads.
    for (int64_t s = 0; s < n; ++s) {
      if (!mask_row[s]) continue;
      const float* key = k_p + s * dim;
      for (int64_t g = 0; g < groups; ++g) scores[g * n + s] = Dot(q_p + g * dim, key, dim) * scale;
    }
    for (int64_t g = 0; g < groups; ++g) {
      float* row_scores = &scores[g * n];
      float top = -std::numeric_limits<float>::infinity();
      for (int64_t s = 0; s < n; ++s)
        if (mask_row[s]) top = std::max(top, row_scores[s]);
      float total = 0.0f;
      for (int64_t s = 0; s < n; ++s) {
        row_scores[s] = mask_row[s] ? std::exp(row_scores[s] - top) : 0.0f;
        total += row_scores[s];
      }
      // No allowed slot (never in decoding: a row's new token sees itself) leaves zeros.
      if (total > 0.0f)
        for (int64_t s = 0; s < n; ++s) row_scores[s] /= total;   // as jax.nn.softmax divides
      std::memset(out_p + g * dim, 0, dim * sizeof(float));
    }
    // Context: each value slot is read once for all G query heads.
    for (int64_t s = 0; s < n; ++s) {
      if (!mask_row[s]) continue;
      const float* value = v_p + s * dim;
      for (int64_t g = 0; g < groups; ++g) {
        const float weight = scores[g * n + s];
        float* o = out_p + g * dim;
        for (int64_t i = 0; i < dim; ++i) o[i] += weight * value[i];
      }
    }
  }

};

ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> query,
                           ffi::Buffer<ffi::F32> key, ffi::Buffer<ffi::F32> value,
                           ffi::Buffer<ffi::S32> key_mask, ffi::Buffer<ffi::S32> num_slots,
                           ffi::ResultBuffer<ffi::F32> out, float scale) {
  const auto q_dims = query.dimensions(), k_dims = key.dimensions(), v_dims = value.dimensions(),
             m_dims = key_mask.dimensions();
  if (q_dims.size() != 4 || k_dims.size() != 4 || m_dims.size() != 2 ||
      num_slots.element_count() != 1) {
    return ffi::Error::InvalidArgument(
        "decode_attention: expected query [B, K, G, Dh], key/value [B, K, S, Dh], key_mask [B, S], "
        "num_slots []");
  }
  const int64_t rows = q_dims[0], heads = q_dims[1], groups = q_dims[2], dim = q_dims[3];
  const int64_t slots = k_dims[2];
  for (int i = 0; i < 4; ++i) {
    if (k_dims[i] != v_dims[i]) return ffi::Error::InvalidArgument("decode_attention: key != value shape");
  }
  if (k_dims[0] != rows || k_dims[1] != heads || k_dims[3] != dim || m_dims[0] != rows ||
      m_dims[1] != slots || dim % 16 != 0) {
    return ffi::Error::InvalidArgument("decode_attention: shapes disagree (Dh must be a multiple of 16)");
  }
  auto work = std::make_shared<Work>();
  work->q = query.typed_data();
  work->k = key.typed_data();
  work->v = value.typed_data();
  work->mask = key_mask.typed_data();
  work->out = out->typed_data();
  work->pairs = rows * heads;
  work->heads = heads;
  work->groups = groups;
  work->slots = slots;
  work->dim = dim;
  work->num_slots = std::clamp<int64_t>(num_slots.typed_data()[0], 0, slots);
  work->scale = scale;
  // Small caches stay on the calling thread (waking a helper costs more than it saves).
  const int64_t bytes = 2 * work->pairs * work->num_slots * dim * 4;
  const int64_t helpers = bytes < (1 << 18) ? 0 : std::max<int64_t>(1, pool.num_threads()) - 1;
  uniecg::RunShared(pool, helpers, work->pairs, 1, [work] {
    return [work, scores = std::vector<float>()](int64_t begin, int64_t end) mutable {
      for (int64_t p = begin; p < end; ++p) work->Pair(p, scores);
    };
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(UniecgDecodeAttention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));
