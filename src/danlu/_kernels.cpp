// danlu native kernels: single-pass optimizer steps over lists of dense, contiguous CPU tensors.
//
// Built on first use by danlu/_native.py with the system C++ compiler and loaded with ctypes (no torch
// headers, so it builds in seconds). Every kernel streams each array once: it reads the parameter, the
// gradient and the state, computes the algorithm's update u in registers, applies the derivations
// folded into it and writes the new parameter and state:
//
//   g    = ((g + accum) / k) * s         (accum: gradient accumulation's applying call, accum <- 0;
//                                         s: the tensor's gradient scale; g itself is never written)
//   u    = algorithm(g, state)           (state updated in place)
//   d    = A * u + B * p                 (weight decay, parameter-wise lr, trust ratio folded into A, B)
//   p   <- p + d
//   slow <- lerp(slow, p, alpha); p <- slow   (Lookahead, on its sync steps)
//   ema  <- lerp(ema, p, w)                   (EMA; of the parameter before or after Lookahead's sync)
//
// Each algorithm is one per-element body, step<V, Stage>(), where V is a variant chosen once per
// tensor from the coefficients (SGD's momentum and Nesterov, Adam's branch of lerp, ...). One loop
// (`body`) runs it for every phase: FULL writes the state and the parameter; ADAPT (layer
// adaptation) first computes the norms of d and p (NORM), then the trust ratio, then writes with the
// ratio folded into A and B. Where u can be recomputed from the new state alone (Adam, RAdam,
// Adamax, momentum SGD and RMSprop) NORM advances the state and the write reads p and the state
// only; elsewhere NORM writes nothing and the write is a full step.
//
// Arithmetic follows the per-tensor reference (danlu's _update_single) operation by operation, in the
// parameter's dtype, without FMA contraction (-ffp-contract=off), so results equal the reference to
// rounding. Only float and double are handled; the Python side falls back for anything else.
//
// Gradient clipping's norms come from danlu_sum_squares: each tensor's sum of squares in one read.
//
// The names below are those of danlu/_native_spec.py (tests/test_native_driver.py checks them).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

enum class Kernel : int { SGD = 0, ADAGRAD = 1, ADADELTA = 2, RMSPROP = 3, ADAM = 4, NADAM = 5, RADAM = 6, LION = 7, ADAMAX = 8, ADAFACTOR = 9 };
enum class Slot : int { PARAM = 0, GRAD = 1, STATE0 = 2, STATE1 = 3, STATE2 = 4, ACCUM = 5, SLOW = 6, EMA = 7, NSLOT = 8 };
enum class Mode : int { ACCUM = 1, SYNC = 2, EMA = 4, EMA_FIRST = 8 };
enum class Phase : int { FULL = 0, NORM = 1, ADAPT = 2 };
enum class Col : int {
  A = 10, B = 11, ACCUM_K = 12, SLOW_STEP = 13, EMA_WEIGHT = 14, POST_A = 15, POST_B = 16, LR = 17, GRAD_SCALE = 18, NCOEF = 20
};

template <class E>
constexpr int I(E e) { return static_cast<int>(e); }

constexpr int NSLOT = I(Slot::NSLOT);
constexpr int NCOEF = I(Col::NCOEF);
constexpr int64_t BS = 256;            // block of the norm sums: partial sums in T, totals in double
constexpr int64_t PAR_MIN = 1 << 16;   // tensors at least this long are split across threads

inline bool has(int mode, Mode m) { return (mode & I(m)) != 0; }
inline bool small(double w) { return std::abs(w) < 0.5; }

// ATen's lerp (exact at both ends) for a weight w fixed for a whole loop, with no branch per element:
// its two formulas, self + w (end - self) for |w| < 0.5 and end - (end - self) (1 - w), are one,
// base + (end - self) c, with the same bits (x - y is x + -y, and -y c is -(y c))
template <typename T>
struct Lerp {
  bool small;
  T c;
  explicit Lerp(T w) : small(std::abs(w) < T(0.5)), c(small ? w : -(T(1) - w)) {}
  inline T operator()(T self, T end) const { return (small ? self : end) + (end - self) * c; }
};

// lerp with the branch of ATen's formula chosen outside the loop (w is loop-invariant)
template <bool SMALL, typename T>
inline T lerp_k(T self, T end, T w, T omw) {
  return SMALL ? self + w * (end - self) : end - (end - self) * omw;
}

template <typename T>
inline T sgn(T x) {
  return T((x > T(0)) - (x < T(0)));
}

// What one call of an algorithm's step does at an element: FULL advances the state and returns u;
// PURE returns u and writes nothing; ADVANCE is FULL for layer adaptation's norm pass; RECOMPUTE
// returns u from the already advanced state, without the gradient (only where recomputes(V)).
enum class Stage { FULL, PURE, ADVANCE, RECOMPUTE };

constexpr bool writes(Stage s) { return s == Stage::FULL || s == Stage::ADVANCE; }

// The passes of one tensor: the step, layer adaptation's norms, and its write after the norms.
enum class Pass { STEP, NORM, APPLY };

