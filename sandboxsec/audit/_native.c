/*
 * Bulk hashing for audit export verification (sandboxsec.audit._native).
 *
 * Optional: sandboxsec.audit.verify uses it when it imports and runs the same checks in pure
 * Python otherwise.  It computes exactly what verify._chunk and merkle.perfect_root compute,
 * only without one interpreter round trip per entry:
 *
 *   leaves(data, lo, hi, prefix, seq, prev) -> (bytes, bool)
 *       The RFC 9162 leaf hash SHA-256(0x00 || line) of every line of data[lo:hi] (split on
 *       "\n"; a final line without "\n" counts, so an empty range is one empty line), as
 *       concatenated 32-byte hashes, and whether every line starts with
 *       prefix || decimal(seq + i) || ',"prev":"' || hex(previous leaf), the first line's
 *       previous leaf being the bytes `prev` as given.
 *
 *   roots(hashes, height) -> bytes
 *       The roots of consecutive blocks of 2**height leaf hashes (RFC 9162 node hash
 *       SHA-256(0x01 || left || right)), concatenated.
 *
 * The input is an untrusted export: every offset is checked against the buffer, lengths are
 * checked before any multiplication can overflow, and nothing is written outside the output
 * object allocated for the exact size.  SHA-256 is OpenSSL's (EVP, fetched once); nothing
 * here implements a primitive.  The GIL is released while hashing so threads can share the
 * work; the buffers stay valid because the Py_buffer views are held until the end.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <openssl/evp.h>
#include <string.h>

#define HASH 32
#define PREV_FIELD ",\"prev\":\""
#define PREV_FIELD_LEN 9
/* 2**40 leaves per block is far beyond any export; the bound keeps shifts defined. */
#define MAX_HEIGHT 40

/* Fetched once at import; EVP_MD objects are immutable and safe to share between threads
 * (and forked children).  Each call makes its own EVP_MD_CTX. */
static EVP_MD *sha256;

static const char hexdigits[] = "0123456789abcdef";

/* Hash parts[0..n) (lengths lens) into out; 0 on an OpenSSL failure. */
static int
digest(EVP_MD_CTX *ctx, const unsigned char *const *parts, const size_t *lens, int n,
       unsigned char *out)
{
    unsigned int outlen = 0;
    if (!EVP_DigestInit_ex(ctx, sha256, NULL))
        return 0;
    for (int i = 0; i < n; i++)
        if (!EVP_DigestUpdate(ctx, parts[i], lens[i]))
            return 0;
    return EVP_DigestFinal_ex(ctx, out, &outlen) && outlen == HASH;
}

/* Decimal digits of v into buf (at least 20 bytes); returns their number. */
static size_t
decimal(unsigned long long v, char *buf)
{
    char tmp[20];
    size_t n = 0;
    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    for (size_t i = 0; i < n; i++)
        buf[i] = tmp[n - 1 - i];
    return n;
}

/* Whether line[0..len) starts with prefix || decimal(seq) || PREV_FIELD || prev. */
static int
head_holds(const unsigned char *line, size_t len, const Py_buffer *prefix,
           unsigned long long seq, const unsigned char *prev, size_t prev_len)
{
    char digits[20];
    size_t nd = decimal(seq, digits);
    size_t p = (size_t)prefix->len;
    /* Subtract piece by piece rather than add the lengths: no sum can wrap around. */
    if (len < p || len - p < nd + PREV_FIELD_LEN || len - p - nd - PREV_FIELD_LEN < prev_len)
        return 0;
    return memcmp(line, prefix->buf, p) == 0
        && memcmp(line + p, digits, nd) == 0
        && memcmp(line + p + nd, PREV_FIELD, PREV_FIELD_LEN) == 0
        && memcmp(line + p + nd + PREV_FIELD_LEN, prev, prev_len) == 0;
}

