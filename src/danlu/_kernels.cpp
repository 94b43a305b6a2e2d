// danlu native kernels: single-pass optimizer steps over lists of dense, contiguous CPU tensors.
//
// Built on first use by danlu/_native.py with the system C++ compiler and loaded with ctypes (no torch
// headers, so it builds in seconds). Every kernel streams each array once: it reads the parameter, the
// gradient and the state, computes the algorithm's update u in registers/L1 (blocks of BS elements),
// applies the derivations folded into it and writes the new parameter and state:
//
//   g    = (g + accum) / k               (gradient accumulation, applying call; accum <- 0; g is never written)
//   u    = algorithm(g, state)           (state updated in place)
//   d    = A * u + B * p                 (weight decay, parameter-wise lr, trust ratio folded into A, B)
//   p   <- p + d
//   slow <- lerp(slow, p, alpha); p <- slow   (Lookahead, on its sync steps)
//   ema  <- lerp(ema, p, 1 - mu)              (EMA; before or after Lookahead, in the stack's order)
//
// Layer adaptation needs the norms of d and p before anything is written: phase NORM computes them
// (and, for algorithms whose u can be recomputed from the new state, writes the state), phase APPLY
// then writes the parameter with the trust ratio folded into A and B.
//
// Arithmetic follows the per-tensor reference (danlu's _update_single) operation by operation, in the
// parameter's dtype, without FMA contraction (-ffp-contract=off), so results equal the reference to
// rounding. Only float and double are handled; the Python side falls back for anything else.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

constexpr int64_t BS = 256;            // block length: every temporary lives in L1
constexpr int64_t PAR_MIN = 1 << 16;   // tensors at least this long are split across threads
constexpr int NSLOT = 8;               // p, g, s0, s1, s2, accum, slow, ema
constexpr int NCOEF = 20;              // 0-9 algorithm, 10 A, 11 B, 12 k, 13 alpha, 14 ema weight, 15-17 adapt

enum { ALG_SGD = 0, ALG_ADAGRAD = 1, ALG_ADADELTA = 2, ALG_RMSPROP = 3, ALG_ADAM = 4, ALG_NADAM = 5, ALG_RADAM = 6, ALG_LION = 7 };
enum { M_ACCUM = 1, M_SYNC = 2, M_EMA = 4, M_EMA_FIRST = 8 };
enum { PH_FULL = 0, PH_NORM = 1, PH_APPLY = 2, PH_ADAPT = 3 };

template <typename T>
inline T lerp(T self, T end, T w) {
  // ATen's lerp: exact at both ends
  return std::abs(w) < T(0.5) ? self + w * (end - self) : end - (end - self) * (T(1) - w);
}

// lerp with the branch of ATen's formula chosen outside the loop (w is loop-invariant)
template <bool SMALL, typename T>
inline T lerp_k(T self, T end, T w, T omw) {
  return SMALL ? self + w * (end - self) : end - (end - self) * omw;
}

template <typename T>
inline T sgn(T x) {
  return T((x > T(0)) - (x < T(0)));
}

// ------------------------------------------------------------------ algorithms
// update(): advance the state in place and write the update u; recompute(): u from the new state.

template <typename T, bool MOM, bool FIRST, bool NEST>
void sgd_loop(const double* c, int64_t n, T* __restrict p, const T* __restrict g, T* __restrict buf) {
  const T mu = T(c[1]), damp = T(c[2]), nl = T(c[5]), A = T(c[10]), B = T(c[11]);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const T gj = g[j];
    T u;
    if constexpr (MOM) {
      const T bj = FIRST ? gj : buf[j] * mu + damp * gj;
      buf[j] = bj;
      u = (NEST ? gj + mu * bj : bj) * nl;
    } else {
      u = gj * nl;
    }
    const T pj = p[j];
    p[j] = pj + (A * u + B * pj);
  }
}

template <typename T>
struct Sgd {  // c: 0 has momentum, 1 mu, 2 1-dampening, 3 nesterov, 4 first step, 5 -lr
  static constexpr bool RECOMP = true;
  static constexpr bool DIRECT = true;
  static void direct(const double* c, int64_t n, T* p, const T* g, T* s0, T*, T*) {
    const bool mom = c[0] != 0, first = c[4] != 0, nest = c[3] != 0;
    if (!mom) return sgd_loop<T, false, false, false>(c, n, p, g, s0);
    if (first) return nest ? sgd_loop<T, true, true, true>(c, n, p, g, s0) : sgd_loop<T, true, true, false>(c, n, p, g, s0);
    return nest ? sgd_loop<T, true, false, true>(c, n, p, g, s0) : sgd_loop<T, true, false, false>(c, n, p, g, s0);
  }
  static void update(const double* c, int64_t n, const T* g, T* s0, T*, T*, T* u) {
    const T mu = T(c[1]), damp = T(c[2]), nl = T(c[5]);
    if (c[0] == 0) {
      for (int64_t j = 0; j < n; ++j) u[j] = g[j] * nl;
      return;
    }
    if (c[4] != 0) {
      for (int64_t j = 0; j < n; ++j) s0[j] = g[j];
    } else {
      for (int64_t j = 0; j < n; ++j) s0[j] = s0[j] * mu + damp * g[j];
    }
    recompute(c, n, g, s0, nullptr, nullptr, u);
  }
  static void recompute(const double* c, int64_t n, const T* g, T* s0, T*, T*, T* u) {
    const T mu = T(c[1]), nl = T(c[5]);
    if (c[0] == 0) {
      for (int64_t j = 0; j < n; ++j) u[j] = g[j] * nl;
    } else if (c[3] != 0) {
      for (int64_t j = 0; j < n; ++j) u[j] = (g[j] + mu * s0[j]) * nl;
    } else {
      for (int64_t j = 0; j < n; ++j) u[j] = s0[j] * nl;
    }
  }
};