// ------------------------------------------------------------------ algorithms
// Each: NV variants, variant(c), constants K(c), step<V, Stage>(k, g, s0, s1, s2, j) -> u, which reads
// the state at j and writes it back when the stage writes, and recomputes(V): whether u follows from
// the advanced state alone (Stage::RECOMPUTE). Columns 0-9 of c are the algorithm's.

template <typename T>
struct Sgd {  // c: 0 has momentum, 1 mu, 2 1-dampening, 3 nesterov, 4 first step, 5 -lr; s0 momentum_buffer
  static constexpr int NV = 5;  // 0 plain, 1 first nesterov, 2 first, 3 nesterov, 4 momentum
  static int variant(const double* c) {
    if (c[0] == 0) return 0;
    return (c[4] != 0 ? 1 : 3) + (c[3] != 0 ? 0 : 1);
  }
  struct K {
    T mu, damp, nl;
    explicit K(const double* c) : mu(T(c[1])), damp(T(c[2])), nl(T(c[5])) {}
  };
  template <int V, Stage S>
  static inline T step(const K& k, T g, T* s0, T*, T*, int64_t j) {
    if constexpr (V == 0) {
      return g * k.nl;
    } else {
      constexpr bool first = V == 1 || V == 2, nest = V == 1 || V == 3;
      const T b = S == Stage::RECOMPUTE ? s0[j] : first ? g : s0[j] * k.mu + k.damp * g;
      if constexpr (writes(S)) s0[j] = b;
      return (nest ? g + k.mu * b : b) * k.nl;
    }
  }
  static constexpr bool recomputes(int v) { return v == 2 || v == 4; }  // u = buffer * (-lr)
};

template <typename T>
struct Adagrad {  // c: 0 -lr, 1 eps; s0 sum
  static constexpr int NV = 1;
  static int variant(const double*) { return 0; }
  struct K {
    T nl, eps;
    explicit K(const double* c) : nl(T(c[0])), eps(T(c[1])) {}
  };
  template <int V, Stage S>
  static inline T step(const K& k, T g, T* s0, T*, T*, int64_t j) {
    const T s = s0[j] + g * g;
    if constexpr (writes(S)) s0[j] = s;
    return g / (std::sqrt(s) + k.eps) * k.nl;
  }
  static constexpr bool recomputes(int) { return false; }
};

template <typename T>
struct Adadelta {  // c: 0 rho, 1 1-rho, 2 eps, 3 -lr; s0 square_avg, s1 acc_delta
  static constexpr int NV = 1;
  static int variant(const double*) { return 0; }
  struct K {
    T rho, omr, eps, nl;
    explicit K(const double* c) : rho(T(c[0])), omr(T(c[1])), eps(T(c[2])), nl(T(c[3])) {}
  };
  template <int V, Stage S>
  static inline T step(const K& k, T g, T* s0, T* s1, T*, int64_t j) {
    const T sq = s0[j] * k.rho + k.omr * g * g;
    const T delta = std::sqrt(s1[j] + k.eps) / std::sqrt(sq + k.eps) * g;
    if constexpr (writes(S)) {
      s0[j] = sq;
      s1[j] = s1[j] * k.rho + k.omr * delta * delta;
    }
    return delta * k.nl;
  }
  static constexpr bool recomputes(int) { return false; }
};

template <typename T>
struct Rmsprop {  // c: 0 alpha, 1 1-alpha, 2 eps, 3 -lr, 4 centered, 5 has momentum, 6 mu
  // s0 square_avg, s1 momentum_buffer, s2 grad_avg
  static constexpr int NV = 4;  // bit 0 centered, bit 1 momentum
  static int variant(const double* c) { return (c[4] != 0 ? 1 : 0) + (c[5] != 0 ? 2 : 0); }
  struct K {
    T alpha, oma, eps, nl, mu;
    Lerp<T> to_avg;
    explicit K(const double* c)
        : alpha(T(c[0])), oma(T(c[1])), eps(T(c[2])), nl(T(c[3])), mu(T(c[6])), to_avg(T(c[1])) {}
  };
  template <int V, Stage S>
  static inline T step(const K& k, T g, T* s0, T* s1, T* s2, int64_t j) {
    constexpr bool centered = V & 1, momentum = V & 2;
    if constexpr (S == Stage::RECOMPUTE) return s1[j] * k.nl;
    const T sq = s0[j] * k.alpha + k.oma * g * g;
    if constexpr (writes(S)) s0[j] = sq;
    T den;
    if constexpr (centered) {
      const T ga = k.to_avg(s2[j], g);
      if constexpr (writes(S)) s2[j] = ga;
      den = std::sqrt(sq - ga * ga) + k.eps;
    } else {
      den = std::sqrt(sq) + k.eps;
    }
    if constexpr (momentum) {
      const T b = s1[j] * k.mu + g / den;
      if constexpr (writes(S)) s1[j] = b;
      return b * k.nl;
    } else {
      return g / den * k.nl;
    }
  }
  static constexpr bool recomputes(int v) { return (v & 2) != 0; }  // u = buffer * (-lr)
};

