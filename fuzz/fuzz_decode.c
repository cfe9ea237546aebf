/*
 * fuzz_decode.c - libFuzzer target for the SPOP frame codec (csrc/spop.c).
 *
 *   clang -g -O1 -fsanitize=fuzzer,address,undefined -Icsrc csrc/spop.c \
 *         fuzz/fuzz_decode.c -o fuzz_decode
 *   mkdir -p /tmp/corpus && cp -r fuzz/corpus/. /tmp/corpus/
 *   ./fuzz_decode -max_total_time=60 /tmp/corpus
 *
 * The input is a byte stream as read from a socket. It is decoded with
 * several (max_frame_size, record capacity) settings and every invariant of
 * the contract in spop.h is checked; any violation abort()s so libFuzzer
 * keeps a crash file. Successful decodes are re-encoded and decoded again.
 * The input is also read as varints (decode -> encode must give back the
 * consumed bytes: the encoding is canonical), decoded and indexed by
 * spop_decode_batch (same records as spop_decode_frames, columns in range
 * and naming the right handler), and used as the concatenated actions of
 * spop_encode_acks with ends == NULL (accepted exactly when it is n
 * well-formed actions; the ACKs decode back to them, one each, and match
 * the ends-array form).
 */
#include "spop.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_FRAMES 64
#define MAX_ITEMS 8192 /* >= SPOP_DEFAULT_FRAME_SIZE / 2 + 1 */

/* Static: too big for the stack, and the fuzzer runs one input at a time. */
static spop_frame g_frames[MAX_FRAMES], g_frames2[MAX_FRAMES], g_frames_big[MAX_FRAMES];
static spop_item g_items[MAX_ITEMS], g_items2[MAX_ITEMS], g_items_big[MAX_ITEMS];

/* A heap array of exactly n records (n may be 0), poisoned: a write past the
 * capacity a call is given is an ASan report, not a write into spare room. */
static void *exact(size_t n, size_t size)
{
    void *p = malloc(n * size ? n * size : 1);
    if (!p)
        abort();
    memset(p, 0xA5, n * size);
    return p;
}

static void fail(const char *why, size_t at)
{
    fprintf(stderr, "fuzz_decode: invariant broken: %s (at %zu)\n", why, at);
    abort();
}

