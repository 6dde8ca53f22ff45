/* flexemr ranker row cache, native parts (see cache.h for the contract). */

#include <stdint.h>
#include <string.h>

#include "cache.h"

#define FXC_MUL 0x9E3779B97F4A7C15ull
/* distinct ids probed ahead of the one being probed (prefetch distance) */
#define FXC_AHEAD 8

static inline int64_t fxc_home(int64_t key, int64_t mask, int shift) {
    return (int64_t)(((uint64_t)key * FXC_MUL) >> shift) & mask;
}

static inline int64_t fxc_pos(const int64_t *tkeys, int64_t mask, int shift, int64_t key) {
    int64_t p = fxc_home(key, mask, shift);
    for (;;) {
        int64_t k = tkeys[p];
        if (k == key)
            return p;
        if (k == FXC_EMPTY)
            return -1;
        p = (p + 1) & mask;
    }
}

int64_t fxc_find(const int64_t *tkeys, int64_t mask, int shift, const int64_t *keys, int64_t n, int64_t *out_pos) {
    int64_t found = 0;
    for (int64_t i = 0; i < n; i++) {
        int64_t p = fxc_pos(tkeys, mask, shift, keys[i]);
        out_pos[i] = p;
        found += p >= 0;
    }
    return found;
}

int64_t fxc_put(int64_t *tkeys, int64_t *tvals, int64_t mask, int shift, const int64_t *keys, const int64_t *vals,
                int64_t n) {
    int64_t took_empty = 0;
    for (int64_t i = 0; i < n; i++) {
        int64_t p = fxc_home(keys[i], mask, shift);
        while (tkeys[p] >= 0)
            p = (p + 1) & mask;
        took_empty += tkeys[p] == FXC_EMPTY;
        tkeys[p] = keys[i];
        tvals[p] = vals[i];
    }
    return took_empty;
}

int64_t fxc_delete(int64_t *tkeys, int64_t mask, int shift, const int64_t *keys, int64_t n) {
    int64_t deleted = 0;
    for (int64_t i = 0; i < n; i++) {
        int64_t p = fxc_pos(tkeys, mask, shift, keys[i]);
        if (p >= 0) {
            tkeys[p] = FXC_TOMB;
            deleted++;
        }
    }
    return deleted;
}

/* A hit on slot s at tick t: its last use and count move on, and (with an LRU log) the use is logged. */
static inline void fxc_touch(int64_t s, int64_t t, int64_t *last_use, int64_t *freq, int64_t *log_tick,
                             int64_t *log_slot, int64_t *tail) {
    if (last_use[s] < t)
        last_use[s] = t;
    freq[s] += 1;
    if (log_slot) {
        log_tick[*tail] = last_use[s];
        log_slot[*tail] = s;
        (*tail)++;
    }
}

int64_t fxc_probe(const int64_t *tkeys, const int64_t *tvals, int64_t mask, int shift, const int64_t *ids, int64_t n,
                  int64_t key_base, int64_t tick0, int64_t *last_use, int64_t *freq, int64_t *out_slot,
                  int64_t *log_tick, int64_t *log_slot, int64_t *log_tail) {
    int64_t hits = 0;
    int64_t tail = log_tail ? *log_tail : 0;
    for (int64_t i = 0; i < n; i++) {
        int64_t p = fxc_pos(tkeys, mask, shift, key_base | ids[i]);
        if (p < 0) {
            out_slot[i] = -1;
            continue;
        }
        int64_t s = tvals[p];
        out_slot[i] = s;
        fxc_touch(s, tick0 + i, last_use, freq, log_tick, log_slot, &tail);
        hits++;
    }
    if (log_tail)
        *log_tail = tail;
    return hits;
}

static inline int fxc_current(const int64_t *last_use, const int64_t *slot_key, int64_t tick, int64_t slot) {
    return slot_key[slot] >= 0 && last_use[slot] == tick;
}

int64_t fxc_lru_victims(int64_t *log_tick, int64_t *log_slot, int64_t *head, int64_t tail, const int64_t *last_use,
                        const int64_t *slot_key, const uint8_t *protect, int64_t k, int64_t *victims) {
    int64_t i = *head, found = 0, kept = 0;
    /* kept (protected, current) entries are compacted in place behind the scan: they are older
     * than everything after the new head, so they go right before it */
    for (; i < tail && found < k; i++) {
        int64_t t = log_tick[i], s = log_slot[i];
        if (!fxc_current(last_use, slot_key, t, s))
            continue;
        if (protect[s]) {
            log_tick[*head + kept] = t;
            log_slot[*head + kept] = s;
            kept++;
            continue;
        }
        victims[found++] = s;
    }
    /* entries [*head, *head + kept) are the kept ones; move them to end right before i */
    int64_t new_head = i - kept;
    if (kept && new_head != *head) {
        memmove(log_tick + new_head, log_tick + *head, (size_t)kept * sizeof(int64_t));
        memmove(log_slot + new_head, log_slot + *head, (size_t)kept * sizeof(int64_t));
    }
    *head = new_head;
    return found;
}