template <typename T>
struct Adagrad {  // c: 0 -lr, 1 eps
  static constexpr bool RECOMP = true;
  static void update(const double* c, int64_t n, const T* g, T* s0, T*, T*, T* u) {
    for (int64_t j = 0; j < n; ++j) s0[j] = s0[j] + g[j] * g[j];
    recompute(c, n, g, s0, nullptr, nullptr, u);
  }
  static void recompute(const double* c, int64_t n, const T* g, T* s0, T*, T*, T* u) {
    const T nl = T(c[0]), eps = T(c[1]);
    for (int64_t j = 0; j < n; ++j) u[j] = g[j] / (std::sqrt(s0[j]) + eps) * nl;
  }
};

template <typename T>
struct Adadelta {  // c: 0 rho, 1 1-rho, 2 eps, 3 -lr; s0 square_avg, s1 acc_delta
  static constexpr bool RECOMP = false;
  static void update(const double* c, int64_t n, const T* g, T* s0, T* s1, T*, T* u) {
    const T rho = T(c[0]), omr = T(c[1]), eps = T(c[2]), nl = T(c[3]);
    for (int64_t j = 0; j < n; ++j) {
      const T sq = s0[j] * rho + omr * g[j] * g[j];
      const T delta = std::sqrt(s1[j] + eps) / std::sqrt(sq + eps) * g[j];
      s0[j] = sq;
      s1[j] = s1[j] * rho + omr * delta * delta;
      u[j] = delta * nl;
    }
  }
  static void recompute(const double*, int64_t, const T*, T*, T*, T*, T*) {}
};

template <typename T>
struct Rmsprop {  // c: 0 alpha, 1 1-alpha, 2 eps, 3 -lr, 4 centered, 5 has momentum, 6 mu
  // s0 square_avg, s1 momentum_buffer, s2 grad_avg
  static constexpr bool RECOMP = true;
  static void update(const double* c, int64_t n, const T* g, T* s0, T* s1, T* s2, T* u) {
    const T alpha = T(c[0]), oma = T(c[1]);
    for (int64_t j = 0; j < n; ++j) s0[j] = s0[j] * alpha + oma * g[j] * g[j];
    if (c[4] != 0) {
      for (int64_t j = 0; j < n; ++j) s2[j] = lerp(s2[j], g[j], oma);
    }
    if (c[5] != 0) {
      const T eps = T(c[2]), mu = T(c[6]);
      if (c[4] != 0) {
        for (int64_t j = 0; j < n; ++j) s1[j] = s1[j] * mu + g[j] / (std::sqrt(s0[j] - s2[j] * s2[j]) + eps);
      } else {
        for (int64_t j = 0; j < n; ++j) s1[j] = s1[j] * mu + g[j] / (std::sqrt(s0[j]) + eps);
      }
    }
    recompute(c, n, g, s0, s1, s2, u);
  }
  static void recompute(const double* c, int64_t n, const T* g, T* s0, T* s1, T* s2, T* u) {
    const T eps = T(c[2]), nl = T(c[3]);
    if (c[5] != 0) {
      for (int64_t j = 0; j < n; ++j) u[j] = s1[j] * nl;
    } else if (c[4] != 0) {
      for (int64_t j = 0; j < n; ++j) u[j] = g[j] / (std::sqrt(s0[j] - s2[j] * s2[j]) + eps) * nl;
    } else {
      for (int64_t j = 0; j < n; ++j) u[j] = g[j] / (std::sqrt(s0[j]) + eps) * nl;
    }
  }
};

template <typename T>
inline void adam_moments(const double* c, int64_t n, const T* g, T* m, T* v) {
  const T w1 = T(c[0]), b2 = T(c[1]), omb2 = T(c[2]);
  for (int64_t j = 0; j < n; ++j) {
    m[j] = lerp(m[j], g[j], w1);
    v[j] = v[j] * b2 + omb2 * g[j] * g[j];
  }
}

// Adam's common case (no accumulation, Lookahead sync or EMA in this pass) as one loop per element:
// the staged blocks cost compute that shows when the data sit in cache.
template <typename T, bool SMALL>
void adam_direct_loop(const double* c, int64_t n, T* __restrict p, const T* __restrict g, T* __restrict m,
                      T* __restrict v) {
  const T w1 = T(c[0]), b2 = T(c[1]), omb2 = T(c[2]), bc2 = T(c[3]), eps = T(c[4]), k = T(c[5]);
  const T A = T(c[10]), B = T(c[11]), omw1 = T(1) - w1;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const T gj = g[j], mo = m[j];
    const T mj = SMALL ? mo + w1 * (gj - mo) : gj - (gj - mo) * omw1;
    const T vj = v[j] * b2 + omb2 * gj * gj;
    m[j] = mj;
    v[j] = vj;
    const T u = mj / (std::sqrt(vj) / bc2 + eps) * k;
    const T pj = p[j];
    p[j] = pj + (A * u + B * pj);
  }
}