#define REQUIRE(cond, at)               \
    do {                                \
        if (!(cond))                    \
            fail(#cond, (size_t)(at)); \
    } while (0)

static uint32_t be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static int span_in(uint64_t off, uint64_t len, uint64_t lo, uint64_t hi)
{
    return off >= lo && off <= hi && len <= hi - off;
}

static int known_type(uint8_t type)
{
    return type == SPOP_FRAME_HAPROXY_HELLO || type == SPOP_FRAME_HAPROXY_DISCONNECT ||
           type == SPOP_FRAME_NOTIFY || type == SPOP_FRAME_AGENT_HELLO ||
           type == SPOP_FRAME_AGENT_DISCONNECT || type == SPOP_FRAME_ACK;
}

/* spop.h: items are walked for known types carrying FIN and not ABORT. */
static int expect_items(const spop_frame *f)
{
    return known_type(f->type) && (f->flags & (SPOP_FLAG_FIN | SPOP_FLAG_ABORT)) == SPOP_FLAG_FIN;
}

static uint8_t item_kind_for(uint8_t type)
{
    if (type == SPOP_FRAME_NOTIFY)
        return SPOP_ITEM_MESSAGE;
    if (type == SPOP_FRAME_ACK)
        return SPOP_ITEM_ACTION;
    return SPOP_ITEM_KV;
}

/* A typed value inside the frame's payload [lo, hi). */
static void check_value(const spop_item *it, uint64_t lo, uint64_t hi, size_t at)
{
    REQUIRE(it->type <= SPOP_DATA_BINARY, at);
    if (it->type == SPOP_DATA_BOOL)
        REQUIRE(it->num <= 1, at);
    if (it->type == SPOP_DATA_IPV4)
        REQUIRE(it->val_len == 4, at);
    if (it->type == SPOP_DATA_IPV6)
        REQUIRE(it->val_len == 16, at);
    if (it->type >= SPOP_DATA_IPV4)
        REQUIRE(span_in(it->val_off, it->val_len, lo, hi), at);
}

/* Every invariant of one spop_decode_frames() result. Returns bytes consumed. */
static size_t check_decode(const uint8_t *buf, size_t len, uint32_t mfs, uint32_t max_frames,
                           uint32_t max_items, int ret, uint32_t n, const spop_frame *fr,
                           const spop_item *it)
{
    REQUIRE(n <= max_frames, n);
    REQUIRE(ret == 0 || ret == -SPOP_ST_TOO_BIG || ret == -SPOP_ST_INVALID || ret == -SPOP_ST_RES, 0);
    if (ret == -SPOP_ST_RES) /* only the first frame may fail for lack of records */
        REQUIRE(n == 0, n);
    /* sized as spop.h advises, records never run out */
    if ((uint64_t)max_items >= (uint64_t)mfs / 2 + 1)
        REQUIRE(ret != -SPOP_ST_RES, 0);

    size_t pos = 0;
    uint32_t next_item = 0;
    for (uint32_t k = 0; k < n; k++) {
        const spop_frame *f = &fr[k];
        REQUIRE(f->offset == pos, pos); /* contiguous, from 0 */
        REQUIRE(len - pos >= 4, pos);
        REQUIRE(f->length == be32(buf + pos), pos);
        REQUIRE(f->length <= mfs && f->length >= SPOP_FRAME_MIN_LEN, pos);
        REQUIRE((uint64_t)f->offset + 4 + f->length <= len, pos);
        uint64_t body = (uint64_t)f->offset + 4, end = body + f->length;
        REQUIRE(f->type == buf[body], pos);
        REQUIRE(f->flags == be32(buf + body + 1), pos);
        REQUIRE(f->payload_off >= body + SPOP_FRAME_MIN_LEN, pos);
        REQUIRE(f->payload_off <= body + SPOP_FRAME_HDR_MAX, pos);
        REQUIRE((uint64_t)f->payload_off + f->payload_len == end, pos);
        /* the header varints re-read to the same ids */
        uint64_t sid, fid;
        int a = spop_varint_decode(buf + body + 5, (size_t)(end - body - 5), &sid);
        REQUIRE(a > 0 && sid == f->sid, pos);
        int b = spop_varint_decode(buf + body + 5 + a, (size_t)(end - body - 5 - a), &fid);
        REQUIRE(b > 0 && fid == f->fid, pos);
        REQUIRE(f->payload_off == body + 5 + a + b, pos);

        REQUIRE(f->items_parsed == expect_items(f), pos);
        REQUIRE(f->first_item == next_item, pos);
        if (!f->items_parsed)
            REQUIRE(f->n_items == 0, pos);
        REQUIRE((uint64_t)f->first_item + f->n_items <= max_items, pos);

        uint8_t kind = item_kind_for(f->type);
        uint64_t lo = f->payload_off;
        uint64_t prev_end = lo; /* items appear in payload order, without overlap */
        for (uint32_t i = f->first_item; i < f->first_item + f->n_items; i++) {
            const spop_item *x = &it[i];
            REQUIRE(x->kind == kind, i);
            REQUIRE(span_in(x->name_off, x->name_len, prev_end, end), i);
            prev_end = (uint64_t)x->name_off + x->name_len;
            if (kind == SPOP_ITEM_KV) {
                check_value(x, prev_end, end, i);
            } else if (kind == SPOP_ITEM_ACTION) {
                REQUIRE(x->scope <= SPOP_SCOPE_RES, i);
                REQUIRE((x->action == SPOP_ACTION_SET_VAR && x->nargs == 3) ||
                            (x->action == SPOP_ACTION_UNSET_VAR && x->nargs == 2),
                        i);
                if (x->action == SPOP_ACTION_SET_VAR)
                    check_value(x, prev_end, end, i);
            } else {
                /* MESSAGE then exactly nargs ARG records */
                REQUIRE((uint64_t)i + 1 + x->nargs <= (uint64_t)f->first_item + f->n_items, i);
                for (uint32_t j = i + 1; j <= i + x->nargs; j++) {
                    REQUIRE(it[j].kind == SPOP_ITEM_ARG, j);
                    REQUIRE(span_in(it[j].name_off, it[j].name_len, prev_end, end), j);
                    prev_end = (uint64_t)it[j].name_off + it[j].name_len;
                    check_value(&it[j], prev_end, end, j);
                    if (it[j].type >= SPOP_DATA_IPV4)
                        prev_end = (uint64_t)it[j].val_off + it[j].val_len;
                }
                i += x->nargs;
                continue;
            }
            if (x->type >= SPOP_DATA_IPV4 && !(kind == SPOP_ITEM_ACTION && x->action != SPOP_ACTION_SET_VAR))
                prev_end = (uint64_t)x->val_off + x->val_len;
        }
        next_item = f->first_item + f->n_items;
        pos = (size_t)end;
    }

    /* why did it stop? */
    if (ret == 0 && n < max_frames && len - pos >= 4) {
        uint32_t flen = be32(buf + pos);
        REQUIRE(flen <= mfs && flen >= SPOP_FRAME_MIN_LEN, pos); /* else an error was due */
        if (len - pos - 4 >= flen) {
            /* a whole frame is there: it must be the item records that ran out */
            uint32_t nb = 0;
            int rb = spop_decode_frames(buf + pos, len - pos, mfs, g_frames_big, 1, g_items_big,
                                        MAX_ITEMS, &nb);
            if (rb == 0) {
                REQUIRE(nb == 1 && g_frames_big[0].n_items > max_items - next_item, pos);
            } else {
                /* or the records ran out before the decoder reached a fault
                 * further in that frame (an error is reported on the next call) */
                REQUIRE(rb == -SPOP_ST_INVALID || (rb == -SPOP_ST_RES && flen / 2 + 1 > MAX_ITEMS), pos);
            }
        }
    }
    if (ret < 0 && len - pos >= 4) {
        uint32_t flen = be32(buf + pos);
        if (ret == -SPOP_ST_TOO_BIG)
            REQUIRE(flen > mfs, pos);
        else if (ret == -SPOP_ST_INVALID && flen >= SPOP_FRAME_MIN_LEN)
            REQUIRE(len - pos - 4 >= flen, pos); /* only whole frames are judged */
    }
    REQUIRE(ret == 0 || len - pos >= 4, pos);
    return pos;
}

/* The same item, position aside (the two buffers differ). */
static int same_item(const spop_item *a, const uint8_t *abuf, const spop_item *b, const uint8_t *bbuf)
{
    if (a->kind != b->kind || a->name_len != b->name_len ||
        memcmp(abuf + a->name_off, bbuf + b->name_off, a->name_len))
        return 0;
    if (a->kind == SPOP_ITEM_MESSAGE)
        return a->nargs == b->nargs;
    if (a->kind == SPOP_ITEM_ACTION &&
        (a->action != b->action || a->scope != b->scope || a->nargs != b->nargs))
        return 0;
    if (a->kind == SPOP_ITEM_ACTION && a->action == SPOP_ACTION_UNSET_VAR)
        return 1;
    if (a->type != b->type)
        return 0;
    if (a->type >= SPOP_DATA_BOOL && a->type <= SPOP_DATA_UINT64)
        return a->num == b->num;
    if (a->type >= SPOP_DATA_IPV4)
        return a->val_len == b->val_len && !memcmp(abuf + a->val_off, bbuf + b->val_off, a->val_len);
    return 1;
}

/* Encode decoded frames (strings = the input), decode the output, compare. */
static void check_reencode(const uint8_t *buf, size_t consumed, uint32_t mfs, uint32_t n)
{
    uint32_t used = n ? g_frames[n - 1].first_item + g_frames[n - 1].n_items : 0;
    memcpy(g_frames2, g_frames, n * sizeof(spop_frame));

    /* exact room: re-encoded frames are as long as the originals */
    uint8_t *out = malloc(consumed ? consumed : 1);
    if (!out)
        abort();
    int ret = spop_encode_frames(out, consumed, mfs, g_frames2, n, g_items, used, buf, consumed);
    REQUIRE(ret == (int)n, 0);
    size_t pos = 0;
    for (uint32_t k = 0; k < n; k++) {
        const spop_frame *a = &g_frames[k], *e = &g_frames2[k];
        REQUIRE(e->offset == pos, k);
        REQUIRE(e->n_items == a->n_items, k); /* nothing dropped: it fitted before */
        /* items re-encode to the same size (only stray type-byte flags may
         * change); n_items == 0 copies the payload as is */
        REQUIRE(e->length == a->length, k);
        REQUIRE(be32(out + pos) == e->length, k);
        pos += 4 + (size_t)e->length;
    }

    uint32_t n2 = 0;
    int r2 = spop_decode_frames(out, pos, mfs, g_frames2, MAX_FRAMES, g_items2, MAX_ITEMS, &n2);
    REQUIRE(r2 == 0 && n2 == n, 0);
    for (uint32_t k = 0; k < n; k++) {
        const spop_frame *a = &g_frames[k], *b = &g_frames2[k];
        REQUIRE(a->type == b->type && a->flags == b->flags && a->sid == b->sid && a->fid == b->fid, k);
        REQUIRE(a->items_parsed == b->items_parsed && a->n_items == b->n_items, k);
        REQUIRE(a->payload_len == b->payload_len, k);
        if (a->n_items == 0) /* raw: byte for byte */
            REQUIRE(!memcmp(buf + a->payload_off, out + b->payload_off, a->payload_len), k);
        for (uint32_t i = 0; i < a->n_items; i++)
            REQUIRE(same_item(&g_items[a->first_item + i], buf, &g_items2[b->first_item + i], out), k);
    }

    /* canonical form: encoding the second decode gives the same bytes */
    uint8_t *out2 = malloc(pos ? pos : 1);
    if (!out2)
        abort();
    int r3 = spop_encode_frames(out2, pos, mfs, g_frames2, n, g_items2,
                                n ? g_frames2[n - 1].first_item + g_frames2[n - 1].n_items : 0, out, pos);
    REQUIRE(r3 == (int)n && !memcmp(out, out2, pos), 0);
    free(out2);
    free(out);
}

static void fuzz_frames(const uint8_t *buf, size_t len)
{
    static const struct {
        uint32_t mfs, max_frames, max_items;
    } cfg[] = {
        {SPOP_MIN_FRAME_SIZE, 2, 4},                           /* tiny record arrays */
        {SPOP_MIN_FRAME_SIZE, MAX_FRAMES, SPOP_MIN_FRAME_SIZE / 2 + 1},
        {SPOP_DEFAULT_FRAME_SIZE, 1, 3},
        {SPOP_DEFAULT_FRAME_SIZE, 1, 1},                       /* down to one record */
        {SPOP_DEFAULT_FRAME_SIZE, MAX_FRAMES, MAX_ITEMS},      /* as sized in spop.h */
        {UINT32_MAX, MAX_FRAMES, MAX_ITEMS},                   /* no size limit */
    };
    for (size_t c = 0; c < sizeof(cfg) / sizeof(cfg[0]); c++) {
        /* the capacities the call is given, exactly: an overflow is an ASan report */
        spop_frame *fr = exact(cfg[c].max_frames, sizeof(spop_frame));
        spop_item *it = exact(cfg[c].max_items, sizeof(spop_item));
        uint32_t n = 0xFFFFFFFF;
        int ret = spop_decode_frames(buf, len, cfg[c].mfs, fr, cfg[c].max_frames, it, cfg[c].max_items, &n);
        size_t consumed = check_decode(buf, len, cfg[c].mfs, cfg[c].max_frames, cfg[c].max_items, ret,
                                       n, fr, it);
        uint32_t used = n ? fr[n - 1].first_item + fr[n - 1].n_items : 0;
        memcpy(g_frames, fr, n * sizeof(spop_frame)); /* check_reencode reads them there */
        memcpy(g_items, it, used * sizeof(spop_item));
        if (cfg[c].max_frames == MAX_FRAMES && cfg[c].max_items == MAX_ITEMS && n > 0)
            check_reencode(buf, consumed, cfg[c].mfs, n);

        /* capacity never changes what is decoded: a 1-frame run gives frame 0 */
        if (n > 0 && ret == 0) {
            spop_frame *one = exact(1, sizeof(spop_frame));
            uint32_t n1 = 0;
            int r1 = spop_decode_frames(buf, len, cfg[c].mfs, one, 1, it, cfg[c].max_items, &n1);
            REQUIRE(r1 == 0 && n1 == 1 && !memcmp(&fr[0], one, offsetof(spop_frame, pad_)), c);
            free(one);
        }
        free(it);
        free(fr);
    }

    /* a shorter read never decodes more, and never errs where the full read did not */
    if (len > 0) {
        uint32_t nf = 0, np = 0;
        int rf = spop_decode_frames(buf, len, SPOP_DEFAULT_FRAME_SIZE, g_frames, MAX_FRAMES, g_items,
                                    MAX_ITEMS, &nf);
        int rp = spop_decode_frames(buf, len - 1, SPOP_DEFAULT_FRAME_SIZE, g_frames2, MAX_FRAMES,
                                    g_items2, MAX_ITEMS, &np);
        REQUIRE(np <= nf, np);
        if (rf == 0)
            REQUIRE(rp == 0 && np + 1 >= nf, np);
    }
}

static void fuzz_varints(const uint8_t *buf, size_t len)
{
    /* read a varint at each of the first offsets */
    for (size_t at = 0; at < len && at < 16; at++) {
        uint64_t v = 0;
        size_t rest = len - at;
        int r = spop_varint_decode(buf + at, rest, &v);
        if (r > 0) {
            REQUIRE(r <= SPOP_VARINT_MAX && (size_t)r <= rest, at);
            uint8_t out[SPOP_VARINT_MAX];
            int e = spop_varint_encode(v, out, sizeof(out));
            REQUIRE(e == r && !memcmp(out, buf + at, (size_t)r), at); /* canonical */
            uint64_t w = 0;
            REQUIRE(spop_varint_decode(buf + at, (size_t)r, &w) == r && w == v, at);
            REQUIRE(spop_varint_encode(v, out, (size_t)r - 1) < 0, at); /* no room, no write */
        } else if (r == 0) {
            /* incomplete: short, and every byte after the first continues */
            REQUIRE(rest < SPOP_VARINT_MAX && buf[at] >= 240, at);
            for (size_t i = 1; i < rest; i++)
                REQUIRE(buf[at + i] >= 128, at);
        } else {
            REQUIRE(r == -SPOP_ST_INVALID && buf[at] >= 240, at);
        }
    }
    /* any 64-bit value survives encode -> decode */
    if (len >= 8) {
        uint64_t x = 0, y = 0;
        memcpy(&x, buf, 8);
        uint8_t out[SPOP_VARINT_MAX];
        int e = spop_varint_encode(x, out, sizeof(out));
        REQUIRE(e > 0 && spop_varint_decode(out, (size_t)e, &y) == e && y == x, 0);
    }
}

/* ---------------------------------------------------------------- decode + index */

/* The handler names of spop_decode_batch, as a caller packs them: SPOP
 * strings back to back ("check-client-ip", "ip", "a" and the empty name).
 * The literal is split so that no hex escape swallows a letter. */
static const uint8_t FUZZ_NAMES[] = "\x0f" "check-client-ip" "\x02" "ip" "\x01" "a" "\x00";
#define FUZZ_NAMES_LEN ((uint32_t)sizeof(FUZZ_NAMES) - 1) /* the terminating NUL is not a name */
#define FUZZ_N_NAMES 4u

/* Where `name` is in FUZZ_NAMES (n_names when absent): a separate, plain walk. */
static uint32_t ref_name_index(const uint8_t *name, uint32_t len, uint32_t n_names)
{
    size_t at = 0;
    for (uint32_t i = 0; i < n_names; i++) {
        uint32_t n = FUZZ_NAMES[at];
        if (n == len && !memcmp(FUZZ_NAMES + at + 1, name, n))
            return i;
        at += 1 + n;
    }
    return n_names;
}

/* spop_decode_batch against spop_decode_frames and its own contract. */
static void fuzz_batch(const uint8_t *buf, size_t len)
{
    static const struct {
        uint32_t mfs, max_frames, max_items, n_names;
    } cfg[] = {
        {SPOP_DEFAULT_FRAME_SIZE, MAX_FRAMES, MAX_ITEMS, FUZZ_N_NAMES},
        {SPOP_MIN_FRAME_SIZE, 2, 4, FUZZ_N_NAMES}, /* tiny arrays: early stops */
        {SPOP_DEFAULT_FRAME_SIZE, MAX_FRAMES, MAX_ITEMS, 0}, /* no names: every plain frame is 0 */
        {UINT32_MAX, 3, MAX_ITEMS, FUZZ_N_NAMES},
    };
    for (size_t c = 0; c < sizeof(cfg) / sizeof(cfg[0]); c++) {
        spop_frame *g_bframes = exact(cfg[c].max_frames, sizeof(spop_frame));
        spop_item *g_bitems = exact(cfg[c].max_items, sizeof(spop_item));
        uint64_t *out = exact(SPOP_BATCH_OUT(cfg[c].max_frames), sizeof(uint64_t));
        spop_batch b;
        b.frames = g_bframes;
        b.items = g_bitems;
        b.out = out;
        b.names = cfg[c].n_names ? FUZZ_NAMES : NULL;
        b.names_len = cfg[c].n_names ? FUZZ_NAMES_LEN : 0;
        b.n_names = cfg[c].n_names;
        b.max_frames = cfg[c].max_frames;
        b.max_items = cfg[c].max_items;
        /* from 0, and from where the first frame ends: a later round of a read */
        size_t start = 0;
        if (c == 1 && len >= 4 && be32(buf) <= len - 4)
            start = 4 + (size_t)be32(buf);
        int rc = spop_decode_batch(buf, len, start, cfg[c].mfs, &b);

        uint32_t n = 0xFFFFFFFF;
        int ret = spop_decode_frames(buf + start, len - start, cfg[c].mfs, g_frames, cfg[c].max_frames,
                                     g_items, cfg[c].max_items, &n);
        REQUIRE(rc >= 0, c); /* the names are well formed */
        REQUIRE((uint32_t)rc == out[SPOP_OUT_FRAMES] && out[SPOP_OUT_FRAMES] == n, c);
        REQUIRE(out[SPOP_OUT_STATUS] == (uint64_t)-ret, c);
        REQUIRE(out[SPOP_OUT_PLAIN] <= n, c);
        REQUIRE(out[SPOP_OUT_END] <= len, c);
        const spop_frame *last = n ? &g_frames[n - 1] : NULL;
        REQUIRE(out[SPOP_OUT_END] == start + (last ? last->offset + 4 + last->length : 0), c);
        uint32_t n_items = (uint32_t)out[SPOP_OUT_ITEMS];
        REQUIRE(n_items == (last ? last->first_item + last->n_items : 0), c);
        /* the same records as spop_decode_frames on the slice, offsets moved by start */
        for (uint32_t k = 0; k < n; k++) {
            spop_frame f = g_frames[k];
            f.offset += (uint32_t)start;
            f.payload_off += (uint32_t)start;
            REQUIRE(!memcmp(&f, &g_bframes[k], sizeof(spop_frame)), k);
        }
        for (uint32_t i = 0; i < n_items; i++) {
            spop_item it = g_items[i];
            it.name_off += (uint32_t)start; /* every item has a name (maybe empty) */
            if (it.val_len || it.type == SPOP_DATA_STRING || it.type == SPOP_DATA_BINARY)
                it.val_off += (uint32_t)start;
            REQUIRE(!memcmp(&it, &g_bitems[i], sizeof(spop_item)), i);
        }
        const uint64_t *ids = out + SPOP_OUT_HEAD;
        const uint64_t *cols = ids + 2 * (size_t)n;

        uint32_t plain = 0;
        for (uint32_t k = 0; k < n; k++) {
            const spop_frame *f = &g_bframes[k];
            uint64_t idx = cols[k], first = cols[n + k], nargs = cols[2 * n + k];
            REQUIRE(ids[2 * k] == f->sid && ids[2 * k + 1] == f->fid, k);
            const spop_item *m = &g_bitems[f->first_item];
            int one_message = f->type == SPOP_FRAME_NOTIFY && f->items_parsed && f->n_items > 0 &&
                              (uint32_t)m->nargs + 1 == f->n_items;
            if (!one_message) {
                REQUIRE(idx == SPOP_INDEX_OTHER && first == 0 && nargs == 0, k);
                continue;
            }
            plain++;
            REQUIRE(m->kind == SPOP_ITEM_MESSAGE, k);
            REQUIRE(idx == ref_name_index(buf + m->name_off, m->name_len, cfg[c].n_names), k);
            REQUIRE(first == f->first_item + 1 && nargs == m->nargs, k);
            REQUIRE(first + nargs <= n_items, k);
            for (uint64_t a = first; a < first + nargs; a++)
                REQUIRE(g_bitems[a].kind == SPOP_ITEM_ARG, a);
        }
        REQUIRE(plain == out[SPOP_OUT_PLAIN], plain);
        free(out);
        free(g_bitems);
        free(g_bframes);
    }
}

/* ---------------------------------------------------------------- ACKs of one action */

static uint64_t g_ack_ids[2 * (MAX_ITEMS + 2)];
static uint32_t g_ack_ends[MAX_ITEMS + 2];

/* How many well-formed actions buf is, read as an ACK payload by the
 * decoder; -1 when it is not a list of actions, -2 when it cannot tell. */
static long count_actions(const uint8_t *buf, size_t len)
{
    size_t flen = 7 + len;
    uint8_t *frame = malloc(4 + flen);
    if (!frame)
        abort();
    static const uint8_t hdr[11] = {0, 0, 0, 0, SPOP_FRAME_ACK, 0, 0, 0, SPOP_FLAG_FIN, 1, 1};
    memcpy(frame, hdr, sizeof(hdr));
    frame[0] = (uint8_t)(flen >> 24);
    frame[1] = (uint8_t)(flen >> 16);
    frame[2] = (uint8_t)(flen >> 8);
    frame[3] = (uint8_t)flen;
    if (len)
        memcpy(frame + sizeof(hdr), buf, len);
    uint32_t nf = 0;
    int rc = spop_decode_frames(frame, 4 + flen, UINT32_MAX, g_frames2, 1, g_items2, MAX_ITEMS, &nf);
    free(frame);
    if (rc == -SPOP_ST_RES)
        return -2;
    if (rc < 0)
        return -1;
    REQUIRE(nf == 1 && g_frames2[0].items_parsed, 0);
    return (long)g_frames2[0].n_items;
}

/* Decode n ACKs of one action each from out[0..olen): their ids, and their
 * payloads back to back equal to the input. Fills g_ack_ends. */
static void check_one_action_acks(const uint8_t *out, size_t olen, uint32_t n, const uint8_t *buf, size_t len)
{
    size_t pos = 0, poff = 0;
    uint32_t i = 0;
    while (pos < olen) {
        uint32_t nf = 0;
        int rc = spop_decode_frames(out + pos, olen - pos, UINT32_MAX, g_frames2, MAX_FRAMES, g_items2,
                                    MAX_ITEMS, &nf);
        REQUIRE(rc == 0 && nf > 0, pos);
        for (uint32_t k = 0; k < nf; k++, i++) {
            const spop_frame *f = &g_frames2[k];
            REQUIRE(i < n, i);
            REQUIRE(f->type == SPOP_FRAME_ACK && f->flags == SPOP_FLAG_FIN && f->n_items == 1, i);
            REQUIRE(f->sid == g_ack_ids[2 * i] && f->fid == g_ack_ids[2 * i + 1], i);
            REQUIRE(poff + f->payload_len <= len && !memcmp(out + pos + f->payload_off, buf + poff, f->payload_len), i);
            poff += f->payload_len;
            g_ack_ends[i] = (uint32_t)poff;
        }
        const spop_frame *last = &g_frames2[nf - 1];
        pos += last->offset + 4 + last->length;
    }
    REQUIRE(pos == olen && i == n && poff == len, i);
}

/* spop_encode_acks with ends == NULL, the input as the concatenated actions. */
static void fuzz_acks(const uint8_t *buf, size_t len)
{
    long m = count_actions(buf, len);
    if (m > (long)MAX_ITEMS)
        m = -2;
    uint32_t tries[4] = {0};
    size_t n_tries = 0;
    if (m >= 0) {
        tries[n_tries++] = (uint32_t)m;
        tries[n_tries++] = (uint32_t)m + 1;
        if (m > 0)
            tries[n_tries++] = (uint32_t)m - 1;
    }
    if (len) /* any count: whatever comes back is an error or fits `cap` */
        tries[n_tries++] = buf[0];
    for (uint32_t i = 0; i < MAX_ITEMS + 2; i++) {
        uint64_t x = ((uint64_t)i + len) * 0x9E3779B97F4A7C15ull;
        g_ack_ids[2 * i] = x >> (i % 64);
        g_ack_ids[2 * i + 1] = i % 3 ? x : UINT64_MAX;
    }

    for (size_t t = 0; t < n_tries; t++) {
        uint32_t n = tries[t];
        /* room for n frames of the longest header: spop.h says n * 25 + len,
         * which forgets the 4-byte length prefixes (RES with 10-byte ids) */
        size_t cap = (size_t)n * (4 + SPOP_FRAME_HDR_MAX) + len;
        uint8_t *out = malloc(cap ? cap : 1);
        if (!out)
            abort();
        int r = spop_encode_acks(out, cap, UINT32_MAX, g_ack_ids, NULL, n, buf, len);
        REQUIRE(r == -SPOP_ST_INVALID || (r >= 0 && (size_t)r <= cap), r);
        if (m >= 0)
            REQUIRE((n == (uint32_t)m) == (r >= 0), n); /* exactly m well-formed actions */
        if (m == -1)
            REQUIRE(r == -SPOP_ST_INVALID, n);
        if (r >= 0) {
            check_one_action_acks(out, (size_t)r, n, buf, len);
            /* the ends-array form gives the same bytes */
            uint8_t *out2 = malloc(cap ? cap : 1);
            if (!out2)
                abort();
            int r2 = spop_encode_acks(out2, cap, UINT32_MAX, g_ack_ids, g_ack_ends, n, buf, len);
            REQUIRE(r2 == r && !memcmp(out, out2, (size_t)r), n);
            /* a small max_frame_size: the same bytes, or refused as too big */
            uint32_t biggest = 0;
            for (size_t pos = 0; pos < (size_t)r;) {
                uint32_t body = be32(out + pos);
                biggest = body > biggest ? body : biggest;
                pos += 4 + (size_t)body;
            }
            r2 = spop_encode_acks(out2, cap, SPOP_MIN_FRAME_SIZE, g_ack_ids, NULL, n, buf, len);
            if (biggest <= SPOP_MIN_FRAME_SIZE)
                REQUIRE(r2 == r && !memcmp(out, out2, (size_t)r), n);
            else
                REQUIRE(r2 == -SPOP_ST_TOO_BIG, n);
            /* one byte short of the room: refused, nothing past the buffer */
            if (r > 0) {
                free(out2);
                out2 = malloc((size_t)r - 1 ? (size_t)r - 1 : 1);
                if (!out2)
                    abort();
                REQUIRE(spop_encode_acks(out2, (size_t)r - 1, UINT32_MAX, g_ack_ids, NULL, n, buf, len) ==
                            -SPOP_ST_RES,
                        n);
            }
            free(out2);
        }
        free(out);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* exact-size heap copy: ASan flags a read one byte past the input */
    uint8_t *buf = malloc(size ? size : 1);
    if (!buf)
        return 0;
    if (size)
        memcpy(buf, data, size);
    fuzz_varints(buf, size);
    fuzz_frames(buf, size);
    fuzz_batch(buf, size);
    fuzz_acks(buf, size);
    free(buf);
    return 0;
}
