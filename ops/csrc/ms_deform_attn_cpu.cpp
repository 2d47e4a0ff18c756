// Multi-scale deformable attention forward and backward on the CPU, behind a C interface (no torch).
//
// Legend: N batch, S = sum_l H_l*W_l value positions, M heads, D channels per head, Lq queries,
// L levels, P sampling points per (head, level).
//
// Layouts (all contiguous, host memory), as for the CUDA kernel (ms_deform_attn.h):
//   value                    (N, S, M, D)          dtype T
//   spatial_shapes           (L, 2) int64 (H, W);  level_start_index (L,) int64
//   sampling_locations       (N, Lq, M, L, P, 2)   normalized (x, y), type A
//   attention_weights        (N, Lq, M, L, P)      type A
//   output / grad_output     (N, Lq, M, D)         dtype T
//   grad_value               (N, S, M, D)          type A, zero-filled by the caller
//   grad_sampling_locations  (N, Lq, M, L, P, 2)   type A, written once per element
//   grad_attention_weights   (N, Lq, M, L, P)      type A, written once per element
//
//   dtype code       T          A
//   0 float32        float      float
//   2 bfloat16       bfloat16   float   (storage only: all arithmetic in float)
//   3 float64        double     double
//
// Sampling follows bilinear.h, which the CUDA kernel shares. Work: the forward runs the
// N*Lq*M (n, q, m) rows in `num_threads` contiguous ranges; each row gathers the D contiguous
// channels of each bilinear neighbour and accumulates them in place. The backward runs the N*M
// (n, m) pairs in ranges: grad_value[n, :, m, :] is written by the queries of that pair only, in
// query order, so there are no write conflicts and the result does not depend on the thread
// count. The loops over D are written so the compiler vectorizes them; on x86-64 with GCC each
// entry point is also built for x86-64-v3 (AVX2, FMA) and chosen at load time by the CPU
// (target_clones), so one cached library serves every x86-64 machine. MSDA_CPU_BASELINE
// (MSDA_CPU_ISA=baseline in ops/cpu/build.py) leaves the x86-64-v3 copy out: the library then holds
// only the "default" copy, which CPUs without AVX2 run, and runs it on any CPU.
//
// Every function returns 0 on success, 1 for sizes the kernel cannot index or an unknown dtype,
// 2 when scratch memory could not be allocated. The kernel trusts the level table: spatial_shapes
// and level_start_index must describe S, or reads go out of bounds (ops/functional.py checks).

#include <stdint.h>
#include <string.h>

#include <climits>
#include <new>
#include <thread>
#include <vector>

#include "bilinear.h"

#define MSDA_CPU_ABI_VERSION 1

// ifunc-based clones need glibc (musl has no ifunc) and GCC 12 for the arch= form.
#if defined(__x86_64__) && defined(__GLIBC__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && \
    !defined(MSDA_CPU_BASELINE)
#define MSDA_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define MSDA_CLONES
#endif

extern "C" {
int msda_cpu_abi_version(void);
int msda_cpu_forward(int dtype, const void* value, const int64_t* spatial_shapes,
                     const int64_t* level_start_index, const void* sampling_locations,
                     const void* attention_weights, void* output, int64_t N, int64_t S, int64_t M,
                     int64_t D, int64_t Lq, int64_t L, int64_t P, int num_threads);
int msda_cpu_backward(int dtype, const void* grad_output, const void* value,
                      const int64_t* spatial_shapes, const int64_t* level_start_index,
                      const void* sampling_locations, const void* attention_weights,
                      void* grad_value, void* grad_sampling_locations,
                      void* grad_attention_weights, int64_t N, int64_t S, int64_t M, int64_t D,
                      int64_t Lq, int64_t L, int64_t P, int num_threads);
}