// Adam's moments, shared by Adam, NAdam and RAdam: m <- lerp(m, g, 1-b1), v <- b2 v + (1-b2) g^2
template <typename T>
struct Moments {
  T w1, omw1, b2, omb2;
  explicit Moments(const double* c) : w1(T(c[0])), omw1(T(1) - T(c[0])), b2(T(c[1])), omb2(T(c[2])) {}
  template <bool SMALL, Stage S>
  inline void advance(T g, T* s0, T* s1, int64_t j, T& m, T& v) const {
    if constexpr (S == Stage::RECOMPUTE) {  // the moments are already the new ones
      m = s0[j];
      v = s1[j];
      return;
    }
    m = lerp_k<SMALL>(s0[j], g, w1, omw1);
    v = s1[j] * b2 + omb2 * g * g;
    if constexpr (writes(S)) {
      s0[j] = m;
      s1[j] = v;
    }
  }
};

template <typename T>
struct Adam {  // c: 0 1-b1, 1 b2, 2 1-b2, 3 sqrt(1-b2^t), 4 eps, 5 -lr/(1-b1^t); s0 exp_avg, s1 exp_avg_sq
  static constexpr int NV = 2;  // the branch of lerp
  static int variant(const double* c) { return small(c[0]) ? 0 : 1; }
  struct K {
    Moments<T> mo;
    T bc2, eps, k;
    explicit K(const double* c) : mo(c), bc2(T(c[3])), eps(T(c[4])), k(T(c[5])) {}
  };
  template <int V, Stage S>
  static inline T step(const K& k, T g, T* s0, T* s1, T*, int64_t j) {
    T m, v;
    k.mo.template advance<V == 0, S>(g, s0, s1, j, m, v);
    return m / (std::sqrt(v) / k.bc2 + k.eps) * k.k;
  }
  static constexpr bool recomputes(int) { return true; }
};

template <typename T>
struct Nadam {  // c: 0-4 as Adam, 5 grad coefficient, 6 momentum coefficient
  static constexpr int NV = 2;
  static int variant(const double* c) { return small(c[0]) ? 0 : 1; }
  struct K {
    Moments<T> mo;
    T bc2, eps, gc, mc;
    explicit K(const double* c) : mo(c), bc2(T(c[3])), eps(T(c[4])), gc(T(c[5])), mc(T(c[6])) {}
  };
  template <int V, Stage S>
  static inline T step(const K& k, T g, T* s0, T* s1, T*, int64_t j) {
    T m, v;
    k.mo.template advance<V == 0, S>(g, s0, s1, j, m, v);
    const T denom = std::sqrt(v) / k.bc2 + k.eps;
    return g / denom * k.gc + k.mc * (m / denom);
  }
  static constexpr bool recomputes(int) { return false; }
};

template <typename T>
struct Radam {  // c: 0-2 as Adam, 3 rectified, 4 eps, 5 scale, 6 scale * adaptive
  static constexpr int NV = 4;  // bit 0 lerp branch, bit 1 rectified
  static int variant(const double* c) { return (small(c[0]) ? 0 : 1) + (c[3] != 0 ? 2 : 0); }
  struct K {
    Moments<T> mo;
    T eps, scale, k;
    explicit K(const double* c) : mo(c), eps(T(c[4])), scale(T(c[5])), k(T(c[6])) {}
  };
  template <int V, Stage S>
  static inline T step(const K& k, T g, T* s0, T* s1, T*, int64_t j) {
    T m, v;
    k.mo.template advance<(V & 1) == 0, S>(g, s0, s1, j, m, v);
    if constexpr ((V & 2) != 0) {
      return m / (std::sqrt(v) + k.eps) * k.k;
    } else {
      return m * k.scale;
    }
  }
  static constexpr bool recomputes(int) { return true; }
};

template <typename T>
struct Lion {  // c: 0 1-b1, 1 1-b2, 2 -lr; s0 exp_avg
  static constexpr int NV = 4;  // bit 0: lerp branch of b1, bit 1: of b2
  static int variant(const double* c) { return (small(c[0]) ? 0 : 1) + (small(c[1]) ? 0 : 2); }
  struct K {
    T w1, o1, w2, o2, nl;
    explicit K(const double* c)
        : w1(T(c[0])), o1(T(1) - T(c[0])), w2(T(c[1])), o2(T(1) - T(c[1])), nl(T(c[2])) {}
  };
  template <int V, Stage S>
  static inline T step(const K& k, T g, T* s0, T*, T*, int64_t j) {
    const T m = s0[j];
    const T u = sgn(lerp_k<(V & 1) == 0>(m, g, k.w1, k.o1)) * k.nl;
    if constexpr (writes(S)) s0[j] = lerp_k<(V & 2) == 0>(m, g, k.w2, k.o2);
    return u;
  }
  static constexpr bool recomputes(int) { return false; }
};

