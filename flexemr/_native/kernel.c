/* flexemr embedding kernel (see kernel.h for the contract).
 *
 * Pooling reads every row in place and reduces it straight into vector
 * registers (kernel_body.h): for each chunk of a row the bag's rows are
 * accumulated into registers and stored once; no [n_ids, dim] intermediate.
 * Accumulation is float32 (float64 for float64 tables), in id order.
 *
 * Code paths: kernel_body.h is compiled once for the portable baseline
 * (16-byte vectors: SSE2 on x86-64, NEON on aarch64) and, on x86-64, once
 * more for AVX2 + FMA + F16C (x86-64-v3, 32-byte vectors); the path is chosen
 * once at load time from the CPU (fxk_isa, fxk_use_isa).
 *
 * Rows of a later id are prefetched FXK_PREFETCH ids ahead: rows missing in
 * the caches are then fetched while the current rows are added up.
 *
 * Parallelism: a call is cut into tasks (a range of bags of one job, of about
 * equal work); the caller and up to threads-1 pool workers take tasks from a
 * shared counter.  Workers sleep on a condition variable between calls (no
 * spinning); a call only waits for workers that actually joined it, and a
 * call whose work is below fxk_inline_work() runs on the caller's thread.
 */

#include <pthread.h>
#include <signal.h>
#if defined(__GLIBC__) || defined(__linux__)
#include <malloc.h>
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(FXK_NO_DISPATCH)
#define FXK_X86 1
#include <immintrin.h>
#endif

#include "kernel.h"

#define FXK_INLINE static inline __attribute__((always_inline))
#define FXK_LIKELY(x) __builtin_expect(!!(x), 1)
#define FXK_UNLIKELY(x) __builtin_expect(!!(x), 0)
#define FXK_CAT2(a, b) a##b
#define FXK_CAT(a, b) FXK_CAT2(a, b)

/* ids ahead whose rows are prefetched (0 disables prefetching) */
#ifndef FXK_PREFETCH
#define FXK_PREFETCH 24
#endif
/* most worker threads the pool starts */
#define FXK_MAX_WORKERS 63

/* ------------------------------------------------------- scalar elements */

/* IEEE half -> float, exact for every input: the exponent is rebased with
 * integer operations; inf/NaN get the top exponent; zeros and subnormals are
 * renormalised by one exact float subtraction of 2^-14 (no denormal
 * arithmetic, so flush-to-zero modes do not change the result). */
FXK_INLINE float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t o = (uint32_t)(h & 0x7fffu) << 13;
    uint32_t e = o & 0x0f800000u;
    float f;
    o += 0x38000000u; /* (127 - 15) << 23 */
    if (e == 0x0f800000u) {
        o += 0x38000000u;
    } else if (e == 0u) {
        o += 0x00800000u;
        memcpy(&f, &o, 4);
        f -= 6.103515625e-05f; /* 2^-14 */
        memcpy(&o, &f, 4);
    }
    o |= sign;
    memcpy(&f, &o, 4);
    return f;
}

FXK_INLINE float load1f(const char *p, const int dtype) {
    if (dtype == FXK_F32) {
        float v;
        memcpy(&v, p, 4);
        return v;
    }
    if (dtype == FXK_F16) {
        uint16_t h;
        memcpy(&h, p, 2);
        return half_to_float(h);
    }
    if (dtype == FXK_I8) return (float)*(const int8_t *)p;
    return (float)*(const uint8_t *)p;
}

FXK_INLINE double load1d(const char *p) {
    double v;
    memcpy(&v, p, 8);
    return v;
}

FXK_INLINE float max1f(float acc, float x) { return (x > acc || x != x) ? x : acc; }
FXK_INLINE double max1d(double acc, double x) { return (x > acc || x != x) ? x : acc; }

/* Output row b of pooling job j (kernel.h: out_block, out_gap, out_phase). */
FXK_INLINE char *out_row(const fxk_job *j, int64_t b) {
    char *p = (char *)j->out + b * j->out_stride;
    if (j->out_block > 0) p += ((b + j->out_phase) / j->out_block) * j->out_gap;
    return p;
}

/* -------------------------------------------------------------- the bags */