int64_t fxc_lru_compact(int64_t *log_tick, int64_t *log_slot, int64_t head, int64_t tail, const int64_t *last_use,
                        const int64_t *slot_key) {
    int64_t out = 0;
    for (int64_t i = head; i < tail; i++) {
        int64_t t = log_tick[i], s = log_slot[i];
        if (fxc_current(last_use, slot_key, t, s)) {
            log_tick[out] = t;
            log_slot[out] = s;
            out++;
        }
    }
    return out;
}

int64_t fxc_probe_split(const int64_t *tkeys, const int64_t *tvals, int64_t mask, int shift, int64_t key_base,
                        int64_t tick0, int64_t *last_use, int64_t *freq, int64_t *log_tick, int64_t *log_slot,
                        int64_t *log_tail, const int64_t *ids, int64_t n, const int64_t *offsets, int64_t num_bags,
                        const float *w, int64_t admit, int64_t max_id, int64_t *dkeys, int64_t *didx, int64_t dmask,
                        int64_t *uslot, int64_t *ucount, int64_t *inv, int64_t *hit_slot, int64_t *hit_off,
                        float *hit_w, int64_t *adm_pos, int64_t *adm_off, int64_t *miss_pos, int64_t *miss_off,
                        uint8_t *here, int64_t *counts) {
    if (num_bags < 0 || offsets[0] != 0 || offsets[num_bags] != n)
        return -1;
    for (int64_t b = 0; b < num_bags; b++)
        if (offsets[b + 1] < offsets[b])
            return -1;
    int dshift = 64;
    for (int64_t s = dmask + 1; s > 1; s >>= 1)
        dshift--;
    memset(dkeys, 0xff, (size_t)(dmask + 1) * sizeof(int64_t)); /* FXC_EMPTY */
    /* pass 1: deduplicate (the scratch table stays in cache); uslot[u] holds the distinct id for now */
    int64_t nu = 0, uhits = 0;
    for (int64_t k = 0; k < n; k++) {
        int64_t id = ids[k]; /* read once: what is checked is what is used (the GIL is released) */
        if (id < 0 || id > max_id) {
            counts[0] = k;
            return -2; /* nothing changed but the scratch */
        }
        int64_t p = fxc_home(id, dmask, dshift);
        for (;;) {
            int64_t dk = dkeys[p];
            if (dk == id) {
                int64_t u = didx[p];
                ucount[u]++;
                inv[k] = u;
                break;
            }
            if (dk == FXC_EMPTY) {
                int64_t u = nu++;
                dkeys[p] = id;
                didx[p] = u;
                ucount[u] = 1;
                uslot[u] = id;
                inv[k] = u;
                break;
            }
            p = (p + 1) & dmask;
        }
    }
    /* pass 2: probe the index for the distinct ids in order of first occurrence, the home entries of
     * the ids FXC_AHEAD further on prefetched (the index is larger than the caches: its misses overlap) */
    int64_t tail = log_tail ? *log_tail : 0;
    for (int64_t u = 0; u < nu; u++) {
        if (u + FXC_AHEAD < nu) {
            int64_t h = fxc_home(key_base | uslot[u + FXC_AHEAD], mask, shift);
            __builtin_prefetch(&tkeys[h]);
            __builtin_prefetch(&tvals[h]);
        }
        int64_t q = fxc_pos(tkeys, mask, shift, key_base | uslot[u]);
        if (q < 0) {
            uslot[u] = -1;
            continue;
        }
        int64_t s = tvals[q];
        uslot[u] = s;
        fxc_touch(s, tick0 + u, last_use, freq, log_tick, log_slot, &tail);
        uhits++;
    }
    if (log_tail)
        *log_tail = tail;
    int64_t nh = 0, na = 0, nm = 0;
    hit_off[0] = 0;
    adm_off[0] = 0;
    miss_off[0] = 0;
    int64_t multi = 0, start = 0;
    for (int64_t b = 0; b < num_bags; b++) {
        int64_t rest = 0, end = offsets[b + 1];
        /* offsets read again: kept within what was checked, whatever another thread wrote meanwhile */
        end = end < start ? start : end > n ? n : end;
        for (int64_t k = start; k < end; k++) {
            int64_t u = inv[k];
            int64_t s = uslot[u];
            if (s >= 0) {
                hit_slot[nh] = s;
                if (w)
                    hit_w[nh] = w[k];
                nh++;
                here[k] = 1;
            } else if (ucount[u] >= admit) {
                adm_pos[na++] = k;
                miss_pos[nm++] = k;
                here[k] = 1;
            } else {
                miss_pos[nm++] = k;
                here[k] = 0;
                rest++;
            }
        }
        if (rest >= 2)
            multi += rest;
        start = end;
        hit_off[b + 1] = nh;
        adm_off[b + 1] = na;
        miss_off[b + 1] = nm;
    }
    counts[0] = nu;
    counts[1] = uhits;
    counts[2] = na;
    counts[3] = multi;
    return nh;
}