template <typename T>
inline T nan_max(T a, T b) {  // torch.maximum: NaN if either is NaN
  return (a > b || a != a) ? a : b;
}

template <typename T>
struct Adamax {  // c: 0 1-b1, 1 b2, 2 eps, 3 -lr/(1-b1^t); s0 exp_avg, s1 exp_inf
  static constexpr int NV = 2;  // the branch of lerp
  static int variant(const double* c) { return small(c[0]) ? 0 : 1; }
  struct K {
    T w1, omw1, b2, eps, k;
    explicit K(const double* c) : w1(T(c[0])), omw1(T(1) - T(c[0])), b2(T(c[1])), eps(T(c[2])), k(T(c[3])) {}
  };
  template <int V, Stage S>
  static inline T step(const K& k, T g, T* s0, T* s1, T*, int64_t j) {
    const T m = S == Stage::RECOMPUTE ? s0[j] : lerp_k<V == 0>(s0[j], g, k.w1, k.omw1);
    const T e = S == Stage::RECOMPUTE ? s1[j] : nan_max(s1[j] * k.b2, std::abs(g) + k.eps);
    if constexpr (writes(S)) {
      s0[j] = m;
      s1[j] = e;
    }
    return m / e * k.k;
  }
  static constexpr bool recomputes(int) { return true; }
};

// ------------------------------------------------------------------ the one loop

template <typename T>
inline T* at(void* const* slots, Slot s, int64_t begin) {
  void* base = slots[I(s)];
  return base ? static_cast<T*>(base) + begin : nullptr;
}

// One range of one tensor. NORM: the sums of d^2 and p^2 into red, the state advanced where the
// algorithm can recompute u from it (then APPLY writes the parameter without reading g), else
// nothing written (and the next pass is a STEP).
template <typename T, template <typename> class Alg, int V, bool ACC, bool SYNC, bool EMA, Pass P>
void body(const double* c, int mode, void* const* slots, int64_t begin, int64_t n, double* red) {
  using Al = Alg<T>;
  constexpr bool recompute = Al::recomputes(V);
  static_assert(P != Pass::APPLY || (recompute && !ACC), "APPLY recomputes u from the state");
  const typename Al::K k(c);
  T* __restrict p = at<T>(slots, Slot::PARAM, begin);
  const T* __restrict g = at<T>(slots, Slot::GRAD, begin);
  T* __restrict s0 = at<T>(slots, Slot::STATE0, begin);
  T* __restrict s1 = at<T>(slots, Slot::STATE1, begin);
  T* __restrict s2 = at<T>(slots, Slot::STATE2, begin);
  T* __restrict acc = at<T>(slots, Slot::ACCUM, begin);
  const T A = T(c[I(Col::A)]), B = T(c[I(Col::B)]), kk = T(c[I(Col::ACCUM_K)]), gs = T(c[I(Col::GRAD_SCALE)]);
  if constexpr (P == Pass::NORM) {
    constexpr Stage S = recompute ? Stage::ADVANCE : Stage::PURE;
    double sd = 0, sp = 0;
    for (int64_t b0 = 0; b0 < n; b0 += BS) {
      const int64_t e = std::min(n, b0 + BS);
      T bd = 0, bp = 0;
#pragma omp simd reduction(+ : bd, bp)
      for (int64_t j = b0; j < e; ++j) {
        T gj = g[j];
        if constexpr (ACC) {
          gj = (gj + acc[j]) / kk;
          if constexpr (recompute) acc[j] = T(0);
        }
        const T u = Al::template step<V, S>(k, gj * gs, s0, s1, s2, j);
        const T d = A * u + B * p[j];
        bd += d * d;
        bp += p[j] * p[j];
      }
      sd += double(bd);
      sp += double(bp);
    }
    red[0] += sd;
    red[1] += sp;
  } else {
    constexpr Stage S = P == Pass::APPLY ? Stage::RECOMPUTE : Stage::FULL;
    T* __restrict slow = at<T>(slots, Slot::SLOW, begin);
    T* __restrict ema = at<T>(slots, Slot::EMA, begin);
    const Lerp<T> to_slow{T(c[I(Col::SLOW_STEP)])}, to_ema{T(c[I(Col::EMA_WEIGHT)])};
    const bool efirst = has(mode, Mode::EMA_FIRST);
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      T gj = T(0);
      if constexpr (P == Pass::STEP) {
        gj = g[j];
        if constexpr (ACC) {
          gj = (gj + acc[j]) / kk;
          acc[j] = T(0);
        }
        gj = gj * gs;
      }
      const T u = Al::template step<V, S>(k, gj, s0, s1, s2, j);
      const T pj = p[j];
      T pn = pj + (A * u + B * pj);
      if constexpr (SYNC) {
        const T sl = to_slow(slow[j], pn);
        slow[j] = sl;
        if constexpr (EMA) ema[j] = to_ema(ema[j], efirst ? pn : sl);
        pn = sl;
      } else if constexpr (EMA) {
        ema[j] = to_ema(ema[j], pn);
      }
      p[j] = pn;
    }
  }
}