static int dtype_size(int dtype) {
    switch (dtype) {
    case FXK_F16: return 2;
    case FXK_F32: return 4;
    case FXK_F64: return 8;
    case FXK_I8:
    case FXK_U8: return 1;
    default: return 0;
    }
}

/* reduction kinds of the specialised loops */
#define K_SUM 0  /* sum (mean divides afterwards) */
#define K_WSUM 1 /* weighted sum */
#define K_MAX 2

/* What the bag loops need of a job, read once per task. */
typedef struct {
    uintptr_t base;     /* address of row 0's data */
    int64_t stride;
    uint64_t num_rows;
    int64_t dim;
    const void *ids;
    int wide;           /* int64 ids */
    int64_t n_ids;
    const float *weights;
} ctx_t;

FXK_INLINE ctx_t make_ctx(const fxk_job *j) {
    ctx_t c = {(uintptr_t)j->rows + (uintptr_t)j->row_offset, j->row_stride, (uint64_t)j->num_rows, j->dim,
               j->ids, j->id_bytes == 8, j->n_ids, j->weights};
    return c;
}

/* id k; `wide` (int64 ids) is a compile-time constant in the loops */
FXK_INLINE int64_t id_at(const ctx_t *c, int64_t k, const int wide) {
    return wide ? ((const int64_t *)c->ids)[k] : (int64_t)((const int32_t *)c->ids)[k];
}

FXK_INLINE const char *row_at(const ctx_t *c, int64_t id) {
    return (const char *)(c->base + (uintptr_t)id * (uintptr_t)c->stride);
}

/* Prefetch `bytes` (a compile-time constant in the pooling loops) of row `id` from byte col_bytes
 * on.  The id is not checked: a prefetch never faults (whatever the address),
 * and the id is checked before its row is read, FXK_PREFETCH ids later. */
FXK_INLINE void prefetch_row(const ctx_t *c, int64_t id, int64_t col_bytes, const int bytes) {
    const char *p = (const char *)(c->base + (uintptr_t)id * (uintptr_t)c->stride + (uintptr_t)col_bytes);
    for (int off = 0; off < bytes; off += 64) __builtin_prefetch(p + off, 0, 3);
}

/* Ids k < prefetch_end(c) have an id FXK_PREFETCH positions ahead to prefetch. */
FXK_INLINE int64_t prefetch_end(const ctx_t *c) { return FXK_PREFETCH > 0 ? c->n_ids - FXK_PREFETCH : INT64_MIN; }

/* The last n < 8 columns from col on, element by element (one vector's worth at most). */
FXK_INLINE int tail_f(const ctx_t *c, int64_t k0, int64_t k1, int64_t col, int n, float *dst, float scale,
                      const int kind, const int dtype, const int wide) {
    const int es = dtype_size(dtype);
    float acc[8] = {0};
    for (int64_t k = k0; k < k1; k++) {
        int64_t id = id_at(c, k, wide);
        if (FXK_UNLIKELY((uint64_t)id >= c->num_rows)) return -1;
        const char *r = row_at(c, id) + col * es;
        float w = kind == K_WSUM ? c->weights[k] : 1.0f;
        for (int e = 0; e < n; e++) {
            float x = load1f(r + e * es, dtype);
            if (kind == K_MAX) acc[e] = k == k0 ? x : max1f(acc[e], x);
            else if (kind == K_WSUM) acc[e] += x * w;
            else acc[e] += x;
        }
    }
    for (int e = 0; e < n; e++) dst[e] = scale != 1.0f ? acc[e] / scale : acc[e];
    return 0;
}

FXK_INLINE int tail_d(const ctx_t *c, int64_t k0, int64_t k1, int64_t col, int n, double *dst, double scale,
                      const int kind, const int wide) {
    double acc[8] = {0};
    for (int64_t k = k0; k < k1; k++) {
        int64_t id = id_at(c, k, wide);
        if (FXK_UNLIKELY((uint64_t)id >= c->num_rows)) return -1;
        const char *r = row_at(c, id) + col * 8;
        double w = kind == K_WSUM ? (double)c->weights[k] : 1.0;
        for (int e = 0; e < n; e++) {
            double x = load1d(r + e * 8);
            if (kind == K_MAX) acc[e] = k == k0 ? x : max1d(acc[e], x);
            else if (kind == K_WSUM) acc[e] += x * w;
            else acc[e] += x;
        }
    }
    for (int e = 0; e < n; e++) dst[e] = scale != 1.0 ? acc[e] / scale : acc[e];
    return 0;
}