// Adam's pass with the derivations' epilogues (accumulation, Lookahead sync, EMA) in the same loop
template <typename T, bool SMALL, bool ACC, bool SYNC, bool EMA, bool EFIRST>
void adam_modes_loop(const double* c, int64_t n, T* __restrict p, T* __restrict g, T* __restrict m, T* __restrict v,
                     T* __restrict acc, T* __restrict slow, T* __restrict ema) {
  const T w1 = T(c[0]), b2 = T(c[1]), omb2 = T(c[2]), bc2 = T(c[3]), eps = T(c[4]), k = T(c[5]);
  const T A = T(c[10]), B = T(c[11]), kk = T(c[12]), alpha = T(c[13]), ew = T(c[14]), omw1 = T(1) - w1;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    T gj = g[j];
    if constexpr (ACC) {
      gj = (gj + acc[j]) / kk;
      acc[j] = T(0);
    }
    const T mo = m[j];
    const T mj = SMALL ? mo + w1 * (gj - mo) : gj - (gj - mo) * omw1;
    const T vj = v[j] * b2 + omb2 * gj * gj;
    m[j] = mj;
    v[j] = vj;
    const T u = mj / (std::sqrt(vj) / bc2 + eps) * k;
    const T pj = p[j];
    T pn = pj + (A * u + B * pj);
    if constexpr (EMA && EFIRST) ema[j] = lerp(ema[j], pn, ew);
    if constexpr (SYNC) {
      const T sl = lerp(slow[j], pn, alpha);
      slow[j] = sl;
      pn = sl;
    }
    if constexpr (EMA && !EFIRST) ema[j] = lerp(ema[j], pn, ew);
    p[j] = pn;
  }
}

template <typename T, bool SMALL, bool ACC>
void adam_modes_2(const double* c, int mode, int64_t n, T* p, T* g, T* m, T* v, T* acc, T* slow, T* ema) {
  const bool s = mode & M_SYNC, e = mode & M_EMA, f = mode & M_EMA_FIRST;
  if (s) {
    if (!e) return adam_modes_loop<T, SMALL, ACC, true, false, false>(c, n, p, g, m, v, acc, slow, ema);
    if (f) return adam_modes_loop<T, SMALL, ACC, true, true, true>(c, n, p, g, m, v, acc, slow, ema);
    return adam_modes_loop<T, SMALL, ACC, true, true, false>(c, n, p, g, m, v, acc, slow, ema);
  }
  if (!e) return adam_modes_loop<T, SMALL, ACC, false, false, false>(c, n, p, g, m, v, acc, slow, ema);
  return adam_modes_loop<T, SMALL, ACC, false, true, false>(c, n, p, g, m, v, acc, slow, ema);
}

template <typename T>
void adam_modes(const double* c, int mode, int64_t n, T* p, T* g, T* m, T* v, T* acc, T* slow, T* ema) {
  const bool small = std::abs(T(c[0])) < T(0.5), a = mode & M_ACCUM;
  if (small) {
    if (a) return adam_modes_2<T, true, true>(c, mode, n, p, g, m, v, acc, slow, ema);
    return adam_modes_2<T, true, false>(c, mode, n, p, g, m, v, acc, slow, ema);
  }
  if (a) return adam_modes_2<T, false, true>(c, mode, n, p, g, m, v, acc, slow, ema);
  return adam_modes_2<T, false, false>(c, mode, n, p, g, m, v, acc, slow, ema);
}

// layer adaptation's two passes over Adam, each one loop: the norms (advancing m and v), then the write
template <typename T, bool SMALL>
void adam_norm_loop(const double* c, int64_t n, const T* __restrict p, const T* __restrict g, T* __restrict m,
                    T* __restrict v, double* red) {
  const T w1 = T(c[0]), b2 = T(c[1]), omb2 = T(c[2]), bc2 = T(c[3]), eps = T(c[4]), k = T(c[5]);
  const T A = T(c[10]), B = T(c[11]), omw1 = T(1) - w1;
  double sd = 0, sp = 0;
  for (int64_t b0 = 0; b0 < n; b0 += BS) {  // partial sums per block in T, totals in double
    const int64_t e = std::min(n, b0 + BS);
    T bd = 0, bp = 0;
#pragma omp simd reduction(+ : bd, bp)
    for (int64_t j = b0; j < e; ++j) {
      const T gj = g[j], mo = m[j];
      const T mj = SMALL ? mo + w1 * (gj - mo) : gj - (gj - mo) * omw1;
      const T vj = v[j] * b2 + omb2 * gj * gj;
      m[j] = mj;
      v[j] = vj;
      const T d = A * (mj / (std::sqrt(vj) / bc2 + eps) * k) + B * p[j];
      bd += d * d;
      bp += p[j] * p[j];
    }
    sd += double(bd);
    sp += double(bp);
  }
  red[0] += sd;
  red[1] += sp;
}

template <typename T>
void adam_apply_loop(const double* c, int64_t n, T* __restrict p, const T* __restrict m, const T* __restrict v) {
  const T bc2 = T(c[3]), eps = T(c[4]), k = T(c[5]), A = T(c[10]), B = T(c[11]);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const T pj = p[j];
    p[j] = pj + (A * (m[j] / (std::sqrt(v[j]) / bc2 + eps) * k) + B * pj);
  }
}

template <typename T>
void adam_direct(const double* c, int64_t n, T* p, const T* g, T* m, T* v) {
  if (std::abs(T(c[0])) < T(0.5)) {
    adam_direct_loop<T, true>(c, n, p, g, m, v);
  } else {
    adam_direct_loop<T, false>(c, n, p, g, m, v);
  }
}

