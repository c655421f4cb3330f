/* AES-256-XTS over whole 4 KiB blocks, the tweak of each its block number (core/cipher.py).
 *
 * Built by the package's own build (setup.py, optional): core/cipher.py uses it when it is
 * there and its ctypes path otherwise; tests/unit/test_cipher.py checks both against
 * `cryptography`'s XTS. Instead of one OpenSSL call per 4 KiB data unit (~1 us of set-up
 * each), it does what XTS is made of: the tweak of every unit encrypted with the second key
 * (one ECB call for them all), the masks T_j = T * alpha^j computed by doubling in
 * GF(2^128), and the blocks masked, encrypted (or decrypted) with the first key in one ECB
 * call per 64 KiB, and masked again. The GIL is released meanwhile.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <openssl/evp.h>
#include <stdint.h>
#include <string.h>
#ifdef __SSE2__
#include <emmintrin.h>
#endif

#define UNIT 4096
#define BATCH 16 /* units per ECB call: 64 KiB of masks stay in the cache */

typedef struct {
    EVP_CIPHER_CTX *data_enc, *data_dec, *tweak;
} Keys;

static void keys_free(Keys *k) {
    if (k->data_enc) EVP_CIPHER_CTX_free(k->data_enc);
    if (k->data_dec) EVP_CIPHER_CTX_free(k->data_dec);
    if (k->tweak) EVP_CIPHER_CTX_free(k->tweak);
    PyMem_Free(k);
}

static void capsule_free(PyObject *capsule) {
    Keys *k = PyCapsule_GetPointer(capsule, "cargohold.xts");
    if (k) keys_free(k);
}

static EVP_CIPHER_CTX *ecb(const unsigned char *key, int encrypt) {
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    if (!ctx) return NULL;
    if (EVP_CipherInit_ex(ctx, EVP_aes_256_ecb(), NULL, key, NULL, encrypt) != 1
        || EVP_CIPHER_CTX_set_padding(ctx, 0) != 1) {
        EVP_CIPHER_CTX_free(ctx);
        return NULL;
    }
    return ctx;
}

static PyObject *xts_new(PyObject *self, PyObject *args) {
    Py_buffer key;
    if (!PyArg_ParseTuple(args, "y*", &key)) return NULL;
    if (key.len != 64) {
        PyBuffer_Release(&key);
        PyErr_SetString(PyExc_ValueError, "an AES-256-XTS key is 64 bytes");
        return NULL;
    }
    Keys *k = PyMem_Calloc(1, sizeof(Keys));
    if (!k) {
        PyBuffer_Release(&key);
        return PyErr_NoMemory();
    }
    const unsigned char *bytes = key.buf;
    k->data_enc = ecb(bytes, 1);
    k->data_dec = ecb(bytes, 0);
    k->tweak = ecb(bytes + 32, 1);
    PyBuffer_Release(&key);
    if (!k->data_enc || !k->data_dec || !k->tweak) {
        keys_free(k);
        PyErr_SetString(PyExc_ValueError, "OpenSSL refused the key");
        return NULL;
    }
    return PyCapsule_New(k, "cargohold.xts", capsule_free);
}

static int all_zero(const unsigned char *p) {
    uint64_t any = 0, word;
    for (int i = 0; i < UNIT; i += 8) {
        memcpy(&word, p + i, 8);
        any |= word;
    }
    return any == 0;
}

static inline void load(const unsigned char *p, uint64_t *lo, uint64_t *hi) {
    memcpy(lo, p, 8); /* XTS numbers its 128-bit values little-endian, as x86 stores them */
    memcpy(hi, p + 8, 8);
}

/* crypt(keys, first_block, source, target, decrypt): whole units of source into target
 * (the same buffer or another as long); decrypting, a unit of zeros becomes zeros. Returns
 * None; ValueError on bad lengths. */