/* Row of id k copied to out row k (prefetching the first pf_bytes of the
 * row FXK_PREFETCH ids ahead); -1 on a bad id. */
FXK_INLINE int copy_row(const fxk_job *j, const ctx_t *c, int64_t k, size_t nbytes, const int wide, int pf_bytes) {
    int64_t id = id_at(c, k, wide);
    if (FXK_UNLIKELY((uint64_t)id >= c->num_rows)) return -1;
    if (pf_bytes) prefetch_row(c, id_at(c, k + FXK_PREFETCH, wide), 0, pf_bytes);
    memcpy((char *)j->out + k * j->out_stride, row_at(c, id), nbytes);
    return 0;
}

FXK_INLINE int gather_ids(const fxk_job *j, const ctx_t *c, int64_t k0, int64_t k1, const int wide) {
    const size_t nbytes = (size_t)(c->dim * dtype_size(j->dtype));
    const int pf_bytes = nbytes < 256 ? (int)nbytes : 256;
    int64_t k = k0, kpf = prefetch_end(c);
    if (kpf > k1) kpf = k1;
    for (; k < kpf; k++)
        if (copy_row(j, c, k, nbytes, wide, pf_bytes)) return -1;
    for (; k < k1; k++)
        if (copy_row(j, c, k, nbytes, wide, 0)) return -1;
    return 0;
}

/* Rows of ids k0..k1 copied to out rows k0..k1 (up to 256 bytes of a row are prefetched). */
static int gather_range(const fxk_job *j, int64_t k0, int64_t k1) {
    const ctx_t c = make_ctx(j);
    return c.wide ? gather_ids(j, &c, k0, k1, 1) : gather_ids(j, &c, k0, k1, 0);
}

/* ------------------------------------------------------------ code paths */

#define FXK_VBYTES 16
#define FXK_SFX _base
#include "kernel_body.h"
#undef FXK_VBYTES
#undef FXK_SFX

#ifdef FXK_X86
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
#define FXK_VBYTES 32
#define FXK_SFX _avx2
#include "kernel_body.h"
#undef FXK_VBYTES
#undef FXK_SFX
#pragma GCC pop_options
#endif

typedef int (*pool_fn)(const fxk_job *, int64_t, int64_t);

static const struct {
    const char *name;
    pool_fn fn;
} isas[] = {
    {"baseline", pool_range_base},
#ifdef FXK_X86
    {"avx2", pool_range_avx2},
#endif
};

static int isa_supported(int i) {
#ifdef FXK_X86
    if (isas[i].fn == pool_range_avx2) {
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
               __builtin_cpu_supports("x86-64-v3");
    }
#endif
    (void)i;
    return 1;
}

static int isa_index = -1; /* chosen path; -1 until the first call */

static int current_isa(void) {
    int i = __atomic_load_n(&isa_index, __ATOMIC_RELAXED);
    if (i < 0) {
        i = 0;
        for (int k = (int)(sizeof isas / sizeof isas[0]) - 1; k > 0; k--)
            if (isa_supported(k)) { i = k; break; }
        __atomic_store_n(&isa_index, i, __ATOMIC_RELAXED);
    }
    return i;
}

/* Units u0..u1 of job j (bags; ids for a gather) with the chosen code path. */
static int run_range(const fxk_job *j, int64_t u0, int64_t u1, pool_fn pool) {
    return j->mode == FXK_GATHER ? gather_range(j, u0, u1) : pool(j, u0, u1);
}

/* ------------------------------------------------------------ validation */

static int units(const fxk_job *j) { return j->mode == FXK_GATHER; }

static int64_t num_units(const fxk_job *j) { return units(j) ? j->n_ids : j->num_bags; }

