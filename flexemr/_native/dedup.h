/* fxk_unique and fxk_runs (see kernel.h): deduplication by a bitmap of the
 * table's rows, and the runs of sorted unique ids.  Included by kernel.c. */

/* bit k of word k / 64 for every id; 0 or the position of the first id out of range (as -1 - pos) */
FXK_INLINE int64_t mark_ids(const void *ids, const int wide, int64_t n, uint64_t rows, uint64_t *bits) {
    for (int64_t k = 0; k < n; k++) {
        const uint64_t id = wide ? (uint64_t)((const int64_t *)ids)[k] : (uint64_t)(int64_t)((const int32_t *)ids)[k];
        if (FXK_UNLIKELY(id >= rows)) return -1 - k;
        bits[id >> 6] |= 1ull << (id & 63);
    }
    return 0;
}

/* inverse[k]: rank of ids[k] among the set bits.  tab[2 w] holds the set bits before word w and tab[2 w + 1]
 * the bitmap's word w: the two side by side, one cache line per id, not two.  The ids are read again here, with
 * the GIL released: an id that is out of range or not marked (the caller's array changed since mark_ids) stops
 * the pass (returns -1 - its position) instead of reading outside tab; 0 when every id was ranked. */
#define FXK_RANK_BODY                                                                                        \
    for (int64_t k = 0; k < n; k++) {                                                                        \
        const uint64_t id = wide ? (uint64_t)((const int64_t *)ids)[k] : (uint64_t)(int64_t)((const int32_t *)ids)[k]; \
        if (FXK_UNLIKELY(id >= rows)) return -1 - k;                                                         \
        const uint64_t *t = tab + 2 * (id >> 6);                                                             \
        if (FXK_UNLIKELY(!((t[1] >> (id & 63)) & 1))) return -1 - k;                                         \
        inverse[k] = (int64_t)t[0] + (int64_t)__builtin_popcountll(t[1] & ((1ull << (id & 63)) - 1));      \
    }                                                                                                        \
    return 0;

static int64_t rank_ids(const void *ids, const int wide, int64_t n, uint64_t rows, const uint64_t *tab,
                        int64_t *inverse) {
    FXK_RANK_BODY
}

#ifdef FXK_X86
__attribute__((target("popcnt"))) static int64_t rank_ids_popcnt(const void *ids, const int wide, int64_t n,
                                                                 uint64_t rows, const uint64_t *tab,
                                                                 int64_t *inverse) {
    FXK_RANK_BODY
}
#endif

int64_t fxk_unique(const void *ids, int32_t id_bytes, int64_t n, int64_t num_rows, int64_t *uniq, int64_t *inverse,
                   int64_t *bad_pos) {
    if (bad_pos) *bad_pos = -1;
    if (n < 0 || num_rows < 0 || (id_bytes != 4 && id_bytes != 8) || (n > 0 && (ids == NULL || uniq == NULL)))
        return -FXK_EARG;
    if (n == 0) return 0;
    const int wide = id_bytes == 8;
    const int64_t nw = (num_rows + 63) / 64;
    uint64_t *bits = calloc((size_t)nw + 1, sizeof *bits);
    uint64_t *tab = inverse ? malloc(((size_t)nw + 1) * 2 * sizeof *tab) : NULL;
    int64_t c = -FXK_ENOMEM;
    if (bits == NULL || (inverse && tab == NULL)) goto done;
    const int64_t bad = wide ? mark_ids(ids, 1, n, (uint64_t)num_rows, bits) : mark_ids(ids, 0, n, (uint64_t)num_rows, bits);
    if (bad < 0) {
        if (bad_pos) *bad_pos = -1 - bad;
        c = -FXK_EBADID;
        goto done;
    }
    c = 0;
    for (int64_t w = 0; w < nw; w++) {
        uint64_t word = bits[w];
        if (tab) {
            tab[2 * w] = (uint64_t)c;
            tab[2 * w + 1] = word;
        }
        while (word) {
            uniq[c++] = w * 64 + __builtin_ctzll(word);
            word &= word - 1;
        }
    }
    if (inverse) {
        const uint64_t rows = (uint64_t)num_rows;
        int64_t changed;
#ifdef FXK_X86
        if (__builtin_cpu_supports("popcnt"))
            changed = wide ? rank_ids_popcnt(ids, 1, n, rows, tab, inverse) : rank_ids_popcnt(ids, 0, n, rows, tab, inverse);
        else
#endif
            changed = wide ? rank_ids(ids, 1, n, rows, tab, inverse) : rank_ids(ids, 0, n, rows, tab, inverse);
        if (changed < 0) {
            if (bad_pos) *bad_pos = -1 - changed;
            c = -FXK_ECHANGED;
        }
    }
done:
    free(bits);
    free(tab);
    return c;
}

static void run_uniq_task(batch_t *b, int64_t t) {
    fxk_uniq *u = (fxk_uniq *)b->ctx + t;
    u->count = fxk_unique(u->ids, u->id_bytes, u->n, u->num_rows, u->uniq, u->inverse, &u->bad_pos);
}

int fxk_unique_many(fxk_uniq *jobs, int64_t n, int threads) {
    if (n < 0 || (n > 0 && jobs == NULL)) return FXK_EARG;
    int64_t total = 0;
    for (int64_t i = 0; i < n; i++) total += jobs[i].n > 0 ? jobs[i].n : 0;
    batch_t b = {NULL, NULL, n, 0, NULL, run_uniq_task, jobs};
    run_tables(&b, threads, total);
    return FXK_OK;
}

int64_t fxk_runs(const int64_t *uniq, int64_t n, const int64_t *band_start, int64_t n_bands, int64_t *run_start,
                 int64_t *band_run, int64_t *band_pos) {
    if (n < 0 || n_bands < 1 || band_start == NULL || band_run == NULL || band_pos == NULL ||
        (n > 0 && (uniq == NULL || run_start == NULL)))
        return -FXK_EARG;
    int64_t b = 0, runs = 0;
    band_run[0] = 0;
    band_pos[0] = 0;
    for (int64_t k = 0; k < n; k++) {
        const int64_t id = uniq[k];
        if (k > 0 && id <= uniq[k - 1]) return -FXK_EARG;  /* not sorted and unique */
        int new_band = 0;
        while (b + 1 < n_bands && id >= band_start[b + 1]) {
            b++;
            band_run[b] = runs;
            band_pos[b] = k;
            new_band = 1;
        }
        if (k == 0 || new_band || id != uniq[k - 1] + 1) run_start[runs++] = k;
    }
    while (b + 1 < n_bands) {
        b++;
        band_run[b] = runs;
        band_pos[b] = n;
    }
    band_run[n_bands] = runs;
    band_pos[n_bands] = n;
    if (run_start) run_start[runs] = n;
    return runs;
}
