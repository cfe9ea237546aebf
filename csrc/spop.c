/*
 * spop.c - SPOP 2.0 frame codec. See spop.h for the contract.
 *
 * Started from the encoding routines of HAProxy's example agent (spoa.c),
 * without its bugs: every length is compared with the bytes that remain
 * (never `p + len` first), varints stop at 10 bytes and 2^64-1, a declared
 * frame length is checked before its body is read, and frames shorter than
 * their header are refused instead of looping.
 */
#include "spop.h"

#include <string.h>

_Static_assert(sizeof(spop_item) == 32, "spop_item layout is part of the ABI");
_Static_assert(sizeof(spop_frame) == 48, "spop_frame layout is part of the ABI");

/* A read cursor over [p, end). Helpers advance it only on success. */
typedef struct {
    const uint8_t *p;
    const uint8_t *end;
} cursor;

/* The empty byte string a NULL pointer with length 0 stands for: pointer
 * arithmetic on NULL, even + 0, is undefined. */
static const uint8_t no_bytes[1];

#define REMAINING(c) ((size_t)((c)->end - (c)->p))

/* ---------------------------------------------------------------- varint */

/*
 * HAProxy's varint: values below 240 take one byte; otherwise the first byte
 * is 0xF0 | low 4 bits and each following byte adds (byte << shift), its
 * 0x80 continuation bit included, until a byte below 0x80.
 *
 *   bytes  range                    bytes  range
 *   1      0 .. 239                 6      4328786160 .. 554084600047
 *   2      240 .. 2287              7      .. 70922828777711
 *   3      2288 .. 264431           8      .. 9078122083518703
 *   4      264432 .. 33818863       9      .. 1161999626690365679
 *   5      33818864 .. 4328786159   10     .. 2^64-1
 */
int spop_varint_decode(const uint8_t *buf, size_t len, uint64_t *value)
{
    if (len == 0)
        return 0;
    uint64_t v = buf[0];
    if (v < 240) {
        *value = v;
        return 1;
    }
    unsigned shift = 4;
    for (size_t i = 1;; i++) {
        if (i >= SPOP_VARINT_MAX)
            return -SPOP_ST_INVALID;
        if (i >= len)
            return 0;
        uint64_t b = buf[i];
        /* bits shifted out of 64, or a carry out of the sum, mean > 2^64-1 */
        if (shift > 56 && (b >> (64 - shift)) != 0)
            return -SPOP_ST_INVALID;
        uint64_t add = b << shift;
        if (v + add < v)
            return -SPOP_ST_INVALID;
        v += add;
        if (b < 128) {
            *value = v;
            return (int)i + 1;
        }
        shift += 7;
    }
}

int spop_varint_encode(uint64_t value, uint8_t *out, size_t cap)
{
    size_t n = 0;
    if (value < 240) {
        if (cap < 1)
            return -SPOP_ST_TOO_BIG;
        out[0] = (uint8_t)value;
        return 1;
    }
    if (cap < 1)
        return -SPOP_ST_TOO_BIG;
    out[n++] = (uint8_t)(0xF0 | (value & 0x0F));
    value = (value - 240) >> 4;
    while (value >= 128) {
        if (n >= cap)
            return -SPOP_ST_TOO_BIG;
        out[n++] = (uint8_t)(0x80 | (value & 0x7F));
        value = (value - 128) >> 7;
    }
    if (n >= cap)
        return -SPOP_ST_TOO_BIG;
    out[n++] = (uint8_t)value;
    return (int)n;
}

/* ---------------------------------------------------------------- decoding */

static int read_varint(cursor *c, uint64_t *v)
{
    int n = spop_varint_decode(c->p, REMAINING(c), v);
    if (n <= 0)
        return -SPOP_ST_INVALID; /* inside a complete frame, short is invalid */
    c->p += n;
    return 0;
}

/* Varint length + bytes, recorded as an offset into the decoded buffer. */
static int read_string(cursor *c, const uint8_t *base, uint32_t *off, uint32_t *len)
{
    uint64_t n;
    if (read_varint(c, &n) < 0 || n > REMAINING(c))
        return -SPOP_ST_INVALID;
    *off = (uint32_t)(c->p - base);
    *len = (uint32_t)n;
    c->p += n;
    return 0;
}

