/* See criteo.h. */
#include <stdint.h>
#include <string.h>

#include "criteo.h"

static inline int present(const uint8_t *valid, int64_t bit) {
    return valid == NULL || ((valid[bit >> 3] >> (bit & 7)) & 1);
}

#define ONES 0x0101010101010101ULL
#define HIGH 0x8080808080808080ULL

/* The value of the first len (1..8) bytes of w (the first in the low byte) as decimal digits, or -1 when one
   is not a digit ("eight digits unrolled": pairs, then quadruples, then all eight, by three multiplications). */
static inline int64_t dec8(uint64_t w, int len) {
#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
    w = __builtin_bswap64(w);
#endif
    uint64_t mask = ~0ULL >> (64 - 8 * len);
    uint64_t ok = (w + (0x80 - '0') * ONES) & ~(w + (0x80 - '9' - 1) * ONES) & ~w;
    if ((ok & mask & HIGH) != (mask & HIGH))
        return -1;
    w = (w & mask) << (64 - 8 * len);            /* right-aligned: the missing leading digits are 0 bytes */
    w = ((w & 0x0F * ONES) * 2561) >> 8;
    w = ((w & 0x00FF00FF00FF00FFULL) * 6553601) >> 16;
    return (int64_t)(((w & 0x0000FFFF0000FFFFULL) * 42949672960001ULL) >> 32);
}

int64_t fxc_parse_dec(const uint8_t *valid, int64_t bit0, const int32_t *offsets, const uint8_t *data,
                      int64_t data_len, int64_t n, int64_t lo, int64_t hi, int missing_ok, int64_t *out, uint8_t *missing) {
    for (int64_t i = 0; i < n; i++) {
        int32_t a = offsets[i], b = offsets[i + 1];
        if (a < 0 || b < a || b > data_len)
            return -2 - i;
        if (b == a || !present(valid, bit0 + i)) {
            if (!missing_ok)
                return i;
            out[i] = 0;
            missing[i] = 1;
            continue;
        }
        const uint8_t *s = data + a, *e = data + b;
        int neg = *s == '-';
        s += neg;
        if (s == e)
            return i;
        uint64_t v = 0;
        if (e - s <= 8 && data_len - (s - data) >= 8) {      /* up to 8 digits, 8 bytes readable: one word */
            uint64_t w;
            memcpy(&w, s, 8);
            int64_t x = dec8(w, (int)(e - s));
            if (x < 0)
                return i;
            v = (uint64_t)x;
        } else if (e - s <= 18) {                 /* at most 18 digits: below 10**18, no overflow to check */
            unsigned bad = 0;
            for (; s < e; s++) {
                unsigned d = (unsigned)*s - '0';
                bad |= d > 9;
                v = v * 10 + d;
            }
            if (bad)
                return i;
        } else {                           /* magnitude limit: 2**63 when negative, 2**63 - 1 else */
            uint64_t limit = neg ? (uint64_t)1 << 63 : ((uint64_t)1 << 63) - 1;
            for (; s < e; s++) {
                unsigned d = (unsigned)*s - '0';
                if (d > 9 || v > (limit - d) / 10)
                    return i;
                v = v * 10 + d;
            }
        }
        int64_t x = neg ? (int64_t)(0 - v) : (int64_t)v;
        if (x < lo || x > hi)
            return i;
        out[i] = x;
        missing[i] = 0;
    }
    return -1;
}

/* hex digit value, or 0xFF */
static const uint8_t HEXVAL[256] = {
    ['0'] = 1, ['1'] = 2, ['2'] = 3, ['3'] = 4, ['4'] = 5, ['5'] = 6, ['6'] = 7, ['7'] = 8, ['8'] = 9, ['9'] = 10,
    ['a'] = 11, ['b'] = 12, ['c'] = 13, ['d'] = 14, ['e'] = 15, ['f'] = 16,
    ['A'] = 11, ['B'] = 12, ['C'] = 13, ['D'] = 14, ['E'] = 15, ['F'] = 16,
};  /* value + 1: 0 marks a non-digit (the table is zero-filled) */


/* The value of 8 hex digits, the first in the low byte of w (little-endian load), or -1 when a byte is not
   a hex digit.  Every test runs on the 8 bytes at once: adding 0x80 - k to a byte below 0x80 sets its
   high bit when the byte is >= k, and never carries into the next byte. */