/* Position of the first out-of-range id of job j (-1 when none). */
static int64_t first_bad(const fxk_job *j) {
    for (int64_t k = 0; k < j->n_ids; k++) {
        int64_t id = j->id_bytes == 8 ? ((const int64_t *)j->ids)[k] : ((const int32_t *)j->ids)[k];
        if ((uint64_t)id >= (uint64_t)j->num_rows) return k;
    }
    return -1;
}

/* Arguments and offsets of job j; sets and returns its status. */
static int validate(fxk_job *j) {
    j->bad_pos = -1;
    int st = FXK_OK;
    if (dtype_size(j->dtype) == 0 || j->mode < FXK_SUM || j->mode > FXK_GATHER || j->dim < 0 ||
        j->num_rows < 0 || j->n_ids < 0 || (j->id_bytes != 4 && j->id_bytes != 8) ||
        (j->n_ids > 0 && j->ids == NULL) || (j->weights != NULL && j->mode != FXK_SUM && j->mode != FXK_MEAN) ||
        j->out_block < 0 || (j->out_block > 0 && (j->out_phase < 0 || j->out_phase >= j->out_block ||
                                                  j->mode == FXK_GATHER))) {
        st = FXK_EARG;
    } else if (j->mode != FXK_GATHER) {
        if (j->num_bags < 0 || j->offsets == NULL) {
            st = FXK_EARG;
        } else if (j->offsets[0] != 0 || j->offsets[j->num_bags] != j->n_ids) {
            st = FXK_EOFFSETS;
        } else {
            for (int64_t b = 0; b < j->num_bags; b++)
                if (j->offsets[b + 1] < j->offsets[b]) { st = FXK_EOFFSETS; break; }
        }
    }
    if (st == FXK_OK && num_units(j) > 0 && j->dim > 0 && j->out == NULL) st = FXK_EARG;
    if (st == FXK_OK && j->n_ids > 0 && j->dim > 0 && j->rows == NULL) st = FXK_EARG;
    /* with no columns the loops read no row, so they check no id: check them here */
    if (st == FXK_OK && j->dim == 0 && first_bad(j) >= 0) st = FXK_EBADID;
    j->status = st;
    return st;
}

/* Work of units u0..u1 of job j, in element operations. */
static int64_t work(const fxk_job *j, int64_t u0, int64_t u1) {
    int64_t n = units(j) ? u1 - u0 : (j->offsets[u1] - j->offsets[u0]) + (u1 - u0);
    return n * (j->dim > 0 ? j->dim : 1);
}

/* ---------------------------------------------------------------- tasks */

typedef struct {
    int64_t job, u0, u1;
} task_t;

typedef struct batch batch_t;
struct batch {
    fxk_job *jobs;
    task_t *tasks;
    int64_t n_tasks;
    int64_t next; /* next task to take (atomic) */
    pool_fn pool;
    void (*run)(batch_t *b, int64_t t); /* runs task t */
    void *ctx;                          /* what `run` needs besides jobs/tasks */
};

static void fail(fxk_job *j, int code) {
    int expected = FXK_OK;
    __atomic_compare_exchange_n(&j->status, &expected, code, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
}

/* Task t of a pooling/gather batch: a range of units of one job. */
static void run_job_task(batch_t *b, int64_t t) {
    task_t *tk = &b->tasks[t];
    fxk_job *j = &b->jobs[tk->job];
    if (__atomic_load_n(&j->status, __ATOMIC_RELAXED) != FXK_OK) return;
    if (run_range(j, tk->u0, tk->u1, b->pool)) fail(j, FXK_EBADID);
}

static void run_tasks(batch_t *b) {
    for (;;) {
        int64_t t = __atomic_fetch_add(&b->next, 1, __ATOMIC_RELAXED);
        if (t >= b->n_tasks) return;
        b->run(b, t);
    }
}

/* ----------------------------------------------------------- thread pool */

static struct {
    pthread_mutex_t mu;
    pthread_cond_t work_cv; /* workers wait for a batch */
    pthread_cond_t done_cv; /* the caller waits for the workers that joined */
    int n_workers;          /* started */
    int busy;               /* a call owns the pool (a concurrent call runs inline) */
    int open;               /* the current batch takes workers */
    int want;               /* workers wanted by the current batch */
    int joined, running;
    uint64_t gen;           /* batches started */
    batch_t *batch;
} P = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, 0, 0, 0, 0, 0, NULL};