int64_t fxc_insert(int64_t *tkeys, int64_t *tvals, int64_t mask, int shift, int64_t key_base, const int64_t *ids,
                   int64_t n, const uint8_t *rows, int64_t row_bytes, uint8_t *arena, int64_t slot_bytes,
                   int64_t *slot_key, int64_t *last_use, int64_t *freq, int64_t *free_stack, int64_t *nfree,
                   int64_t tick0, int64_t *log_tick, int64_t *log_slot, int64_t *log_head, int64_t *log_tail,
                   uint8_t *protect, int64_t max_id, int64_t *scratch, int64_t *counts) {
    int64_t *slot = scratch, *victims = scratch + n, *keys = scratch + 2 * n;
    int64_t m = 0, prev = -1;
    /* pass 1 (nothing changes): every id checked (read once: pass 2 uses the copy) and the slot of every
     * cached one */
    for (int64_t i = 0; i < n; i++) {
        int64_t id = ids[i];
        if (id <= prev || id > max_id)
            return -2;
        prev = id;
        keys[i] = key_base | id;
        if (i + FXC_AHEAD < n) {
            int64_t ahead = ids[i + FXC_AHEAD];
            if (ahead >= 0 && ahead <= max_id) /* only a hint: checked when its turn comes */
                __builtin_prefetch(&tkeys[fxc_home(key_base | ahead, mask, shift)]);
        }
        int64_t p = fxc_pos(tkeys, mask, shift, keys[i]);
        slot[i] = p < 0 ? -1 : tvals[p];
        m += p < 0;
    }
    /* room for the new ids: the least recently used slots that this insert does not use */
    int64_t k = m - *nfree, took_empty = 0;
    if (k > 0) {
        for (int64_t i = 0; i < n; i++)
            if (slot[i] >= 0)
                protect[slot[i]] = 1;
        int64_t found = fxc_lru_victims(log_tick, log_slot, log_head, *log_tail, last_use, slot_key, protect, k,
                                         victims);
        for (int64_t i = 0; i < n; i++)
            if (slot[i] >= 0)
                protect[slot[i]] = 0;
        if (found < k)
            return -1; /* the log lost slots (not expected): the caller relogs and evicts by selection */
        for (int64_t j = 0; j < k; j++) {
            int64_t v = victims[j];
            int64_t p = fxc_pos(tkeys, mask, shift, slot_key[v]);
            if (p >= 0)
                tkeys[p] = FXC_TOMB;
            slot_key[v] = -1;
            freq[v] = 0;
            free_stack[(*nfree)++] = v;
        }
    }
    /* pass 2: cached ids overwritten, new ids in free slots (popped from the stack's end, in order); every
     * use logged in tick order */
    int64_t tail = *log_tail;
    for (int64_t i = 0; i < n; i++) {
        int64_t s = slot[i];
        if (s < 0) {
            int64_t key = keys[i];
            s = free_stack[--(*nfree)];
            slot_key[s] = key;
            freq[s] = 0;
            int64_t p = fxc_home(key, mask, shift);
            while (tkeys[p] >= 0)
                p = (p + 1) & mask;
            took_empty += tkeys[p] == FXC_EMPTY;
            tkeys[p] = key;
            tvals[p] = s;
        }
        memcpy(arena + s * slot_bytes, rows + i * row_bytes, (size_t)row_bytes);
        last_use[s] = tick0 + i;
        freq[s] += 1;
        log_tick[tail] = tick0 + i;
        log_slot[tail] = s;
        tail++;
    }
    *log_tail = tail;
    counts[0] = m;
    counts[1] = k > 0 ? k : 0;
    counts[2] = took_empty;
    return 0;
}