template <typename T, template <typename> class Alg, int V, Pass P>
void range_epilogue(const double* c, int mode, void* const* slots, int64_t begin, int64_t n, double* red) {
  constexpr bool apply = P == Pass::APPLY;
  if constexpr (apply && !Alg<T>::recomputes(V)) {
    return;  // never asked: the driver runs a STEP after a pure NORM
  } else {
    const bool acc = !apply && has(mode, Mode::ACCUM);
    switch ((acc ? 1 : 0) | (has(mode, Mode::SYNC) ? 2 : 0) | (has(mode, Mode::EMA) ? 4 : 0)) {
      case 0: return body<T, Alg, V, false, false, false, P>(c, mode, slots, begin, n, red);
      case 2: return body<T, Alg, V, false, true, false, P>(c, mode, slots, begin, n, red);
      case 4: return body<T, Alg, V, false, false, true, P>(c, mode, slots, begin, n, red);
      case 6: return body<T, Alg, V, false, true, true, P>(c, mode, slots, begin, n, red);
      default: break;
    }
    if constexpr (!apply) {
      switch ((has(mode, Mode::SYNC) ? 2 : 0) | (has(mode, Mode::EMA) ? 4 : 0)) {
        case 0: return body<T, Alg, V, true, false, false, P>(c, mode, slots, begin, n, red);
        case 2: return body<T, Alg, V, true, true, false, P>(c, mode, slots, begin, n, red);
        case 4: return body<T, Alg, V, true, false, true, P>(c, mode, slots, begin, n, red);
        default: return body<T, Alg, V, true, true, true, P>(c, mode, slots, begin, n, red);
      }
    }
  }
}

template <typename T, template <typename> class Alg, int V>
void range_v(const double* c, int mode, Pass pass, void* const* slots, int64_t begin, int64_t n, double* red) {
  if (pass == Pass::NORM) {
    if (has(mode, Mode::ACCUM)) return body<T, Alg, V, true, false, false, Pass::NORM>(c, mode, slots, begin, n, red);
    return body<T, Alg, V, false, false, false, Pass::NORM>(c, mode, slots, begin, n, red);
  }
  if (pass == Pass::APPLY) return range_epilogue<T, Alg, V, Pass::APPLY>(c, mode, slots, begin, n, red);
  return range_epilogue<T, Alg, V, Pass::STEP>(c, mode, slots, begin, n, red);
}

template <typename T, template <typename> class Alg, int V = 0>
void run_range(int variant, const double* c, int mode, Pass pass, void* const* slots, int64_t begin, int64_t end,
               double* red) {
  if constexpr (V < Alg<T>::NV) {
    if (variant == V) return range_v<T, Alg, V>(c, mode, pass, slots, begin, end - begin, red);
    return run_range<T, Alg, V + 1>(variant, c, mode, pass, slots, begin, end, red);
  }
}

// one tensor, split across threads when it is long; red gets (sum d^2, sum p^2) in pass NORM
template <typename T, template <typename> class Alg>
void run_tensor(const double* c, int mode, Pass pass, void* const* slots, int64_t n, int nthreads, double* red) {
  red[0] = red[1] = 0;
  const int variant = Alg<T>::variant(c);
  if (nthreads <= 1 || n < PAR_MIN) {
    run_range<T, Alg>(variant, c, mode, pass, slots, 0, n, red);
    return;
  }
  const int64_t nb = (n + BS - 1) / BS;
  double sd = 0, sp = 0;
#pragma omp parallel for num_threads(nthreads) schedule(static) reduction(+ : sd, sp)
  for (int64_t t = 0; t < nthreads; ++t) {
    const int64_t lo = nb * t / nthreads * BS, hi = std::min(n, nb * (t + 1) / nthreads * BS);
    double r[2] = {0, 0};
    if (lo < hi) run_range<T, Alg>(variant, c, mode, pass, slots, lo, hi, r);
    sd += r[0];
    sp += r[1];
  }
  red[0] = sd;
  red[1] = sp;
}

// Layer adaptation, tensor by tensor, so that the second pass finds a tensor that fits the caches
// still there: norms, the trust ratio r, then the write with A <- r A POST_A, B <- r B POST_A + POST_B
// (the transforms after layer adaptation folded into POST_A and POST_B). Col::LR holds max(lr, floor).
template <typename T, template <typename> class Alg>
void run_adapted(const double* c, int mode, void* const* slots, int64_t n, int nthreads, double* red) {
  run_tensor<T, Alg>(c, mode, Pass::NORM, slots, n, nthreads, red);
  const double pn = std::sqrt(red[1]), un = std::sqrt(red[0]) / c[I(Col::LR)];
  const double r = (pn > 0 && un > 0) ? pn / un : 1.0;
  double cc[NCOEF];
  std::memcpy(cc, c, sizeof(cc));
  cc[I(Col::A)] = r * c[I(Col::A)] * c[I(Col::POST_A)];
  cc[I(Col::B)] = r * c[I(Col::B)] * c[I(Col::POST_A)] + c[I(Col::POST_B)];
  double unused[2];
  const bool recompute = Alg<T>::recomputes(Alg<T>::variant(c));
  run_tensor<T, Alg>(cc, recompute ? mode & ~I(Mode::ACCUM) : mode, recompute ? Pass::APPLY : Pass::STEP, slots, n, nthreads,
                     unused);
}

