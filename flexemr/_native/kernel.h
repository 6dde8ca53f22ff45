/* flexemr embedding kernel: fused gather + reduce (EmbeddingBag pooling) and
 * strided row gather, over rows read in place, parallel over bags and tables.
 *
 * This header is also the cffi cdef (flexemr/_native/build.py): plain
 * declarations only, no preprocessor beyond what cffi accepts.
 *
 * A job (fxk_job) describes one table.  Row r of the table is read at
 *     (const char *)rows + row_offset + r * row_stride
 * and holds `dim` elements of `dtype`.  Bag b covers ids[offsets[b] ..
 * offsets[b+1]) and its result is written at
 *     (char *)out + b * out_stride
 * as `dim` elements of the accumulation type (float32, or float64 for
 * float64 tables).  For FXK_GATHER, offsets/weights/fill are unused: row
 * ids[k] is copied byte for byte to out + k * out_stride (dim elements of
 * dtype, i.e. dim * itemsize bytes).
 *
 * Every id is checked against num_rows before its row is touched; offsets
 * are checked (offsets[0] == 0, non-decreasing, offsets[num_bags] == n_ids)
 * before any bag is reduced.  A failing job sets `status` (and, for a bad id,
 * `bad_pos`: the position of the first bad id in ids); its output is then
 * unspecified but nothing outside the rows, ids, offsets, weights and out
 * ranges described above is read or written.
 */

/* dtypes of the rows */
#define FXK_F16 0
#define FXK_F32 1
#define FXK_F64 2
#define FXK_I8 3
#define FXK_U8 4

/* modes */
#define FXK_SUM 0
#define FXK_MEAN 1
#define FXK_MAX 2
#define FXK_GATHER 3

/* status codes (fxk_job.status and fxk_run's return value) */
#define FXK_OK 0
#define FXK_EBADID 1
#define FXK_EOFFSETS 2
#define FXK_EARG 3
#define FXK_ENOMEM 4
/* fxk_unique: the ids changed while it ran (another thread wrote them) */
#define FXK_ECHANGED 5

typedef struct {
    /* the table */
    const void *rows;
    int64_t row_offset;      /* bytes from rows to the data of row 0 */
    int64_t row_stride;      /* bytes between consecutive rows (may be negative) */
    int64_t num_rows;
    int64_t dim;             /* elements per row */
    int32_t dtype;           /* FXK_F16 .. FXK_U8 */
    int32_t mode;            /* FXK_SUM, FXK_MEAN, FXK_MAX or FXK_GATHER */
    /* ids and bags */
    const void *ids;
    int32_t id_bytes;        /* 4 (int32 ids) or 8 (int64 ids) */
    int32_t _pad;
    int64_t n_ids;
    const int64_t *offsets;  /* [num_bags + 1]; unused for FXK_GATHER */
    int64_t num_bags;        /* unused for FXK_GATHER (one output row per id) */
    const float *weights;    /* NULL or [n_ids] (sum and mean only) */
    double fill;             /* value of every element of an empty bag */
    /* output */
    void *out;
    int64_t out_stride;      /* bytes between consecutive output rows */
    /* results */
    int32_t status;          /* FXK_OK or an error code */
    int32_t _pad2;
    int64_t bad_pos;         /* FXK_EBADID: position of the first bad id; else -1 */
    /* pooling output in blocks (e.g. the frames of a message, each after its header): with
     * out_block > 0, out_gap more bytes are skipped after every out_block rows, counting out_phase
     * (< out_block) rows before row 0: row b is at out + b * out_stride
     * + ((b + out_phase) / out_block) * out_gap.  0: one block. */
    int64_t out_block;
    int64_t out_gap;
    int64_t out_phase;
} fxk_job;

/* Run n_jobs jobs with up to `threads` threads (the caller's included).
 * Small calls run on the caller's thread only.  Returns FXK_OK when every
 * job succeeded, else the status of the first failing job. */
int fxk_run(fxk_job *jobs, int64_t n_jobs, int threads);

/* Worker threads currently alive in the pool (0 before the first parallel call). */
int fxk_pool_size(void);

/* Work (in element operations: ids x dim) below which a call runs inline. */
int64_t fxk_inline_work(void);
void fxk_set_inline_work(int64_t work);

/* Code path of the pooling loops: "avx2" (x86-64 with AVX2, FMA and F16C)
 * or "baseline" (portable), chosen from the CPU at the first call. */
const char *fxk_isa(void);

/* Use code path `name` from now on (process-wide); 0, or -1 when this build
 * or CPU does not have it. */
int fxk_use_isa(const char *name);

/* ------------------------------------------------------------ partition
 *
 * One table's occurrences (ids, bags by offsets) split by where their rows
 * live, for hierarchical pooling: the table's rows are cut into bands, band i
 * holding rows [band_start[i], band_start[i+1]) (the last one up to
 * num_rows; band_start sorted, band_start[0] == 0).  An occurrence k whose id
 * lies in band i goes to output slot band_slot[i] (when >= 0) as the id
 * relative to its band, id - band_start[i], an int32 (and its weight, when
 * weights are given); slots keep the bag grouping: slot s's occurrences of
 * bag b are slot_ids[s][slot_offsets[s * (num_bags + 1) + b] ..
 * slot_offsets[s * (num_bags + 1) + b + 1]), in the order of ids.
 * Occurrences of a band whose slot is -1, and those with skip[k] != 0 (skip
 * may be NULL), go to the rest: their positions k, by bag, in rest_pos[
 * rest_offsets[b] .. rest_offsets[b + 1]) (rest_offsets and rest_pos may be
 * NULL when nothing goes there; an occurrence that would is then FXK_EARG).
 * slot_ids[s] and slot_weights[s] must hold n_ids entries (the most a slot
 * can get); rest_pos too.  Ids are checked against num_rows (FXK_EBADID,
 * bad_pos), offsets like a pooling job's (FXK_EOFFSETS); a band must hold
 * fewer than 2^31 rows (FXK_EARG). */
