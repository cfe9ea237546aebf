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
 * consumed bytes: the encoding is canonical).
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
        {SPOP_DEFAULT_FRAME_SIZE, MAX_FRAMES, MAX_ITEMS},      /* as sized in spop.h */
        {UINT32_MAX, MAX_FRAMES, MAX_ITEMS},                   /* no size limit */
    };
    for (size_t c = 0; c < sizeof(cfg) / sizeof(cfg[0]); c++) {
        uint32_t n = 0xFFFFFFFF;
        int ret = spop_decode_frames(buf, len, cfg[c].mfs, g_frames, cfg[c].max_frames, g_items,
                                     cfg[c].max_items, &n);
        size_t consumed = check_decode(buf, len, cfg[c].mfs, cfg[c].max_frames, cfg[c].max_items, ret,
                                       n, g_frames, g_items);
        if (cfg[c].max_frames == MAX_FRAMES && cfg[c].max_items == MAX_ITEMS && n > 0)
            check_reencode(buf, consumed, cfg[c].mfs, n);

        /* capacity never changes what is decoded: a 1-frame run gives frame 0 */
        if (n > 0 && ret == 0) {
            spop_frame first = g_frames[0];
            uint32_t n1 = 0;
            int r1 = spop_decode_frames(buf, len, cfg[c].mfs, g_frames, 1, g_items, cfg[c].max_items, &n1);
            REQUIRE(r1 == 0 && n1 == 1 && !memcmp(&first, &g_frames[0], offsetof(spop_frame, pad_)), c);
        }
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
    free(buf);
    return 0;
}
