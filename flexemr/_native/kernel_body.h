/* The pooling loops of one code path, included by kernel.c once per path with
 * FXK_VBYTES (bytes of a vector register: 16 for the portable baseline, 32
 * for x86-64 AVX2) and FXK_SFX (suffix of the names defined here) set.
 *
 * A row is cut into chunks of 8, 4, 2 and 1 vectors (then a scalar tail of
 * fewer than one vector); for each chunk the rows of the bag are added into
 * NV vector registers, which are stored once.  GCC/Clang vector extensions
 * only: the compiler maps the vectors to SSE2, AVX2, NEON... registers.
 */

#define VL (FXK_VBYTES / 4)  /* float lanes */
#define VLD (FXK_VBYTES / 8) /* double lanes */
#define NAME(x) FXK_CAT(x, FXK_SFX)

#define vf NAME(vf)
#define vd NAME(vd)
#define vi32 NAME(vi32)
#define vi64 NAME(vi64)
#define vu32 NAME(vu32)
#define vu16 NAME(vu16)
#define vi8 NAME(vi8)
#define vu8 NAME(vu8)
#define vfu NAME(vfu)
#define vdu NAME(vdu)
typedef float vf __attribute__((vector_size(FXK_VBYTES)));
/* the same vectors at any float (double) alignment: unaligned loads and stores */
typedef float vfu __attribute__((vector_size(FXK_VBYTES), aligned(4)));
typedef double vdu __attribute__((vector_size(FXK_VBYTES), aligned(8)));
typedef double vd __attribute__((vector_size(FXK_VBYTES)));
typedef int32_t vi32 __attribute__((vector_size(FXK_VBYTES)));
typedef int64_t vi64 __attribute__((vector_size(FXK_VBYTES)));
typedef uint32_t vu32 __attribute__((vector_size(FXK_VBYTES)));
typedef uint16_t vu16 __attribute__((vector_size(FXK_VBYTES / 2)));
typedef int8_t vi8 __attribute__((vector_size(FXK_VBYTES / 4)));
typedef uint8_t vu8 __attribute__((vector_size(FXK_VBYTES / 4)));

/* IEEE half -> float, exact for every input (zeros, subnormals, inf, NaN),
 * with integer operations and one exact float subtraction (no denormal
 * arithmetic): see half_to_float. */
FXK_INLINE vf NAME(half_to_float_v)(vu16 h) {
#if FXK_VBYTES == 32 && defined(FXK_X86)
    __m128i x;
    memcpy(&x, &h, sizeof x);
    return (vf)_mm256_cvtph_ps(x); /* F16C */
#else
    vu32 x = __builtin_convertvector(h, vu32);
    vu32 sign = (x & 0x8000u) << 16;
    vu32 o = (x & 0x7fffu) << 13;
    vu32 e = o & 0x0f800000u;
    o += 0x38000000u;
    vu32 inf = (vu32)(e == 0x0f800000u);
    o += inf & 0x38000000u;
    vu32 den = (vu32)(e == 0u);
    vf fd = (vf)(o + 0x00800000u) - 6.103515625e-05f;
    vu32 bits = (((vu32)fd & den) | (o & ~den)) | sign;
    return (vf)bits;
#endif
}

/* VL elements of `dtype` at p -> float lanes */
FXK_INLINE vf NAME(loadf)(const char *p, const int dtype) {
    if (dtype == FXK_F32) {
        vf v;
        memcpy(&v, p, sizeof v);
        return v;
    }
    if (dtype == FXK_F16) {
        vu16 h;
        memcpy(&h, p, sizeof h);
        return NAME(half_to_float_v)(h);
    }
    if (dtype == FXK_I8) {
        vi8 b;
        memcpy(&b, p, sizeof b);
        return __builtin_convertvector(b, vf);
    }
    vu8 b;
    memcpy(&b, p, sizeof b);
    return __builtin_convertvector(b, vf);
}

