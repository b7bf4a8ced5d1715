/* Fused inverted dropout over a dense CPU buffer, for timm_dropfix/fastdrop.py (built by timm_dropfix/_native.py).
 *
 * Elements go in blocks of 16 (in memory order). Element i = 16 b + 8 h + j (j < 8) is kept, times `scale`, when
 * word h (h = 0: the low 32 bits, 1: the high 32 bits) of SplitMix64's output for the state
 * seed + (8 b + j + 1) * GAMMA is >= t, and zeroed otherwise: one 64-bit hash per two elements, laid out so that
 * the compiler vectorizes it. The mask is a pure function of (seed, i): the same for any thread count, so the
 * backward pass recomputes it from the seed instead of keeping it in memory. One pass reads x and writes out;
 * torch's CPU kernel draws each element with a serial sampler and keeps a float mask for backward.
 */
#include <stdint.h>

#define GAMMA 0x9e3779b97f4a7c15ULL

static inline uint64_t splitmix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

/* The hash that decides the elements 16 b + j and 16 b + 8 + j (j < 8): the mask's definition, in one place. */
#define TDF_HASH(b, j) splitmix64(seed + (uint64_t)(8 * (b) + (j) + 1) * GAMMA)

/* The 64-bit multiplies vectorize with AVX-512DQ; target_clones picks the widest the running CPU has, so one build
 * serves every x86-64 machine that shares the cache folder. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(TDF_NO_CLONES)
#define TDF_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define TDF_CLONES
#endif

/* Below this many elements a second thread costs more than it saves. */
#define TDF_PARALLEL_MIN 65536

/* x * 0 (not a literal 0) for dropped elements, so NaN and inf propagate as they do through torch's x * mask.
 * The _inplace variants overwrite x (the restrict-qualified ones must not be given out == x). The _add variants
 * add a second tensor s in the same pass, as the residual addition after a branch-end dropout: x * keep + s, two
 * roundings as in dropout-then-add (built with -ffp-contract=off, so no fused multiply-add). The _relu variants
 * apply a ReLU first, as at a pre-activation branch's BN-ReLU before its last conv: max(x, 0) * keep; the _add_relu
 * ones apply it to the sum, as a post-activation block's activation after its residual addition:
 * max(x * keep + s, 0). NaN and -0.0 are kept as torch's ReLU keeps them. */
#define TDF_KEEP(T, h, hi) (((uint32_t)((h) >> ((hi) * 32))) >= t ? scale : (T)0)
#define TDF_MUL(i, k) (x[i] * (k))
#define TDF_MUL_ADD(i, k) (x[i] * (k) + s[i])
#define TDF_RELU_MUL(i, k) ((x[i] < 0 ? 0.0f : x[i]) * (k))
#define TDF_MUL_ADD_RELU(i, k) (TDF_MUL_ADD(i, k) < 0 ? 0 : TDF_MUL_ADD(i, k))

#define TDF_LOOP(T, DST, VAL)                                                                                      \
    int64_t blocks = n / 16;                                                                                       \
    _Pragma("omp parallel for if(n >= TDF_PARALLEL_MIN) num_threads(threads) schedule(static)")                    \
    for (int64_t b = 0; b < blocks; ++b) {                                                                         \
        uint64_t h[8];                                                                                             \
        for (int j = 0; j < 8; ++j) h[j] = TDF_HASH(b, j);                                                          \
        for (int j = 0; j < 8; ++j) DST[16 * b + j] = VAL(16 * b + j, TDF_KEEP(T, h[j], 0));                      \
        for (int j = 0; j < 8; ++j) DST[16 * b + 8 + j] = VAL(16 * b + 8 + j, TDF_KEEP(T, h[j], 1));              \
    }                                                                                                              \
    for (int64_t i = 16 * blocks; i < n; ++i) {                                                                    \
        int64_t k = i - 16 * blocks;                                                                               \
        uint64_t h = TDF_HASH(blocks, k & 7);                                                                      \
        DST[i] = VAL(i, TDF_KEEP(T, h, k >> 3));                                                                   \
    }