namespace {

enum : int { kFloat32 = 0, kBFloat16 = 2, kFloat64 = 3 };
enum : int { kOk = 0, kBadArgument = 1, kNoMemory = 2 };

// bfloat16 storage: the upper half of a float32.
struct BFloat16 {
  uint16_t bits;
};

inline float to_acc(float x) { return x; }
inline double to_acc(double x) { return x; }
inline float to_acc(BFloat16 x) {
  const uint32_t u = static_cast<uint32_t>(x.bits) << 16;
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

inline void from_acc(float x, float* dst) { *dst = x; }
inline void from_acc(double x, double* dst) { *dst = x; }
inline void from_acc(float x, BFloat16* dst) {
  uint32_t u;
  memcpy(&u, &x, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) {  // NaN: keep it a (quiet) NaN after truncation
    dst->bits = static_cast<uint16_t>((u >> 16) | 0x40u);
    return;
  }
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
  dst->bits = static_cast<uint16_t>(u >> 16);
}

struct Problem {
  const void* value;
  const void* loc;
  const void* attn;
  const int* levels;  // (H, W, start) per level
  int64_t N, S, M, D, Lq, L, P;
  void* output;
  const void* grad_output;
  void* grad_value;
  void* grad_loc;
  void* grad_attn;
};

// Rows of the forward: out[i] for i = (n*Lq + q)*M + m in [begin, end). acc: D scratch values.
template <typename T>
inline __attribute__((always_inline)) void forward_rows(const Problem& p, int64_t begin,
                                                        int64_t end,
                                                        typename AccOf<T>::type* __restrict acc) {
  using A = typename AccOf<T>::type;
  const T* value = static_cast<const T*>(p.value);
  const A* loc = static_cast<const A*>(p.loc);
  const A* attn = static_cast<const A*>(p.attn);
  T* out = static_cast<T*>(p.output);
  const int64_t D = p.D, row_stride = p.M * p.D, LP = p.L * p.P;
  for (int64_t i = begin; i < end; ++i) {
    const int64_t n = i / (p.Lq * p.M), m = i % p.M;
    const T* v_nm = value + (n * p.S * p.M + m) * D;
    const A* loc_i = loc + i * LP * 2;
    const A* attn_i = attn + i * LP;
    for (int64_t c = 0; c < D; ++c) acc[c] = A(0);
    for (int64_t l = 0; l < p.L; ++l) {
      const int H = p.levels[3 * l], W = p.levels[3 * l + 1], start = p.levels[3 * l + 2];
      for (int64_t pt = 0; pt < p.P; ++pt) {
        const int64_t j = l * p.P + pt;
        const msda::Neighbours<A> nb =
            msda::neighbours_of(loc_i[2 * j], loc_i[2 * j + 1], H, W, start);
        if (nb.valid == 0u) continue;
        A bw[4];
        msda::bilinear_weights(nb, bw);
        const A w = attn_i[j];
        if (nb.valid == 15u) {  // the common case: one pass over D for all four neighbours
          const T* __restrict v0 = v_nm + nb.row[0] * row_stride;
          const T* __restrict v1 = v_nm + nb.row[1] * row_stride;
          const T* __restrict v2 = v_nm + nb.row[2] * row_stride;
          const T* __restrict v3 = v_nm + nb.row[3] * row_stride;
          const A c0 = w * bw[0], c1 = w * bw[1], c2 = w * bw[2], c3 = w * bw[3];
          for (int64_t c = 0; c < D; ++c) {
            acc[c] += c0 * to_acc(v0[c]) + c1 * to_acc(v1[c]) + c2 * to_acc(v2[c]) +
                      c3 * to_acc(v3[c]);
          }
        } else {
          for (int k = 0; k < 4; ++k) {
            if (!(nb.valid & (1u << k))) continue;
            const T* __restrict v = v_nm + nb.row[k] * row_stride;
            const A ck = w * bw[k];
            for (int64_t c = 0; c < D; ++c) acc[c] += ck * to_acc(v[c]);
          }
        }
      }
    }
    T* out_i = out + i * D;
    for (int64_t c = 0; c < D; ++c) from_acc(acc[c], out_i + c);
  }
}

// sum_c g[c] * v[c] with eight partial sums (vectorizable without reassociating, and the same
// order on every call); v[c] += scale * g[c] in the same pass.
template <typename T, typename A>
inline __attribute__((always_inline)) A dot_and_scatter(const A* __restrict g,
                                                        const T* __restrict v,
                                                        A* __restrict gv, A scale, int64_t D) {
  A part[8] = {A(0), A(0), A(0), A(0), A(0), A(0), A(0), A(0)};
  int64_t c = 0;
  for (; c + 8 <= D; c += 8) {
    for (int u = 0; u < 8; ++u) {
      part[u] += g[c + u] * to_acc(v[c + u]);
      gv[c + u] += scale * g[c + u];
    }
  }
  for (int u = 0; c < D; ++c, ++u) {
    part[u] += g[c] * to_acc(v[c]);
    gv[c] += scale * g[c];
  }
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

// Pairs of the backward: (n, m) = (j / M, j % M) for j in [begin, end). g: D scratch values.
template <typename T>
inline __attribute__((always_inline)) void backward_pairs(const Problem& p, int64_t begin,
                                                          int64_t end,
                                                          typename AccOf<T>::type* __restrict g) {
  using A = typename AccOf<T>::type;
  const T* value = static_cast<const T*>(p.value);
  const T* grad_out = static_cast<const T*>(p.grad_output);
  const A* loc = static_cast<const A*>(p.loc);
  const A* attn = static_cast<const A*>(p.attn);
  A* grad_value = static_cast<A*>(p.grad_value);
  A* grad_loc = static_cast<A*>(p.grad_loc);
  A* grad_attn = static_cast<A*>(p.grad_attn);
  const int64_t D = p.D, row_stride = p.M * p.D, LP = p.L * p.P;
  for (int64_t j = begin; j < end; ++j) {
    const int64_t n = j / p.M, m = j % p.M;
    const int64_t value_offset = (n * p.S * p.M + m) * D;
    const T* v_nm = value + value_offset;
    A* gv_nm = grad_value + value_offset;
    for (int64_t q = 0; q < p.Lq; ++q) {
      const int64_t i = (n * p.Lq + q) * p.M + m;
      const T* go = grad_out + i * D;
      for (int64_t c = 0; c < D; ++c) g[c] = to_acc(go[c]);
      const A* loc_i = loc + i * LP * 2;
      const A* attn_i = attn + i * LP;
      A* grad_loc_i = grad_loc + i * LP * 2;
      A* grad_attn_i = grad_attn + i * LP;
      for (int64_t l = 0; l < p.L; ++l) {
        const int H = p.levels[3 * l], W = p.levels[3 * l + 1], start = p.levels[3 * l + 2];
        for (int64_t pt = 0; pt < p.P; ++pt) {
          const int64_t k_pt = l * p.P + pt;
          const msda::Neighbours<A> nb =
              msda::neighbours_of(loc_i[2 * k_pt], loc_i[2 * k_pt + 1], H, W, start);
          const A w = attn_i[k_pt];
          A bw[4], dx[4], dy[4];
          msda::bilinear_weights(nb, bw);
          msda::bilinear_weight_grads(nb, dx, dy);
          A sum_attn = A(0), sum_x = A(0), sum_y = A(0);
          for (int k = 0; k < 4; ++k) {
            if (!(nb.valid & (1u << k))) continue;
            const int64_t row = nb.row[k] * row_stride;
            // <grad_output, neighbour value>, and the neighbour's value gradient in the same pass
            const A dot = dot_and_scatter<T, A>(g, v_nm + row, gv_nm + row, w * bw[k], D);
            sum_attn += bw[k] * dot;
            sum_x += dx[k] * dot;
            sum_y += dy[k] * dot;
          }
          grad_attn_i[k_pt] = sum_attn;
          grad_loc_i[2 * k_pt] = w * A(W) * sum_x;  // d w_im / d x = W
          grad_loc_i[2 * k_pt + 1] = w * A(H) * sum_y;  // d h_im / d y = H
        }
      }
    }
  }
}

// One non-template entry per (direction, dtype), so target_clones can build each for x86-64-v3.
MSDA_CLONES void forward_f32(const Problem& p, int64_t b, int64_t e, float* s) {
  forward_rows<float>(p, b, e, s);
}
MSDA_CLONES void forward_bf16(const Problem& p, int64_t b, int64_t e, float* s) {
  forward_rows<BFloat16>(p, b, e, s);
}
MSDA_CLONES void forward_f64(const Problem& p, int64_t b, int64_t e, double* s) {
  forward_rows<double>(p, b, e, s);
}
MSDA_CLONES void backward_f32(const Problem& p, int64_t b, int64_t e, float* s) {
  backward_pairs<float>(p, b, e, s);
}
MSDA_CLONES void backward_bf16(const Problem& p, int64_t b, int64_t e, float* s) {
  backward_pairs<BFloat16>(p, b, e, s);
}
MSDA_CLONES void backward_f64(const Problem& p, int64_t b, int64_t e, double* s) {
  backward_pairs<double>(p, b, e, s);
}

// Runs fn(p, begin, end, scratch) over [0, n) in `threads` contiguous ranges, the first on the
// calling thread; each range gets its own D scratch values. Ranges that got no thread (thread
// creation failed) run on the calling thread afterwards.
template <typename A>
int parallel_ranges(void (*fn)(const Problem&, int64_t, int64_t, A*), const Problem& p, int64_t n,
                    int threads, int64_t work_per_item) {
  // Below ~64k multiply-adds a thread costs more to start than it saves.
  const int64_t useful = work_per_item > 0 ? (n * work_per_item) / 65536 + 1 : 1;
  int64_t t64 = threads < 1 ? 1 : threads;
  if (t64 > n) t64 = n;
  if (t64 > useful) t64 = useful;
  if (t64 < 1) t64 = 1;
  const int t_count = static_cast<int>(t64);
  std::vector<A> scratch;
  std::vector<std::thread> pool;
  try {
    scratch.resize(static_cast<size_t>(t_count) * static_cast<size_t>(p.D > 0 ? p.D : 1));
    pool.reserve(t_count - 1);
  } catch (const std::bad_alloc&) {
    return kNoMemory;
  }
  auto range = [&](int t) {
    fn(p, n * t / t_count, n * (t + 1) / t_count, scratch.data() + static_cast<size_t>(t) * p.D);
  };
  int started = 1;
  try {
    for (; started < t_count; ++started) pool.emplace_back(range, started);
  } catch (...) {  // std::system_error: fewer threads; the rest of the ranges run below
  }
  range(0);
  for (int t = started; t < t_count; ++t) range(t);
  for (std::thread& th : pool) th.join();
  return kOk;
}

bool sizes_ok(int64_t N, int64_t S, int64_t M, int64_t D, int64_t Lq, int64_t L, int64_t P) {
  if (N < 0 || S < 0 || M < 0 || D < 0 || Lq < 0 || L < 0 || P < 0) return false;
  // Neighbour positions in S are ints (bilinear.h); the products below stay far from overflow.
  if (S > INT_MAX || L > INT_MAX / 3) return false;
  constexpr int64_t kLimit = INT64_MAX / 64;
  if (M > 0 && D > kLimit / M) return false;
  if (N > 0 && S > 0 && M * D > 0 && (N > kLimit / S || N * S > kLimit / (M * D))) return false;
  if (N > 0 && Lq > 0 && M > 0 && (N > kLimit / Lq || N * Lq > kLimit / M)) return false;
  if (L > 0 && P > kLimit / (2 * L)) return false;
  if (N * Lq * M > 0 && L * P * 2 > kLimit / (N * Lq * M)) return false;
  return true;
}

// The level table as (H, W, start) ints; false when a level does not fit in S.
bool read_levels(const int64_t* shapes, const int64_t* starts, int64_t L, int64_t S,
                 std::vector<int>* levels) {
  levels->resize(static_cast<size_t>(3 * L));
  for (int64_t l = 0; l < L; ++l) {
    const int64_t H = shapes[2 * l], W = shapes[2 * l + 1], start = starts[l];
    if (H < 1 || W < 1 || start < 0 || H > S || W > S || H * W > S - start) return false;
    (*levels)[3 * l] = static_cast<int>(H);
    (*levels)[3 * l + 1] = static_cast<int>(W);
    (*levels)[3 * l + 2] = static_cast<int>(start);
  }
  return true;
}

int prepare(Problem* p, const int64_t* spatial_shapes, const int64_t* level_start_index,
            std::vector<int>* levels) {
  if (!sizes_ok(p->N, p->S, p->M, p->D, p->Lq, p->L, p->P)) return kBadArgument;
  try {
    if (!read_levels(spatial_shapes, level_start_index, p->L, p->S, levels)) return kBadArgument;
  } catch (const std::bad_alloc&) {
    return kNoMemory;
  }
  p->levels = levels->data();
  return kOk;
}

}  // namespace

int msda_cpu_abi_version(void) { return MSDA_CPU_ABI_VERSION; }

int msda_cpu_forward(int dtype, const void* value, const int64_t* spatial_shapes,
                     const int64_t* level_start_index, const void* sampling_locations,
                     const void* attention_weights, void* output, int64_t N, int64_t S, int64_t M,
                     int64_t D, int64_t Lq, int64_t L, int64_t P, int num_threads) {
  Problem p = {};
  p.value = value;
  p.loc = sampling_locations;
  p.attn = attention_weights;
  p.N = N, p.S = S, p.M = M, p.D = D, p.Lq = Lq, p.L = L, p.P = P;
  p.output = output;
  std::vector<int> levels;
  const int code = prepare(&p, spatial_shapes, level_start_index, &levels);
  if (code != kOk) return code;
  const int64_t rows = N * Lq * M, work = L * P * 4 * D + D;
  switch (dtype) {
    case kFloat32: return parallel_ranges<float>(forward_f32, p, rows, num_threads, work);
    case kBFloat16: return parallel_ranges<float>(forward_bf16, p, rows, num_threads, work);
    case kFloat64: return parallel_ranges<double>(forward_f64, p, rows, num_threads, work);
    default: return kBadArgument;
  }
}

int msda_cpu_backward(int dtype, const void* grad_output, const void* value,
                      const int64_t* spatial_shapes, const int64_t* level_start_index,
                      const void* sampling_locations, const void* attention_weights,
                      void* grad_value, void* grad_sampling_locations,
                      void* grad_attention_weights, int64_t N, int64_t S, int64_t M, int64_t D,
                      int64_t Lq, int64_t L, int64_t P, int num_threads) {
  Problem p = {};
  p.value = value;
  p.loc = sampling_locations;
  p.attn = attention_weights;
  p.N = N, p.S = S, p.M = M, p.D = D, p.Lq = Lq, p.L = L, p.P = P;
  p.grad_output = grad_output;
  p.grad_value = grad_value;
  p.grad_loc = grad_sampling_locations;
  p.grad_attn = grad_attention_weights;
  std::vector<int> levels;
  const int code = prepare(&p, spatial_shapes, level_start_index, &levels);
  if (code != kOk) return code;
  const int64_t pairs = N * M, work = Lq * (L * P * 8 * D + D);
  switch (dtype) {
    case kFloat32: return parallel_ranges<float>(backward_f32, p, pairs, num_threads, work);
    case kBFloat16: return parallel_ranges<float>(backward_bf16, p, pairs, num_threads, work);
    case kFloat64: return parallel_ranges<double>(backward_f64, p, pairs, num_threads, work);
    default: return kBadArgument;
  }
}