static int read_byte(cursor *c, uint8_t *b)
{
    if (c->p >= c->end)
        return -SPOP_ST_INVALID;
    *b = *c->p++;
    return 0;
}

/* TYPED-DATA into it->type / num / val_off / val_len. */
static int read_typed(cursor *c, const uint8_t *base, spop_item *it)
{
    uint8_t tb;
    if (read_byte(c, &tb) < 0)
        return -SPOP_ST_INVALID;
    it->type = tb & 0x0F;
    it->num = 0;
    it->val_off = 0;
    it->val_len = 0;
    switch (it->type) {
    case SPOP_DATA_NULL:
        return 0;
    case SPOP_DATA_BOOL:
        it->num = (tb & 0x10) ? 1 : 0;
        return 0;
    case SPOP_DATA_INT32:
    case SPOP_DATA_UINT32:
    case SPOP_DATA_INT64:
    case SPOP_DATA_UINT64:
        return read_varint(c, &it->num);
    case SPOP_DATA_IPV4:
    case SPOP_DATA_IPV6: {
        size_t n = it->type == SPOP_DATA_IPV4 ? 4 : 16;
        if (REMAINING(c) < n)
            return -SPOP_ST_INVALID;
        it->val_off = (uint32_t)(c->p - base);
        it->val_len = (uint32_t)n;
        if (n == 4) /* also as an integer: saves the caller a slice */
            it->num = (uint64_t)c->p[0] << 24 | (uint64_t)c->p[1] << 16 |
                      (uint64_t)c->p[2] << 8 | c->p[3];
        c->p += n;
        return 0;
    }
    case SPOP_DATA_STRING:
    case SPOP_DATA_BINARY:
        return read_string(c, base, &it->val_off, &it->val_len);
    default:
        /* reserved 10..15: the value's length is unknown, nothing after it
         * can be read (HAProxy would treat it as empty and misalign) */
        return -SPOP_ST_INVALID;
    }
}

/* One ACK action (set-var or unset-var) into it. */
static int read_action(cursor *c, const uint8_t *base, spop_item *it)
{
    it->kind = SPOP_ITEM_ACTION;
    if (read_byte(c, &it->action) < 0 || read_byte(c, &it->nargs) < 0 ||
        read_byte(c, &it->scope) < 0 || it->scope > SPOP_SCOPE_RES)
        return -SPOP_ST_INVALID;
    if (it->action == SPOP_ACTION_SET_VAR && it->nargs == 3)
        return read_string(c, base, &it->name_off, &it->name_len) < 0 ||
                       read_typed(c, base, it) < 0
                   ? -SPOP_ST_INVALID
                   : 0;
    if (it->action == SPOP_ACTION_UNSET_VAR && it->nargs == 2)
        return read_string(c, base, &it->name_off, &it->name_len);
    return -SPOP_ST_INVALID; /* unknown action: its length is unknown */
}

static spop_item *next_item(spop_item *items, uint32_t max_items, uint32_t *n)
{
    if (*n >= max_items)
        return NULL;
    spop_item *it = &items[(*n)++];
    memset(it, 0, sizeof(*it));
    return it;
}

/*
 * Walk one payload into items. Returns 0, -SPOP_ST_INVALID for a malformed
 * payload, or 1 when the item array is too small (the caller decides whether
 * that ends a batch or is an error).
 */
static int read_payload(uint8_t type, cursor *c, const uint8_t *base,
                        spop_item *items, uint32_t max_items, uint32_t *n)
{
    spop_item *it;
    while (c->p < c->end) {
        if (!(it = next_item(items, max_items, n)))
            return 1;
        switch (type) {
        case SPOP_FRAME_HAPROXY_HELLO:
        case SPOP_FRAME_HAPROXY_DISCONNECT:
        case SPOP_FRAME_AGENT_HELLO:
        case SPOP_FRAME_AGENT_DISCONNECT:
            it->kind = SPOP_ITEM_KV;
            if (read_string(c, base, &it->name_off, &it->name_len) < 0 ||
                read_typed(c, base, it) < 0)
                return -SPOP_ST_INVALID;
            break;
        case SPOP_FRAME_NOTIFY: {
            it->kind = SPOP_ITEM_MESSAGE;
            if (read_string(c, base, &it->name_off, &it->name_len) < 0 ||
                read_byte(c, &it->nargs) < 0)
                return -SPOP_ST_INVALID;
            for (unsigned a = 0; a < it->nargs; a++) {
                spop_item *arg = next_item(items, max_items, n);
                if (!arg)
                    return 1;
                arg->kind = SPOP_ITEM_ARG;
                if (read_string(c, base, &arg->name_off, &arg->name_len) < 0 ||
                    read_typed(c, base, arg) < 0)
                    return -SPOP_ST_INVALID;
            }
            break;
        }
        case SPOP_FRAME_ACK:
            if (read_action(c, base, it) < 0)
                return -SPOP_ST_INVALID;
            break;
        default:
            return -SPOP_ST_INVALID;
        }
    }
    return 0;
}