template <typename T>
struct Adam {  // c: 0 1-b1, 1 b2, 2 1-b2, 3 sqrt(1-b2^t), 4 eps, 5 -lr/(1-b1^t)
  static constexpr bool RECOMP = true;
  static constexpr bool DIRECT = true;
  static void direct(const double* c, int64_t n, T* p, const T* g, T* s0, T* s1, T*) { adam_direct(c, n, p, g, s0, s1); }
  static void direct_norm(const double* c, int64_t n, T* p, const T* g, T* s0, T* s1, T*, double* red) {
    if (std::abs(T(c[0])) < T(0.5)) {
      adam_norm_loop<T, true>(c, n, p, g, s0, s1, red);
    } else {
      adam_norm_loop<T, false>(c, n, p, g, s0, s1, red);
    }
  }
  static void direct_apply(const double* c, int64_t n, T* p, const T*, T* s0, T* s1, T*) { adam_apply_loop(c, n, p, s0, s1); }
  static void direct_modes(const double* c, int mode, int64_t n, T* p, T* g, T* s0, T* s1, T*, T* acc, T* slow, T* ema) {
    adam_modes(c, mode, n, p, g, s0, s1, acc, slow, ema);
  }
  static void update(const double* c, int64_t n, const T* g, T* s0, T* s1, T*, T* u) {
    adam_moments(c, n, g, s0, s1);
    recompute(c, n, g, s0, s1, nullptr, u);
  }
  static void recompute(const double* c, int64_t n, const T*, T* s0, T* s1, T*, T* u) {
    // m / (sqrt(v) / bc2 + eps) * k, with one division: (m * (k * bc2)) / (sqrt(v) + eps * bc2)
    const T bc2 = T(c[3]), eps = T(c[4] * c[3]), k = T(c[5] * c[3]);
    for (int64_t j = 0; j < n; ++j) u[j] = s0[j] * k / (std::sqrt(s1[j]) + eps);
  }
};

template <typename T, bool SMALL, int KIND>  // KIND 0: NAdam, 1: RAdam rectified, 2: RAdam not rectified
void adamlike_loop(const double* c, int64_t n, T* __restrict p, const T* __restrict g, T* __restrict m, T* __restrict v) {
  const T w1 = T(c[0]), b2 = T(c[1]), omb2 = T(c[2]), bc2 = T(c[3]), eps = T(c[4]), c5 = T(c[5]), c6 = T(c[6]);
  const T A = T(c[10]), B = T(c[11]), omw1 = T(1) - w1;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const T gj = g[j];
    const T mj = lerp_k<SMALL>(m[j], gj, w1, omw1);
    const T vj = v[j] * b2 + omb2 * gj * gj;
    m[j] = mj;
    v[j] = vj;
    T u;
    if constexpr (KIND == 0) {
      const T denom = std::sqrt(vj) / bc2 + eps;
      u = gj / denom * c5 + c6 * (mj / denom);
    } else if constexpr (KIND == 1) {
      u = mj / (std::sqrt(vj) + eps) * c6;
    } else {
      u = mj * c5;
    }
    const T pj = p[j];
    p[j] = pj + (A * u + B * pj);
  }
}

template <typename T, int KIND>
void adamlike(const double* c, int64_t n, T* p, const T* g, T* m, T* v) {
  if (std::abs(T(c[0])) < T(0.5)) {
    adamlike_loop<T, true, KIND>(c, n, p, g, m, v);
  } else {
    adamlike_loop<T, false, KIND>(c, n, p, g, m, v);
  }
}

template <typename T>
struct Nadam {  // c: 0-4 as Adam, 5 grad coefficient, 6 momentum coefficient
  static constexpr bool RECOMP = true;
  static constexpr bool DIRECT = true;
  static void direct(const double* c, int64_t n, T* p, const T* g, T* s0, T* s1, T*) { adamlike<T, 0>(c, n, p, g, s0, s1); }
  static void update(const double* c, int64_t n, const T* g, T* s0, T* s1, T*, T* u) {
    adam_moments(c, n, g, s0, s1);
    recompute(c, n, g, s0, s1, nullptr, u);
  }
  static void recompute(const double* c, int64_t n, const T* g, T* s0, T* s1, T*, T* u) {
    const T bc2 = T(c[3]), eps = T(c[4]), gc = T(c[5]), mc = T(c[6]);
    for (int64_t j = 0; j < n; ++j) {
      const T denom = std::sqrt(s1[j]) / bc2 + eps;
      u[j] = g[j] / denom * gc + mc * (s0[j] / denom);
    }
  }
};

template <typename T>
struct Radam {  // c: 0-2 as Adam, 3 rectified, 4 eps, 5 scale, 6 scale * adaptive
  static constexpr bool RECOMP = true;
  static constexpr bool DIRECT = true;
  static void direct(const double* c, int64_t n, T* p, const T* g, T* s0, T* s1, T*) {
    if (c[3] != 0) {
      adamlike<T, 1>(c, n, p, g, s0, s1);
    } else {
      adamlike<T, 2>(c, n, p, g, s0, s1);
    }
  }
  static void update(const double* c, int64_t n, const T* g, T* s0, T* s1, T*, T* u) {
    adam_moments(c, n, g, s0, s1);
    recompute(c, n, g, s0, s1, nullptr, u);
  }
  static void recompute(const double* c, int64_t n, const T*, T* s0, T* s1, T*, T* u) {
    const T eps = T(c[4]), scale = T(c[5]), k = T(c[6]);
    if (c[3] == 0) {
      for (int64_t j = 0; j < n; ++j) u[j] = s0[j] * scale;
    } else {
      for (int64_t j = 0; j < n; ++j) u[j] = s0[j] / (std::sqrt(s1[j]) + eps) * k;
    }
  }
};

template <typename T, bool S1, bool S2>
void lion_loop(const double* c, int64_t n, T* __restrict p, const T* __restrict g, T* __restrict m) {
  const T w1 = T(c[0]), w2 = T(c[1]), nl = T(c[2]), A = T(c[10]), B = T(c[11]);
  const T o1 = T(1) - w1, o2 = T(1) - w2;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const T gj = g[j], mj = m[j];
    const T u = sgn(lerp_k<S1>(mj, gj, w1, o1)) * nl;
    m[j] = lerp_k<S2>(mj, gj, w2, o2);
    const T pj = p[j];
    p[j] = pj + (A * u + B * pj);
  }
}