static PyObject *xts_crypt(PyObject *self, PyObject *args) {
    PyObject *capsule;
    unsigned long long first;
    Py_buffer src, dst;
    int decrypt;
    if (!PyArg_ParseTuple(args, "OKy*w*p", &capsule, &first, &src, &dst, &decrypt)) return NULL;
    Keys *k = PyCapsule_GetPointer(capsule, "cargohold.xts");
    PyObject *result = NULL;
    if (!k) goto done;
    if (src.len % UNIT || dst.len < src.len) {
        PyErr_SetString(PyExc_ValueError, "whole 4 KiB blocks only");
        goto done;
    }
    int ok = 1;
    Py_BEGIN_ALLOW_THREADS
    unsigned char *masks = PyMem_RawMalloc(BATCH * UNIT);
    unsigned char tweaks[BATCH * 16], encrypted[BATCH * 16];
    const unsigned char *in = src.buf;
    unsigned char *out = dst.buf;
    EVP_CIPHER_CTX *data = decrypt ? k->data_dec : k->data_enc;
    Py_ssize_t units = src.len / UNIT;
    if (!masks) ok = 0;
    for (Py_ssize_t u0 = 0; ok && u0 < units; u0 += BATCH) {
        int n = (int)(units - u0 < BATCH ? units - u0 : BATCH), len = 0;
        int zero[BATCH]; /* decrypting: units stored as zeros read as zeros */
        for (int u = 0; u < n; u++)
            zero[u] = decrypt && all_zero(in + (size_t)(u0 + u) * UNIT);
        memset(tweaks, 0, sizeof tweaks);
        for (int u = 0; u < n; u++) {
            uint64_t number = (uint64_t)first + (uint64_t)(u0 + u);
            memcpy(tweaks + 16 * u, &number, 8);
        }
        if (EVP_EncryptUpdate(k->tweak, encrypted, &len, tweaks, 16 * n) != 1) {
            ok = 0;
            break;
        }
        for (int u = 0; u < n; u++) {
            uint64_t lo, hi;
            load(encrypted + 16 * u, &lo, &hi);
            unsigned char *mask = masks + (size_t)u * UNIT;
            const unsigned char *p = in + (size_t)(u0 + u) * UNIT;
            unsigned char *q = out + (size_t)(u0 + u) * UNIT;
            for (int j = 0; j < UNIT; j += 16) { /* unaligned loads: any buffer will do */
#ifdef __SSE2__
                __m128i t = _mm_set_epi64x((long long)hi, (long long)lo);
                _mm_store_si128((__m128i *)(mask + j), t);
                _mm_storeu_si128((__m128i *)(q + j),
                                 _mm_xor_si128(_mm_loadu_si128((const __m128i *)(p + j)), t));
#else
                uint64_t a, b;
                memcpy(mask + j, &lo, 8);
                memcpy(mask + j + 8, &hi, 8);
                memcpy(&a, p + j, 8);
                memcpy(&b, p + j + 8, 8);
                a ^= lo;
                b ^= hi;
                memcpy(q + j, &a, 8);
                memcpy(q + j + 8, &b, 8);
#endif
                uint64_t carry = hi >> 63; /* multiply by alpha: shift left, reduce */
                hi = (hi << 1) | (lo >> 63);
                lo = (lo << 1) ^ (carry * 0x87);
            }
        }
        unsigned char *block = out + (size_t)u0 * UNIT;
        if (EVP_CipherUpdate(data, block, &len, block, n * UNIT) != 1 || len != n * UNIT) {
            ok = 0;
            break;
        }
#ifdef __SSE2__
        for (size_t i = 0; i < (size_t)n * UNIT; i += 16) {
            __m128i *at = (__m128i *)(block + i);
            _mm_storeu_si128(at, _mm_xor_si128(_mm_loadu_si128(at),
                                               _mm_load_si128((const __m128i *)(masks + i))));
        }
#else
        for (size_t i = 0; i < (size_t)n * UNIT; i += 8) {
            uint64_t a, m;
            memcpy(&a, block + i, 8);
            memcpy(&m, masks + i, 8);
            a ^= m;
            memcpy(block + i, &a, 8);
        }
#endif
        for (int u = 0; u < n; u++)
            if (zero[u]) memset(block + (size_t)u * UNIT, 0, UNIT);
    }
    PyMem_RawFree(masks);
    Py_END_ALLOW_THREADS
    if (!ok) {
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL failed");
        goto done;
    }
    result = Py_None;
    Py_INCREF(result);
done:
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return result;
}

static PyMethodDef methods[] = {
    {"new", xts_new, METH_VARARGS, "new(key64) -> the keys, for crypt()"},
    {"crypt", xts_crypt, METH_VARARGS,
     "crypt(keys, first_block, source, target, decrypt): AES-256-XTS of whole 4 KiB blocks"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_xts", NULL, -1, methods};

PyMODINIT_FUNC PyInit__xts(void) { return PyModule_Create(&module); }