template <typename T, template <typename> class Alg>
void run_list(int64_t nt, const int64_t* numel, void* const* ptrs, const double* coef, const int* modes, int phase, int nthreads,
              double* red) {
  auto one = [&](int64_t i, int threads) {
    if (phase == I(Phase::ADAPT)) {
      run_adapted<T, Alg>(coef + i * NCOEF, modes[i], ptrs + i * NSLOT, numel[i], threads, red + 2 * i);
    } else {
      const Pass pass = phase == I(Phase::NORM) ? Pass::NORM : Pass::STEP;
      run_tensor<T, Alg>(coef + i * NCOEF, modes[i], pass, ptrs + i * NSLOT, numel[i], threads, red + 2 * i);
    }
  };
  std::vector<int64_t> small_ones;
  for (int64_t i = 0; i < nt; ++i) {
    red[2 * i] = red[2 * i + 1] = 0;
    if (numel[i] == 0) continue;
    if (nthreads <= 1 || numel[i] < PAR_MIN) {
      small_ones.push_back(i);
    } else {
      one(i, nthreads);
    }
  }
  const int64_t ns = int64_t(small_ones.size());
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 4) if (nthreads > 1 && ns > 1)
  for (int64_t k = 0; k < ns; ++k) one(small_ones[k], 1);
}

template <typename T>
int dispatch(int kernel, int64_t nt, const int64_t* numel, void* const* ptrs, const double* coef, const int* modes, int phase,
             int nthreads, double* red) {
  switch (static_cast<Kernel>(kernel)) {
    case Kernel::SGD: run_list<T, Sgd>(nt, numel, ptrs, coef, modes, phase, nthreads, red); return 0;
    case Kernel::ADAGRAD: run_list<T, Adagrad>(nt, numel, ptrs, coef, modes, phase, nthreads, red); return 0;
    case Kernel::ADADELTA: run_list<T, Adadelta>(nt, numel, ptrs, coef, modes, phase, nthreads, red); return 0;
    case Kernel::RMSPROP: run_list<T, Rmsprop>(nt, numel, ptrs, coef, modes, phase, nthreads, red); return 0;
    case Kernel::ADAM: run_list<T, Adam>(nt, numel, ptrs, coef, modes, phase, nthreads, red); return 0;
    case Kernel::NADAM: run_list<T, Nadam>(nt, numel, ptrs, coef, modes, phase, nthreads, red); return 0;
    case Kernel::RADAM: run_list<T, Radam>(nt, numel, ptrs, coef, modes, phase, nthreads, red); return 0;
    case Kernel::LION: run_list<T, Lion>(nt, numel, ptrs, coef, modes, phase, nthreads, red); return 0;
    case Kernel::ADAMAX: run_list<T, Adamax>(nt, numel, ptrs, coef, modes, phase, nthreads, red); return 0;
    default: return -1;
  }
}

// ------------------------------------------------------------------ Adafactor
// slots: PARAM, GRAD, STATE0 stat over axis 1 (length n0), STATE1 stat over axis 0 (length n1),
//        STATE2 v (unfactored), ACCUM m (beta1 > 0), SLOW, EMA
// coef: 0 beta2, 1 1-beta2, 2 eps1, 3 eps2, 4 clipping threshold (0: none), 5 beta1, 6 1-beta1,
//       7 parameter scale (0/1), 8 -lr, 9 row is the axis-1 statistic (largest axis is 1), then the shared columns
// shape: n0, n1 (n1 == 0: unfactored, n0 elements)

// p <- p + A u + B p, then Lookahead / EMA, over one block; `u` is overwritten with the new parameter.
template <typename T>
inline void adafactor_write(const double* c, int mode, int64_t n, T* p, T* u, T* slow, T* ema) {
  const T A = T(c[I(Col::A)]), B = T(c[I(Col::B)]);
  for (int64_t j = 0; j < n; ++j) u[j] = p[j] + (A * u[j] + B * p[j]);
  const Lerp<T> to_slow{T(c[I(Col::SLOW_STEP)])}, to_ema{T(c[I(Col::EMA_WEIGHT)])};
  const bool ema_on = has(mode, Mode::EMA), first = has(mode, Mode::EMA_FIRST);
  if (ema_on && first) {
    for (int64_t j = 0; j < n; ++j) ema[j] = to_ema(ema[j], u[j]);
  }
  if (has(mode, Mode::SYNC)) {
    for (int64_t j = 0; j < n; ++j) {
      slow[j] = to_slow(slow[j], u[j]);
      u[j] = slow[j];
    }
  }
  if (ema_on && !first) {
    for (int64_t j = 0; j < n; ++j) ema[j] = to_ema(ema[j], u[j]);
  }
  std::memcpy(p, u, sizeof(T) * n);
}