typedef struct {
    const void *ids;
    int32_t id_bytes;        /* 4 or 8 */
    int32_t _pad;
    int64_t n_ids;
    const int64_t *offsets;  /* [num_bags + 1] */
    int64_t num_bags;
    int64_t num_rows;
    const float *weights;    /* NULL or [n_ids] */
    const uint8_t *skip;     /* NULL or [n_ids] */
    const int64_t *band_start; /* [n_bands] */
    const int32_t *band_slot;  /* [n_bands]: output slot, or -1 (the rest) */
    int64_t n_bands;
    int64_t n_slots;
    int64_t *slot_offsets;   /* [n_slots * (num_bags + 1)] */
    int32_t **slot_ids;      /* [n_slots] pointers to n_ids int32 each */
    float **slot_weights;    /* [n_slots] pointers (with weights), or NULL */
    int64_t *rest_offsets;   /* [num_bags + 1] or NULL */
    int64_t *rest_pos;       /* [n_ids] or NULL */
    int64_t rest_count;      /* result: occurrences in the rest */
    int32_t status;
    int32_t _pad2;
    int64_t bad_pos;
} fxk_part;

/* Partition n parts (tables), spread over up to `threads` threads; returns
 * FXK_OK or the status of the first failing part. */
int fxk_partition(fxk_part *parts, int64_t n, int threads);

/* ------------------------------------------------------------ dedup
 *
 * fxk_unique: the distinct ids of ids[0 .. n) (int32 or int64, each checked
 * against num_rows), sorted, into uniq (room for n), and, when inverse is not
 * NULL, for each id its position in uniq (inverse[k], n entries), with a
 * bitmap of num_rows bits (O(n + num_rows / 64); callers use it when ids are
 * dense enough).  Returns the number of distinct ids, or -FXK_EBADID (and
 * *bad_pos: the position of the first id out of range), -FXK_ECHANGED (and
 * *bad_pos: the first id the second pass found out of range or unmarked: the
 * caller's array changed while the GIL was released), -FXK_EARG or
 * -FXK_ENOMEM.
 *
 * fxk_runs: the runs of consecutive ids of sorted unique uniq[0 .. n) that
 * lie in one band (bands as fxk_part's: band_start sorted, [0] == 0): run r
 * is uniq[run_start[r] .. run_start[r + 1]) (run_start: room for n + 1);
 * band b's runs are band_run[b] .. band_run[b + 1] and its ids
 * uniq[band_pos[b] .. band_pos[b + 1]) (both n_bands + 1 entries).  Returns
 * the number of runs, or -FXK_EARG (also when uniq is not strictly
 * increasing). */
int64_t fxk_unique(const void *ids, int32_t id_bytes, int64_t n, int64_t num_rows, int64_t *uniq, int64_t *inverse,
                   int64_t *bad_pos);

/* One table's dedup for fxk_unique_many: the arguments of fxk_unique, and
 * its result in count (distinct ids, or -FXK_*) and bad_pos. */
typedef struct {
    const void *ids;
    int32_t id_bytes;
    int32_t _pad;
    int64_t n;
    int64_t num_rows;
    int64_t *uniq;
    int64_t *inverse;
    int64_t count;
    int64_t bad_pos;
} fxk_uniq;

/* fxk_unique for each of n tables, spread over up to `threads` threads (a
 * table per task); returns FXK_OK, or FXK_EARG for bad arguments: each
 * table's own outcome is in its count. */
int fxk_unique_many(fxk_uniq *jobs, int64_t n, int threads);
int64_t fxk_runs(const int64_t *uniq, int64_t n, const int64_t *band_start, int64_t n_bands, int64_t *run_start,
                 int64_t *band_run, int64_t *band_pos);

/* ------------------------------------------------------------ requests
 *
 * fxk_bind_request: the n_jobs pooling jobs of one pooling request (the
 * bytes req[0 .. size) in flexemr.core.poolwire's format),
 * read in place: jobs[i] becomes tmpl[i] (table, mode, fill, output layout)
 * with the ids, offsets and weights of the request's job i, and its output at
 * out_base + out_off[i].  The request's job i must ask for tmpl[i].num_bags
 * bags, and carry weights exactly when tmpl[i] has (non-NULL) weights; a job
 * sent with one id per bag (no offsets on the wire) takes tmpl[i]'s offsets,
 * which must then be 0 .. num_bags.
 * Returns FXK_OK, FXK_EOFFSETS when the layout does not fit (sizes, headers),
 * or FXK_EARG (NULL or negative arguments).  Ids and offsets are
 * checked by fxk_run. */
int fxk_bind_request(fxk_job *jobs, const fxk_job *tmpl, int64_t n_jobs, const uint8_t *req, int64_t size,
                     const int64_t *out_off, char *out_base);

/* glibc's malloc: blocks up to mmap_threshold bytes come from the heap, and
 * the heap keeps up to trim_threshold free bytes instead of returning them
 * (mallopt M_MMAP_THRESHOLD, M_TRIM_THRESHOLD).  0, or -1 where that is not
 * available (another libc) or a value is refused. */
int fxk_tune_malloc(int64_t mmap_threshold, int64_t trim_threshold);