template <typename T>
struct Lion {  // c: 0 1-b1, 1 1-b2, 2 -lr
  static constexpr bool RECOMP = false;
  static constexpr bool DIRECT = true;
  static void direct(const double* c, int64_t n, T* p, const T* g, T* s0, T*, T*) {
    const bool s1 = std::abs(T(c[0])) < T(0.5), s2 = std::abs(T(c[1])) < T(0.5);
    if (s1 && s2) return lion_loop<T, true, true>(c, n, p, g, s0);
    if (s1) return lion_loop<T, true, false>(c, n, p, g, s0);
    if (s2) return lion_loop<T, false, true>(c, n, p, g, s0);
    return lion_loop<T, false, false>(c, n, p, g, s0);
  }
  static void update(const double* c, int64_t n, const T* g, T* s0, T*, T*, T* u) {
    const T w1 = T(c[0]), w2 = T(c[1]), nl = T(c[2]);
    for (int64_t j = 0; j < n; ++j) {
      u[j] = sgn(lerp(s0[j], g[j], w1)) * nl;
      s0[j] = lerp(s0[j], g[j], w2);
    }
  }
  static void recompute(const double*, int64_t, const T*, T*, T*, T*, T*) {}
};

// ------------------------------------------------------------------ shared epilogue

// p <- p + A u + B p, then Lookahead / EMA; `u` is overwritten with the new parameter.
template <typename T>
inline void write_params(const double* c, int mode, int64_t n, T* p, T* u, T* slow, T* ema) {
  const T A = T(c[10]), B = T(c[11]);
  for (int64_t j = 0; j < n; ++j) u[j] = p[j] + (A * u[j] + B * p[j]);
  const T alpha = T(c[13]), ew = T(c[14]);
  if ((mode & M_EMA) && (mode & M_EMA_FIRST)) {
    for (int64_t j = 0; j < n; ++j) ema[j] = lerp(ema[j], u[j], ew);
  }
  if (mode & M_SYNC) {
    for (int64_t j = 0; j < n; ++j) {
      slow[j] = lerp(slow[j], u[j], alpha);
      u[j] = slow[j];
    }
  }
  if ((mode & M_EMA) && !(mode & M_EMA_FIRST)) {
    for (int64_t j = 0; j < n; ++j) ema[j] = lerp(ema[j], u[j], ew);
  }
  std::memcpy(p, u, sizeof(T) * n);
}

template <typename T>
inline void norms(const double* c, int64_t n, const T* p, const T* u, double* red) {
  const T A = T(c[10]), B = T(c[11]);
  T sd = 0, sp = 0;  // partial sums of one block (<= 256 terms) in T, the total in double
#pragma omp simd reduction(+ : sd, sp)
  for (int64_t j = 0; j < n; ++j) {
    const T d = A * u[j] + B * p[j];
    sd += d * d;
    sp += p[j] * p[j];
  }
  red[0] += double(sd);
  red[1] += double(sp);
}

inline void* off(void* base, int64_t i, size_t size) {
  return base ? static_cast<char*>(base) + i * size : nullptr;
}

// ------------------------------------------------------------------ elementwise driver

template <class A, class = void>
struct has_direct : std::false_type {};
template <class A>
struct has_direct<A, std::void_t<decltype(A::DIRECT)>> : std::true_type {};

template <class A, class = void>
struct has_direct_modes : std::false_type {};
template <class A>
struct has_direct_modes<A, std::void_t<decltype(&A::direct_modes)>> : std::true_type {};

template <class A, class = void>
struct has_direct_adapt : std::false_type {};
template <class A>
struct has_direct_adapt<A, std::void_t<decltype(&A::direct_norm)>> : std::true_type {};

template <typename T, template <typename> class Alg>
void run_range(const double* c, int mode, int phase, void* const* slots, int64_t begin, int64_t end, double* red) {
  alignas(64) T gb[BS], u[BS], t0[BS], t1[BS], t2[BS];
  T* p0 = static_cast<T*>(slots[0]);
  T* g0 = static_cast<T*>(slots[1]);
  if constexpr (has_direct<Alg<T>>::value) {
    auto at = [&](int k) { return slots[k] ? static_cast<T*>(slots[k]) + begin : nullptr; };
    if (phase == PH_FULL && mode == 0) {
      Alg<T>::direct(c, end - begin, p0 + begin, g0 + begin, at(2), at(3), at(4));
      return;
    }
    if constexpr (has_direct_modes<Alg<T>>::value) {
      if (phase == PH_FULL) {
        Alg<T>::direct_modes(c, mode, end - begin, p0 + begin, g0 + begin, at(2), at(3), at(4), at(5), at(6), at(7));
        return;
      }
    }
    if constexpr (has_direct_adapt<Alg<T>>::value) {
      if (phase == PH_NORM && mode == 0) {
        Alg<T>::direct_norm(c, end - begin, p0 + begin, g0 + begin, at(2), at(3), at(4), red);
        return;
      }
      if (phase == PH_APPLY && mode == 0) {
        Alg<T>::direct_apply(c, end - begin, p0 + begin, nullptr, at(2), at(3), at(4));
        return;
      }
    }
  }
  const T kk = T(c[12]);
  for (int64_t b = begin; b < end; b += BS) {
    const int64_t n = std::min(BS, end - b);
    T* p = p0 + b;
    const T* g = g0 ? g0 + b : nullptr;
    T* s0 = static_cast<T*>(off(slots[2], b, sizeof(T)));
    T* s1 = static_cast<T*>(off(slots[3], b, sizeof(T)));
    T* s2 = static_cast<T*>(off(slots[4], b, sizeof(T)));
    if (mode & M_ACCUM) {
      T* acc = static_cast<T*>(slots[5]) + b;
      T* gm = g0 + b;
      for (int64_t j = 0; j < n; ++j) {
        gb[j] = (gm[j] + acc[j]) / kk;
        acc[j] = T(0);
      }
      g = gb;
    }
    if (phase == PH_NORM && !Alg<T>::RECOMP) {  // pure pass: advance a copy of the state
      if (s0) { std::memcpy(t0, s0, sizeof(T) * n); s0 = t0; }
      if (s1) { std::memcpy(t1, s1, sizeof(T) * n); s1 = t1; }
      if (s2) { std::memcpy(t2, s2, sizeof(T) * n); s2 = t2; }
    }
    if (phase == PH_APPLY && Alg<T>::RECOMP) {
      Alg<T>::recompute(c, n, g, s0, s1, s2, u);
    } else {
      Alg<T>::update(c, n, g, s0, s1, s2, u);
    }
    if (phase == PH_NORM) {
      norms(c, n, p, u, red);
    } else {
      write_params(c, mode, n, p, u, static_cast<T*>(off(slots[6], b, sizeof(T))), static_cast<T*>(off(slots[7], b, sizeof(T))));
    }
  }
}