static int64_t inline_work = 1 << 21; /* ~150 us of work: below, waking a worker costs more than it saves here */
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

static void *worker_main(void *arg) {
    (void)arg;
    uint64_t seen = 0;
    pthread_mutex_lock(&P.mu);
    for (;;) {
        while (!(P.open && P.joined < P.want && P.gen != seen)) pthread_cond_wait(&P.work_cv, &P.mu);
        seen = P.gen;
        P.joined++;
        P.running++;
        batch_t *b = P.batch;
        pthread_mutex_unlock(&P.mu);
        run_tasks(b);
        pthread_mutex_lock(&P.mu);
        if (--P.running == 0 && !P.open) pthread_cond_signal(&P.done_cv);
    }
    return NULL;
}

/* Fork: hold the lock across fork() so the child copies a consistent pool;
 * the child has none of the workers, so it starts from an empty pool. */
static void atfork_prepare(void) { pthread_mutex_lock(&P.mu); }
static void atfork_parent(void) { pthread_mutex_unlock(&P.mu); }
static void atfork_child(void) {
    pthread_mutex_init(&P.mu, NULL);
    pthread_cond_init(&P.work_cv, NULL);
    pthread_cond_init(&P.done_cv, NULL);
    P.n_workers = P.busy = P.open = P.want = P.joined = P.running = 0;
    P.batch = NULL;
}
static void register_atfork(void) { pthread_atfork(atfork_prepare, atfork_parent, atfork_child); }

/* Start workers until there are n (under P.mu); signals stay with the caller's threads. */
static void grow_pool(int n) {
    if (n > FXK_MAX_WORKERS) n = FXK_MAX_WORKERS;
    if (P.n_workers >= n) return;
    pthread_once(&atfork_once, register_atfork);
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 1 << 20);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    while (P.n_workers < n) {
        pthread_t t;
        if (pthread_create(&t, &attr, worker_main, NULL) != 0) break;
        P.n_workers++;
    }
    pthread_attr_destroy(&attr);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
}

/* Run batch b with the caller and up to `workers` pool workers. */
static void run_parallel(batch_t *b, int workers) {
    pthread_mutex_lock(&P.mu);
    if (P.busy) { /* another thread's call owns the pool */
        pthread_mutex_unlock(&P.mu);
        run_tasks(b);
        return;
    }
    grow_pool(workers);
    if (workers > P.n_workers) workers = P.n_workers;
    P.busy = 1;
    P.batch = b;
    P.want = workers;
    P.joined = P.running = 0;
    P.open = 1;
    P.gen++;
    if (workers == 1) pthread_cond_signal(&P.work_cv);
    else if (workers > 1) pthread_cond_broadcast(&P.work_cv);
    pthread_mutex_unlock(&P.mu);

    run_tasks(b);

    pthread_mutex_lock(&P.mu);
    P.open = 0;
    while (P.running > 0) pthread_cond_wait(&P.done_cv, &P.mu);
    P.busy = 0;
    P.batch = NULL;
    pthread_mutex_unlock(&P.mu);
}

/* Run b's tasks, one per table of about `ids` ids in all (a few ns per id):
 * on the caller's thread when few (below inline_work / 16 ids a worker's
 * wake-up costs more than it saves), else over up to `threads` threads. */
static void run_tables(batch_t *b, int threads, int64_t ids) {
    if (threads <= 1 || b->n_tasks == 1 || ids < __atomic_load_n(&inline_work, __ATOMIC_RELAXED) / 16) {
        for (int64_t t = 0; t < b->n_tasks; t++) b->run(b, t);
        return;
    }
    int workers = threads - 1;
    if ((int64_t)workers > b->n_tasks - 1) workers = (int)(b->n_tasks - 1);
    run_parallel(b, workers);
}

/* ------------------------------------------------------------------ API */