#define TDF_DROPOUT(NAME, T)                                                                                       \
    TDF_CLONES void NAME(const T *restrict x, T *restrict out, int64_t n, uint64_t seed, uint32_t t, T scale,      \
                         int threads) {                                                                            \
        TDF_LOOP(T, out, TDF_MUL)                                                                                  \
    }                                                                                                              \
    TDF_CLONES void NAME##_inplace(T *x, int64_t n, uint64_t seed, uint32_t t, T scale, int threads) {             \
        TDF_LOOP(T, x, TDF_MUL)                                                                                    \
    }                                                                                                              \
    TDF_CLONES void NAME##_add(const T *restrict x, const T *restrict s, T *restrict out, int64_t n, uint64_t seed, \
                               uint32_t t, T scale, int threads) {                                                 \
        TDF_LOOP(T, out, TDF_MUL_ADD)                                                                              \
    }                                                                                                              \
    TDF_CLONES void NAME##_add_inplace(T *x, const T *restrict s, int64_t n, uint64_t seed, uint32_t t, T scale,   \
                                       int threads) {                                                              \
        TDF_LOOP(T, x, TDF_MUL_ADD)                                                                                \
    }                                                                                                              \
    TDF_CLONES void NAME##_add_relu(const T *restrict x, const T *restrict s, T *restrict out, int64_t n,          \
                                    uint64_t seed, uint32_t t, T scale, int threads) {                             \
        TDF_LOOP(T, out, TDF_MUL_ADD_RELU)                                                                         \
    }                                                                                                              \
    TDF_CLONES void NAME##_add_relu_inplace(T *x, const T *restrict s, int64_t n, uint64_t seed, uint32_t t,       \
                                            T scale, int threads) {                                                \
        TDF_LOOP(T, x, TDF_MUL_ADD_RELU)                                                                           \
    }                                                                                                              \
    /* the _add_relu forms' backward in one pass: the ReLU's gradient (g, zeroed where the output y is <= 0, as     \
     * torch's threshold_backward zeroes it) to the shortcut (gs) and, dropped, to the branch (gb), where the        \
     * ReLU's backward and then the dropout's would write that gradient and read it back. A block's 16 values go    \
     * through a local array as a copy and a conditional zero: GCC 12.2 vectorized `gs = y <= 0 ? 0 : g` wrongly   \
     * in this loop for x86-64-v3 and -v4 (some gs zeroed where y > 0). */                                         \
    TDF_CLONES void NAME##_add_relu_backward(const T *restrict g, const T *restrict y, T *restrict gs,             \
                                             T *restrict gb, int64_t n, uint64_t seed, uint32_t t, T scale,        \
                                             int threads) {                                                        \
        int64_t blocks = n / 16;                                                                                   \
        _Pragma("omp parallel for if(n >= TDF_PARALLEL_MIN) num_threads(threads) schedule(static)")                \
        for (int64_t b = 0; b < blocks; ++b) {                                                                     \
            uint64_t h[8];                                                                                         \
            T a[16];                                                                                               \
            for (int j = 0; j < 16; ++j) {                                                                         \
                a[j] = g[16 * b + j];                                                                              \
                if (y[16 * b + j] <= 0) a[j] = 0;                                                                  \
            }                                                                                                      \
            for (int j = 0; j < 16; ++j) gs[16 * b + j] = a[j];                                                    \
            for (int j = 0; j < 8; ++j) h[j] = TDF_HASH(b, j);                                                      \
            for (int j = 0; j < 8; ++j) gb[16 * b + j] = a[j] * TDF_KEEP(T, h[j], 0);                              \
            for (int j = 0; j < 8; ++j) gb[16 * b + 8 + j] = a[8 + j] * TDF_KEEP(T, h[j], 1);                      \
        }                                                                                                          \
        for (int64_t i = 16 * blocks; i < n; ++i) {                                                                \
            int64_t k = i - 16 * blocks;                                                                           \
            uint64_t h = TDF_HASH(blocks, k & 7);                                                                  \
            gs[i] = y[i] <= 0 ? 0 : g[i];                                                                          \
            gb[i] = gs[i] * TDF_KEEP(T, h, k >> 3);                                                                \
        }                                                                                                          \
    }                                                                                                              \
    TDF_CLONES void NAME##_relu(const T *restrict x, T *restrict out, int64_t n, uint64_t seed, uint32_t t,        \
                                T scale, int threads) {                                                            \
        TDF_LOOP(T, out, TDF_RELU_MUL)                                                                             \
    }                                                                                                              \
    TDF_CLONES void NAME##_relu_inplace(T *x, int64_t n, uint64_t seed, uint32_t t, T scale, int threads) {        \
        TDF_LOOP(T, x, TDF_RELU_MUL)                                                                               \
    }                                                                                                              \
    /* the _relu forms' backward: y is 0 wherever the ReLU or the mask zeroed, so y alone gives the gradient       \
     * (g * scale where y > 0, else 0, as threshold_backward(g * scale, y, 0)) and no mask is recomputed */         \
    TDF_CLONES void NAME##_relu_backward(const T *restrict g, const T *restrict y, T *restrict out, int64_t n,     \
                                         T scale, int threads) {                                                   \
        _Pragma("omp parallel for if(n >= TDF_PARALLEL_MIN) num_threads(threads) schedule(static)")                \
        for (int64_t i = 0; i < n; ++i) out[i] = y[i] <= 0 ? 0 : g[i] * scale;                                    \
    }

TDF_DROPOUT(tdf_dropout_f32, float)
TDF_DROPOUT(tdf_dropout_f64, double)