FXK_INLINE vd NAME(loadd)(const char *p) {
    vd v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* element-wise max that propagates NaN like numpy.maximum: take x where
 * x > acc or x is NaN (a NaN already in acc stays: nothing compares greater) */
FXK_INLINE vf NAME(maxf)(vf acc, vf x) {
    vi32 m = (x > acc) | (x != x);
    return (vf)(((vi32)x & m) | ((vi32)acc & ~m));
}

FXK_INLINE vd NAME(maxd)(vd acc, vd x) {
    vi64 m = (x > acc) | (x != x);
    return (vd)(((vi64)x & m) | ((vi64)acc & ~m));
}

/* One chunk of NV float vectors (columns col .. col + NV * VL) of the bag
 * ids k0..k1 (k1 > k0), stored at dst (divided by scale unless it is 1);
 * with pf, rows FXK_PREFETCH ids ahead are prefetched (the caller makes sure
 * those ids exist).  The accumulators stay in registers: NV, kind, dtype,
 * wide and pf are compile-time constants here.  Returns 0, or -1 on a bad id. */
FXK_INLINE int NAME(chunk_f)(const ctx_t *c, int64_t k0, int64_t k1, int64_t col, float *dst, float scale,
                             const int NV, const int kind, const int dtype, const int wide, const int pf) {
    const int es = dtype_size(dtype);
    /* the chunk's columns as the rows: one base register, constant displacements */
    ctx_t cc = *c;
    cc.base += (uintptr_t)(col * es);
    vf acc[8];
    int64_t k = k0;
    if (kind == K_MAX) {
        int64_t id = id_at(&cc, k, wide);
        if (FXK_UNLIKELY((uint64_t)id >= cc.num_rows)) return -1;
        const char *r = row_at(&cc, id);
        for (int v = 0; v < NV; v++) acc[v] = NAME(loadf)(r + v * VL * es, dtype);
        k++;
    } else {
        for (int v = 0; v < NV; v++) acc[v] = (vf){0};
    }
    for (; k < k1; k++) {
        int64_t id = id_at(&cc, k, wide);
        if (FXK_UNLIKELY((uint64_t)id >= cc.num_rows)) return -1;
        if (pf) prefetch_row(&cc, id_at(&cc, k + FXK_PREFETCH, wide), 0, NV * VL * es);
        const char *r = row_at(&cc, id);
        if (kind == K_WSUM) {
            float w = cc.weights[k];
            for (int v = 0; v < NV; v++) acc[v] += NAME(loadf)(r + v * VL * es, dtype) * w;
        } else if (kind == K_MAX) {
            for (int v = 0; v < NV; v++) acc[v] = NAME(maxf)(acc[v], NAME(loadf)(r + v * VL * es, dtype));
        } else {
            for (int v = 0; v < NV; v++) acc[v] += NAME(loadf)(r + v * VL * es, dtype);
        }
    }
    if (scale != 1.0f)
        for (int v = 0; v < NV; v++) acc[v] /= scale;
    for (int v = 0; v < NV; v++) *(vfu *)(dst + v * VL) = acc[v];
    return 0;
}

FXK_INLINE int NAME(chunk_d)(const ctx_t *c, int64_t k0, int64_t k1, int64_t col, double *dst, double scale,
                             const int NV, const int kind, const int wide, const int pf) {
    ctx_t cc = *c;
    cc.base += (uintptr_t)(col * 8);
    vd acc[8];
    int64_t k = k0;
    if (kind == K_MAX) {
        int64_t id = id_at(&cc, k, wide);
        if (FXK_UNLIKELY((uint64_t)id >= cc.num_rows)) return -1;
        const char *r = row_at(&cc, id);
        for (int v = 0; v < NV; v++) acc[v] = NAME(loadd)(r + v * FXK_VBYTES);
        k++;
    } else {
        for (int v = 0; v < NV; v++) acc[v] = (vd){0};
    }
    for (; k < k1; k++) {
        int64_t id = id_at(&cc, k, wide);
        if (FXK_UNLIKELY((uint64_t)id >= cc.num_rows)) return -1;
        if (pf) prefetch_row(&cc, id_at(&cc, k + FXK_PREFETCH, wide), 0, NV * FXK_VBYTES);
        const char *r = row_at(&cc, id);
        if (kind == K_WSUM) {
            double w = (double)cc.weights[k];
            for (int v = 0; v < NV; v++) acc[v] += NAME(loadd)(r + v * FXK_VBYTES) * w;
        } else if (kind == K_MAX) {
            for (int v = 0; v < NV; v++) acc[v] = NAME(maxd)(acc[v], NAME(loadd)(r + v * FXK_VBYTES));
        } else {
            for (int v = 0; v < NV; v++) acc[v] += NAME(loadd)(r + v * FXK_VBYTES);
        }
    }
    if (scale != 1.0)
        for (int v = 0; v < NV; v++) acc[v] /= scale;
    for (int v = 0; v < NV; v++) *(vdu *)(dst + v * VLD) = acc[v];
    return 0;
}

/* Every column of one bag (ids k0..k1, k1 > k0) into dst: chunks of 8, 4, 2
 * and 1 vectors, then the scalar tail.  Returns 0, or -1 on a bad id. */
FXK_INLINE int NAME(bag_f)(const ctx_t *c, int64_t k0, int64_t k1, float *dst, float scale, const int kind,
                           const int dtype, const int wide, const int pf) {
    const int64_t dim = c->dim;
    int64_t col = 0;
    int rc = 0;
    for (; col + 8 * VL <= dim; col += 8 * VL)
        rc |= NAME(chunk_f)(c, k0, k1, col, dst + col, scale, 8, kind, dtype, wide, pf);
    if (col + 4 * VL <= dim) {
        rc |= NAME(chunk_f)(c, k0, k1, col, dst + col, scale, 4, kind, dtype, wide, pf);
        col += 4 * VL;
    }
    if (col + 2 * VL <= dim) {
        rc |= NAME(chunk_f)(c, k0, k1, col, dst + col, scale, 2, kind, dtype, wide, pf);
        col += 2 * VL;
    }
    if (col + VL <= dim) {
        rc |= NAME(chunk_f)(c, k0, k1, col, dst + col, scale, 1, kind, dtype, wide, pf);
        col += VL;
    }
    if (col < dim) rc |= tail_f(c, k0, k1, col, (int)(dim - col), dst + col, scale, kind, dtype, wide);
    return rc;
}

FXK_INLINE int NAME(bag_d)(const ctx_t *c, int64_t k0, int64_t k1, double *dst, double scale, const int kind,
                           const int wide, const int pf) {
    const int64_t dim = c->dim;
    int64_t col = 0;
    int rc = 0;
    for (; col + 8 * VLD <= dim; col += 8 * VLD)
        rc |= NAME(chunk_d)(c, k0, k1, col, dst + col, scale, 8, kind, wide, pf);
    if (col + 4 * VLD <= dim) {
        rc |= NAME(chunk_d)(c, k0, k1, col, dst + col, scale, 4, kind, wide, pf);
        col += 4 * VLD;
    }
    if (col + 2 * VLD <= dim) {
        rc |= NAME(chunk_d)(c, k0, k1, col, dst + col, scale, 2, kind, wide, pf);
        col += 2 * VLD;
    }
    if (col + VLD <= dim) {
        rc |= NAME(chunk_d)(c, k0, k1, col, dst + col, scale, 1, kind, wide, pf);
        col += VLD;
    }
    if (col < dim) rc |= tail_d(c, k0, k1, col, (int)(dim - col), dst + col, scale, kind, wide);
    return rc;
}

/* Bags b0..b1 of job j with float accumulation.  A bag whose ids all have an
 * id FXK_PREFETCH positions ahead (all but the job's last few) prefetches. */
FXK_INLINE int NAME(bags_f)(const fxk_job *j, const ctx_t *c, int64_t b0, int64_t b1, const int kind,
                            const int dtype, const int wide) {
    const int64_t dim = c->dim, kpf = prefetch_end(c);
    const int mean = j->mode == FXK_MEAN;
    const float fill = (float)j->fill;
    for (int64_t b = b0; b < b1; b++) {
        int64_t k0 = j->offsets[b], k1 = j->offsets[b + 1];
        float *dst = (float *)out_row(j, b);
        if (k0 == k1) {
            for (int64_t e = 0; e < dim; e++) dst[e] = fill;
            continue;
        }
        float scale = mean ? (float)(k1 - k0) : 1.0f;
        int rc = FXK_LIKELY(k1 <= kpf) ? NAME(bag_f)(c, k0, k1, dst, scale, kind, dtype, wide, 1)
                                       : NAME(bag_f)(c, k0, k1, dst, scale, kind, dtype, wide, 0);
        if (FXK_UNLIKELY(rc)) return -1;
    }
    return 0;
}

FXK_INLINE int NAME(bags_d)(const fxk_job *j, const ctx_t *c, int64_t b0, int64_t b1, const int kind,
                            const int wide) {
    const int64_t dim = c->dim, kpf = prefetch_end(c);
    const int mean = j->mode == FXK_MEAN;
    for (int64_t b = b0; b < b1; b++) {
        int64_t k0 = j->offsets[b], k1 = j->offsets[b + 1];
        double *dst = (double *)out_row(j, b);
        if (k0 == k1) {
            for (int64_t e = 0; e < dim; e++) dst[e] = j->fill;
            continue;
        }
        double scale = mean ? (double)(k1 - k0) : 1.0;
        int rc = FXK_LIKELY(k1 <= kpf) ? NAME(bag_d)(c, k0, k1, dst, scale, kind, wide, 1)
                                       : NAME(bag_d)(c, k0, k1, dst, scale, kind, wide, 0);
        if (FXK_UNLIKELY(rc)) return -1;
    }
    return 0;
}

#define FXK_CASES(DT, W)                                                 \
    switch (kind) {                                                      \
    case K_SUM: return NAME(bags_f)(j, &c, b0, b1, K_SUM, DT, W);         \
    case K_WSUM: return NAME(bags_f)(j, &c, b0, b1, K_WSUM, DT, W);       \
    default: return NAME(bags_f)(j, &c, b0, b1, K_MAX, DT, W);            \
    }
#define FXK_KIND_CASES(DT)           \
    case DT:                         \
        if (c.wide) FXK_CASES(DT, 1) \
        else FXK_CASES(DT, 0)

/* Pool bags b0..b1 of job j: the loop specialised for its dtype, kind and id
 * width.  Returns 0, or -1 on a bad id. */
static int NAME(pool_range)(const fxk_job *j, int64_t b0, int64_t b1) {
    const ctx_t c = make_ctx(j);
    const int kind = j->mode == FXK_MAX ? K_MAX : j->weights ? K_WSUM : K_SUM;
    switch (j->dtype) {
    FXK_KIND_CASES(FXK_F32)
    FXK_KIND_CASES(FXK_F16)
    FXK_KIND_CASES(FXK_I8)
    FXK_KIND_CASES(FXK_U8)
    default:
        if (c.wide) {
            switch (kind) {
            case K_SUM: return NAME(bags_d)(j, &c, b0, b1, K_SUM, 1);
            case K_WSUM: return NAME(bags_d)(j, &c, b0, b1, K_WSUM, 1);
            default: return NAME(bags_d)(j, &c, b0, b1, K_MAX, 1);
            }
        }
        switch (kind) {
        case K_SUM: return NAME(bags_d)(j, &c, b0, b1, K_SUM, 0);
        case K_WSUM: return NAME(bags_d)(j, &c, b0, b1, K_WSUM, 0);
        default: return NAME(bags_d)(j, &c, b0, b1, K_MAX, 0);
        }
    }
}

#undef FXK_CASES
#undef FXK_KIND_CASES
#undef vf
#undef vfu
#undef vdu
#undef vd
#undef vi32
#undef vi64
#undef vu32
#undef vu16
#undef vi8
#undef vu8
#undef VL
#undef VLD
#undef NAME