template <typename T>
void adafactor_one(const int64_t* shape, void* const* slots, const double* c, int mode, int nthreads) {
  const int64_t n0 = shape[0], n1 = shape[1];
  const bool factored = n1 > 0;
  const int64_t n = factored ? n0 * n1 : n0;
  if (n == 0) return;
  T* p = static_cast<T*>(slots[I(Slot::PARAM)]);
  const T* g = static_cast<const T*>(slots[I(Slot::GRAD)]);
  T* a1 = static_cast<T*>(slots[I(Slot::STATE0)]);
  T* a0 = static_cast<T*>(slots[I(Slot::STATE1)]);
  T* v = static_cast<T*>(slots[I(Slot::STATE2)]);
  T* m = static_cast<T*>(slots[I(Slot::ACCUM)]);
  T* slow = static_cast<T*>(slots[I(Slot::SLOW)]);
  T* ema = static_cast<T*>(slots[I(Slot::EMA)]);
  const T b2 = T(c[0]), omb2 = T(c[1]), eps1 = T(c[2]), eps2 = T(c[3]), b1 = T(c[5]), omb1 = T(c[6]), nl = T(c[8]);
  const T gs = T(c[I(Col::GRAD_SCALE)]);
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
          const T gj = gi[j] * gs;
          const T x = gj * gj + eps1;
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
        for (int64_t j = 0; j < n1; ++j) {
          const T gj = gi[j] * gs;
          rr += gj * gj / (ai * cf[j] + eps1);
        }
        r = double(rr);
        su += r;
      }
    } else {
#pragma omp parallel for simd num_threads(nth) reduction(+ : su) schedule(static)
      for (int64_t j = 0; j < n; ++j) {
        const T gj = g[j] * gs;
        const T vj = v[j] * b2 + omb2 * (gj * gj + eps1);
        v[j] = vj;
        const T x = gj / std::sqrt(vj + eps1);
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
    const T A = T(c[I(Col::A)]), B = T(c[I(Col::B)]);
#pragma omp parallel for num_threads(nth) schedule(static)
    for (int64_t i = 0; i < rows; ++i) {
      const T ai = a1[i];
      const T* __restrict gg = g + i * cols;
      T* __restrict pp = p + i * cols;
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j) {
        const T u = gg[j] * gs / std::sqrt(ai * cf[j] + eps1) * post;
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
        for (int64_t j = 0; j < len; ++j) u[j] = gg[j] * gs / std::sqrt(ai * aj[j] + eps1);
      } else {
        T* vv = v + base;
        if (!v_done) {
          for (int64_t j = 0; j < len; ++j) vv[j] = vv[j] * b2 + omb2 * ((gg[j] * gs) * (gg[j] * gs) + eps1);
        }
        for (int64_t j = 0; j < len; ++j) u[j] = gg[j] * gs / std::sqrt(vv[j] + eps1);
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
      adafactor_write(c, mode, len, p + base, u, slow ? slow + base : nullptr, ema ? ema + base : nullptr);
    }
  }
}

// ------------------------------------------------------------------ sums of squares (gradient clipping)
// Each tensor's sum of x^2 in double, in an order that the source alone fixes (not the instruction set,
// not the thread count): chunks of NORM_CHUNK elements; in a chunk, element j goes to running sum
// j mod NORM_LANES (NORM_LANES / 8 independent vector accumulators, so that one core streams at read
// bandwidth), the lanes are added pairwise, and the chunk sums in order. The square of a float or a
// bfloat16 is exact in double, so their sums carry only the rounding of double additions.

enum class Elem : int { F32 = 0, F64 = 1, BF16 = 2 };
constexpr int NORM_LANES = 64;
constexpr int64_t NORM_CHUNK = int64_t(1) << 15;

typedef double v8d __attribute__((vector_size(64)));
typedef float v8f __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef uint16_t v8h __attribute__((vector_size(16)));

// (the vectors go by reference: a vector argument or result would change with the instruction set's ABI)
inline void load8(const double* x, v8d& v) { std::memcpy(&v, x, sizeof(v)); }

#if defined(__AVX512F__)
inline void load8(const float* x, v8d& v) { v = (v8d)_mm512_cvtps_pd(_mm256_loadu_ps(x)); }

inline void load8(const uint16_t* x, v8d& v) {  // bfloat16: the high half of a float
  const __m256i u = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x))), 16);
  v = (v8d)_mm512_cvtps_pd(_mm256_castsi256_ps(u));
}
#else
inline void load8(const float* x, v8d& v) {
  v8f f;
  std::memcpy(&f, x, sizeof(f));
  v = __builtin_convertvector(f, v8d);
}

inline void load8(const uint16_t* x, v8d& v) {  // bfloat16: the high half of a float
  v8h h;
  std::memcpy(&h, x, sizeof(h));
  const v8u u = __builtin_convertvector(h, v8u) << 16;
  v8f f;
  std::memcpy(&f, &u, sizeof(f));
  v = __builtin_convertvector(f, v8d);
}
#endif

