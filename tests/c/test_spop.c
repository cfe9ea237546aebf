/*
 * test_spop.c - standalone tests for the SPOP frame codec (csrc/spop.c).
 *
 * Plain C, no framework. Build and run (ASan + UBSan):
 *   gcc -std=c11 -Wall -Wextra -Werror -g -O1 -fno-omit-frame-pointer \
 *       -fsanitize=address,undefined -fno-sanitize-recover=all \
 *       -Icsrc csrc/spop.c tests/c/test_spop.c -o test_spop && ./test_spop
 * Prints "not ok" lines for failures (every line with -v), then a TAP plan
 * and "N passed, N failed"; exits 1 on any failure.
 *
 * Every check runs whatever the outcome of earlier ones, so the number of
 * checks is fixed: tests/test_c_codec.py asserts it.
 *
 * Inputs are copied into exact-size heap buffers, or to the very end of a
 * page followed by a PROT_NONE page, so that a 1-byte over-read is caught.
 * Vectors are those of /work/shared/vectors/spop-vectors.json (spop.md §12).
 */
#define _DEFAULT_SOURCE /* mmap, MAP_ANONYMOUS, sysconf */

#include "spop.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

/* ------------------------------------------------------------ check helpers */

static unsigned g_pass, g_fail, g_verbose;

static int report(int ok, const char *file, int line, const char *detail,
                  const char *fmt, va_list ap)
{
    unsigned n = g_pass + g_fail + 1;
    if (ok)
        g_pass++;
    else
        g_fail++;
    if (ok && !g_verbose)
        return ok;
    printf("%s %u - ", ok ? "ok" : "not ok", n);
    vprintf(fmt, ap);
    printf("\n");
    if (!ok)
        printf("#   %s:%d: %s\n", file, line, detail);
    return ok;
}

static int check_(int ok, const char *file, int line, const char *expr, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    report(ok, file, line, expr, fmt, ap);
    va_end(ap);
    return ok;
}

/* EQ and EQU: got == exp, both printed (as signed values when is_signed). */
static int check_equal_(int is_signed, unsigned long long got, unsigned long long exp, const char *file,
                        int line, const char *fmt, ...)
{
    char detail[96];
    va_list ap;
    if (is_signed)
        snprintf(detail, sizeof(detail), "got %lld, expected %lld", (long long)got, (long long)exp);
    else
        snprintf(detail, sizeof(detail), "got %llu, expected %llu", got, exp);
    va_start(ap, fmt);
    report(got == exp, file, line, detail, fmt, ap);
    va_end(ap);
    return got == exp;
}

/* CHECK(cond, fmt, ...): one check. EQ/EQU: one check, printing both values. */
#define CHECK(cond, ...) check_((cond) != 0, __FILE__, __LINE__, #cond, __VA_ARGS__)
#define EQ(got, exp, ...)                                                                     \
    check_equal_(1, (unsigned long long)(long long)(got), (unsigned long long)(long long)(exp), __FILE__, \
                 __LINE__, __VA_ARGS__)
#define EQU(got, exp, ...) \
    check_equal_(0, (unsigned long long)(got), (unsigned long long)(exp), __FILE__, __LINE__, __VA_ARGS__)

/* ------------------------------------------------------------ buffers */

static void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (!p) {
        perror("malloc");
        exit(2);
    }
    return p;
}

static int hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* Hex (spaces allowed) to bytes; returns the byte count. */
static size_t unhex(const char *hex, uint8_t *out, size_t cap)
{
    size_t n = 0;
    for (const char *p = hex; *p;) {
        if (*p == ' ') {
            p++;
            continue;
        }
        int hi = hexval(p[0]), lo = p[1] ? hexval(p[1]) : -1;
        if (hi < 0 || lo < 0 || n >= cap) {
            fprintf(stderr, "bad hex in test: %s\n", hex);
            exit(2);
        }
        out[n++] = (uint8_t)(hi << 4 | lo);
        p += 2;
    }
    return n;
}

/* Exact-size heap copy: ASan flags any access past len. */
static uint8_t *dup_exact(const uint8_t *src, size_t len)
{
    uint8_t *p = malloc(len);
    if (!p && len) {
        perror("malloc");
        exit(2);
    }
    if (len)
        memcpy(p, src, len);
    return p;
}

/* A region whose last data byte is followed by a PROT_NONE page: data placed
 * at its end faults on any over-read, even one ASan's redzone would miss. */
#define GUARD_DATA_PAGES 16
static uint8_t *g_guard_base;
static size_t g_guard_size;

