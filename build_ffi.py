"""cffi build script for the SPOP frame codec (out-of-line API mode).

setuptools runs it from the project root (see setup.py); `python build_ffi.py`
builds in place for quick experiments.
"""

from cffi import FFI

# The subset of csrc/spop.h that Python calls; the C compiler checks it
# against the real header when the module is built.
CDEF = """
typedef struct spop_item {
    uint64_t num;
    uint32_t name_off;
    uint32_t name_len;
    uint32_t val_off;
    uint32_t val_len;
    uint8_t kind;
    uint8_t type;
    uint8_t nargs;
    uint8_t action;
    uint8_t scope;
    uint8_t pad_[3];
} spop_item;

typedef struct spop_frame {
    uint64_t sid;
    uint64_t fid;
    uint32_t flags;
    uint32_t offset;
    uint32_t length;
    uint32_t payload_off;
    uint32_t payload_len;
    uint32_t first_item;
    uint32_t n_items;
    uint8_t type;
    uint8_t items_parsed;
    uint8_t pad_[2];
} spop_frame;

int spop_varint_decode(const uint8_t *buf, size_t len, uint64_t *value);
int spop_varint_encode(uint64_t value, uint8_t *out, size_t cap);
int spop_decode_frames(const uint8_t *buf, size_t len, uint32_t max_frame_size,
                       spop_frame *frames, uint32_t max_frames,
                       spop_item *items, uint32_t max_items,
                       uint32_t *n_frames);
int spop_encode_frames(uint8_t *out, size_t cap, uint32_t max_frame_size,
                       spop_frame *frames, uint32_t n_frames,
                       const spop_item *items, uint32_t n_items,
                       const uint8_t *strings, size_t strings_len);
const char *spop_status_reason(int status);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "spoa_mp._spop",
    '#include "spop.h"',
    sources=["csrc/spop.c"],
    include_dirs=["csrc"],
    extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