// one tensor, split across threads when it is long; red gets (sum d^2, sum p^2) in phase NORM
template <typename T, template <typename> class Alg>
void run_tensor(const double* c, int mode, int phase, void* const* slots, int64_t n, int nthreads, double* red) {
  red[0] = red[1] = 0;
  if (nthreads <= 1 || n < PAR_MIN) {
    run_range<T, Alg>(c, mode, phase, slots, 0, n, red);
    return;
  }
  const int64_t nb = (n + BS - 1) / BS;
  double sd = 0, sp = 0;
#pragma omp parallel for num_threads(nthreads) schedule(static) reduction(+ : sd, sp)
  for (int64_t t = 0; t < nthreads; ++t) {
    const int64_t lo = nb * t / nthreads * BS, hi = std::min(n, nb * (t + 1) / nthreads * BS);
    double r[2] = {0, 0};
    if (lo < hi) run_range<T, Alg>(c, mode, phase, slots, lo, hi, r);
    sd += r[0];
    sp += r[1];
  }
  red[0] = sd;
  red[1] = sp;
}

// Layer adaptation, tensor by tensor, so that the second pass finds a tensor that fits the caches
// still there: norms, the trust ratio r, then the write with A <- r A M, B <- r B M + W (the
// transforms after layer adaptation folded into M and W). c: 15 M, 16 W, 17 lr_t.
template <typename T, template <typename> class Alg>
void run_adapted(const double* c, int mode, void* const* slots, int64_t n, int nthreads, double* red) {
  run_tensor<T, Alg>(c, 0, PH_NORM, slots, n, nthreads, red);
  const double pn = std::sqrt(red[1]), un = std::sqrt(red[0]) / std::max(c[17], 1e-7);
  const double r = (pn > 0 && un > 0) ? pn / un : 1.0;
  double cc[NCOEF];
  std::memcpy(cc, c, sizeof(cc));
  cc[10] = r * c[10] * c[15];
  cc[11] = r * c[11] * c[15] + c[16];
  double unused[2];
  run_tensor<T, Alg>(cc, mode, PH_APPLY, slots, n, nthreads, unused);
}

template <typename T, template <typename> class Alg>
void run_list(int64_t nt, const int64_t* numel, void* const* ptrs, const double* coef, const int* modes, int phase, int nthreads,
              double* red) {
  auto one = [&](int64_t i, int threads) {
    if (phase == PH_ADAPT) {
      run_adapted<T, Alg>(coef + i * NCOEF, modes[i], ptrs + i * NSLOT, numel[i], threads, red + 2 * i);
    } else {
      run_tensor<T, Alg>(coef + i * NCOEF, modes[i], phase, ptrs + i * NSLOT, numel[i], threads, red + 2 * i);
    }
  };
  std::vector<int64_t> small;
  for (int64_t i = 0; i < nt; ++i) {
    red[2 * i] = red[2 * i + 1] = 0;
    if (numel[i] == 0) continue;
    if (nthreads <= 1 || numel[i] < PAR_MIN) {
      small.push_back(i);
    } else {
      one(i, nthreads);
    }
  }
  const int64_t ns = int64_t(small.size());
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 4) if (nthreads > 1 && ns > 1)
  for (int64_t k = 0; k < ns; ++k) one(small[k], 1);
}

template <typename T>
int dispatch(int alg, int64_t nt, const int64_t* numel, void* const* ptrs, const double* coef, const int* modes, int phase,
             int nthreads, double* red) {
  switch (alg) {
    case ALG_SGD: run_list<T, Sgd>(nt, numel, ptrs, coef, modes, phase, nthreads, red); return 0;
    case ALG_ADAGRAD: run_list<T, Adagrad>(nt, numel, ptrs, coef, modes, phase, nthreads, red); return 0;
    case ALG_ADADELTA: run_list<T, Adadelta>(nt, numel, ptrs, coef, modes, phase, nthreads, red); return 0;
    case ALG_RMSPROP: run_list<T, Rmsprop>(nt, numel, ptrs, coef, modes, phase, nthreads, red); return 0;
    case ALG_ADAM: run_list<T, Adam>(nt, numel, ptrs, coef, modes, phase, nthreads, red); return 0;
    case ALG_NADAM: run_list<T, Nadam>(nt, numel, ptrs, coef, modes, phase, nthreads, red); return 0;
    case ALG_RADAM: run_list<T, Radam>(nt, numel, ptrs, coef, modes, phase, nthreads, red); return 0;
    case ALG_LION: run_list<T, Lion>(nt, numel, ptrs, coef, modes, phase, nthreads, red); return 0;
  }
  return -1;
}