static void guard_init(void)
{
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    g_guard_size = GUARD_DATA_PAGES * page;
    g_guard_base = mmap(NULL, g_guard_size + page, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (g_guard_base == MAP_FAILED || mprotect(g_guard_base + g_guard_size, page, PROT_NONE)) {
        perror("mmap/mprotect");
        exit(2);
    }
}

static uint8_t *guard_place(const uint8_t *src, size_t len)
{
    if (len > g_guard_size) {
        fprintf(stderr, "guard region too small\n");
        exit(2);
    }
    uint8_t *p = g_guard_base + g_guard_size - len;
    if (len)
        memcpy(p, src, len);
    return p;
}

/* ------------------------------------------------------------ decode helper */

#define MAX_FRAMES 64
#define MAX_ITEMS 1024

typedef struct {
    int ret;
    uint32_t n;
    spop_frame f[MAX_FRAMES];
    spop_item it[MAX_ITEMS];
} dres;

static dres g_d; /* large: keep it off the stack */

static int decode(const uint8_t *buf, size_t len, uint32_t mfs, uint32_t max_frames,
                  uint32_t max_items, dres *r)
{
    /* the decoder writes into heap arrays of exactly the capacities it is
     * given (a write past them is an ASan report), poisoned so that fields it
     * forgets to set show up; the checks read the copy in r */
    if (max_frames > MAX_FRAMES || max_items > MAX_ITEMS)
        abort(); /* a harness bug: r cannot hold the copy */
    spop_frame *f = malloc(max_frames ? max_frames * sizeof(spop_frame) : 1);
    spop_item *it = malloc(max_items ? max_items * sizeof(spop_item) : 1);
    if (!f || !it)
        abort();
    memset(f, 0xA5, max_frames * sizeof(spop_frame));
    memset(it, 0xA5, max_items * sizeof(spop_item));
    memset(r->f, 0xA5, sizeof(r->f));
    memset(r->it, 0xA5, sizeof(r->it));
    r->n = 0xDEADBEEF;
    r->ret = spop_decode_frames(buf, len, mfs, f, max_frames, it, max_items, &r->n);
    memcpy(r->f, f, max_frames * sizeof(spop_frame));
    memcpy(r->it, it, max_items * sizeof(spop_item));
    free(it);
    free(f);
    return r->ret;
}

/* Decode hex through an exact-size heap copy. */
static int decode_hex(const char *hex, uint32_t mfs, uint32_t max_frames, uint32_t max_items,
                      dres *r)
{
    static uint8_t tmp[65536];
    size_t len = unhex(hex, tmp, sizeof(tmp));
    uint8_t *buf = dup_exact(tmp, len);
    int ret = decode(buf, len, mfs, max_frames, max_items, r);
    free(buf);
    return ret;
}

/* ------------------------------------------------------------ vectors */

typedef struct {
    uint8_t kind, type, nargs, action, scope;
    const char *name;
    uint32_t name_len;
    const char *val; /* IPV4, IPV6, STRING, BINARY */
    uint32_t val_len;
    uint64_t num; /* BOOL, integers */
} exp_item;

typedef struct {
    const char *name;
    const char *hex;
    uint8_t type;
    uint32_t flags;
    uint64_t sid, fid;
    uint8_t items_parsed;
    uint32_t n_items;
    exp_item items[16];
} exp_frame;

typedef struct {
    uint64_t value;
    const char *hex;
} exp_varint;

#define B(s) s, (uint32_t)(sizeof(s) - 1)
#define NOVAL NULL, 0
#define KV(n, t, v, num) {SPOP_ITEM_KV, t, 0, 0, 0, n, v, num}
#define MSG(n, nargs) {SPOP_ITEM_MESSAGE, 0, nargs, 0, 0, n, NOVAL, 0}
#define ARG(n, t, v, num) {SPOP_ITEM_ARG, t, 0, 0, 0, n, v, num}
#define SETVAR(sc, n, t, v, num) {SPOP_ITEM_ACTION, t, 3, SPOP_ACTION_SET_VAR, sc, n, v, num}
#define UNSETVAR(sc, n) {SPOP_ITEM_ACTION, SPOP_DATA_NULL, 2, SPOP_ACTION_UNSET_VAR, sc, n, NOVAL, 0}

/* Item groups that several vectors share. */
#define CCI_IPV4 MSG(B("check-client-ip"), 1), ARG(B(""), 6, B("\x7f\x00\x00\x01"), 0ull)
#define STATUS_KV(code, msg) KV(B("status-code"), 3, NOVAL, code), KV(B("message"), 8, B(msg), 0ull)
#define HELLO_KV(version_key, caps)                                                      \
    KV(B(version_key), 8, B("2.0"), 0ull), KV(B("max-frame-size"), 3, NOVAL, 16380ull), \
        KV(B("capabilities"), 8, B(caps), 0ull)

/* Generated from spop-vectors.json; integers are the raw 64-bit patterns. */
static const exp_frame FRAME_VECTORS[] = {
    {"haproxy-hello 2.6",
     "000000810100000001000012737570706f727465642d76657273696f6e730803322e300e6d61782d6672616d652d73697a6503fcf0060c6361706162696c69746965730810706970656c696e696e672c6173796e6309656e67696e652d6964082462393138633366632d373566312d346665322d613566662d333438393063663930626238",
     1, 1, 0ull, 0ull, 1, 4, {
         HELLO_KV("supported-versions", "pipelining,async"),
         KV(B("engine-id"), 8, B("b918c3fc-75f1-4fe2-a5ff-34890cf90bb8"), 0ull),
     }},
    {"haproxy-hello 3.x",
     "0000007b0100000001000012737570706f727465642d76657273696f6e730803322e300e6d61782d6672616d652d73697a6503fcf0060c6361706162696c6974696573080a706970656c696e696e6709656e67696e652d6964082463636334333638352d383636612d343834352d623139632d623064666365636561366136",
     1, 1, 0ull, 0ull, 1, 4, {
         HELLO_KV("supported-versions", "pipelining"),
         KV(B("engine-id"), 8, B("ccc43685-866a-4845-b19c-b0dfcecea6a6"), 0ull),
     }},
    {"haproxy-hello healthcheck",
     "0000004e0100000001000012737570706f727465642d76657273696f6e730803322e300e6d61782d6672616d652d73697a6503fcf0060c6361706162696c697469657308000b6865616c7468636865636b11",
     1, 1, 0ull, 0ull, 1, 4, {
         HELLO_KV("supported-versions", ""),
         KV(B("healthcheck"), 1, NOVAL, 1ull),
     }},
    {"agent-hello no capability",
     "00000036650000000100000776657273696f6e0803322e300e6d61782d6672616d652d73697a6503fcf0060c6361706162696c69746965730800",
     101, 1, 0ull, 0ull, 1, 3, {HELLO_KV("version", "")}},
    {"agent-hello pipelining",
     "00000040650000000100000776657273696f6e0803322e300e6d61782d6672616d652d73697a6503fcf0060c6361706162696c6974696573080a706970656c696e696e67",
     101, 1, 0ull, 0ull, 1, 3, {HELLO_KV("version", "pipelining")}},
    {"notify check-client-ip ipv4 sid 0 (2.6 first stream)",
     "0000001e030000000100010f636865636b2d636c69656e742d69700100067f000001",
     3, 1, 0ull, 1ull, 1, 2, {CCI_IPV4}},
    {"notify check-client-ip ipv4 sid 20",
     "0000001e030000000114010f636865636b2d636c69656e742d69700100067f000001",
     3, 1, 20ull, 1ull, 1, 2, {CCI_IPV4}},
    {"notify check-client-ip ipv4 sid 3 (3.x)",
     "0000001e030000000103010f636865636b2d636c69656e742d69700100067f000001",
     3, 1, 3ull, 1ull, 1, 2, {CCI_IPV4}},
    {"notify check-client-ip ipv6 named arg, sid 300",
     "0000002d0300000001fc03010f636865636b2d636c69656e742d6970010269700720010db8000000000000000000000001",
     3, 1, 300ull, 1ull, 1, 2, {
         MSG(B("check-client-ip"), 1),
         ARG(B("ip"), 7, B(" \x01\x0d\xb8\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x01"), 0ull),
     }},
    {"notify two messages, every data type",
     "000000960300000001070209616c6c2d74797065730c016e000174110166010369333202fbf0fefefefefefefe0e0375333203fff0fefe7e0369363404f0f1fefefefefefefe060375363405fff0fefefefefefefe0e027634060a01020302763607000000000000000000000000000000010173080368c3a9016508000162090200ff0f636865636b2d636c69656e742d69700100067f000001",
     3, 1, 7ull, 2ull, 1, 15, {
         MSG(B("all-types"), 12),
         ARG(B("n"), 0, NOVAL, 0ull),
         ARG(B("t"), 1, NOVAL, 1ull),
         ARG(B("f"), 1, NOVAL, 0ull),
         ARG(B("i32"), 2, NOVAL, 18446744073709551611ull),
         ARG(B("u32"), 3, NOVAL, 4294967295ull),
         ARG(B("i64"), 4, NOVAL, 9223372036854775808ull),
         ARG(B("u64"), 5, NOVAL, 18446744073709551615ull),
         ARG(B("v4"), 6, B("\x0a\x01\x02\x03"), 0ull),
         ARG(B("v6"), 7, B("\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x01"), 0ull),
         ARG(B("s"), 8, B("h\xc3\xa9"), 0ull),
         ARG(B("e"), 8, B(""), 0ull),
         ARG(B("b"), 9, B("\x00\xff"), 0ull),
         CCI_IPV4,
     }},
    {"ack set-var sess ip_score uint32 42",
     "00000015670000000114010103010869705f73636f7265032a",
     103, 1, 20ull, 1ull, 1, 1, {SETVAR(1, B("ip_score"), 3, NOVAL, 42ull)}},
    {"ack set-var sess ip_score int32 42",
     "00000015670000000114010103010869705f73636f7265022a",
     103, 1, 20ull, 1ull, 1, 1, {SETVAR(1, B("ip_score"), 2, NOVAL, 42ull)}},
    {"ack empty",
     "0000000767000000010101",
     103, 1, 1ull, 1ull, 1, 0, {}},
    {"ack unset-var txn foo",
     "0000000e6700000001010102020203666f6f",
     103, 1, 1ull, 1ull, 1, 1, {UNSETVAR(2, B("foo"))}},
    {"ack set-var txn n int64 -1",
     "0000001767000000010101010302016e04fff0fefefefefefefe0e",
     103, 1, 1ull, 1ull, 1, 1, {SETVAR(2, B("n"), 4, NOVAL, 18446744073709551615ull)}},
    {"haproxy-disconnect 0 normal", "00000025020000000100000b7374617475732d636f64650300076d65737361676508066e6f726d616c", 2, 1, 0ull, 0ull, 1, 2, {STATUS_KV(0ull, "normal")}},
    {"haproxy-disconnect 2 timeout", "00000031020000000100000b7374617475732d636f64650302076d6573736167650812612074696d656f7574206f63637572726564", 2, 1, 0ull, 0ull, 1, 2, {STATUS_KV(2ull, "a timeout occurred")}},
    {"agent-disconnect 0 normal", "00000025660000000100000b7374617475732d636f64650300076d65737361676508066e6f726d616c", 102, 1, 0ull, 0ull, 1, 2, {STATUS_KV(0ull, "normal")}},
    {"haproxy-disconnect 8 unsupported version", "00000032020000000100000b7374617475732d636f64650308076d6573736167650813756e737570706f727465642076657273696f6e", 2, 1, 0ull, 0ull, 1, 2, {STATUS_KV(8ull, "unsupported version")}},
    {"unset fragment fin+abort",
     "0000000700000000031401",
     0, 3, 20ull, 1ull, 0, 0, {}},
};
static const exp_varint VARINT_VECTORS[] = {
    {0ull, "00"},
    {1ull, "01"},
    {239ull, "ef"},
    {240ull, "f000"},
    {241ull, "f100"},
    {255ull, "ff00"},
    {256ull, "f001"},
    {2287ull, "ff7f"},
    {2288ull, "f08000"},
    {16380ull, "fcf006"},
    {16384ull, "f0f106"},
    {264431ull, "ffff7f"},
    {264432ull, "f0808000"},
    {33818863ull, "ffffff7f"},
    {33818864ull, "f080808000"},
    {4294967295ull, "fff0fefe7e"},
    {9223372036854775807ull, "fff0fefefefefefefe06"},
    {9223372036854775808ull, "f0f1fefefefefefefe06"},
    {18446744073709551615ull, "fff0fefefefefefefe0e"},
};
static const char *const TRUNCATED_VARINTS[] = {"", "f0", "ff80", "ffffff"};

#define N_FRAME_VECTORS (sizeof(FRAME_VECTORS) / sizeof(FRAME_VECTORS[0]))
#define N_VARINT_VECTORS (sizeof(VARINT_VECTORS) / sizeof(VARINT_VECTORS[0]))
#define N_TRUNCATED (sizeof(TRUNCATED_VARINTS) / sizeof(TRUNCATED_VARINTS[0]))

/* The wire bytes of every frame vector, and all of them back to back. */
static uint8_t g_vec[N_FRAME_VECTORS][256];
static size_t g_vec_len[N_FRAME_VECTORS];
static uint8_t g_all[N_FRAME_VECTORS * 256];
static size_t g_all_len;

static void vectors_init(void)
{
    g_all_len = 0;
    for (size_t v = 0; v < N_FRAME_VECTORS; v++) {
        g_vec_len[v] = unhex(FRAME_VECTORS[v].hex, g_vec[v], sizeof(g_vec[v]));
        memcpy(g_all + g_all_len, g_vec[v], g_vec_len[v]);
        g_all_len += g_vec_len[v];
    }
}

/* Reference varint encoder, straight from spop.md §2.1, to cross-check. */
static size_t ref_varint(uint64_t x, uint8_t *out)
{
    size_t n = 0;
    if (x < 240) {
        out[n++] = (uint8_t)x;
        return n;
    }
    out[n++] = (uint8_t)(0xF0 | (x & 0x0F));
    x = (x - 240) >> 4;
    while (x >= 128) {
        out[n++] = (uint8_t)(0x80 | (x & 0x7F));
        x = (x - 128) >> 7;
    }
    out[n++] = (uint8_t)x;
    return n;
}

static size_t ref_varint_len(uint64_t x)
{
    uint8_t tmp[16];
    return ref_varint(x, tmp);
}

/* ------------------------------------------------------------ record checks */

static int span_ok(uint32_t off, uint32_t len, size_t buflen)
{
    return off <= buflen && len <= buflen - off;
}

/* Compare a decoded item with its expectation; returns NULL or what differs. */
static const char *item_diff(const spop_item *g, const exp_item *e, const uint8_t *buf,
                             size_t len)
{
    if (g->kind != e->kind)
        return "kind";
    if (!span_ok(g->name_off, g->name_len, len))
        return "name outside the buffer";
    if (g->name_len != e->name_len || memcmp(buf + g->name_off, e->name, e->name_len))
        return "name";
    if (e->kind == SPOP_ITEM_MESSAGE)
        return g->nargs == e->nargs ? NULL : "nargs";
    if (e->kind == SPOP_ITEM_ACTION) {
        if (g->action != e->action)
            return "action";
        if (g->scope != e->scope)
            return "scope";
        if (g->nargs != e->nargs)
            return "nargs";
        if (e->action == SPOP_ACTION_UNSET_VAR)
            return NULL; /* no value */
    }
    if (g->type != e->type)
        return "type";
    switch (e->type) {
    case SPOP_DATA_NULL:
        return NULL;
    case SPOP_DATA_BOOL:
    case SPOP_DATA_INT32:
    case SPOP_DATA_UINT32:
    case SPOP_DATA_INT64:
    case SPOP_DATA_UINT64:
        return g->num == e->num ? NULL : "num";
    default:
        if (!span_ok(g->val_off, g->val_len, len))
            return "value outside the buffer";
        if (g->val_len != e->val_len || memcmp(buf + g->val_off, e->val, e->val_len))
            return "value";
        return NULL;
    }
}

/* 11 + e->n_items checks: frame `idx` of r against vector e placed at `offset`,
 * its records starting at `first_item`. */
static void check_frame(const char *ctx, const dres *r, uint32_t idx, const exp_frame *e,
                        const uint8_t *buf, size_t len, uint32_t offset, uint32_t first_item)
{
    const spop_frame *f = &r->f[idx];
    uint32_t hdr = 5 + (uint32_t)ref_varint_len(e->sid) + (uint32_t)ref_varint_len(e->fid);
    uint32_t flen = (uint32_t)buf[offset] << 24 | (uint32_t)buf[offset + 1] << 16 |
                    (uint32_t)buf[offset + 2] << 8 | buf[offset + 3];

    EQ(f->type, e->type, "%s [%s]: type", ctx, e->name);
    EQU(f->flags, e->flags, "%s [%s]: flags", ctx, e->name);
    EQU(f->sid, e->sid, "%s [%s]: sid", ctx, e->name);
    EQU(f->fid, e->fid, "%s [%s]: fid", ctx, e->name);
    EQ(f->offset, offset, "%s [%s]: offset", ctx, e->name);
    EQ(f->length, flen, "%s [%s]: length", ctx, e->name);
    EQ(f->payload_off, offset + 4 + hdr, "%s [%s]: payload_off", ctx, e->name);
    EQ(f->payload_len, flen - hdr, "%s [%s]: payload_len", ctx, e->name);
    EQ(f->items_parsed, e->items_parsed, "%s [%s]: items_parsed", ctx, e->name);
    EQ(f->n_items, e->n_items, "%s [%s]: n_items", ctx, e->name);
    EQ(f->first_item, first_item, "%s [%s]: first_item", ctx, e->name);
    for (uint32_t i = 0; i < e->n_items; i++) {
        const char *why = "missing";
        if (i < f->n_items && first_item + i < MAX_ITEMS)
            why = item_diff(&r->it[first_item + i], &e->items[i], buf, len);
        CHECK(why == NULL, "%s [%s]: item %u (%s)", ctx, e->name, i, why ? why : "");
    }
}

/* ------------------------------------------------------------ varints */

static void test_varints(void)
{
    uint8_t bytes[32], out[16];
    uint64_t v;

    for (size_t k = 0; k < N_VARINT_VECTORS; k++) {
        const exp_varint *x = &VARINT_VECTORS[k];
        size_t n = unhex(x->hex, bytes, sizeof(bytes));
        uint8_t *buf = dup_exact(bytes, n);
        v = 0;
        EQ(spop_varint_decode(buf, n, &v), n, "varint %s: decode length", x->hex);
        EQU(v, x->value, "varint %s: decoded value", x->hex);
        free(buf);

        /* trailing bytes are left alone */
        bytes[n] = 0xFF;
        buf = dup_exact(bytes, n + 1);
        EQ(spop_varint_decode(buf, n + 1, &v), n, "varint %s + ff: consumes only the varint", x->hex);
        free(buf);

        EQ(spop_varint_encode(x->value, out, sizeof(out)), n, "varint %s: encode length", x->hex);
        CHECK(memcmp(out, bytes, n) == 0, "varint %s: encoded bytes", x->hex);

        buf = xmalloc(n); /* exact room: fits */
        EQ(spop_varint_encode(x->value, buf, n), n, "varint %s: encode into exact room", x->hex);
        free(buf);
        buf = n > 1 ? xmalloc(n - 1) : NULL; /* one byte short: refused, no overflow */
        CHECK(spop_varint_encode(x->value, buf, n - 1) < 0, "varint %s: encode into %zu bytes fails",
              x->hex, n - 1);
        free(buf);

        /* every strict prefix is incomplete, read in place at a page end */
        int all0 = 1;
        for (size_t p = 0; p < n; p++) {
            uint8_t *heap = dup_exact(bytes, p);
            all0 &= spop_varint_decode(heap, p, &v) == 0;
            free(heap);
            all0 &= spop_varint_decode(guard_place(bytes, p), p, &v) == 0;
        }
        CHECK(all0, "varint %s: every strict prefix is incomplete", x->hex);
    }

    for (size_t k = 0; k < N_TRUNCATED; k++) {
        size_t n = unhex(TRUNCATED_VARINTS[k], bytes, sizeof(bytes));
        EQ(spop_varint_decode(guard_place(bytes, n), n, &v), 0, "truncated varint '%s' is incomplete",
           TRUNCATED_VARINTS[k]);
    }
    EQ(spop_varint_decode(NULL, 0, &v), 0, "varint: empty NULL buffer is incomplete");
    {
        /* 9 bytes with continuation bits: a 10th byte could still end it */
        size_t n = unhex("ffffffffffffffffff", bytes, sizeof(bytes));
        EQ(spop_varint_decode(guard_place(bytes, n), n, &v), 0, "varint: 9 bytes, all continued, is incomplete");
    }

    static const char *const rejected[] = {
        "ff80808080808080808000",           /* 11 bytes */
        "f0808080808080808080",             /* 10th byte still continued */
        "ffffffffffffffffffffffffffffffff", /* haproxy shifts past 64 bits here */
        "fff0fefefefefefefe0f",             /* 2^64-1 + 2^60 */
        "f0f0fefefefefefefe10",             /* 2^64 exactly */
        "ffffffffffffffffff7f",             /* far above 2^64-1 */
    };
    for (size_t k = 0; k < sizeof(rejected) / sizeof(rejected[0]); k++) {
        size_t n = unhex(rejected[k], bytes, sizeof(bytes));
        uint8_t *buf = dup_exact(bytes, n);
        EQ(spop_varint_decode(buf, n, &v), -SPOP_ST_INVALID, "varint %s is rejected", rejected[k]);
        free(buf);
        EQ(spop_varint_decode(guard_place(bytes, n), n, &v), -SPOP_ST_INVALID,
           "varint %s is rejected (page end)", rejected[k]);
    }
    {
        size_t n = unhex("f0f0fefefefefefefe0e", bytes, sizeof(bytes));
        EQ(spop_varint_decode(guard_place(bytes, n), n, &v), 10, "varint 2^64-16 (10 bytes) accepted");
        EQU(v, UINT64_MAX - 15, "varint 2^64-16 value");
    }

    /* sweep: spop encoder == reference encoder, and decode inverts it */
    int sweep_ok = 1;
    uint64_t bad = 0;
    for (uint64_t x = 0; x <= 300000 && sweep_ok; x++) {
        size_t rn = ref_varint(x, bytes);
        int en = spop_varint_encode(x, out, sizeof(out));
        sweep_ok = en == (int)rn && !memcmp(out, bytes, rn) && spop_varint_decode(out, rn, &v) == en &&
                   v == x;
        bad = x;
    }
    for (int bit = 0; bit < 64 && sweep_ok; bit++) {
        for (int d = -1; d <= 1 && sweep_ok; d++) {
            uint64_t x = ((uint64_t)1 << bit) + (uint64_t)(int64_t)d;
            size_t rn = ref_varint(x, bytes);
            int en = spop_varint_encode(x, out, sizeof(out));
            sweep_ok = en == (int)rn && !memcmp(out, bytes, rn) &&
                       spop_varint_decode(out, rn, &v) == en && v == x;
            bad = x;
        }
    }
    CHECK(sweep_ok, "varint encode/decode sweep (first failure at %llu)", (unsigned long long)bad);
}

/* ------------------------------------------------------------ frame vectors */

static void test_frame_vectors(void)
{
    for (size_t k = 0; k < N_FRAME_VECTORS; k++) {
        const exp_frame *e = &FRAME_VECTORS[k];
        uint8_t *buf = dup_exact(g_vec[k], g_vec_len[k]);
        size_t len = g_vec_len[k];
        uint32_t flen = (uint32_t)(len - 4);

        EQ(decode(buf, len, SPOP_DEFAULT_FRAME_SIZE, 4, 64, &g_d), 0, "decode [%s]: status", e->name);
        EQ(g_d.n, 1, "decode [%s]: one frame", e->name);
        check_frame("decode", &g_d, 0, e, buf, len, 0, 0);

        /* max_frame_size is inclusive */
        decode(buf, len, flen, 4, 64, &g_d);
        CHECK(g_d.ret == 0 && g_d.n == 1, "decode [%s]: max_frame_size == LENGTH accepted", e->name);
        EQ(decode(buf, len, flen - 1, 4, 64, &g_d), -SPOP_ST_TOO_BIG,
           "decode [%s]: max_frame_size == LENGTH-1 refused", e->name);

        /* exactly enough item records; one fewer is a resource error */
        decode(buf, len, SPOP_DEFAULT_FRAME_SIZE, 1, e->n_items, &g_d);
        CHECK(g_d.ret == 0 && g_d.n == 1, "decode [%s]: %u item records suffice", e->name, e->n_items);
        if (e->n_items > 0) {
            decode(buf, len, SPOP_DEFAULT_FRAME_SIZE, 1, e->n_items - 1, &g_d);
            CHECK(g_d.ret == -SPOP_ST_RES && g_d.n == 0, "decode [%s]: %u item records give -13 (got %d)",
                  e->name, e->n_items - 1, g_d.ret);
        } else {
            CHECK(1, "decode [%s]: no items, nothing to starve", e->name);
        }
        free(buf);
    }
}

/* Every strict prefix of every vector is incomplete: status 0, no frame. */
static void test_prefixes(void)
{
    for (size_t k = 0; k < N_FRAME_VECTORS; k++) {
        const exp_frame *e = &FRAME_VECTORS[k];
        int heap_ok = 1, page_ok = 1;
        size_t bad_heap = 0, bad_page = 0;
        for (size_t p = 0; p < g_vec_len[k]; p++) {
            uint8_t *buf = dup_exact(g_vec[k], p);
            decode(buf, p, SPOP_DEFAULT_FRAME_SIZE, 4, 64, &g_d);
            free(buf);
            if (heap_ok && !(g_d.ret == 0 && g_d.n == 0)) {
                heap_ok = 0;
                bad_heap = p;
            }
            decode(guard_place(g_vec[k], p), p, SPOP_DEFAULT_FRAME_SIZE, 4, 64, &g_d);
            if (page_ok && !(g_d.ret == 0 && g_d.n == 0)) {
                page_ok = 0;
                bad_page = p;
            }
        }
        CHECK(heap_ok, "prefixes [%s]: incomplete (exact heap copy; first bad length %zu)", e->name, bad_heap);
        CHECK(page_ok, "prefixes [%s]: incomplete (at a page end; first bad length %zu)", e->name, bad_page);
        decode(guard_place(g_vec[k], g_vec_len[k]), g_vec_len[k], SPOP_DEFAULT_FRAME_SIZE, 4, 64, &g_d);
        CHECK(g_d.ret == 0 && g_d.n == 1, "prefixes [%s]: whole frame at a page end decodes", e->name);
    }
}

/* ------------------------------------------------------------ batches */

static void test_multi(void)
{
    uint8_t *buf = dup_exact(g_all, g_all_len);
    uint32_t off = 0, first = 0;

    EQ(decode(buf, g_all_len, SPOP_DEFAULT_FRAME_SIZE, MAX_FRAMES, MAX_ITEMS, &g_d), 0,
       "batch: every vector back to back: status");
    EQ(g_d.n, N_FRAME_VECTORS, "batch: every vector back to back: frame count");
    for (size_t k = 0; k < N_FRAME_VECTORS; k++) {
        check_frame("batch", &g_d, (uint32_t)k, &FRAME_VECTORS[k], buf, g_all_len, off, first);
        off += (uint32_t)g_vec_len[k];
        first += FRAME_VECTORS[k].n_items;
    }
    free(buf);

    decode(guard_place(g_all, g_all_len), g_all_len, SPOP_DEFAULT_FRAME_SIZE, MAX_FRAMES, MAX_ITEMS, &g_d);
    CHECK(g_d.ret == 0 && g_d.n == N_FRAME_VECTORS, "batch: at a page end");

    buf = dup_exact(g_all, g_all_len);
    decode(buf, g_all_len, SPOP_DEFAULT_FRAME_SIZE, 3, MAX_ITEMS, &g_d);
    CHECK(g_d.ret == 0 && g_d.n == 3, "batch: stops at max_frames=3 (ret %d, n %u)", g_d.ret, g_d.n);
    decode(buf, g_all_len, SPOP_DEFAULT_FRAME_SIZE, 0, MAX_ITEMS, &g_d);
    CHECK(g_d.ret == 0 && g_d.n == 0, "batch: max_frames=0 decodes nothing");
    free(buf);

    /* every strict prefix decodes exactly the frames it holds whole */
    int ok = 1;
    size_t bad = 0;
    for (size_t p = 0; p < g_all_len && ok; p++) {
        uint32_t whole = 0;
        for (size_t k = 0, end = 0; k < N_FRAME_VECTORS; k++) {
            end += g_vec_len[k];
            if (end <= p)
                whole++;
        }
        uint8_t *pb = dup_exact(g_all, p);
        decode(pb, p, SPOP_DEFAULT_FRAME_SIZE, MAX_FRAMES, MAX_ITEMS, &g_d);
        free(pb);
        ok = g_d.ret == 0 && g_d.n == whole;
        bad = p;
    }
    CHECK(ok, "batch: every prefix gives its whole frames (first bad length %zu)", bad);

    /* what follows the valid frames: partial, too big, too small */
    static uint8_t tail[sizeof(g_all) + 16];
    struct {
        const char *what, *hex;
        int ret;
    } tails[] = {
        {"a partial frame", "000000810100000001", 0},
        {"a 4-byte prefix over max_frame_size", "00ffffff", -SPOP_ST_TOO_BIG},
        {"a LENGTH below 7", "00000003010203", -SPOP_ST_INVALID},
    };
    for (size_t t = 0; t < sizeof(tails) / sizeof(tails[0]); t++) {
        memcpy(tail, g_all, g_all_len);
        size_t n = g_all_len + unhex(tails[t].hex, tail + g_all_len, sizeof(tail) - g_all_len);
        buf = dup_exact(tail, n);
        decode(buf, n, SPOP_DEFAULT_FRAME_SIZE, MAX_FRAMES, MAX_ITEMS, &g_d);
        free(buf);
        CHECK(g_d.ret == tails[t].ret && g_d.n == N_FRAME_VECTORS,
              "batch + %s: status %d, %zu frames kept (got %d, %u)", tails[t].what, tails[t].ret,
              N_FRAME_VECTORS, g_d.ret, g_d.n);
    }

    /* item records: the batch stops at the frame that does not fit */
    memcpy(tail, g_vec[0], g_vec_len[0]);             /* hello: 4 items */
    memcpy(tail + g_vec_len[0], g_vec[6], g_vec_len[6]); /* notify: 2 items */
    size_t n = g_vec_len[0] + g_vec_len[6];
    buf = dup_exact(tail, n);
    decode(buf, n, SPOP_DEFAULT_FRAME_SIZE, 8, 5, &g_d);
    CHECK(g_d.ret == 0 && g_d.n == 1, "batch: 5 records for 4+2 items stop after frame 1 (ret %d, n %u)",
          g_d.ret, g_d.n);
    decode(buf, n, SPOP_DEFAULT_FRAME_SIZE, 8, 6, &g_d);
    CHECK(g_d.ret == 0 && g_d.n == 2, "batch: 6 records for 4+2 items decode both");
    decode(buf, n, SPOP_DEFAULT_FRAME_SIZE, 8, 3, &g_d);
    CHECK(g_d.ret == -SPOP_ST_RES && g_d.n == 0, "batch: 3 records for a 4-item first frame give -13");
    free(buf);
}

/* ------------------------------------------------------------ LENGTH limits */

static void expect_decode(const char *what, const char *hex, uint32_t mfs, int ret, uint32_t n)
{
    decode_hex(hex, mfs, 8, 64, &g_d);
    CHECK(g_d.ret == ret && g_d.n == n, "%s: expect status %d, %u frames (got %d, %u) [%s]", what, ret, n,
          g_d.ret, g_d.n, hex);
}

static void test_limits(void)
{
    expect_decode("LENGTH 16381 > 16380, prefix only", "00003ffd", 16380, -SPOP_ST_TOO_BIG, 0);
    expect_decode("LENGTH 16380 == max, prefix only", "00003ffc", 16380, 0, 0);
    expect_decode("LENGTH 2^32-1, prefix only", "ffffffff", 16380, -SPOP_ST_TOO_BIG, 0);
    expect_decode("LENGTH 257 > 256, prefix only", "00000101", 256, -SPOP_ST_TOO_BIG, 0);
    expect_decode("LENGTH 256 == 256, prefix only", "00000100", 256, 0, 0);
    expect_decode("3 bytes of prefix", "00ffff", 16380, 0, 0);
    expect_decode("valid frame then a too-big prefix", "0000000767000000010101 00004000", 16380,
                  -SPOP_ST_TOO_BIG, 1);

    /* LENGTH 0..6 with the whole (short) body present */
    static const char *const body = "67000000010101";
    for (unsigned l = 0; l < SPOP_FRAME_MIN_LEN; l++) {
        char hex[64];
        snprintf(hex, sizeof(hex), "%08x%.*s", l, (int)(2 * l), body);
        char what[32];
        snprintf(what, sizeof(what), "LENGTH %u < 7", l);
        expect_decode(what, hex, 16380, -SPOP_ST_INVALID, 0);
    }

    /* header varints must end inside the frame: invalid, not incomplete */
    expect_decode("sid varint cut by LENGTH", "00000007 03 00000001 f080", 16380, -SPOP_ST_INVALID, 0);
    expect_decode("fid missing", "00000007 03 00000001 f000", 16380, -SPOP_ST_INVALID, 0);
    expect_decode("11-byte sid varint", "00000011 03 00000001 ff80808080808080808000 01", 16380,
                  -SPOP_ST_INVALID, 0);
    decode_hex("00000019 03 00000001 fff0fefefefefefefe0e fff0fefefefefefefe0e", 16380, 8, 64, &g_d);
    CHECK(g_d.ret == 0 && g_d.n == 1 && g_d.f[0].sid == UINT64_MAX && g_d.f[0].fid == UINT64_MAX &&
              g_d.f[0].items_parsed == 1 && g_d.f[0].n_items == 0,
          "sid = fid = 2^64-1 (25-byte header), empty NOTIFY");
}

/* ------------------------------------------------------------ malformed payloads */

#define NOTIFY_HEAD "0000001e 03 00000001 14 01 0f 636865636b2d636c69656e742d6970" /* check-client-ip */

static void test_malformed(void)
{
    /* reserved data types 10..15: length unknown, frame refused */
    for (unsigned t = 10; t <= 15; t++) {
        char hex[160], what[48];
        snprintf(hex, sizeof(hex), NOTIFY_HEAD " 01 00 %02x 7f000001", t);
        snprintf(what, sizeof(what), "NOTIFY arg of reserved type %u", t);
        expect_decode(what, hex, 16380, -SPOP_ST_INVALID, 0);
    }
    expect_decode("HELLO value of reserved type 13",
                  "00000036650000000100000776657273696f6e0803322e300e6d61782d6672616d652d73697a6503fcf0060c"
                  "6361706162696c69746965730d00",
                  16380, -SPOP_ST_INVALID, 0);
    expect_decode("reserved type with high-nibble flags (0x1a)", NOTIFY_HEAD " 01 00 1a 7f000001", 16380,
                  -SPOP_ST_INVALID, 0);

    /* NB-ARGS larger than the args present */
    expect_decode("NB-ARGS 2, one arg", NOTIFY_HEAD " 02 00 06 7f000001", 16380, -SPOP_ST_INVALID, 0);
    expect_decode("NB-ARGS 255, one arg", NOTIFY_HEAD " ff 00 06 7f000001", 16380, -SPOP_ST_INVALID, 0);

    /* lengths running past the frame */
    expect_decode("message name 1 byte too long",
                  "0000001e 03 00000001 14 01 10 636865636b2d636c69656e742d6970 01 00 06 7f000001", 16380,
                  -SPOP_ST_INVALID, 0);
    expect_decode("message name length 2^64-1",
                  "00000018 03 00000001 14 01 fff0fefefefefefefe0e 01 00 06 7f000001", 16380,
                  -SPOP_ST_INVALID, 0);
    expect_decode("IPv4 value cut", "0000001d 03 00000001 14 01 0f 636865636b2d636c69656e742d6970 01 00 06 7f0000",
                  16380, -SPOP_ST_INVALID, 0);
    expect_decode("IPv6 value cut",
                  "00000027 03 00000001 14 01 0f 636865636b2d636c69656e742d6970 01 00 07 20010db8000000000000000000",
                  16380, -SPOP_ST_INVALID, 0);
    expect_decode("INT64 varint cut", "0000001a 03 00000001 14 01 0f 636865636b2d636c69656e742d6970 01 00 04 f0",
                  16380, -SPOP_ST_INVALID, 0);
    expect_decode("STRING longer than the frame",
                  "0000001d 03 00000001 14 01 0f 636865636b2d636c69656e742d6970 01 00 08 05 6162", 16380,
                  -SPOP_ST_INVALID, 0);
    /* one byte short at the very end of the frame: nothing is read there, so
     * only the status can tell (and the next frame's first byte is no help) */
    expect_decode("STRING value 1 byte past the frame end",
                  "0000001d 03 00000001 14 01 0f 636865636b2d636c69656e742d6970 01 00 08 03 6162", 16380,
                  -SPOP_ST_INVALID, 0);
    expect_decode("STRING value 1 byte past the frame end, another frame after",
                  "0000001d 03 00000001 14 01 0f 636865636b2d636c69656e742d6970 01 00 08 03 6162"
                  " 0000000767000000010101",
                  16380, -SPOP_ST_INVALID, 0);
    expect_decode("message name 1 byte past the frame end", "00000009 03 00000001 14 01 02 61", 16380,
                  -SPOP_ST_INVALID, 0);
    expect_decode("HELLO key 1 byte past the frame end", "0000000a 65 00000001 00 00 03 7665", 16380,
                  -SPOP_ST_INVALID, 0);
    expect_decode("ACK variable name 1 byte past the frame end",
                  "00000013 67 00000001 14 01 02 02 01 09 69705f73636f7265", 16380, -SPOP_ST_INVALID, 0);
    expect_decode("arg name cut", "00000019 03 00000001 14 01 0f 636865636b2d636c69656e742d6970 01 03",
                  16380, -SPOP_ST_INVALID, 0);
    expect_decode("NB-ARGS missing", "00000017 03 00000001 14 01 0f 636865636b2d636c69656e742d6970", 16380,
                  -SPOP_ST_INVALID, 0);
    expect_decode("HELLO key without value", "0000000f 65 00000001 00 00 07 76657273696f6e", 16380,
                  -SPOP_ST_INVALID, 0);
    expect_decode("ACK action cut", "0000000a 67 00000001 01 01 01 03 01", 16380, -SPOP_ST_INVALID, 0);
    expect_decode("ACK set-var without value", "00000013 67 00000001 14 01 01 03 01 08 69705f73636f7265",
                  16380, -SPOP_ST_INVALID, 0);
    expect_decode("ACK set-var with NB-ARGS 4", "00000015 67 00000001 14 01 01 04 01 08 69705f73636f7265 032a",
                  16380, -SPOP_ST_INVALID, 0);
    expect_decode("ACK unknown action 3", "00000015 67 00000001 14 01 03 03 01 08 69705f73636f7265 032a",
                  16380, -SPOP_ST_INVALID, 0);
    expect_decode("ACK scope 5", "00000015 67 00000001 14 01 01 03 05 08 69705f73636f7265 032a", 16380,
                  -SPOP_ST_INVALID, 0);

    /* a bad frame after a good one: the good one is kept */
    expect_decode("empty ACK then NB-ARGS mismatch", "0000000767000000010101 " NOTIFY_HEAD " 02 00 06 7f000001",
                  16380, -SPOP_ST_INVALID, 1);
}

/* ------------------------------------------------------------ skippable frames */

static void expect_raw(const char *what, const char *hex, uint8_t type, uint32_t flags,
                       uint32_t payload_off, uint32_t payload_len)
{
    decode_hex(hex, 16380, 8, 64, &g_d);
    const spop_frame *f = &g_d.f[0];
    CHECK(g_d.ret == 0 && g_d.n >= 1 && f->type == type && f->flags == flags && f->items_parsed == 0 &&
              f->n_items == 0 && f->payload_off == payload_off && f->payload_len == payload_len,
          "%s: kept unparsed (got ret %d n %u type %u flags %u parsed %u items %u payload %u+%u)", what,
          g_d.ret, g_d.n, f->type, f->flags, f->items_parsed, f->n_items, f->payload_off, f->payload_len);
}

static void test_skippable(void)
{
    expect_raw("unknown type 50", "00000007 32 00000001 01 01", 50, 1, 11, 0);
    expect_raw("unknown type 50 with payload", "0000000b 32 00000001 01 01 0f ffffff", 50, 1, 11, 4);
    expect_decode("unknown type then empty ACK", "0000000b 32 00000001 01 01 0f ffffff 0000000767000000010101",
                  16380, 0, 2);
    expect_raw("NOTIFY without FIN", "0000001e 03 00000000 14 01 0f 636865636b2d636c69656e742d6970 01 00 06 7f000001",
               3, 0, 11, 23);
    expect_raw("NOTIFY without FIN, unparseable payload", "0000000a 03 00000000 14 01 0a0b0c", 3, 0, 11, 3);
    expect_raw("NOTIFY FIN|ABORT", "0000001e 03 00000003 14 01 0f 636865636b2d636c69656e742d6970 01 00 06 7f000001",
               3, 3, 11, 23);
    expect_raw("NOTIFY ABORT only", "0000000a 03 00000002 14 01 0a0b0c", 3, 2, 11, 3);
    expect_raw("UNSET with FIN, payload", "0000000a 00 00000001 14 01 0a0b0c", 0, 1, 11, 3);
    expect_raw("ACK without FIN", "0000000a 67 00000000 01 01 030303", 103, 0, 11, 3);

    /* reserved flag bits are kept and ignored */
    decode_hex("0000001e 03 80000001 14 01 0f 636865636b2d636c69656e742d6970 01 00 06 7f000001", 16380, 8, 64,
               &g_d);
    CHECK(g_d.ret == 0 && g_d.n == 1 && g_d.f[0].flags == 0x80000001u && g_d.f[0].items_parsed == 1 &&
              g_d.f[0].n_items == 2,
          "NOTIFY with reserved flag bits + FIN is parsed");
    /* HAProxy 3.1.0-3.3-dev6 sent NOTIFY with no message: parsed, zero items */
    decode_hex("00000007 03 00000001 01 01", 16380, 8, 64, &g_d);
    CHECK(g_d.ret == 0 && g_d.n == 1 && g_d.f[0].items_parsed == 1 && g_d.f[0].n_items == 0,
          "empty NOTIFY with FIN is parsed, 0 items");
    /* unparsed frames need no item record */
    decode_hex("0000000b 32 00000001 01 01 0f ffffff", 16380, 8, 0, &g_d);
    CHECK(g_d.ret == 0 && g_d.n == 1, "unknown type decodes with max_items 0");
    decode_hex("0000000767000000010101", 16380, 8, 0, &g_d);
    CHECK(g_d.ret == 0 && g_d.n == 1, "empty ACK decodes with max_items 0");
    /* a STRING type byte with stray high-nibble flags is still a string */
    decode_hex("0000001b 03 00000001 14 01 0f 636865636b2d636c69656e742d6970 01 00 28 00", 16380, 8, 64, &g_d);
    CHECK(g_d.ret == 0 && g_d.n == 1 && g_d.f[0].n_items == 2 && g_d.it[1].type == SPOP_DATA_STRING &&
              g_d.it[1].val_len == 0,
          "STRING type byte 0x28 (stray flag) decodes as STRING");
}

/* ------------------------------------------------------------ encoder */

typedef struct {
    uint8_t s[8192];
    uint32_t slen;
    spop_item it[256];
    uint32_t n;
} builder;

static builder g_b;

static uint32_t bstr(builder *b, const char *p, uint32_t len)
{
    uint32_t off = b->slen;
    if (len)
        memcpy(b->s + off, p, len);
    b->slen += len;
    return off;
}

static spop_item *badd(builder *b, uint8_t kind, uint8_t type, const char *name, uint32_t name_len,
                       const char *val, uint32_t val_len, uint64_t num)
{
    spop_item *it = &b->it[b->n++];
    memset(it, 0, sizeof(*it));
    it->kind = kind;
    it->type = type;
    it->name_off = bstr(b, name, name_len);
    it->name_len = name_len;
    if (val) {
        it->val_off = bstr(b, val, val_len);
        it->val_len = val_len;
    }
    it->num = num;
    return it;
}

/* Records for a vector, appended to b. */
static void build_frame(builder *b, const exp_frame *e, spop_frame *f)
{
    memset(f, 0, sizeof(*f));
    f->type = e->type;
    f->flags = e->flags;
    f->sid = e->sid;
    f->fid = e->fid;
    f->first_item = b->n;
    f->n_items = e->n_items;
    for (uint32_t i = 0; i < e->n_items; i++) {
        const exp_item *x = &e->items[i];
        spop_item *it = badd(b, x->kind, x->type, x->name, x->name_len, x->val, x->val_len, x->num);
        it->nargs = x->nargs;
        it->action = x->action;
        it->scope = x->scope;
    }
}

static int encode(uint8_t *out, size_t cap, uint32_t mfs, spop_frame *frames, uint32_t n_frames,
                  const builder *b)
{
    uint8_t *strings = dup_exact(b->s, b->slen);
    int ret = spop_encode_frames(out, cap, mfs, frames, n_frames, b->it, b->n, strings, b->slen);
    free(strings);
    return ret;
}

static void test_encode_vectors(void)
{
    static spop_frame frames[N_FRAME_VECTORS];

    for (size_t k = 0; k < N_FRAME_VECTORS; k++) {
        const exp_frame *e = &FRAME_VECTORS[k];
        size_t len = g_vec_len[k];
        spop_frame f;
        g_b.slen = g_b.n = 0;
        build_frame(&g_b, e, &f);
        uint8_t *out = xmalloc(len); /* exact size: a 1-byte overrun is caught */
        EQ(encode(out, len, SPOP_DEFAULT_FRAME_SIZE, &f, 1, &g_b), 1, "encode [%s]: one frame", e->name);
        CHECK(memcmp(out, g_vec[k], len) == 0, "encode [%s]: bytes equal the vector", e->name);
        EQ(f.offset, 0, "encode [%s]: offset", e->name);
        EQ(f.length, len - 4, "encode [%s]: length", e->name);
        EQ(f.n_items, e->n_items, "encode [%s]: n_items unchanged", e->name);

        /* decode, then encode the decoded records with the input as strings */
        uint8_t *in = dup_exact(g_vec[k], len);
        decode(in, len, SPOP_DEFAULT_FRAME_SIZE, 1, MAX_ITEMS, &g_d);
        memset(out, 0, len);
        int ret = spop_encode_frames(out, len, SPOP_DEFAULT_FRAME_SIZE, g_d.f, 1, g_d.it, MAX_ITEMS, in, len);
        CHECK(ret == 1 && memcmp(out, g_vec[k], len) == 0, "round trip [%s]: decode then encode is identity",
              e->name);
        free(in);
        free(out);
    }

    /* all vectors in one call */
    g_b.slen = g_b.n = 0;
    for (size_t k = 0; k < N_FRAME_VECTORS; k++)
        build_frame(&g_b, &FRAME_VECTORS[k], &frames[k]);
    uint8_t *out = xmalloc(g_all_len);
    EQ(encode(out, g_all_len, SPOP_DEFAULT_FRAME_SIZE, frames, N_FRAME_VECTORS, &g_b), N_FRAME_VECTORS,
       "encode batch: every vector written");
    CHECK(memcmp(out, g_all, g_all_len) == 0, "encode batch: bytes equal the vectors back to back");
    int offs_ok = 1;
    for (size_t k = 0, off = 0; k < N_FRAME_VECTORS; off += g_vec_len[k], k++)
        offs_ok &= frames[k].offset == off && frames[k].length == g_vec_len[k] - 4;
    CHECK(offs_ok, "encode batch: offsets and lengths");
    free(out);

    /* no strings at all: NULL strings buffer and items array */
    spop_frame f = {.type = SPOP_FRAME_ACK, .flags = SPOP_FLAG_FIN, .sid = 1, .fid = 1};
    uint8_t small[11];
    int ret = spop_encode_frames(small, sizeof(small), 256, &f, 1, NULL, 0, NULL, 0);
    CHECK(ret == 1 && memcmp(small, "\x00\x00\x00\x07\x67\x00\x00\x00\x01\x01\x01", 11) == 0,
          "encode empty ACK with NULL items and strings");
    spop_frame u = {.type = SPOP_FRAME_UNSET, .flags = 3, .sid = 20, .fid = 1};
    ret = spop_encode_frames(small, sizeof(small), 256, &u, 1, NULL, 0, NULL, 0);
    CHECK(ret == 1 && memcmp(small, "\x00\x00\x00\x07\x00\x00\x00\x00\x03\x14\x01", 11) == 0,
          "encode empty raw UNSET with NULL strings");

    /* n_items == 0: the payload is copied from strings, whatever the type */
    static const uint8_t actions[] = "xx\x01\x03\x01\x08ip_score\x03\x2a"; /* 2 bytes of slack */
    uint8_t *strings = dup_exact(actions, sizeof(actions) - 1);
    spop_frame raw = {.type = SPOP_FRAME_ACK, .flags = SPOP_FLAG_FIN, .sid = 20, .fid = 1,
                      .payload_off = 2, .payload_len = 14};
    out = xmalloc(g_vec_len[10]);
    ret = spop_encode_frames(out, g_vec_len[10], 256, &raw, 1, NULL, 0, strings, sizeof(actions) - 1);
    CHECK(ret == 1 && raw.length == 21 && memcmp(out, g_vec[10], g_vec_len[10]) == 0,
          "encode a pre-encoded action list as a raw ACK payload (got %d)", ret);
    free(out);
    out = xmalloc(64);
    ret = spop_encode_frames(out, 64, 20, &raw, 1, NULL, 0, strings, sizeof(actions) - 1);
    EQ(ret, -SPOP_ST_TOO_BIG, "a raw payload over max_frame_size (21 > 20)");
    raw.payload_len = 15;
    ret = spop_encode_frames(out, 64, 256, &raw, 1, NULL, 0, strings, sizeof(actions) - 1);
    EQ(ret, -SPOP_ST_INVALID, "a raw payload 1 byte past the strings");
    free(out);
    free(strings);

    /* frames the decoder leaves unparsed re-encode byte for byte */
    static const char *const unparsed[] = {
        "0000000b 32 00000001 01 01 0f ffffff",
        "0000001e 03 00000000 14 01 0f 636865636b2d636c69656e742d6970 01 00 06 7f000001",
        "0000000a 03 00000003 14 01 0a0b0c",
        "0000000a 00 00000000 14 01 0a0b0c",
        "0000000a 67 00000000 01 01 030303",
    };
    for (size_t k = 0; k < sizeof(unparsed) / sizeof(unparsed[0]); k++) {
        uint8_t tmp[64];
        size_t n = unhex(unparsed[k], tmp, sizeof(tmp));
        uint8_t *in = dup_exact(tmp, n);
        decode(in, n, SPOP_DEFAULT_FRAME_SIZE, 1, MAX_ITEMS, &g_d);
        out = xmalloc(n);
        ret = spop_encode_frames(out, n, SPOP_DEFAULT_FRAME_SIZE, g_d.f, 1, g_d.it, 0, in, n);
        CHECK(g_d.ret == 0 && g_d.n == 1 && ret == 1 && memcmp(out, in, n) == 0,
              "round trip of unparsed frame %s", unparsed[k]);
        free(out);
        free(in);
    }
}

/* Three empty ACKs, 11 bytes each, into exact-size buffers of various caps. */
static void test_encode_cap(void)
{
    static const uint8_t want[33] = {0, 0, 0, 7, 0x67, 0, 0, 0, 1, 1, 1, 0, 0, 0, 7, 0x67, 0, 0,
                                     0, 1, 2, 1, 0, 0, 0, 7, 0x67, 0, 0, 0, 1, 3, 1};
    static const struct {
        size_t cap;
        int frames;
    } cases[] = {{33, 3}, {40, 3}, {32, 2}, {22, 2}, {21, 1}, {11, 1}, {10, 0}, {4, 0}, {3, 0}, {0, 0}};
    for (size_t c = 0; c < sizeof(cases) / sizeof(cases[0]); c++) {
        spop_frame f[3];
        for (int k = 0; k < 3; k++)
            f[k] = (spop_frame){.type = SPOP_FRAME_ACK, .flags = SPOP_FLAG_FIN, .sid = (uint64_t)k + 1, .fid = 1};
        uint8_t *out = cases[c].cap ? xmalloc(cases[c].cap) : guard_place(NULL, 0);
        g_b.slen = g_b.n = 0;
        int ret = encode(out, cases[c].cap, 256, f, 3, &g_b);
        size_t used = (size_t)(ret > 0 ? ret : 0) * 11;
        CHECK(ret == cases[c].frames && memcmp(out, want, used) == 0 &&
                  (ret < 2 || (f[1].offset == 11 && f[1].length == 7)),
              "encode 3 empty ACKs with cap %zu: %d frames (got %d)", cases[c].cap, cases[c].frames, ret);
        if (cases[c].cap)
            free(out);
    }

    /* a frame that does not fit `cap` is not truncated: it waits */
    spop_frame f = {.type = SPOP_FRAME_ACK, .flags = SPOP_FLAG_FIN, .sid = 1, .fid = 1};
    g_b.slen = g_b.n = 0;
    f.first_item = 0;
    for (int k = 0; k < 3; k++) {
        spop_item *it = badd(&g_b, SPOP_ITEM_ACTION, SPOP_DATA_UINT32, B("ip_score"), NOVAL, 42);
        it->action = SPOP_ACTION_SET_VAR;
        it->scope = SPOP_SCOPE_SESS;
        it->nargs = 3;
    }
    f.n_items = 3;
    uint8_t *out = xmalloc(40);
    int ret = encode(out, 40, SPOP_DEFAULT_FRAME_SIZE, &f, 1, &g_b);
    CHECK(ret == 0 && f.n_items == 3, "encode 3 set-var (53 bytes) with cap 40: nothing written, n_items kept (got %d, %u)",
          ret, f.n_items);
    free(out);
    out = xmalloc(53);
    ret = encode(out, 53, SPOP_DEFAULT_FRAME_SIZE, &f, 1, &g_b);
    CHECK(ret == 1 && f.n_items == 3 && f.length == 49, "encode 3 set-var with cap 53: whole frame");
    free(out);
}

/* An ACK of n set-var(sess.ip_score = 42) actions, 14 bytes each. */
static void build_ack(builder *b, spop_frame *f, uint32_t n)
{
    b->slen = b->n = 0;
    *f = (spop_frame){.type = SPOP_FRAME_ACK, .flags = SPOP_FLAG_FIN, .sid = 1, .fid = 1};
    for (uint32_t k = 0; k < n; k++) {
        spop_item *it = badd(b, SPOP_ITEM_ACTION, SPOP_DATA_UINT32, B("ip_score"), NOVAL, 42);
        it->action = SPOP_ACTION_SET_VAR;
        it->scope = SPOP_SCOPE_SESS;
        it->nargs = 3;
    }
    f->n_items = n;
}

static void test_encode_truncate(void)
{
    spop_frame f;
    static uint8_t out[1024];

    static const struct {
        uint32_t mfs, keep;
    } cases[] = {{256, 17}, {7, 0}, {20, 0}, {21, 1}, {16380, 30}};
    for (size_t c = 0; c < sizeof(cases) / sizeof(cases[0]); c++) {
        build_ack(&g_b, &f, 30);
        int ret = encode(out, sizeof(out), cases[c].mfs, &f, 1, &g_b);
        CHECK(ret == 1 && f.n_items == cases[c].keep && f.length == 7 + 14 * cases[c].keep,
              "ACK of 30 actions, max_frame_size %u: keeps %u (got ret %d, n_items %u, length %u)",
              cases[c].mfs, cases[c].keep, ret, f.n_items, f.length);
        /* what was written decodes to exactly the kept actions */
        decode(out, f.length + 4, cases[c].mfs, 1, MAX_ITEMS, &g_d);
        int ok = g_d.ret == 0 && g_d.n == 1 && g_d.f[0].n_items == cases[c].keep;
        for (uint32_t k = 0; ok && k < cases[c].keep; k++)
            ok = g_d.it[k].action == SPOP_ACTION_SET_VAR && g_d.it[k].num == 42 && g_d.it[k].name_len == 8;
        CHECK(ok, "ACK of 30 actions, max_frame_size %u: output decodes to %u actions", cases[c].mfs,
              cases[c].keep);
    }

    /* the cap is big enough for the truncated frame, but below max_frame_size + 4 */
    build_ack(&g_b, &f, 30);
    uint8_t *small = xmalloc(250);
    int ret = encode(small, 250, 256, &f, 1, &g_b);
    CHECK(ret == 1 && f.n_items == 17 && f.length == 245,
          "ACK of 30 actions, max_frame_size 256, cap 250: the 249-byte truncated frame is written "
          "(got ret %d, n_items %u)",
          ret, f.n_items);
    free(small);

    build_ack(&g_b, &f, 30);
    EQ(encode(out, sizeof(out), 6, &f, 1, &g_b), -SPOP_ST_BAD_FRAME_SIZE, "encode with max_frame_size 6");
    EQ(encode(out, sizeof(out), 0, &f, 1, &g_b), -SPOP_ST_BAD_FRAME_SIZE, "encode with max_frame_size 0");

    /* a MESSAGE and its args are kept or dropped as one; only a prefix is kept */
    const exp_frame *two = &FRAME_VECTORS[9]; /* notify two messages: 120 + 23 payload bytes */
    static const struct {
        uint32_t mfs, keep, length;
    } msgs[] = {{150, 15, 150}, {149, 13, 127}, {127, 13, 127}, {126, 0, 7}};
    for (size_t c = 0; c < sizeof(msgs) / sizeof(msgs[0]); c++) {
        g_b.slen = g_b.n = 0;
        build_frame(&g_b, two, &f);
        int r = encode(out, sizeof(out), msgs[c].mfs, &f, 1, &g_b);
        CHECK(r == 1 && f.n_items == msgs[c].keep && f.length == msgs[c].length &&
                  memcmp(out + 4, g_vec[9] + 4, 7 + (msgs[c].keep ? 120 : 0)) == 0,
              "NOTIFY of 2 messages, max_frame_size %u: keeps %u records, length %u (got %d, %u, %u)",
              msgs[c].mfs, msgs[c].keep, msgs[c].length, r, f.n_items, f.length);
    }
}

/* Records the encoder must refuse with -SPOP_ST_INVALID. */
static void test_encode_bad(void)
{
    static uint8_t out[1024];
    spop_frame f;
    spop_item *it;

    /* start from a valid one-set-var ACK (checked first), then break one thing */
#define BAD_CASE(what, type_, setup)                                                      \
    do {                                                                                  \
        build_ack(&g_b, &f, 1);                                                           \
        f.type = (type_);                                                                 \
        it = &g_b.it[0];                                                                  \
        (void)it;                                                                         \
        setup;                                                                            \
        int r_ = encode(out, sizeof(out), SPOP_DEFAULT_FRAME_SIZE, &f, 1, &g_b);          \
        CHECK(r_ == -SPOP_ST_INVALID, "encode refuses %s (got %d)", what, r_);           \
    } while (0)

    build_ack(&g_b, &f, 1);
    EQ(encode(out, sizeof(out), SPOP_DEFAULT_FRAME_SIZE, &f, 1, &g_b), 1, "encode bad: the base case is valid");

    BAD_CASE("an unknown item kind", SPOP_FRAME_ACK, it->kind = 9);
    BAD_CASE("item kind 0", SPOP_FRAME_ACK, it->kind = 0);
    BAD_CASE("data type 10", SPOP_FRAME_ACK, it->type = 10);
    BAD_CASE("data type 15", SPOP_FRAME_ACK, it->type = 15);
    BAD_CASE("scope 5", SPOP_FRAME_ACK, it->scope = 5);
    BAD_CASE("action 3", SPOP_FRAME_ACK, it->action = 3);
    BAD_CASE("action 0", SPOP_FRAME_ACK, it->action = 0);
    BAD_CASE("a name past the strings", SPOP_FRAME_ACK, it->name_off = g_b.slen - 2);
    BAD_CASE("a name offset that wraps", SPOP_FRAME_ACK, (it->name_off = UINT32_MAX, it->name_len = 2));
    BAD_CASE("a STRING value past the strings", SPOP_FRAME_ACK,
             (it->type = SPOP_DATA_STRING, it->val_off = 0, it->val_len = g_b.slen + 1));
    BAD_CASE("an IPv4 of 3 bytes", SPOP_FRAME_ACK, (it->type = SPOP_DATA_IPV4, it->val_off = 0, it->val_len = 3));
    BAD_CASE("an IPv6 of 8 bytes", SPOP_FRAME_ACK, (it->type = SPOP_DATA_IPV6, it->val_off = 0, it->val_len = 8));
    BAD_CASE("an IPv4 past the strings", SPOP_FRAME_ACK,
             (it->type = SPOP_DATA_IPV4, it->val_off = g_b.slen - 3, it->val_len = 4));
    BAD_CASE("an ACTION in an AGENT-HELLO", SPOP_FRAME_AGENT_HELLO, (void)0);
    BAD_CASE("an ACTION in a NOTIFY", SPOP_FRAME_NOTIFY, (void)0);
    BAD_CASE("a KV in an ACK", SPOP_FRAME_ACK, it->kind = SPOP_ITEM_KV);
    BAD_CASE("a KV in a NOTIFY", SPOP_FRAME_NOTIFY, it->kind = SPOP_ITEM_KV);
    BAD_CASE("a MESSAGE in an ACK", SPOP_FRAME_ACK, (it->kind = SPOP_ITEM_MESSAGE, it->nargs = 0));
    BAD_CASE("an ARG without its MESSAGE", SPOP_FRAME_NOTIFY, it->kind = SPOP_ITEM_ARG);
    BAD_CASE("a MESSAGE with more args than records", SPOP_FRAME_NOTIFY,
             (it->kind = SPOP_ITEM_MESSAGE, it->nargs = 1));
    BAD_CASE("a MESSAGE followed by a KV, not an ARG", SPOP_FRAME_NOTIFY,
             (it->kind = SPOP_ITEM_MESSAGE, it->nargs = 1,
              badd(&g_b, SPOP_ITEM_KV, SPOP_DATA_NULL, B("x"), NOVAL, 0), f.n_items = 2));
    BAD_CASE("an ARG with a bad type", SPOP_FRAME_NOTIFY,
             (it->kind = SPOP_ITEM_MESSAGE, it->nargs = 1,
              badd(&g_b, SPOP_ITEM_ARG, 12, B("x"), NOVAL, 0), f.n_items = 2));
    BAD_CASE("first_item + n_items past the items", SPOP_FRAME_ACK, f.n_items = 2);
    BAD_CASE("first_item past the items", SPOP_FRAME_ACK, (f.first_item = 5, f.n_items = 0));
    BAD_CASE("a raw frame with items", SPOP_FRAME_UNSET, (void)0);
    BAD_CASE("a raw payload past the strings", SPOP_FRAME_UNSET,
             (f.n_items = 0, f.payload_off = 0, f.payload_len = g_b.slen + 1));
#undef BAD_CASE
}

static void test_status_reason(void)
{
    static const struct {
        int code;
        const char *text;
    } reasons[] = {
        {0, "normal"},
        {1, "I/O error"},
        {2, "a timeout occurred"},
        {3, "frame is too big"},
        {4, "invalid frame received"},
        {5, "version value not found"},
        {6, "max-frame-size value not found"},
        {7, "capabilities value not found"},
        {8, "unsupported version"},
        {9, "max-frame-size too big or too small"},
        {10, "fragmentation not supported"},
        {11, "invalid interlaced frames"},
        {12, "frame-id not found"},
        {13, "resource allocation error"},
        {99, "an unknown error occurred"},
    };
    for (size_t k = 0; k < sizeof(reasons) / sizeof(reasons[0]); k++) {
        const char *got = spop_status_reason(reasons[k].code);
        CHECK(got && strcmp(got, reasons[k].text) == 0, "status %d reason '%s' (got '%s')", reasons[k].code,
              reasons[k].text, got ? got : "(null)");
    }
    static const int unknown[] = {14, 42, 98, 100, -1, -4};
    for (size_t k = 0; k < sizeof(unknown) / sizeof(unknown[0]); k++) {
        const char *got = spop_status_reason(unknown[k]);
        CHECK(got && *got, "status %d has some reason text", unknown[k]);
    }
}

/* spop_encode_acks: the ACK vectors byte for byte, back to back, and its errors. */
static void test_encode_acks(void)
{
    /* "ack set-var sess ip_score uint32 42" (sid 20) then "ack empty" (sid 1) */
    uint8_t want[64];
    size_t w1 = unhex("00000015670000000114010103010869705f73636f7265032a", want, sizeof(want));
    size_t w2 = unhex("0000000767000000010101", want + w1, sizeof(want) - w1);
    uint8_t action[16];
    size_t alen = unhex("010301" "0869705f73636f7265" "032a", action, sizeof(action));
    uint64_t ids[4] = {20, 1, 1, 1};
    uint32_t ends[2] = {(uint32_t)alen, (uint32_t)alen};
    uint8_t *out = xmalloc(w1 + w2);
    int n = spop_encode_acks(out, w1 + w2, 16380, ids, ends, 2, action, alen);
    EQ(n, w1 + w2, "encode_acks: bytes written");
    CHECK(n > 0 && memcmp(out, want, w1 + w2) == 0, "encode_acks: vectors byte for byte");
    /* one byte short of the room the frames need: refused, not truncated */
    EQ(spop_encode_acks(out, w1 + w2 - 1, 16380, ids, ends, 2, action, alen), -SPOP_ST_RES,
       "encode_acks: short cap");
    /* an ACK over max-frame-size (body 21 bytes) */
    EQ(spop_encode_acks(out, w1 + w2, 20, ids, ends, 1, action, alen), -SPOP_ST_TOO_BIG,
       "encode_acks: frame too big");
    /* ends not increasing, or past the payload */
    uint32_t back[2] = {(uint32_t)alen, 3};
    EQ(spop_encode_acks(out, w1 + w2, 16380, ids, back, 2, action, alen), -SPOP_ST_INVALID,
       "encode_acks: decreasing ends");
    uint32_t past[1] = {(uint32_t)alen + 1};
    EQ(spop_encode_acks(out, w1 + w2, 16380, ids, past, 1, action, alen), -SPOP_ST_INVALID,
       "encode_acks: end past payload");
    EQ(spop_encode_acks(out, w1 + w2, 16380, ids, ends, 0, action, alen), 0,
       "encode_acks: nothing to do");
    /* the largest ids: 10-byte varints, decoded back */
    uint64_t big[2] = {UINT64_MAX, UINT64_MAX};
    uint32_t none[1] = {0};
    uint8_t frame[32];
    int len = spop_encode_acks(frame, sizeof(frame), 16380, big, none, 1, action, 0);
    EQ(len, 4 + 5 + 10 + 10, "encode_acks: 10-byte ids");
    spop_frame f[1];
    spop_item it[1];
    uint32_t nf = 0;
    int rc = len > 0 ? spop_decode_frames(frame, (size_t)len, 16380, f, 1, it, 1, &nf) : -1;
    CHECK(rc == 0 && nf == 1 && f[0].sid == UINT64_MAX && f[0].fid == UINT64_MAX &&
              f[0].type == SPOP_FRAME_ACK && f[0].n_items == 0,
          "encode_acks: decodes back");
    free(out);
}

/* ------------------------------------------------------------ decode + index (spop_decode_batch) */

/* One frame of a batch and what spop_decode_batch must say about it. */
typedef struct {
    const char *what;
    const char *hex;
    uint64_t sid, fid;
    uint32_t n_items; /* records the frame takes */
    uint32_t idx;     /* cols[k] with BATCH_NAMES; SPOP_INDEX_OTHER for non-plain frames */
    uint32_t nargs;   /* plain frames: argument count */
    const char *msg;  /* plain frames: the message name */
} batch_frame;

/* The handler names of most batch checks, as the caller packs them. */
#define BATCH_NAMES_HEX "0f 636865636b2d636c69656e742d6970 02 6970 01 61" /* check-client-ip, ip, a */
#define BATCH_N_NAMES 3u
#define OTHER SPOP_INDEX_OTHER

/* one-message NOTIFYs, the plain frames */
static const batch_frame BF_CCI = {"notify check-client-ip sid 20",
                                   "0000001e 03 00000001 14 01 0f 636865636b2d636c69656e742d6970 01 00 06 7f000001",
                                   20, 1, 2, 0, 1, "check-client-ip"};
static const batch_frame BF_IP = {"notify ip, 2 args", "00000014 03 00000001 05 02 02 6970 02 00 03 2a 01 78 08 02 6869",
                                  5, 2, 3, 1, 2, "ip"};
static const batch_frame BF_ZZ = {"notify zz (unlisted), 0 args", "0000000b 03 00000001 07 03 02 7a7a 00", 7, 3, 1,
                                  BATCH_N_NAMES, 0, "zz"};
static const batch_frame BF_BIG = {"notify a, sid = fid = 2^64-1",
                                   "0000001c 03 00000001 fff0fefefefefefefe0e fff0fefefefefefefe0e 01 61 00",
                                   UINT64_MAX, UINT64_MAX, 1, 2, 0, "a"};
static const batch_frame BF_V6 = {"notify check-client-ip ipv6 named arg, sid 300",
                                  "0000002d0300000001fc03010f636865636b2d636c69656e742d6970010269700720010db8000000000000000000000001",
                                  300, 1, 2, 0, 1, "check-client-ip"};
/* everything else: OTHER, ids still filled */
static const batch_frame BF_HELLO = {"haproxy-hello",
                                     "000000810100000001000012737570706f727465642d76657273696f6e730803322e300e6d61782d6672616d652d73697a6503fcf0060c6361706162696c69746965730810706970656c696e696e672c6173796e6309656e67696e652d6964082462393138633366632d373566312d346665322d613566662d333438393063663930626238",
                                     0, 0, 4, OTHER, 0, NULL};
static const batch_frame BF_TWO = {"notify two messages",
                                   "000000960300000001070209616c6c2d74797065730c016e000174110166010369333202fbf0fefefefefefefe0e0375333203fff0fefe7e0369363404f0f1fefefefefefefe060375363405fff0fefefefefefefe0e027634060a01020302763607000000000000000000000000000000010173080368c3a9016508000162090200ff0f636865636b2d636c69656e742d69700100067f000001",
                                   7, 2, 15, OTHER, 0, NULL};
static const batch_frame BF_TWO_EMPTY = {"notify two 0-arg messages (a, b)", "0000000d 03 00000001 0f 01 01 61 00 01 62 00",
                                         15, 1, 2, OTHER, 0, NULL};
static const batch_frame BF_EMPTY = {"notify without message", "00000007 03 00000001 09 01", 9, 1, 0, OTHER, 0, NULL};
static const batch_frame BF_FRAG = {"notify fragment (no FIN)", "0000000a 03 00000000 0b 01 0a0b0c", 11, 1, 0, OTHER, 0,
                                    NULL};
static const batch_frame BF_ABORT = {"notify FIN|ABORT",
                                     "0000001e 03 00000003 14 01 0f 636865636b2d636c69656e742d6970 01 00 06 7f000001",
                                     20, 1, 0, OTHER, 0, NULL};
static const batch_frame BF_UNKNOWN = {"unknown type 50", "0000000b 32 00000001 0d 02 0f ffffff", 13, 2, 0, OTHER, 0,
                                       NULL};
static const batch_frame BF_DISC = {"haproxy-disconnect",
                                    "00000025020000000100000b7374617475732d636f64650300076d65737361676508066e6f726d616c",
                                    0, 0, 2, OTHER, 0, NULL};
static const batch_frame BF_ACK = {"ack set-var", "00000015670000000114010103010869705f73636f7265032a", 20, 1, 1, OTHER, 0,
                                   NULL};
static const batch_frame BF_UNSET = {"unset fin+abort", "0000000700000000031401", 20, 1, 0, OTHER, 0, NULL};

static const batch_frame *const BATCH_PLAIN[] = {&BF_CCI, &BF_IP, &BF_ZZ, &BF_BIG, &BF_V6};
static const batch_frame *const BATCH_MIXED[] = {&BF_HELLO, &BF_CCI,   &BF_TWO,  &BF_EMPTY, &BF_FRAG,
                                                 &BF_UNKNOWN, &BF_IP,  &BF_DISC, &BF_ABORT, &BF_ACK,
                                                 &BF_UNSET, &BF_TWO_EMPTY, &BF_ZZ, &BF_BIG};
#define N_PLAIN (sizeof(BATCH_PLAIN) / sizeof(BATCH_PLAIN[0]))
#define N_MIXED (sizeof(BATCH_MIXED) / sizeof(BATCH_MIXED[0]))

/* The record arrays of the last batch call, on the heap and sized exactly to
 * the capacities it was given: a write past them is an ASan report. */
static spop_frame *g_bf;
static spop_item *g_bi;
static uint64_t *g_bout;
static uint8_t g_names[64];
static size_t g_names_len;

/* spop_decode_batch's flat result, unpacked into the fields the checks read
 * (cols: name indexes, first records, argument counts, n each). */
typedef struct {
    spop_batch c;
    spop_frame *frames;
    spop_item *items;
    uint32_t n_frames, n_plain, n_items, consumed, status;
    uint64_t ids[2 * MAX_FRAMES];
    uint32_t cols[3 * MAX_FRAMES];
} hbatch;

static void *poisoned(size_t size)
{
    void *p = malloc(size ? size : 1);
    if (!p)
        abort();
    memset(p, 0xA5, size);
    return p;
}

/* Fresh exact-size arrays for max_frames / max_items records. */
static void batch_arrays(hbatch *b, uint32_t max_frames, uint32_t max_items)
{
    free(g_bf);
    free(g_bi);
    free(g_bout);
    g_bf = poisoned(max_frames * sizeof(spop_frame));
    g_bi = poisoned(max_items * sizeof(spop_item));
    g_bout = poisoned(SPOP_BATCH_OUT(max_frames) * sizeof(uint64_t));
    b->c.frames = b->frames = g_bf;
    b->c.items = b->items = g_bi;
    b->c.out = g_bout;
    b->c.max_frames = max_frames;
    b->c.max_items = max_items;
}

/* One spop_decode_batch call on b's arrays; unpacks its result when rc >= 0
 * (the fields stay poisoned otherwise). */
static int batch_run(hbatch *b, const uint8_t *buf, size_t len, size_t start, uint32_t mfs)
{
    memset(&b->n_frames, 0xA5, sizeof(uint32_t) * 5);
    memset(b->ids, 0xA5, sizeof(b->ids));
    memset(b->cols, 0xA5, sizeof(b->cols));
    int rc = spop_decode_batch(buf, len, start, mfs, &b->c);
    if (rc < 0)
        return rc;
    const uint64_t *out = b->c.out;
    uint32_t n = (uint32_t)out[SPOP_OUT_FRAMES];
    b->n_frames = n;
    b->n_plain = (uint32_t)out[SPOP_OUT_PLAIN];
    b->n_items = (uint32_t)out[SPOP_OUT_ITEMS];
    b->consumed = (uint32_t)out[SPOP_OUT_END];
    b->status = (uint32_t)out[SPOP_OUT_STATUS];
    if (n > MAX_FRAMES || n > b->c.max_frames)
        return rc; /* reported by the checks (n_frames) */
    memcpy(b->ids, out + SPOP_OUT_HEAD, 2 * (size_t)n * sizeof(uint64_t));
    for (uint32_t j = 0; j < 3 * n; j++)
        b->cols[j] = (uint32_t)out[SPOP_OUT_HEAD + 2 * (size_t)n + j];
    return rc;
}

/* The frames back to back into out; ends[k] is where frame k ends. */
static size_t build_batch(const batch_frame *const *fr, size_t n, uint8_t *out, size_t cap, size_t *ends)
{
    size_t len = 0;
    for (size_t k = 0; k < n; k++) {
        len += unhex(fr[k]->hex, out + len, cap - len);
        ends[k] = len;
    }
    return len;
}

/* spop_decode_batch on poisoned arrays; the names are read at a page end
 * (a names list over-read faults) unless names is NULL. */
static int batch_decode(const uint8_t *buf, size_t len, uint32_t mfs, const uint8_t *names, uint32_t names_len,
                        uint32_t n_names, uint32_t max_frames, uint32_t max_items, hbatch *b)
{
    memset(b, 0xA5, sizeof(*b));
    batch_arrays(b, max_frames, max_items);
    b->c.names = names ? guard_place(names, names_len) : NULL;
    b->c.names_len = names_len;
    b->c.n_names = n_names;
    return batch_run(b, buf, len, 0, mfs);
}

/* spop_decode_batch of buf placed at a page end (an over-read faults), with
 * the standard names read from `names` (on the heap or in static memory). */
static int batch_at_page_end(hbatch *b, const uint8_t *buf, size_t len, const uint8_t *names)
{
    batch_arrays(b, MAX_FRAMES, MAX_ITEMS);
    b->c.names = names;
    b->c.names_len = (uint32_t)g_names_len;
    b->c.n_names = BATCH_N_NAMES;
    return batch_run(b, guard_place(buf, len), len, 0, SPOP_DEFAULT_FRAME_SIZE);
}

/* With the standard names unless `empty_names` (then every plain frame is 0). */
static uint32_t expected_idx(const batch_frame *e, int empty_names)
{
    return e->idx != OTHER && empty_names ? 0 : e->idx;
}

/* 4 checks: frame k of b against e, its records starting at first_item. */
static void check_batch_frame(const char *ctx, const hbatch *b, uint32_t k, const batch_frame *e,
                              uint32_t first_item, int empty_names, const uint8_t *buf)
{
    uint32_t n = b->n_frames;
    if (n > MAX_FRAMES || k >= n) { /* already reported: keep the count fixed */
        for (int c = 0; c < 4; c++)
            CHECK(0, "%s [%s]: frame %u not decoded (n_frames %u)", ctx, e->what, k, n);
        return;
    }
    CHECK(b->ids[2 * k] == e->sid && b->ids[2 * k + 1] == e->fid, "%s [%s]: ids (got %llu/%llu)", ctx, e->what,
          (unsigned long long)b->ids[2 * k], (unsigned long long)b->ids[2 * k + 1]);
    EQU(b->cols[k], expected_idx(e, empty_names), "%s [%s]: name index", ctx, e->what);
    const spop_frame *f = &b->frames[k];
    if (e->idx == OTHER) {
        CHECK(b->cols[n + k] == 0 && b->cols[2 * n + k] == 0, "%s [%s]: other frame: first 0, nargs 0 (got %u, %u)",
              ctx, e->what, b->cols[n + k], b->cols[2 * n + k]);
        CHECK(f->first_item == first_item && f->n_items == e->n_items, "%s [%s]: frame record (%u items from %u)",
              ctx, e->what, e->n_items, first_item);
        return;
    }
    CHECK(b->cols[n + k] == first_item + 1 && b->cols[2 * n + k] == e->nargs,
          "%s [%s]: first argument %u, %u args (got %u, %u)", ctx, e->what, first_item + 1, e->nargs,
          b->cols[n + k], b->cols[2 * n + k]);
    const spop_item *m = &b->items[first_item];
    size_t mlen = strlen(e->msg);
    int args_ok = 1;
    for (uint32_t a = 1; a <= e->nargs; a++)
        args_ok &= b->items[first_item + a].kind == SPOP_ITEM_ARG;
    CHECK(f->n_items == e->n_items && m->kind == SPOP_ITEM_MESSAGE && m->nargs == e->nargs &&
              m->name_len == mlen && memcmp(buf + m->name_off, e->msg, mlen) == 0 && args_ok,
          "%s [%s]: the columns point at the message's records", ctx, e->what);
}

typedef struct {
    int rc;
    uint32_t n_frames, n_plain, n_items, consumed, status;
} batch_expect;

/* 6 + 4 * n_exp checks: the results of b and its first n_exp frames. */
static void check_batch(const char *ctx, const hbatch *b, int rc, const batch_expect *x,
                        const batch_frame *const *fr, uint32_t n_exp, int empty_names, const uint8_t *buf)
{
    EQ(rc, x->rc, "%s: return value", ctx);
    EQU(b->n_frames, x->n_frames, "%s: n_frames", ctx);
    EQU(b->n_plain, x->n_plain, "%s: n_plain", ctx);
    EQU(b->n_items, x->n_items, "%s: n_items", ctx);
    EQU(b->consumed, x->consumed, "%s: consumed", ctx);
    EQU(b->status, x->status, "%s: status", ctx);
    uint32_t first = 0;
    for (uint32_t k = 0; k < n_exp; k++) {
        check_batch_frame(ctx, b, k, fr[k], first, empty_names, buf);
        first += fr[k]->n_items;
    }
}

/* What a batch of the first n frames of fr must give (no error, no stop). */
static batch_expect whole(const batch_frame *const *fr, uint32_t n, const size_t *ends)
{
    batch_expect x = {(int)n, n, 0, 0, n ? (uint32_t)ends[n - 1] : 0, 0};
    for (uint32_t k = 0; k < n; k++) {
        x.n_plain += fr[k]->idx != OTHER;
        x.n_items += fr[k]->n_items;
    }
    return x;
}

static void test_decode_batch(void)
{
    static uint8_t tmp[4096];
    size_t ends[N_MIXED];
    hbatch b;
    int rc;
    g_names_len = unhex(BATCH_NAMES_HEX, g_names, sizeof(g_names));

    /* several plain NOTIFYs, listed and unlisted names */
    size_t plen = build_batch(BATCH_PLAIN, N_PLAIN, tmp, sizeof(tmp), ends);
    uint8_t *plain = dup_exact(tmp, plen);
    batch_expect xp = whole(BATCH_PLAIN, N_PLAIN, ends);
    CHECK(xp.n_plain == N_PLAIN && xp.n_items == 9, "batch plain: the expectation counts every frame as plain");
    rc = batch_decode(plain, plen, SPOP_DEFAULT_FRAME_SIZE, g_names, (uint32_t)g_names_len, BATCH_N_NAMES,
                      MAX_FRAMES, MAX_ITEMS, &b);
    check_batch("batch plain", &b, rc, &xp, BATCH_PLAIN, N_PLAIN, 0, plain);

    /* the frame and item records are those of spop_decode_frames */
    decode(plain, plen, SPOP_DEFAULT_FRAME_SIZE, MAX_FRAMES, MAX_ITEMS, &g_d);
    CHECK(g_d.ret == 0 && g_d.n == b.n_frames && memcmp(g_d.f, g_bf, N_PLAIN * sizeof(spop_frame)) == 0 &&
              memcmp(g_d.it, g_bi, xp.n_items * sizeof(spop_item)) == 0,
          "batch plain: frame and item records equal spop_decode_frames'");

    /* no names: every plain NOTIFY gets index 0 == n_names */
    rc = batch_decode(plain, plen, SPOP_DEFAULT_FRAME_SIZE, NULL, 0, 0, MAX_FRAMES, MAX_ITEMS, &b);
    check_batch("batch plain, no names", &b, rc, &xp, BATCH_PLAIN, N_PLAIN, 1, plain);

    /* another list: indexes follow it; a prefix of a message name is not that name */
    {
        uint8_t names[32];
        size_t nl = unhex("02 7a7a 0e 636865636b2d636c69656e742d69 02 6970", names, sizeof(names));
        rc = batch_decode(plain, plen, SPOP_DEFAULT_FRAME_SIZE, names, (uint32_t)nl, 3, MAX_FRAMES, MAX_ITEMS, &b);
        CHECK(rc == (int)N_PLAIN && b.n_plain == N_PLAIN && b.cols[0] == 3 && b.cols[1] == 2 && b.cols[2] == 0 &&
                  b.cols[3] == 3 && b.cols[4] == 3,
              "batch plain, names (zz, check-client-i, ip): indexes 3 2 0 3 3 (got %u %u %u %u %u)", b.cols[0],
              b.cols[1], b.cols[2], b.cols[3], b.cols[4]);
        /* a name listed twice: the first one */
        nl = unhex("02 6970 02 6970", names, sizeof(names));
        rc = batch_decode(plain, plen, SPOP_DEFAULT_FRAME_SIZE, names, (uint32_t)nl, 2, MAX_FRAMES, MAX_ITEMS, &b);
        CHECK(rc == (int)N_PLAIN && b.cols[1] == 0 && b.cols[0] == 2,
              "batch plain, names (ip, ip): ip is 0, others 2 (got %u, %u)", b.cols[1], b.cols[0]);
    }

    /* a malformed names list is refused before anything is decoded, even
     * when no frame would look a name up */
    {
        static const struct {
            const char *what, *hex;
            uint32_t n_names;
        } bad[] = {
            {"a name longer than the list", "05 6162", 1},
            {"fewer names than n_names", "02 6970", 2},
            {"a truncated length varint", "f0", 1},
            {"an empty list with n_names 1", "", 1},
            {"bytes after the last name", "02 6970 00", 1},
        };
        for (size_t c = 0; c < sizeof(bad) / sizeof(bad[0]); c++) {
            uint8_t names[16];
            size_t nl = unhex(bad[c].hex, names, sizeof(names));
            rc = batch_decode(plain, plen, SPOP_DEFAULT_FRAME_SIZE, names, (uint32_t)nl, bad[c].n_names,
                              MAX_FRAMES, MAX_ITEMS, &b);
            EQ(rc, -SPOP_ST_INVALID, "batch plain, names list with %s", bad[c].what);
            rc = batch_decode(plain, 0, SPOP_DEFAULT_FRAME_SIZE, names, (uint32_t)nl, bad[c].n_names,
                              MAX_FRAMES, MAX_ITEMS, &b);
            EQ(rc, -SPOP_ST_INVALID, "batch of no frame, names list with %s", bad[c].what);
        }
    }

    /* plain NOTIFYs mixed with everything else */
    size_t mlen = build_batch(BATCH_MIXED, N_MIXED, tmp, sizeof(tmp), ends);
    uint8_t *mixed = dup_exact(tmp, mlen);
    batch_expect xm = whole(BATCH_MIXED, N_MIXED, ends);
    CHECK(xm.n_plain == 4, "batch mixed: 4 plain frames expected");
    rc = batch_decode(mixed, mlen, SPOP_DEFAULT_FRAME_SIZE, g_names, (uint32_t)g_names_len, BATCH_N_NAMES,
                      MAX_FRAMES, MAX_ITEMS, &b);
    check_batch("batch mixed", &b, rc, &xm, BATCH_MIXED, N_MIXED, 0, mixed);
    {
        /* the same batch at a page end (names on the heap): the same results */
        uint32_t cols[3 * N_MIXED];
        memcpy(cols, b.cols, sizeof(cols));
        uint8_t *names_heap = dup_exact(g_names, g_names_len);
        hbatch b2;
        rc = batch_at_page_end(&b2, mixed, mlen, names_heap);
        CHECK(rc == (int)N_MIXED && b2.n_plain == xm.n_plain && b2.n_items == xm.n_items && b2.consumed == mlen &&
                  memcmp(cols, b2.cols, sizeof(cols)) == 0,
              "batch mixed at a page end: same results");
        free(names_heap);
    }
    rc = batch_decode(mixed, mlen, SPOP_DEFAULT_FRAME_SIZE, NULL, 0, 0, MAX_FRAMES, MAX_ITEMS, &b);
    check_batch("batch mixed, no names", &b, rc, &xm, BATCH_MIXED, N_MIXED, 1, mixed);

    /* an incomplete trailing frame: consumed stops before it */
    {
        static uint8_t buf[4096 + 16];
        uint8_t hello[256];
        unhex(BF_HELLO.hex, hello, sizeof(hello));
        memcpy(buf, plain, plen);
        memcpy(buf + plen, hello, 10); /* a HELLO's first 10 bytes */
        uint8_t *in = dup_exact(buf, plen + 10);
        rc = batch_decode(in, plen + 10, SPOP_DEFAULT_FRAME_SIZE, g_names, (uint32_t)g_names_len, BATCH_N_NAMES,
                          MAX_FRAMES, MAX_ITEMS, &b);
        check_batch("batch plain + 10 bytes of a frame", &b, rc, &xp, BATCH_PLAIN, N_PLAIN, 0, in);
        free(in);

        /* a malformed frame after valid ones: status set, the valid ones kept */
        static const struct {
            const char *what, *hex;
            uint32_t status;
        } tails[] = {
            {"a LENGTH below 7", "00000003 010203", SPOP_ST_INVALID},
            {"a LENGTH over max_frame_size", "00004000", SPOP_ST_TOO_BIG},
            {"a NOTIFY with NB-ARGS 2 and one arg",
             "0000001e 03 00000001 14 01 0f 636865636b2d636c69656e742d6970 02 00 06 7f000001", SPOP_ST_INVALID},
        };
        for (size_t t = 0; t < sizeof(tails) / sizeof(tails[0]); t++) {
            size_t n = plen + unhex(tails[t].hex, buf + plen, sizeof(buf) - plen);
            /* a valid frame after the bad one is not reached */
            n += unhex(BF_CCI.hex, buf + n, sizeof(buf) - n);
            in = dup_exact(buf, n);
            rc = batch_decode(in, n, SPOP_DEFAULT_FRAME_SIZE, g_names, (uint32_t)g_names_len, BATCH_N_NAMES,
                              MAX_FRAMES, MAX_ITEMS, &b);
            batch_expect x = xp;
            x.status = tails[t].status;
            char ctx[96];
            snprintf(ctx, sizeof(ctx), "batch plain + %s", tails[t].what);
            check_batch(ctx, &b, rc, &x, BATCH_PLAIN, N_PLAIN, 0, in);
            free(in);
        }

        /* malformed first frame: nothing decoded, status set */
        size_t n = unhex("00000003 010203", buf, sizeof(buf));
        in = dup_exact(buf, n);
        rc = batch_decode(in, n, SPOP_DEFAULT_FRAME_SIZE, g_names, (uint32_t)g_names_len, BATCH_N_NAMES,
                          MAX_FRAMES, MAX_ITEMS, &b);
        CHECK(rc == 0 && b.n_frames == 0 && b.n_plain == 0 && b.n_items == 0 && b.consumed == 0 &&
                  b.status == SPOP_ST_INVALID,
              "batch of one malformed frame: 0 frames, status 4 (got rc %d, n %u, status %u)", rc, b.n_frames,
              b.status);
        free(in);
    }

    /* max_frames reached: a clean stop */
    {
        batch_expect x = whole(BATCH_MIXED, 3, ends);
        rc = batch_decode(mixed, mlen, SPOP_DEFAULT_FRAME_SIZE, g_names, (uint32_t)g_names_len, BATCH_N_NAMES, 3,
                          MAX_ITEMS, &b);
        check_batch("batch mixed, max_frames 3", &b, rc, &x, BATCH_MIXED, 3, 0, mixed);
        rc = batch_decode(mixed, mlen, SPOP_DEFAULT_FRAME_SIZE, g_names, (uint32_t)g_names_len, BATCH_N_NAMES, 0,
                          MAX_ITEMS, &b);
        CHECK(rc == 0 && b.n_frames == 0 && b.consumed == 0 && b.status == 0, "batch mixed, max_frames 0: nothing");
    }

    /* item records run out: stop before the frame that does not fit; none fits: status 13 */
    {
        size_t pends[N_PLAIN];
        build_batch(BATCH_PLAIN, N_PLAIN, tmp, sizeof(tmp), pends);
        batch_expect x = whole(BATCH_PLAIN, 1, pends);
        rc = batch_decode(plain, plen, SPOP_DEFAULT_FRAME_SIZE, g_names, (uint32_t)g_names_len, BATCH_N_NAMES,
                          MAX_FRAMES, 4, &b);
        check_batch("batch plain, 4 item records", &b, rc, &x, BATCH_PLAIN, 1, 0, plain);
        rc = batch_decode(plain, plen, SPOP_DEFAULT_FRAME_SIZE, g_names, (uint32_t)g_names_len, BATCH_N_NAMES,
                          MAX_FRAMES, 1, &b);
        CHECK(rc == 0 && b.n_frames == 0 && b.consumed == 0 && b.status == SPOP_ST_RES,
              "batch plain, 1 item record: status 13 (got rc %d, n %u, status %u)", rc, b.n_frames, b.status);
    }

    /* every strict prefix: the whole frames it holds, never an error */
    {
        build_batch(BATCH_MIXED, N_MIXED, tmp, sizeof(tmp), ends);
        int heap_ok = 1, page_ok = 1;
        size_t bad_heap = 0, bad_page = 0;
        for (size_t p = 0; p < mlen; p++) {
            uint32_t k = 0;
            while (k < N_MIXED && ends[k] <= p)
                k++;
            batch_expect x = whole(BATCH_MIXED, k, ends);
            uint8_t *in = dup_exact(tmp, p);
            rc = batch_decode(in, p, SPOP_DEFAULT_FRAME_SIZE, g_names, (uint32_t)g_names_len, BATCH_N_NAMES,
                              MAX_FRAMES, MAX_ITEMS, &b);
            free(in);
            int ok = rc == x.rc && b.n_frames == x.n_frames && b.n_plain == x.n_plain && b.n_items == x.n_items &&
                     b.consumed == x.consumed && b.status == 0;
            for (uint32_t j = 0; ok && j < k; j++)
                ok = b.cols[j] == BATCH_MIXED[j]->idx && b.ids[2 * j] == BATCH_MIXED[j]->sid &&
                     b.ids[2 * j + 1] == BATCH_MIXED[j]->fid;
            if (heap_ok && !ok) {
                heap_ok = 0;
                bad_heap = p;
            }
            /* the input at a page end, the names in static memory */
            hbatch b2;
            rc = batch_at_page_end(&b2, tmp, p, g_names);
            ok = rc == x.rc && b2.n_frames == x.n_frames && b2.n_plain == x.n_plain && b2.n_items == x.n_items &&
                 b2.consumed == x.consumed && b2.status == 0;
            if (page_ok && !ok) {
                page_ok = 0;
                bad_page = p;
            }
        }
        CHECK(heap_ok, "batch mixed: every strict prefix gives its whole frames (first bad length %zu)", bad_heap);
        CHECK(page_ok, "batch mixed: every strict prefix at a page end (first bad length %zu)", bad_page);
    }

    /* 5 checks: a start offset decodes the frames after it, offsets counted from buf */
    {
        uint8_t *shifted = poisoned(7 + plen);
        memset(shifted, 0xEE, 7);
        memcpy(shifted + 7, plain, plen);
        hbatch b2;
        batch_arrays(&b2, MAX_FRAMES, MAX_ITEMS);
        b2.c.names = g_names;
        b2.c.names_len = (uint32_t)g_names_len;
        b2.c.n_names = BATCH_N_NAMES;
        rc = batch_run(&b2, shifted, 7 + plen, 7, SPOP_DEFAULT_FRAME_SIZE);
        CHECK(rc == (int)N_PLAIN && b2.n_plain == N_PLAIN && b2.consumed == 7 + plen && g_bf[0].offset == 7 &&
                  b2.ids[0] == BF_CCI.sid,
              "batch from offset 7: the frames after it, offsets from buf (got rc %d, end %u)", rc, b2.consumed);
        CHECK(g_bi[0].name_off == 7 + 12 && memcmp(shifted + g_bi[0].name_off, "check-client-ip", 15) == 0,
              "batch from offset 7: names point into buf (got %u)", g_bi[0].name_off);
        rc = batch_run(&b2, shifted, 7 + plen, 7 + plen, SPOP_DEFAULT_FRAME_SIZE);
        CHECK(rc == 0 && b2.n_frames == 0 && b2.consumed == 7 + plen && b2.status == 0,
              "batch from the end: nothing, end = start (got rc %d, end %u)", rc, b2.consumed);
        rc = batch_run(&b2, shifted, 7 + plen, 8 + plen, SPOP_DEFAULT_FRAME_SIZE);
        EQ(rc, -SPOP_ST_INVALID, "batch from past the end: refused");
        rc = batch_run(&b2, shifted, 7 + plen, 9, SPOP_DEFAULT_FRAME_SIZE);
        CHECK(rc == 0 && b2.status == SPOP_ST_TOO_BIG,
              "batch from inside a frame: its bytes read as a bad length (got rc %d, status %u)", rc, b2.status);
        free(shifted);
    }
    free(plain);
    free(mixed);
}

/* ------------------------------------------------------------ spop_encode_acks, one action per ACK */

/* Encoded actions (each a valid ACK payload on its own). */
static const char *const ONE_ACTIONS[] = {
    "010301 08 69705f73636f7265 03 2a",          /* set-var sess ip_score uint32 42 */
    "020202 03 666f6f",                          /* unset-var txn foo */
    "010302 01 6e 04 fff0fefefefefefefe0e",      /* set-var txn n int64 -1 */
    "010303 01 73 08 03 616263",                 /* set-var req s "abc" */
    "010300 02 7636 07 20010db8000000000000000000000001", /* set-var proc v6 2001:db8::1 */
    "010304 01 62 11",                           /* set-var res b true */
    "020201 00",                                 /* unset-var sess "" */
};
#define N_ONE (sizeof(ONE_ACTIONS) / sizeof(ONE_ACTIONS[0]))
static const uint64_t ONE_IDS[2 * (N_ONE + 1)] = {20, 1, 1, 1, UINT64_MAX, UINT64_MAX, 0, 1,
                                                  300, 1ull << 32, 7, 2, 240, 2287, 9, 9};

/* spop_encode_acks into an exact-size heap buffer of `cap` bytes; the
 * result is copied to `copy` (when > 0) before the buffer is freed. */
static int acks_into(size_t cap, uint32_t mfs, const uint64_t *ids, const uint32_t *ends, uint32_t n,
                     const uint8_t *payload, size_t payload_len, uint8_t *copy)
{
    uint8_t *out = cap ? xmalloc(cap) : guard_place(NULL, 0);
    int rc = spop_encode_acks(out, cap, mfs, ids, ends, n, payload, payload_len);
    if (rc > 0 && copy)
        memcpy(copy, out, (size_t)rc);
    if (cap)
        free(out);
    return rc;
}

/* The payload from hex, at a page end: an over-read past it faults. */
static const uint8_t *guard_hex(const char *hex, size_t *len)
{
    static uint8_t tmp[256];
    *len = unhex(hex, tmp, sizeof(tmp));
    return guard_place(tmp, *len);
}

static void test_encode_acks_one_action(void)
{
    static uint8_t payload[512], with_ends[1024], without[1024];
    uint32_t ends[N_ONE];
    size_t plen = 0, starts[N_ONE + 1];
    for (size_t k = 0; k < N_ONE; k++) {
        starts[k] = plen;
        plen += unhex(ONE_ACTIONS[k], payload + plen, sizeof(payload) - plen);
        ends[k] = (uint32_t)plen;
    }
    starts[N_ONE] = plen;
    size_t cap = N_ONE * 25 + plen; /* always enough, says spop.h */

    /* the same bytes as the ends-array form */
    int a = acks_into(cap, SPOP_DEFAULT_FRAME_SIZE, ONE_IDS, ends, N_ONE, payload, plen, with_ends);
    int b = acks_into(cap, SPOP_DEFAULT_FRAME_SIZE, ONE_IDS, NULL, N_ONE, payload, plen, without);
    CHECK(a > 0 && a == b, "encode_acks one action each: as long as with ends (got %d, %d)", b, a);
    CHECK(a > 0 && a == b && memcmp(with_ends, without, (size_t)a) == 0,
          "encode_acks one action each: the same bytes as with ends");

    /* which decode to one ACK per action, with its ids */
    {
        spop_frame f[N_ONE + 1];
        spop_item it[N_ONE + 1];
        uint32_t nf = 0;
        int rc = b > 0 ? spop_decode_frames(without, (size_t)b, SPOP_DEFAULT_FRAME_SIZE, f, N_ONE + 1, it,
                                            N_ONE + 1, &nf)
                       : -1;
        int ok = rc == 0 && nf == N_ONE && f[N_ONE - 1].offset + 4 + f[N_ONE - 1].length == (uint32_t)b;
        for (uint32_t k = 0; ok && k < N_ONE; k++)
            ok = f[k].type == SPOP_FRAME_ACK && f[k].flags == SPOP_FLAG_FIN && f[k].sid == ONE_IDS[2 * k] &&
                 f[k].fid == ONE_IDS[2 * k + 1] && f[k].n_items == 1 &&
                 f[k].payload_len == ends[k] - starts[k] &&
                 memcmp(without + f[k].payload_off, payload + starts[k], f[k].payload_len) == 0;
        CHECK(ok, "encode_acks one action each: decodes to %zu ACKs of one action, ids in order", N_ONE);
    }

    /* one ACK: the vector "ack set-var sess ip_score uint32 42" */
    {
        uint8_t out[64];
        int rc = acks_into(g_vec_len[10], SPOP_DEFAULT_FRAME_SIZE, ONE_IDS, NULL, 1, payload, ends[0], out);
        CHECK(rc == (int)g_vec_len[10] && memcmp(out, g_vec[10], g_vec_len[10]) == 0,
              "encode_acks one action: the ACK vector byte for byte (got %d)", rc);
    }

    /* the room: exactly enough, one byte short, none */
    EQ(acks_into((size_t)b, SPOP_DEFAULT_FRAME_SIZE, ONE_IDS, NULL, N_ONE, payload, plen, NULL), b,
       "encode_acks one action each: cap exactly the output");
    EQ(acks_into((size_t)b - 1, SPOP_DEFAULT_FRAME_SIZE, ONE_IDS, NULL, N_ONE, payload, plen, NULL), -SPOP_ST_RES,
       "encode_acks one action each: cap one byte short");
    EQ(acks_into(0, SPOP_DEFAULT_FRAME_SIZE, ONE_IDS, NULL, 1, payload, ends[0], NULL), -SPOP_ST_RES,
       "encode_acks one action: cap 0");

    /* max_frame_size: the body is 7 + 14 bytes with 1-byte ids, 25 + 14 with 10-byte ids */
    static const uint64_t big_ids[2] = {UINT64_MAX, UINT64_MAX};
    EQ(acks_into(64, 21, ONE_IDS, NULL, 1, payload, ends[0], NULL), 25, "encode_acks one action: body 21, max 21");
    EQ(acks_into(64, 20, ONE_IDS, NULL, 1, payload, ends[0], NULL), -SPOP_ST_TOO_BIG,
       "encode_acks one action: body 21, max 20");
    EQ(acks_into(64, 39, big_ids, NULL, 1, payload, ends[0], NULL), 43,
       "encode_acks one action, 10-byte ids: body 39, max 39");
    EQ(acks_into(64, 38, big_ids, NULL, 1, payload, ends[0], NULL), -SPOP_ST_TOO_BIG,
       "encode_acks one action, 10-byte ids: body 39, max 38");
    /* bodies 21, 14, then 25 + 16: the first two fit in 34, the third does not */
    EQ(acks_into(cap, 34, ONE_IDS, NULL, N_ONE, payload, plen, NULL), -SPOP_ST_TOO_BIG,
       "encode_acks one action each: the 3rd ACK (body 41) over max_frame_size 34 is refused");

    /* payloads that are not exactly n well-formed actions (read at a page end) */
    static const struct {
        const char *what, *hex;
        uint32_t n;
    } bad[] = {
        {"a trailing byte", "010301 08 69705f73636f7265 03 2a 00", 1},
        {"a trailing action", "010301 08 69705f73636f7265 03 2a 020202 03 666f6f", 1},
        {"a truncated action", "010301 08 69705f73636f7265 03", 1},
        {"a truncated value varint", "010302 01 6e 04 fff0fefe", 1},
        {"a truncated 2nd action", "010301 08 69705f73636f7265 03 2a 020202", 2},
        {"fewer actions than n", "010301 08 69705f73636f7265 03 2a", 2},
        {"unknown action 3", "030301 01 6e 03 2a", 1},
        {"unknown action 0", "000201 01 6e", 1},
        {"set-var with NB-ARGS 2", "010201 01 6e 03 2a", 1},
        {"unset-var with NB-ARGS 3", "020301 01 6e 03 2a", 1},
        {"scope 5", "020205 01 6e", 1},
        {"reserved data type 10", "010301 01 6e 0a 00", 1},
        {"a name past the payload", "020201 05 6162", 1},
        {"an empty payload for one ACK", "", 1},
        {"an action and n 0", "020202 03 666f6f", 0},
    };
    for (size_t c = 0; c < sizeof(bad) / sizeof(bad[0]); c++) {
        size_t len;
        const uint8_t *p = guard_hex(bad[c].hex, &len);
        EQ(acks_into(1024, SPOP_DEFAULT_FRAME_SIZE, ONE_IDS, NULL, bad[c].n, p, len, NULL), -SPOP_ST_INVALID,
           "encode_acks one action each: %s", bad[c].what);
    }
    EQ(acks_into(16, SPOP_DEFAULT_FRAME_SIZE, ONE_IDS, NULL, 0, NULL, 0, NULL), 0,
       "encode_acks one action each: nothing to do");

    /* every strict prefix of the payload: only whole actions, as many as n, encode */
    {
        int ok = 1;
        size_t bad_at = 0;
        for (size_t p = 0; p < plen && ok; p++) {
            uint32_t k = 0;
            while (k < N_ONE && ends[k] <= p)
                k++;
            const uint8_t *in = guard_place(payload, p);
            int at_boundary = starts[k] == p;
            int r_k = acks_into(cap, SPOP_DEFAULT_FRAME_SIZE, ONE_IDS, NULL, k, in, p, without);
            int r_k1 = acks_into(cap, SPOP_DEFAULT_FRAME_SIZE, ONE_IDS, NULL, k + 1, in, p, NULL);
            if (at_boundary) {
                size_t want = 0;
                for (uint32_t j = 0; j < k; j++)
                    want += 4 + 5 + ref_varint_len(ONE_IDS[2 * j]) + ref_varint_len(ONE_IDS[2 * j + 1]) +
                            (ends[j] - starts[j]);
                ok = r_k == (int)want && memcmp(without, with_ends, want) == 0 && r_k1 == -SPOP_ST_INVALID;
            } else {
                ok = r_k == -SPOP_ST_INVALID && r_k1 == -SPOP_ST_INVALID;
            }
            bad_at = p;
        }
        CHECK(ok, "encode_acks one action each: every prefix of the payload (first bad length %zu)", bad_at);
    }
}
#undef OTHER

int main(int argc, char **argv)
{
    g_verbose = argc > 1 && strcmp(argv[1], "-v") == 0;
    guard_init();
    vectors_init();

    EQ(sizeof(spop_item), 32, "sizeof(spop_item)");
    EQ(sizeof(spop_frame), 48, "sizeof(spop_frame)");
    test_varints();
    test_frame_vectors();
    test_prefixes();
    test_multi();
    test_limits();
    test_malformed();
    test_skippable();
    test_encode_vectors();
    test_encode_cap();
    test_encode_truncate();
    test_encode_bad();
    test_encode_acks();
    test_decode_batch();
    test_encode_acks_one_action();
    test_status_reason();

    printf("1..%u\n%u passed, %u failed\n", g_pass + g_fail, g_pass, g_fail);
    return g_fail ? 1 : 0;
}