static int has_items(uint8_t type, uint32_t flags)
{
    if ((flags & (SPOP_FLAG_FIN | SPOP_FLAG_ABORT)) != SPOP_FLAG_FIN)
        return 0; /* a fragment: its payload may stop anywhere */
    switch (type) {
    case SPOP_FRAME_HAPROXY_HELLO:
    case SPOP_FRAME_HAPROXY_DISCONNECT:
    case SPOP_FRAME_NOTIFY:
    case SPOP_FRAME_AGENT_HELLO:
    case SPOP_FRAME_AGENT_DISCONNECT:
    case SPOP_FRAME_ACK:
        return 1;
    default:
        return 0;
    }
}

/* spop_decode_frames from buf[start]: offsets in the records stay relative
 * to buf, so that a caller decoding a buffer in rounds slices nothing. */
static int decode_from(const uint8_t *buf, size_t len, size_t start, uint32_t max_frame_size,
                       spop_frame *frames, uint32_t max_frames,
                       spop_item *items, uint32_t max_items,
                       uint32_t *n_frames)
{
    size_t pos = start;
    uint32_t nf = 0, ni = 0;

    *n_frames = 0;
    if (len > UINT32_MAX)
        len = UINT32_MAX; /* offsets are 32-bit; the rest waits for a later call */
    if (pos > len)
        return 0;

    while (nf < max_frames && len - pos >= 4) {
        const uint8_t *p = buf + pos;
        uint32_t flen = (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 |
                        (uint32_t)p[2] << 8 | (uint32_t)p[3];
        /* refuse a bad length before waiting for (or reading) its body */
        if (flen > max_frame_size)
            return -SPOP_ST_TOO_BIG;
        if (flen < SPOP_FRAME_MIN_LEN)
            return -SPOP_ST_INVALID;
        if (len - pos - 4 < flen)
            break; /* incomplete */

        cursor c = {p + 4, p + 4 + flen};
        spop_frame *f = &frames[nf];
        memset(f, 0, sizeof(*f));
        f->type = c.p[0];
        f->flags = (uint32_t)c.p[1] << 24 | (uint32_t)c.p[2] << 16 |
                   (uint32_t)c.p[3] << 8 | (uint32_t)c.p[4];
        c.p += 5;
        if (read_varint(&c, &f->sid) < 0 || read_varint(&c, &f->fid) < 0)
            return -SPOP_ST_INVALID;
        f->offset = (uint32_t)pos;
        f->length = flen;
        f->payload_off = (uint32_t)(c.p - buf);
        f->payload_len = (uint32_t)REMAINING(&c);
        f->first_item = ni;

        if (has_items(f->type, f->flags)) {
            uint32_t n = ni;
            int rc = read_payload(f->type, &c, buf, items, max_items, &n);
            if (rc < 0)
                return rc;
            if (rc > 0) /* out of records: stop here, or fail if nothing fits */
                return nf == 0 ? -SPOP_ST_RES : 0;
            f->items_parsed = 1;
            f->n_items = n - ni;
            ni = n;
        }
        nf++;
        *n_frames = nf;
        pos += 4 + (size_t)flen;
    }
    return 0;
}

int spop_decode_frames(const uint8_t *buf, size_t len, uint32_t max_frame_size,
                       spop_frame *frames, uint32_t max_frames,
                       spop_item *items, uint32_t max_items,
                       uint32_t *n_frames)
{
    return decode_from(buf, len, 0, max_frame_size, frames, max_frames, items, max_items,
                       n_frames);
}

/* ---------------------------------------------------------------- encoding */

/*
 * A write cursor over one frame body. Two limits: `limit` is what the frame
 * may hold (max-frame-size), `cap` what the output buffer has left. Past
 * `cap` the cursor keeps counting without writing, so that a group that
 * would cross `limit` anyway is told apart from one that only needs a
 * bigger buffer. Errors are sticky and checked once per group.
 */
typedef struct {
    uint8_t *base;
    size_t pos;
    size_t cap;
    size_t limit;
    int too_big;  /* crossed `limit`: the frame cannot hold this */
    int short_;   /* crossed `cap`: retry with a larger buffer */
} wcursor;

static void put_bytes(wcursor *w, const uint8_t *src, size_t n)
{
    if (w->too_big)
        return;
    if (w->limit - w->pos < n) {
        w->too_big = 1;
        return;
    }
    if (!w->short_ && w->cap - w->pos >= n) {
        if (n)
            memcpy(w->base + w->pos, src, n);
    } else {
        w->short_ = 1;
    }
    w->pos += n;
}

static void put_byte(wcursor *w, uint8_t b)
{
    put_bytes(w, &b, 1);
}

static void put_varint(wcursor *w, uint64_t v)
{
    uint8_t tmp[SPOP_VARINT_MAX];
    int n = spop_varint_encode(v, tmp, sizeof(tmp));
    put_bytes(w, tmp, (size_t)n); /* cannot fail: tmp holds any varint */
}

typedef struct {
    const uint8_t *base;
    size_t len;
} strings_ref;

static int ref_ok(const strings_ref *s, uint32_t off, uint32_t len)
{
    return off <= s->len && len <= s->len - off;
}

static void put_string(wcursor *w, const strings_ref *s, uint32_t off, uint32_t len)
{
    put_varint(w, len);
    put_bytes(w, s->base + off, len);
}

/* Validate an item's typed value and its references. */
static int typed_ok(const spop_item *it, const strings_ref *s)
{
    switch (it->type) {
    case SPOP_DATA_NULL:
    case SPOP_DATA_BOOL:
    case SPOP_DATA_INT32:
    case SPOP_DATA_UINT32:
    case SPOP_DATA_INT64:
    case SPOP_DATA_UINT64:
        return 1;
    case SPOP_DATA_IPV4:
        return it->val_len == 4 && ref_ok(s, it->val_off, 4);
    case SPOP_DATA_IPV6:
        return it->val_len == 16 && ref_ok(s, it->val_off, 16);
    case SPOP_DATA_STRING:
    case SPOP_DATA_BINARY:
        return ref_ok(s, it->val_off, it->val_len);
    default:
        return 0;
    }
}

static void put_typed(wcursor *w, const spop_item *it, const strings_ref *s)
{
    switch (it->type) {
    case SPOP_DATA_BOOL:
        put_byte(w, (uint8_t)(SPOP_DATA_BOOL | (it->num ? 0x10 : 0)));
        break;
    case SPOP_DATA_INT32:
    case SPOP_DATA_UINT32:
    case SPOP_DATA_INT64:
    case SPOP_DATA_UINT64:
        put_byte(w, it->type);
        put_varint(w, it->num);
        break;
    case SPOP_DATA_IPV4:
    case SPOP_DATA_IPV6:
        put_byte(w, it->type);
        put_bytes(w, s->base + it->val_off, it->val_len);
        break;
    case SPOP_DATA_STRING:
    case SPOP_DATA_BINARY:
        put_byte(w, it->type);
        put_string(w, s, it->val_off, it->val_len);
        break;
    default:
        put_byte(w, SPOP_DATA_NULL);
        break;
    }
}

/* The item kind a frame type's payload is made of (0: raw payload). */
static uint8_t payload_kind(uint8_t type)
{
    switch (type) {
    case SPOP_FRAME_HAPROXY_HELLO:
    case SPOP_FRAME_HAPROXY_DISCONNECT:
    case SPOP_FRAME_AGENT_HELLO:
    case SPOP_FRAME_AGENT_DISCONNECT:
        return SPOP_ITEM_KV;
    case SPOP_FRAME_NOTIFY:
        return SPOP_ITEM_MESSAGE;
    case SPOP_FRAME_ACK:
        return SPOP_ITEM_ACTION;
    default:
        return 0;
    }
}

/* Check the records of one item group (an item, or a MESSAGE and its args);
 * returns how many records it spans, or 0 if it cannot be encoded. */
static uint32_t group_check(const spop_item *items, uint32_t i, uint32_t end,
                            uint8_t kind, const strings_ref *s)
{
    const spop_item *it = &items[i];
    if (it->kind != kind || !ref_ok(s, it->name_off, it->name_len))
        return 0;
    switch (kind) {
    case SPOP_ITEM_KV:
        return typed_ok(it, s) ? 1 : 0;
    case SPOP_ITEM_ACTION:
        if (it->scope > SPOP_SCOPE_RES)
            return 0;
        if (it->action == SPOP_ACTION_UNSET_VAR)
            return 1;
        return it->action == SPOP_ACTION_SET_VAR && typed_ok(it, s) ? 1 : 0;
    case SPOP_ITEM_MESSAGE: {
        uint32_t span = 1 + (uint32_t)it->nargs;
        if (span > end - i)
            return 0;
        for (uint32_t a = i + 1; a < i + span; a++) {
            if (items[a].kind != SPOP_ITEM_ARG ||
                !ref_ok(s, items[a].name_off, items[a].name_len) ||
                !typed_ok(&items[a], s))
                return 0;
        }
        return span;
    }
    default:
        return 0;
    }
}

static void put_group(wcursor *w, const spop_item *items, uint32_t i,
                      uint32_t span, const strings_ref *s)
{
    const spop_item *it = &items[i];
    switch (it->kind) {
    case SPOP_ITEM_KV:
        put_string(w, s, it->name_off, it->name_len);
        put_typed(w, it, s);
        break;
    case SPOP_ITEM_ACTION:
        put_byte(w, it->action);
        put_byte(w, it->action == SPOP_ACTION_SET_VAR ? 3 : 2);
        put_byte(w, it->scope);
        put_string(w, s, it->name_off, it->name_len);
        if (it->action == SPOP_ACTION_SET_VAR)
            put_typed(w, it, s);
        break;
    case SPOP_ITEM_MESSAGE:
        put_string(w, s, it->name_off, it->name_len);
        put_byte(w, it->nargs);
        for (uint32_t a = i + 1; a < i + span; a++) {
            put_string(w, s, items[a].name_off, items[a].name_len);
            put_typed(w, &items[a], s);
        }
        break;
    default:
        break;
    }
}

/*
 * Write one frame at out[*pos]. The body is limited to max_frame_size;
 * groups that would cross it are left out. Returns 1 when written (and
 * advances *pos), 0 when `cap` ran out, < 0 for a bad record or a frame
 * that cannot be made to fit.
 */
static int put_frame(uint8_t *out, size_t cap, size_t *pos, uint32_t max_frame_size,
                     spop_frame *f, const spop_item *items, uint32_t n_items,
                     const strings_ref *s)
{
    size_t room = cap - *pos;
    if (room < 4)
        return 0;
    wcursor w = {out + *pos + 4, 0, room - 4, max_frame_size, 0, 0};

    /* no items: the payload is raw bytes (fragments, pre-encoded lists) */
    uint8_t kind = f->n_items ? payload_kind(f->type) : 0;
    if (f->first_item > n_items || f->n_items > n_items - f->first_item)
        return -SPOP_ST_INVALID;
    if (f->n_items && !kind)
        return -SPOP_ST_INVALID;
    if (!kind && !ref_ok(s, f->payload_off, f->payload_len))
        return -SPOP_ST_INVALID;

    put_byte(&w, f->type);
    uint8_t flags[4] = {(uint8_t)(f->flags >> 24), (uint8_t)(f->flags >> 16),
                        (uint8_t)(f->flags >> 8), (uint8_t)f->flags};
    put_bytes(&w, flags, 4);
    put_varint(&w, f->sid);
    put_varint(&w, f->fid);
    if (w.too_big)
        return -SPOP_ST_BAD_FRAME_SIZE;

    uint32_t written = 0;
    if (!kind) {
        put_bytes(&w, s->base + f->payload_off, f->payload_len);
        if (w.too_big)
            return -SPOP_ST_TOO_BIG;
    }
    uint32_t end = f->first_item + f->n_items;
    for (uint32_t i = f->first_item; kind && i < end;) {
        uint32_t span = group_check(items, i, end, kind, s);
        if (!span)
            return -SPOP_ST_INVALID;
        size_t mark = w.pos;
        int short_mark = w.short_;
        put_group(&w, items, i, span, s);
        if (w.too_big) { /* the frame cannot hold it: drop it and the rest */
            w.pos = mark;
            w.too_big = 0;
            w.short_ = short_mark;
            break;
        }
        written += span;
        i += span;
    }
    if (w.short_)
        return 0;
    if (kind)
        f->n_items = written;

    uint8_t *start = out + *pos;
    uint32_t body = (uint32_t)w.pos;
    start[0] = (uint8_t)(body >> 24);
    start[1] = (uint8_t)(body >> 16);
    start[2] = (uint8_t)(body >> 8);
    start[3] = (uint8_t)body;
    f->offset = (uint32_t)*pos;
    f->length = body;
    *pos += 4 + (size_t)body;
    return 1;
}

int spop_encode_frames(uint8_t *out, size_t cap, uint32_t max_frame_size,
                       spop_frame *frames, uint32_t n_frames,
                       const spop_item *items, uint32_t n_items,
                       const uint8_t *strings, size_t strings_len)
{
    if (max_frame_size < SPOP_FRAME_MIN_LEN)
        return -SPOP_ST_BAD_FRAME_SIZE;
    if (cap > UINT32_MAX)
        cap = UINT32_MAX; /* offsets in the records are 32-bit */
    strings_ref s = {strings ? strings : no_bytes, strings ? strings_len : 0};
    size_t pos = 0;
    uint32_t k;
    for (k = 0; k < n_frames; k++) {
        int rc = put_frame(out, cap, &pos, max_frame_size, &frames[k], items, n_items, &s);
        if (rc < 0)
            return rc;
        if (rc == 0)
            break;
    }
    return (int)k;
}

int spop_encode_acks(uint8_t *out, size_t cap, uint32_t max_frame_size,
                     const uint64_t *ids, const uint32_t *ends, uint32_t n,
                     const uint8_t *payload, size_t payload_len)
{
    size_t pos = 0;
    uint32_t start = 0;
    if (cap > INT32_MAX)
        cap = INT32_MAX; /* the byte count is returned as an int */
    if (!payload) { /* no actions at all (NULL + 0 is undefined) */
        payload = no_bytes;
        payload_len = 0;
    }
    cursor actions = {payload, payload + payload_len};
    for (uint32_t i = 0; i < n; i++) {
        uint32_t end;
        if (ends) {
            end = ends[i];
        } else { /* one action per ACK: find where this one ends */
            spop_item it;
            if (read_action(&actions, payload, &it) < 0)
                return -SPOP_ST_INVALID;
            end = (uint32_t)(actions.p - payload);
        }
        if (end < start || end > payload_len)
            return -SPOP_ST_INVALID;
        uint8_t hdr[SPOP_FRAME_HDR_MAX] = {SPOP_FRAME_ACK, 0, 0, 0, SPOP_FLAG_FIN};
        size_t h = 5;
        h += (size_t)spop_varint_encode(ids[2 * (size_t)i], hdr + h, sizeof(hdr) - h);
        h += (size_t)spop_varint_encode(ids[2 * (size_t)i + 1], hdr + h, sizeof(hdr) - h);
        size_t body = h + (end - start);
        if (body > max_frame_size)
            return -SPOP_ST_TOO_BIG;
        if (cap - pos < 4 + body)
            return -SPOP_ST_RES;
        uint8_t *f = out + pos;
        f[0] = (uint8_t)(body >> 24);
        f[1] = (uint8_t)(body >> 16);
        f[2] = (uint8_t)(body >> 8);
        f[3] = (uint8_t)body;
        memcpy(f + 4, hdr, h);
        if (end > start)
            memcpy(f + 4 + h, payload + start, end - start);
        pos += 4 + body;
        start = end;
    }
    if (!ends && start != payload_len)
        return -SPOP_ST_INVALID; /* more actions than ACKs */
    return (int)pos;
}

/* ---------------------------------------------------------------- index */

/* Position of `name` in the list of SPOP strings (checked by the caller),
 * n_names when absent. Handler names are few: a linear scan with the length
 * compared first beats hashing here. */
static uint32_t find_name(const uint8_t *name, uint32_t name_len,
                          const uint8_t *names, size_t names_len, uint32_t n_names)
{
    cursor c = {names, names + names_len};
    for (uint32_t i = 0; i < n_names; i++) {
        uint32_t off, n;
        if (read_string(&c, names, &off, &n) < 0)
            break;
        if (n == name_len && memcmp(names + off, name, n) == 0)
            return i;
    }
    return n_names;
}

int spop_decode_batch(const uint8_t *buf, size_t len, size_t start, uint32_t max_frame_size,
                      spop_batch *b)
{
    /* the names list is the caller's: check it whole, before writing anything */
    const uint8_t *names_base = b->names ? b->names : no_bytes;
    size_t names_len = b->names ? b->names_len : 0;
    cursor names = {names_base, names_base + names_len};
    for (uint32_t i = 0; i < b->n_names; i++) {
        uint32_t off, nlen;
        if (read_string(&names, names_base, &off, &nlen) < 0)
            return -SPOP_ST_INVALID;
    }
    if (names.p != names.end || start > len)
        return -SPOP_ST_INVALID;

    uint32_t n = 0;
    int rc = decode_from(buf, len, start, max_frame_size, b->frames, b->max_frames,
                         b->items, b->max_items, &n);
    uint64_t *out = b->out;
    out[SPOP_OUT_FRAMES] = n;
    out[SPOP_OUT_PLAIN] = 0;
    out[SPOP_OUT_ITEMS] = 0;
    out[SPOP_OUT_END] = start;
    out[SPOP_OUT_STATUS] = rc < 0 ? (uint64_t)-rc : 0;
    if (n == 0)
        return 0;
    const spop_frame *last = &b->frames[n - 1];
    /* records are handed out in order: the last frame ends them */
    out[SPOP_OUT_ITEMS] = last->first_item + last->n_items;
    out[SPOP_OUT_END] = (uint64_t)last->offset + 4 + last->length;

    uint64_t *ids = out + SPOP_OUT_HEAD;
    uint64_t *names_col = ids + 2 * (size_t)n;
    uint64_t *first_col = names_col + n;
    uint64_t *nargs_col = first_col + n;
    uint32_t plain = 0;
    for (uint32_t k = 0; k < n; k++) {
        const spop_frame *f = &b->frames[k];
        ids[2 * (size_t)k] = f->sid;
        ids[2 * (size_t)k + 1] = f->fid;
        names_col[k] = SPOP_INDEX_OTHER;
        first_col[k] = 0;
        nargs_col[k] = 0;
        if (f->type != SPOP_FRAME_NOTIFY || !f->items_parsed || f->n_items == 0)
            continue;
        const spop_item *m = &b->items[f->first_item];
        if (m->kind != SPOP_ITEM_MESSAGE || (uint32_t)m->nargs + 1 != f->n_items)
            continue; /* several messages: the caller walks the records */
        names_col[k] = find_name(buf + m->name_off, m->name_len, names_base, names_len,
                                 b->n_names);
        first_col[k] = f->first_item + 1;
        nargs_col[k] = m->nargs;
        plain++;
    }
    out[SPOP_OUT_PLAIN] = plain;
    return (int)n;
}

/* ---------------------------------------------------------------- status */

const char *spop_status_reason(int status)
{
    switch (status) {
    case SPOP_ST_NORMAL: return "normal";
    case SPOP_ST_IO: return "I/O error";
    case SPOP_ST_TIMEOUT: return "a timeout occurred";
    case SPOP_ST_TOO_BIG: return "frame is too big";
    case SPOP_ST_INVALID: return "invalid frame received";
    case SPOP_ST_NO_VSN: return "version value not found";
    case SPOP_ST_NO_FRAME_SIZE: return "max-frame-size value not found";
    case SPOP_ST_NO_CAP: return "capabilities value not found";
    case SPOP_ST_BAD_VSN: return "unsupported version";
    case SPOP_ST_BAD_FRAME_SIZE: return "max-frame-size too big or too small";
    case SPOP_ST_FRAG_NOT_SUPPORTED: return "fragmentation not supported";
    case SPOP_ST_INTERLACED_FRAMES: return "invalid interlaced frames";
    case SPOP_ST_FRAMEID_NOTFOUND: return "frame-id not found";
    case SPOP_ST_RES: return "resource allocation error";
    default: return "an unknown error occurred";
    }
}