// ------------------------------------------------------------------ Adafactor
// slots: 0 p, 1 g, 2 stat over axis 1 (length n0), 3 stat over axis 0 (length n1), 4 v (unfactored),
//        5 m (beta1 > 0), 6 slow, 7 ema
// coef: 0 beta2, 1 1-beta2, 2 eps1, 3 eps2, 4 clipping threshold (0: none), 5 beta1, 6 1-beta1,
//       7 parameter scale (0/1), 8 -lr, 9 row is the axis-1 statistic (largest axis is 1), 10-14 epilogue
// shape: n0, n1 (n1 == 0: unfactored, n0 elements)

template <typename T>
void adafactor_one(const int64_t* shape, void* const* slots, const double* c, int mode, int nthreads) {
  const int64_t n0 = shape[0], n1 = shape[1];
  const bool factored = n1 > 0;
  const int64_t n = factored ? n0 * n1 : n0;
  if (n == 0) return;
  T* p = static_cast<T*>(slots[0]);
  const T* g = static_cast<const T*>(slots[1]);
  T* a1 = static_cast<T*>(slots[2]);
  T* a0 = static_cast<T*>(slots[3]);
  T* v = static_cast<T*>(slots[4]);
  T* m = static_cast<T*>(slots[5]);
  T* slow = static_cast<T*>(slots[6]);
  T* ema = static_cast<T*>(slots[7]);
  const T b2 = T(c[0]), omb2 = T(c[1]), eps1 = T(c[2]), eps2 = T(c[3]), b1 = T(c[5]), omb1 = T(c[6]), nl = T(c[8]);
  const bool clip = c[4] != 0, scaled = c[7] != 0, momentum = m != nullptr;
  const int nth = (nthreads > 1 && n >= PAR_MIN) ? nthreads : 1;
  (void)nth;

  // pass 1: statistics of g^2 + eps1 (factored) and sum of p^2 (parameter scale)
  double psum = 0;
  T row_mean = T(1);
  if (factored) {
    std::vector<double> s1(n0, 0.0), s0(n1, 0.0);
#pragma omp parallel num_threads(nth)
    {
      // column sums: partial sums of up to 16 rows in T, flushed into double
      std::vector<double> local0(n1, 0.0);
      std::vector<T> part(n1, T(0));
      double lp = 0;
      int64_t pending = 0;
#pragma omp for schedule(static)
      for (int64_t i = 0; i < n0; ++i) {
        const T* gi = g + i * n1;
        const T* pi = p + i * n1;
        T* pp = part.data();
        T r = 0;
#pragma omp simd reduction(+ : r)
        for (int64_t j = 0; j < n1; ++j) {
          const T x = gi[j] * gi[j] + eps1;
          r += x;
          pp[j] += x;
        }
        s1[i] = double(r);
        if (++pending == 16) {
          for (int64_t j = 0; j < n1; ++j) {
            local0[j] += double(pp[j]);
            pp[j] = T(0);
          }
          pending = 0;
        }
        if (scaled) {
          T q = 0;
#pragma omp simd reduction(+ : q)
          for (int64_t j = 0; j < n1; ++j) q += pi[j] * pi[j];
          lp += double(q);
        }
      }
      for (int64_t j = 0; j < n1; ++j) local0[j] += double(part[j]);
#pragma omp critical
      {
        for (int64_t j = 0; j < n1; ++j) s0[j] += local0[j];
        psum += lp;
      }
    }
    for (int64_t i = 0; i < n0; ++i) a1[i] = a1[i] * b2 + omb2 * T(s1[i] / double(n1));
    for (int64_t j = 0; j < n1; ++j) a0[j] = a0[j] * b2 + omb2 * T(s0[j] / double(n0));
    // the row statistic is the mean over the largest axis: a0 when the largest axis is 0
    const bool row_is_a1 = c[9] != 0;
    const T* row = row_is_a1 ? a1 : a0;
    const int64_t nrow = row_is_a1 ? n0 : n1;
    double rs = 0;
    for (int64_t i = 0; i < nrow; ++i) rs += double(row[i]);
    row_mean = T(rs / double(nrow));
  } else if (scaled) {
#pragma omp parallel for simd num_threads(nth) reduction(+ : psum) schedule(static)
    for (int64_t j = 0; j < n; ++j) psum += double(p[j]) * double(p[j]);
  }
  const T pscale = std::max(T(std::sqrt(T(psum / double(n)))), eps2);
  // v_hat(i, j) = a1[i] * (a0[j] / row_mean): the division done once per column (the reference
  // divides the product; the two differ by rounding)
  std::vector<T> colf(factored ? n1 : 0);
  for (int64_t j = 0; j < (factored ? n1 : 0); ++j) colf[j] = a0[j] / row_mean;
  const T* cf = colf.data();

  // pass 2: RMS of the unclipped update (the unfactored second moment is advanced here)
  T clipdiv = T(1);
  bool v_done = false;
  if (clip) {
    double su = 0;
    if (factored) {
#pragma omp parallel for num_threads(nth) reduction(+ : su) schedule(static)
      for (int64_t i = 0; i < n0; ++i) {
        const T* gi = g + i * n1;
        double r = 0;
        const T ai = a1[i];
        T rr = 0;  // the square of the update, g^2 / (v + eps1), needs no square root
#pragma omp simd reduction(+ : rr)
        for (int64_t j = 0; j < n1; ++j) rr += gi[j] * gi[j] / (ai * cf[j] + eps1);
        r = double(rr);
        su += r;
      }
    } else {
#pragma omp parallel for simd num_threads(nth) reduction(+ : su) schedule(static)
      for (int64_t j = 0; j < n; ++j) {
        const T vj = v[j] * b2 + omb2 * (g[j] * g[j] + eps1);
        v[j] = vj;
        const T x = g[j] / std::sqrt(vj + eps1);
        su += double(x) * double(x);
      }
      v_done = true;
    }
    const T rms = T(std::sqrt(T(su / double(n))));
    clipdiv = std::max(rms / T(c[4]), T(1));
  }

  // pass 3: the update, the momentum, the parameter. The scalar factors are applied once: 1/clipdiv
  // before the momentum, the parameter scale and -lr after it.
  const T pre = momentum ? T(1) / clipdiv : T(1);
  const T post = momentum ? (scaled ? pscale * nl : nl) : (scaled ? pscale * nl : nl) / clipdiv;
  const int64_t rows = factored ? n0 : 1, cols = factored ? n1 : n;
  if (factored && !momentum && mode == 0) {  // the common case as one loop per row
    const T A = T(c[10]), B = T(c[11]);
#pragma omp parallel for num_threads(nth) schedule(static)
    for (int64_t i = 0; i < rows; ++i) {
      const T ai = a1[i];
      const T* __restrict gg = g + i * cols;
      T* __restrict pp = p + i * cols;
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j) {
        const T u = gg[j] / std::sqrt(ai * cf[j] + eps1) * post;
        const T pj = pp[j];
        pp[j] = pj + (A * u + B * pj);
      }
    }
    return;
  }