int fxk_run(fxk_job *jobs, int64_t n_jobs, int threads) {
    if (n_jobs < 0 || (n_jobs > 0 && jobs == NULL)) return FXK_EARG;
    pool_fn pool = isas[current_isa()].fn;
    int64_t total = 0;
    for (int64_t i = 0; i < n_jobs; i++)
        if (validate(&jobs[i]) == FXK_OK) total += work(&jobs[i], 0, num_units(&jobs[i]));

    if (threads <= 1 || total < inline_work) {
        for (int64_t i = 0; i < n_jobs; i++)
            if (jobs[i].status == FXK_OK && num_units(&jobs[i]) > 0 && run_range(&jobs[i], 0, num_units(&jobs[i]), pool))
                jobs[i].status = FXK_EBADID;
    } else {
        /* tasks of about `grain` work each: enough tasks for every thread to
         * take several (the machine is shared; a late thread takes fewer) */
        int64_t grain = total / ((int64_t)threads * 8);
        if (grain < inline_work / 4) grain = inline_work / 4;
        if (grain < 1) grain = 1;
        int64_t cap = n_jobs + total / grain + 1;
        task_t *tasks = malloc((size_t)cap * sizeof *tasks);
        if (tasks == NULL) return FXK_ENOMEM;
        int64_t n = 0;
        for (int64_t i = 0; i < n_jobs; i++) {
            fxk_job *j = &jobs[i];
            if (j->status != FXK_OK) continue;
            int64_t nu = num_units(j), u0 = 0, per = j->dim > 0 ? j->dim : 1;
            while (u0 < nu) {
                int64_t u1 = u0 + 1, w = 0;
                if (units(j)) { /* gather: fixed work per id */
                    u1 = u0 + (grain + per - 1) / per;
                    if (u1 > nu) u1 = nu;
                } else {
                    w = work(j, u0, u1);
                    while (u1 < nu && w < grain) { w += work(j, u1, u1 + 1); u1++; }
                }
                tasks[n++] = (task_t){i, u0, u1};
                u0 = u1;
            }
        }
        batch_t b = {jobs, tasks, n, 0, pool, run_job_task, NULL};
        int workers = threads - 1;
        if ((int64_t)workers > n - 1) workers = (int)(n - 1);
        if (workers > 0) run_parallel(&b, workers);
        else run_tasks(&b);
        free(tasks);
    }

    int rc = FXK_OK;
    for (int64_t i = 0; i < n_jobs; i++) {
        if (jobs[i].status == FXK_EBADID) jobs[i].bad_pos = first_bad(&jobs[i]);
        if (rc == FXK_OK) rc = jobs[i].status;
    }
    return rc;
}

int fxk_pool_size(void) {
    pthread_mutex_lock(&P.mu);
    int n = P.n_workers;
    pthread_mutex_unlock(&P.mu);
    return n;
}

int64_t fxk_inline_work(void) { return __atomic_load_n(&inline_work, __ATOMIC_RELAXED); }

void fxk_set_inline_work(int64_t w) { __atomic_store_n(&inline_work, w < 0 ? 0 : w, __ATOMIC_RELAXED); }

const char *fxk_isa(void) { return isas[current_isa()].name; }

int fxk_use_isa(const char *name) {
    for (int i = 0; i < (int)(sizeof isas / sizeof isas[0]); i++) {
        if (strcmp(name, isas[i].name) == 0) {
            if (!isa_supported(i)) return -1;
            __atomic_store_n(&isa_index, i, __ATOMIC_RELAXED);
            return 0;
        }
    }
    return -1;
}

/* ------------------------------------------------------------ partition */

#include "partition.h"

/* ---------------------------------------------------------- dedup, runs */

#include "dedup.h"

/* ------------------------------------------------------------- requests */

#include "request.h"

/* ------------------------------------------------------------ allocator */

int fxk_tune_malloc(int64_t mmap_threshold, int64_t trim_threshold) {
#if defined(M_MMAP_THRESHOLD) && defined(M_TRIM_THRESHOLD)
    if (mmap_threshold < 0 || mmap_threshold > INT32_MAX || trim_threshold < 0 || trim_threshold > INT32_MAX) return -1;
    if (!mallopt(M_MMAP_THRESHOLD, (int)mmap_threshold)) return -1;
    if (!mallopt(M_TRIM_THRESHOLD, (int)trim_threshold)) return -1;
    return 0;
#else
    (void)mmap_threshold;
    (void)trim_threshold;
    return -1;
#endif
}
