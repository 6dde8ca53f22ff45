/* fxk_partition (see kernel.h): one pass over a table's occurrences, in bag
 * order, writing each to its slot (or the rest).  Included by kernel.c after
 * the thread pool. */

/* Band of id: the last band whose start is <= id (band_start sorted, [0] == 0). */
FXK_INLINE int64_t band_of(const int64_t *start, int64_t n, int64_t id) {
    if (n <= 4) {
        int64_t b = 0;
        for (int64_t i = 1; i < n; i++) b += start[i] <= id;
        return b;
    }
    int64_t lo = 0, len = n; /* upper bound - 1 */
    while (len > 1) {
        int64_t half = len / 2;
        lo = start[lo + half] <= id ? lo + half : lo;
        len -= half;
    }
    return lo;
}

FXK_INLINE int part_ids(fxk_part *p, const int wide, const int weighted, const int skipping) {
    /* everything in locals: the stores below (int32, float, int64) must not make the compiler reload them */
    const int64_t nb = p->num_bags, ns = p->n_slots, stride = nb + 1, nbands = p->n_bands;
    const int64_t *const off = p->offsets, *const start = p->band_start;
    const int32_t *const bslot = p->band_slot;
    const uint64_t rows = (uint64_t)p->num_rows;
    const void *const ids = p->ids;
    const float *const w = p->weights;
    const uint8_t *const skip = p->skip;
    int64_t *const soff = p->slot_offsets, *const rpos = p->rest_pos, *const roff = p->rest_offsets;
    int32_t *out_stack[16];
    float *wout_stack[16];
    int64_t cur_stack[16];
    int32_t **out = ns <= 16 ? out_stack : malloc((size_t)ns * sizeof *out);
    float **wout = ns <= 16 ? wout_stack : malloc((size_t)ns * sizeof *wout);
    int64_t *cur = ns <= 16 ? cur_stack : malloc((size_t)ns * sizeof *cur);
    int st = FXK_OK;
    if (out == NULL || wout == NULL || cur == NULL) {
        st = FXK_ENOMEM;
        goto done;
    }
    for (int64_t s = 0; s < ns; s++) {
        out[s] = p->slot_ids[s];
        wout[s] = weighted ? p->slot_weights[s] : NULL;
        cur[s] = 0;
    }
    int64_t rest = 0;
    for (int64_t b = 0; b < nb; b++) {
        for (int64_t s = 0; s < ns; s++) soff[s * stride + b] = cur[s];
        if (roff) roff[b] = rest;
        const int64_t k1 = off[b + 1];
        for (int64_t k = off[b]; k < k1; k++) {
            int64_t id = wide ? ((const int64_t *)ids)[k] : (int64_t)((const int32_t *)ids)[k];
            if (FXK_UNLIKELY((uint64_t)id >= rows)) {
                p->bad_pos = k;
                st = FXK_EBADID;
                goto done;
            }
            const int64_t band = band_of(start, nbands, id);
            const int32_t s = bslot[band];
            if (s < 0 || (skipping && skip[k])) {
                if (FXK_UNLIKELY(rpos == NULL)) {
                    st = FXK_EARG;
                    goto done;
                }
                rpos[rest++] = k;
                continue;
            }
            const int64_t c = cur[s]++;
            out[s][c] = (int32_t)(id - start[band]);
            if (weighted) wout[s][c] = w[k];
        }
    }
    for (int64_t s = 0; s < ns; s++) soff[s * stride + nb] = cur[s];
    if (roff) roff[nb] = rest;
    p->rest_count = rest;
done:
    if (out != out_stack) free(out);
    if (wout != wout_stack) free(wout);
    if (cur != cur_stack) free(cur);
    return st;
}

/* Arguments, offsets and bands of part p; its status. */
static int part_validate(fxk_part *p) {
    p->bad_pos = -1;
    p->rest_count = 0;
    if (p->n_ids < 0 || p->num_bags < 0 || p->num_rows < 0 || (p->id_bytes != 4 && p->id_bytes != 8) ||
        (p->n_ids > 0 && p->ids == NULL) || p->offsets == NULL || p->n_bands < 1 || p->band_start == NULL ||
        p->band_slot == NULL || p->n_slots < 0 || (p->n_slots > 0 && (p->slot_offsets == NULL || p->slot_ids == NULL)) ||
        (p->weights != NULL && p->n_slots > 0 && p->slot_weights == NULL) ||
        ((p->rest_offsets == NULL) != (p->rest_pos == NULL)))
        return FXK_EARG;
    if (p->band_start[0] != 0) return FXK_EARG;
    for (int64_t i = 0; i < p->n_bands; i++) {
        int64_t end = i + 1 < p->n_bands ? p->band_start[i + 1] : p->num_rows;
        if (end < p->band_start[i] || end - p->band_start[i] > INT32_MAX) return FXK_EARG;
        if (p->band_slot[i] < -1 || p->band_slot[i] >= p->n_slots) return FXK_EARG;
    }
    for (int64_t s = 0; s < p->n_slots; s++)
        if ((p->n_ids > 0 && p->slot_ids[s] == NULL) || (p->weights != NULL && p->n_ids > 0 && p->slot_weights[s] == NULL))
            return FXK_EARG;
    if (p->offsets[0] != 0 || p->offsets[p->num_bags] != p->n_ids) return FXK_EOFFSETS;
    for (int64_t b = 0; b < p->num_bags; b++)
        if (p->offsets[b + 1] < p->offsets[b]) return FXK_EOFFSETS;
    return FXK_OK;
}

static int part_run(fxk_part *p) {
    int st = part_validate(p);
    if (st != FXK_OK) return st;
    const int wide = p->id_bytes == 8, w = p->weights != NULL, sk = p->skip != NULL;
    /* the loop specialised for id width, weights and skip mask */
    if (wide) {
        if (w) return sk ? part_ids(p, 1, 1, 1) : part_ids(p, 1, 1, 0);
        return sk ? part_ids(p, 1, 0, 1) : part_ids(p, 1, 0, 0);
    }
    if (w) return sk ? part_ids(p, 0, 1, 1) : part_ids(p, 0, 1, 0);
    return sk ? part_ids(p, 0, 0, 1) : part_ids(p, 0, 0, 0);
}

static void run_part_task(batch_t *b, int64_t t) {
    fxk_part *p = (fxk_part *)b->ctx + t;
    p->status = part_run(p);
}

int fxk_partition(fxk_part *parts, int64_t n, int threads) {
    if (n < 0 || (n > 0 && parts == NULL)) return FXK_EARG;
    int64_t total = 0;
    for (int64_t i = 0; i < n; i++) total += parts[i].n_ids > 0 ? parts[i].n_ids : 0;
    batch_t b = {NULL, NULL, n, 0, NULL, run_part_task, parts};
    run_tables(&b, threads, total);
    for (int64_t i = 0; i < n; i++)
        if (parts[i].status != FXK_OK) return parts[i].status;
    return FXK_OK;
}