#pragma omp parallel for num_threads(nth) schedule(static)
  for (int64_t i = 0; i < rows; ++i) {
    alignas(64) T u[BS];
    for (int64_t jb = 0; jb < cols; jb += BS) {
      const int64_t len = std::min(BS, cols - jb);
      const int64_t base = i * cols + jb;
      const T* gg = g + base;
      if (factored) {
        const T ai = a1[i];
        const T* aj = cf + jb;
        for (int64_t j = 0; j < len; ++j) u[j] = gg[j] / std::sqrt(ai * aj[j] + eps1);
      } else {
        T* vv = v + base;
        if (!v_done) {
          for (int64_t j = 0; j < len; ++j) vv[j] = vv[j] * b2 + omb2 * (gg[j] * gg[j] + eps1);
        }
        for (int64_t j = 0; j < len; ++j) u[j] = gg[j] / std::sqrt(vv[j] + eps1);
      }
      if (momentum) {
        T* mm = m + base;
        for (int64_t j = 0; j < len; ++j) {
          mm[j] = mm[j] * b1 + omb1 * (u[j] * pre);
          u[j] = mm[j] * post;
        }
      } else {
        for (int64_t j = 0; j < len; ++j) u[j] = u[j] * post;
      }
      write_params(c, mode, len, p + base, u, slow ? slow + base : nullptr, ema ? ema + base : nullptr);
    }
  }
}

}  // namespace

extern "C" {

int danlu_abi_version() { return 4; }

// A STREAM-like bandwidth probe with Adam's access pattern: reads a, b, c, d and writes a, c, d
// (7 transfers per element); s = 0 leaves the values as they are.
void danlu_probe(int64_t nt, const int64_t* numel, void* const* ptrs, double s) {
  for (int64_t i = 0; i < nt; ++i) {
    float* a = static_cast<float*>(ptrs[4 * i]);
    const float* b = static_cast<const float*>(ptrs[4 * i + 1]);
    float* c = static_cast<float*>(ptrs[4 * i + 2]);
    float* d = static_cast<float*>(ptrs[4 * i + 3]);
    const float f = float(s);
    for (int64_t j = 0; j < numel[i]; ++j) {
      const float x = b[j] * f;
      a[j] = a[j] + x;
      c[j] = c[j] + x;
      d[j] = d[j] + x;
    }
  }
}

// Step counters: add 1 to each float32 scalar and report the new values.
void danlu_increment(int64_t n, void* const* ptrs, double* out) {
  for (int64_t i = 0; i < n; ++i) {
    float* t = static_cast<float*>(ptrs[i]);
    *t += 1.0f;
    out[i] = double(*t);
  }
}

// Elementwise algorithms over a list of tensors. dtype: 0 float, 1 double. ptrs: nt * 8 slots,
// coef: nt * 16, modes: nt, red: nt * 2 (phase NORM: sum d^2, sum p^2). Returns 0, or -1 for an
// unknown algorithm or dtype.
int danlu_elementwise(int dtype, int alg, int64_t nt, const int64_t* numel, void* const* ptrs, const double* coef,
                      const int* modes, int phase, int nthreads, double* red) {
  if (dtype == 0) return dispatch<float>(alg, nt, numel, ptrs, coef, modes, phase, nthreads, red);
  if (dtype == 1) return dispatch<double>(alg, nt, numel, ptrs, coef, modes, phase, nthreads, red);
  return -1;
}

int danlu_adafactor(int dtype, int64_t nt, const int64_t* shapes, void* const* ptrs, const double* coef, const int* modes,
                    int nthreads) {
  for (int64_t i = 0; i < nt; ++i) {
    if (dtype == 0) {
      adafactor_one<float>(shapes + 2 * i, ptrs + i * NSLOT, coef + i * NCOEF, modes[i], nthreads);
    } else if (dtype == 1) {
      adafactor_one<double>(shapes + 2 * i, ptrs + i * NSLOT, coef + i * NCOEF, modes[i], nthreads);
    } else {
      return -1;
    }
  }
  return 0;
}

}  // extern "C"