static PyObject *
native_leaves(PyObject *Py_UNUSED(self), PyObject *args)
{
    Py_buffer data = {0}, prefix = {0}, first_prev = {0};
    Py_ssize_t lo, hi;
    PyObject *seq_obj, *out = NULL, *result = NULL;
    if (!PyArg_ParseTuple(args, "y*nny*Oy*:leaves", &data, &lo, &hi, &prefix, &seq_obj,
                          &first_prev))
        return NULL;
    unsigned long long seq = PyLong_AsUnsignedLongLong(seq_obj);
    if (seq == (unsigned long long)-1 && PyErr_Occurred())
        goto done;
    if (!data.readonly) {
        /* Read without the GIL: a buffer another thread could change is not accepted. */
        PyErr_SetString(PyExc_TypeError, "data must be a read-only buffer (bytes)");
        goto done;
    }
    if (lo < 0 || hi < lo || hi > data.len) {
        PyErr_SetString(PyExc_ValueError, "range outside the data");
        goto done;
    }
    const unsigned char *base = data.buf;
    /* One leaf per newline in the range, plus the last line. */
    Py_ssize_t n = 1;
    for (const unsigned char *q = base + lo, *end = base + hi;
         (q = memchr(q, '\n', (size_t)(end - q))) != NULL; q++)
        n++;
    /* seq + n - 1 must fit (no wrap-around to small sequence numbers), as must n * HASH. */
    if ((unsigned long long)n - 1 > ULLONG_MAX - seq || n > PY_SSIZE_T_MAX / HASH) {
        PyErr_SetString(PyExc_OverflowError, "sequence numbers or output too large");
        goto done;
    }
    out = PyBytes_FromStringAndSize(NULL, n * HASH);
    if (out == NULL)
        goto done;
    unsigned char *leaf = (unsigned char *)PyBytes_AS_STRING(out);
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    if (ctx == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    int ok = 1, failed = 0;
    Py_BEGIN_ALLOW_THREADS
    static const unsigned char leaf_prefix = 0x00;
    const unsigned char *prev = first_prev.buf;
    size_t prev_len = (size_t)first_prev.len;
    unsigned char prev_hex[2 * HASH];
    const unsigned char *pos = base + lo, *end = base + hi;
    for (Py_ssize_t i = 0; i < n; i++) {
        const unsigned char *nl = memchr(pos, '\n', (size_t)(end - pos));
        const unsigned char *stop = nl != NULL ? nl : end;
        size_t len = (size_t)(stop - pos);
        const unsigned char *parts[2] = {&leaf_prefix, pos};
        size_t lens[2] = {1, len};
        if (!digest(ctx, parts, lens, 2, leaf)) {
            failed = 1;
            break;
        }
        /* Once a head fails the caller names it in Python; the rest only needs hashes. */
        if (ok && !head_holds(pos, len, &prefix, seq + (unsigned long long)i, prev, prev_len))
            ok = 0;
        for (int k = 0; k < HASH; k++) {
            prev_hex[2 * k] = (unsigned char)hexdigits[leaf[k] >> 4];
            prev_hex[2 * k + 1] = (unsigned char)hexdigits[leaf[k] & 15];
        }
        prev = prev_hex;
        prev_len = sizeof prev_hex;
        leaf += HASH;
        if (nl == NULL)
            break; /* the last line (the count above makes this i == n - 1) */
        pos = nl + 1;
    }
    Py_END_ALLOW_THREADS
    EVP_MD_CTX_free(ctx);
    if (failed) {
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL SHA-256 failed");
        goto done;
    }
    result = Py_BuildValue("(OO)", out, ok ? Py_True : Py_False);
done:
    Py_XDECREF(out);
    PyBuffer_Release(&data);
    PyBuffer_Release(&prefix);
    PyBuffer_Release(&first_prev);
    return result;
}

static PyObject *
native_roots(PyObject *Py_UNUSED(self), PyObject *args)
{
    Py_buffer hashes = {0};
    int height;
    PyObject *out = NULL;
    if (!PyArg_ParseTuple(args, "y*i:roots", &hashes, &height))
        return NULL;
    /* 2**height leaf hashes must be countable in a Py_ssize_t (also on 32-bit builds). */
    if (height < 0 || height > MAX_HEIGHT || height >= (int)(8 * sizeof(Py_ssize_t)) - 6) {
        PyErr_SetString(PyExc_ValueError, "block height out of range");
        goto done;
    }
    Py_ssize_t width = (Py_ssize_t)1 << height;
    if (hashes.len % HASH != 0 || (hashes.len / HASH) % width != 0) {
        PyErr_SetString(PyExc_ValueError, "not a whole number of blocks of leaf hashes");
        goto done;
    }
    Py_ssize_t blocks = hashes.len / HASH / width;
    out = PyBytes_FromStringAndSize(NULL, blocks * HASH);
    if (out == NULL)
        goto done;
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    if (ctx == NULL) {
        Py_CLEAR(out);
        PyErr_NoMemory();
        goto done;
    }
    int failed = 0;
    Py_BEGIN_ALLOW_THREADS
    static const unsigned char node_prefix = 0x01;
    /* A block is reduced as a binary counter carries: stack[d] holds a subtree of height
     * heights[d]; two of equal height merge.  Depth <= height + 1, so no allocation. */
    unsigned char stack[MAX_HEIGHT + 1][HASH];
    int heights[MAX_HEIGHT + 1];
    const unsigned char *leaf = hashes.buf;
    unsigned char *root = (unsigned char *)PyBytes_AS_STRING(out);
    for (Py_ssize_t b = 0; b < blocks && !failed; b++) {
        int depth = 0;
        for (Py_ssize_t i = 0; i < width; i++, leaf += HASH) {
            memcpy(stack[depth], leaf, HASH);
            heights[depth++] = 0;
            while (depth >= 2 && heights[depth - 1] == heights[depth - 2]) {
                const unsigned char *parts[3] = {&node_prefix, stack[depth - 2],
                                                 stack[depth - 1]};
                size_t lens[3] = {1, HASH, HASH};
                unsigned char node[HASH];
                if (!digest(ctx, parts, lens, 3, node)) {
                    failed = 1;
                    break;
                }
                depth--;
                memcpy(stack[depth - 1], node, HASH);
                heights[depth - 1]++;
            }
            if (failed)
                break;
        }
        memcpy(root, stack[0], HASH);
        root += HASH;
    }
    Py_END_ALLOW_THREADS
    EVP_MD_CTX_free(ctx);
    if (failed) {
        Py_CLEAR(out);
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL SHA-256 failed");
    }
done:
    PyBuffer_Release(&hashes);
    return out;
}

static PyMethodDef methods[] = {
    {"leaves", native_leaves, METH_VARARGS,
     "leaves(data, lo, hi, prefix, seq, prev) -> (leaf hashes, every head and link held)"},
    {"roots", native_roots, METH_VARARGS,
     "roots(hashes, height) -> roots of consecutive blocks of 2**height leaf hashes"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    .m_base = PyModuleDef_HEAD_INIT,
    .m_name = "sandboxsec.audit._native",
    .m_doc = "OpenSSL bulk hashing for audit export verification (optional).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC
PyInit__native(void)
{
    if (sha256 == NULL) {
        sha256 = EVP_MD_fetch(NULL, "SHA256", NULL);
        if (sha256 == NULL) {
            PyErr_SetString(PyExc_ImportError, "OpenSSL has no SHA-256");
            return NULL;
        }
    }
    return PyModule_Create(&module);
}