static inline int64_t hex8(uint64_t w) {
#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
    w = __builtin_bswap64(w);
#endif
    uint64_t lower = w | 0x20 * ONES;                           /* 'A'-'F' -> 'a'-'f' */
    uint64_t digit = (w + (0x80 - '0') * ONES) & ~(w + (0x80 - '9' - 1) * ONES);
    uint64_t alpha = (lower + (0x80 - 'a') * ONES) & ~(lower + (0x80 - 'f' - 1) * ONES);
    if ((((digit | alpha) & HIGH) != HIGH) | ((w & HIGH) != 0))
        return -1;
    uint64_t nib = (w & 0x0F * ONES) + ((alpha & HIGH) >> 7) * 9;      /* each byte: its digit's value */
    /* pack: byte 2k (more significant) and 2k + 1 -> one byte; then 16-bit pairs; then 32-bit */
    uint64_t t = ((nib & 0x000F000F000F000FULL) << 4) | ((nib >> 8) & 0x000F000F000F000FULL);
    uint64_t u = ((t & 0x000000FF000000FFULL) << 8) | ((t >> 16) & 0x000000FF000000FFULL);
    return (int64_t)(((u & 0xFFFF) << 16) | (u >> 32));
}

int64_t fxc_parse_hex(const uint8_t *valid, int64_t bit0, const int32_t *offsets, const uint8_t *data,
                      int64_t data_len, int64_t n, int max_digits, int64_t *out) {
    if (max_digits > 15)
        max_digits = 15;
    for (int64_t i = 0; i < n; i++) {
        int32_t a = offsets[i], b = offsets[i + 1];
        if (a < 0 || b < a || b > data_len)
            return -2 - i;
        if (b == a || !present(valid, bit0 + i)) {
            out[i] = -1;
            continue;
        }
        if (b - a > max_digits)
            return i;
        const uint8_t *s = data + a, *e = data + b;
        if (b - a == 8) {                  /* Criteo's case: 8 digits in one 64-bit word */
            uint64_t w;
            memcpy(&w, s, 8);
            int64_t x = hex8(w);
            if (x < 0)
                return i;
            out[i] = x;
            continue;
        }
        uint64_t v = 0;
        unsigned bad = 0;
        for (; s < e; s++) {
            unsigned d = HEXVAL[*s];
            bad |= d == 0;
            v = (v << 4) | ((d - 1) & 0xF);
        }
        if (bad)
            return i;
        out[i] = (int64_t)v;
    }
    return -1;
}

/* x % d for every 64-bit x, with m = ceil(2**128 / d) (d >= 1; m wraps to 0 for d == 1, giving 0):
   Lemire, Kaser and Kurz, "Faster remainder by direct computation" (2019), 128-bit fraction */
static inline uint64_t fastmod(uint64_t x, unsigned __int128 m, uint64_t d) {
    unsigned __int128 low = m * x;
    unsigned __int128 bottom = ((low & UINT64_MAX) * (unsigned __int128)d) >> 64;
    unsigned __int128 top = (low >> 64) * (unsigned __int128)d;
    return (uint64_t)((bottom + top) >> 64);
}

int64_t fxc_hash_bags(const int64_t *values, int64_t feature_stride, int64_t sample_stride, int64_t n,
                      int64_t nfeat, const int64_t *salt, const uint64_t *num_rows, int64_t *ids,
                      int64_t *offsets) {
    int64_t k = 0;
    offsets[0] = 0;
    for (int64_t f = 0; f < nfeat; f++) {
        const int64_t *col = values + f * feature_stride;
        uint64_t s = 0x9E3779B97F4A7C15ULL * (uint64_t)(salt[f] + 1), d = num_rows[f];
        unsigned __int128 m = ((~(unsigned __int128)0) / d) + 1;
        int64_t *off = offsets + 1 + f * n;
        for (int64_t i = 0; i < n; i++) {
            int64_t v = col[i * sample_stride];
            int64_t has = v >= 0;
            uint64_t x = (uint64_t)v + s;
            x ^= x >> 30;
            x *= 0xBF58476D1CE4E5B9ULL;
            x ^= x >> 27;
            x *= 0x94D049BB133111EBULL;
            x ^= x >> 31;
            ids[k] = (int64_t)fastmod(x, m, d);
            k += has;              /* branch-free: a missing value's row is overwritten by the next */
            off[i] = k;
        }
    }
    return k;
}

int64_t fxc_empty_line(const uint8_t *data, int64_t len) {
    if (len <= 0)
        return -1;
    if (data[0] == '\n' || data[0] == '\r')
        return 0;
    const uint8_t *end = data + len;
    if (memchr(data, '\r', (size_t)len) == NULL) {        /* \n only (the usual case): memchr from line to line */
        for (const uint8_t *p = data; (p = memchr(p, '\n', (size_t)(end - p))) != NULL; p++)
            if (p + 1 < end && p[1] == '\n')
                return p + 1 - data;
        return -1;
    }
    for (int64_t i = 0; i < len;) {                        /* at the start of a line */
        if (data[i] == '\n' || data[i] == '\r')
            return i;
        while (i < len && data[i] != '\n' && data[i] != '\r')
            i++;
        if (i >= len)
            return -1;
        i += (data[i] == '\r' && i + 1 < len && data[i + 1] == '\n') ? 2 : 1;
    }
    return -1;
}