// acc += v * v. The square of a widened float or bfloat16 is exact, so a fused multiply-add gives the
// same bits as the multiplication and the addition; a double's square is rounded, and keeps the two.
template <typename T>
inline void add_square(v8d& acc, const v8d& v) {
#if defined(__AVX512F__)
  if constexpr (!std::is_same_v<T, double>) {
    acc = (v8d)_mm512_fmadd_pd((__m512d)v, (__m512d)v, (__m512d)acc);
    return;
  }
#endif
  acc += v * v;
}

inline double widen(double x) { return x; }
inline double widen(float x) { return double(x); }
inline double widen(uint16_t x) {
  const uint32_t u = uint32_t(x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return double(f);
}

template <typename T>
double chunk_sumsq(const T* __restrict x, int64_t n) {
  constexpr int NV = NORM_LANES / 8;
  v8d acc[NV] = {};
  int64_t j = 0;
  for (; j + NORM_LANES <= n; j += NORM_LANES) {
#pragma GCC unroll 8
    for (int u = 0; u < NV; ++u) {
      v8d v;
      load8(x + j + 8 * u, v);
      add_square<T>(acc[u], v);
    }
  }
  double s[NORM_LANES];
  std::memcpy(s, acc, sizeof(s));
  for (int k = 0; j + k < n; ++k) {
    const double v = widen(x[j + k]);
    s[k] += v * v;
  }
  for (int w = NORM_LANES / 2; w > 0; w /= 2) {
    for (int k = 0; k < w; ++k) s[k] += s[k + w];
  }
  return s[0];
}

inline int64_t norm_chunks(int64_t n) { return (n + NORM_CHUNK - 1) / NORM_CHUNK; }

inline double sumsq_at(int dtype, const void* base, int64_t begin, int64_t n) {
  switch (static_cast<Elem>(dtype)) {
    case Elem::F32: return chunk_sumsq(static_cast<const float*>(base) + begin, n);
    case Elem::F64: return chunk_sumsq(static_cast<const double*>(base) + begin, n);
    default: return chunk_sumsq(static_cast<const uint16_t*>(base) + begin, n);
  }
}

}  // namespace

extern "C" {

int danlu_abi_version() { return 7; }

// The sum of squares of each of nt tensors (dtypes: an Elem each) into out, in double; chunks of the
// tensors spread over nthreads, with the same result for any thread count. Returns 0, or -1 for an
// unknown dtype (nothing written then).
int danlu_sum_squares(int64_t nt, const int64_t* numel, void* const* ptrs, const int* dtypes, int nthreads, double* out) {
  std::vector<int64_t> first(nt + 1, 0);
  for (int64_t i = 0; i < nt; ++i) {
    if (dtypes[i] < 0 || dtypes[i] > I(Elem::BF16)) return -1;
    first[i + 1] = first[i] + norm_chunks(numel[i]);
  }
  const int64_t total = first[nt];
  std::vector<double> part(total);
  int64_t tensor = 0;  // the tensor of chunk 0; each thread walks forward from its own
#pragma omp parallel for num_threads(nthreads) schedule(static) firstprivate(tensor) if (nthreads > 1 && total > 1)
  for (int64_t c = 0; c < total; ++c) {
    if (c >= first[tensor + 1] || c < first[tensor]) {
      tensor = std::upper_bound(first.begin(), first.end(), c) - first.begin() - 1;
    }
    const int64_t begin = (c - first[tensor]) * NORM_CHUNK;
    part[c] = sumsq_at(dtypes[tensor], ptrs[tensor], begin, std::min(NORM_CHUNK, numel[tensor] - begin));
  }
  for (int64_t i = 0; i < nt; ++i) {
    double s = 0;
    for (int64_t c = first[i]; c < first[i + 1]; ++c) s += part[c];
    out[i] = s;
  }
  return 0;
}

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

// Float64 scalars (NAdam's mu_product): multiply each by its factor and report the new values.
void danlu_scale(int64_t n, void* const* ptrs, const double* factors, double* out) {
  for (int64_t i = 0; i < n; ++i) {
    double* t = static_cast<double*>(ptrs[i]);
    *t *= factors[i];
    out[i] = *t;
  }
}

// Elementwise algorithms over a list of tensors. dtype: 0 float, 1 double. kernel: a Kernel.
// ptrs: nt * NSLOT slots, coef: nt * NCOEF, modes: nt, red: nt * 2 (phases NORM and ADAPT: sum d^2,
// sum p^2). Returns 0, or -1 for an unknown kernel or dtype.
int danlu_elementwise(int dtype, int kernel, int64_t nt, const int64_t* numel, void* const* ptrs, const double* coef,
                      const int* modes, int phase, int nthreads, double* red) {
  if (dtype == 0) return dispatch<float>(kernel, nt, numel, ptrs, coef, modes, phase, nthreads, red);
  if (dtype == 1) return dispatch<double>(kernel, nt, numel, ptrs, coef, modes, phase, nthreads, red);
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
