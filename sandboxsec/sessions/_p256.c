/*
 * ECDSA P-256 / SHA-256 signature checks that run without the GIL (sandboxsec.sessions._p256).
 *
 * Optional: sandboxsec.sessions.signatures uses it when it imports and checks proof
 * signatures with `cryptography` otherwise.  It exists because `cryptography` holds the GIL
 * while it verifies, so a proof's signature could not be checked while the request goes on;
 * this module runs the same OpenSSL call (EVP_DigestVerify, SHA-256, DER signature) on a
 * thread of its own.  Nothing here implements a primitive, parses a key format or decides
 * anything beyond OpenSSL's answer:
 *
 *   PublicKey(point) -> PublicKey
 *       An uncompressed SEC1 point (65 bytes, 0x04 || x || y) on P-256; OpenSSL refuses a
 *       point off the curve (ValueError).  Callers pass a point `cryptography` already
 *       accepted.
 *
 *   PublicKey.verify(signature, message) -> bool
 *       True exactly when EVP_DigestVerify returns 1 for the signature over message.  The
 *       signature is JWS's raw form, r || s (64 bytes), which OpenSSL's ECDSA_SIG turns into
 *       DER.  The GIL is released while OpenSSL works.
 *
 *   PublicKey.start(signature, message) -> Pending
 *       The same check, queued for a small pool of threads that never touch Python (started
 *       on first use, at most MAX_WORKERS); Pending.result() returns the bool.  A check no
 *       thread has taken yet when result() is called runs in the caller (so waiting never
 *       costs more than checking); one a thread runs is waited for, GIL released.  The
 *       inputs are copied, so no Python object is read without the GIL.  When no thread can
 *       be started the check runs in result().  A Pending dropped without result() is
 *       finished before it is freed; one that crossed a fork (its thread stayed in the
 *       parent) is checked again in the child, whose pool starts afresh.
 *
 * The signature must be 64 bytes and the message at most MAX_MESSAGE, checked before
 * anything is copied.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/params.h>
#include <pthread.h>
#include <signal.h>
#include <string.h>
#include <unistd.h>

#define POINT_LEN 65
#define SCALAR_LEN 32
#define SIGNATURE_LEN (2 * SCALAR_LEN)
/* A session proof is at most 4096 characters; a few times that is plenty. */
#define MAX_MESSAGE 65536
#define THREAD_STACK (256 * 1024)

typedef struct {
    PyObject_HEAD
    EVP_PKEY *pkey;
} PublicKeyObject;

enum { QUEUED, RUNNING, DONE };

typedef struct Job {
    struct Job *next; /* in the queue while QUEUED */
    EVP_PKEY *pkey;   /* one reference of its own */
    unsigned char signature[SIGNATURE_LEN];
    unsigned char *message;
    size_t message_len;
    pid_t pid;  /* the process whose pool holds it */
    int state;  /* under pool.lock */
    int result; /* 1 verified, 0 not; valid once DONE */
} Job;

typedef struct {
    PyObject_HEAD
    Job *job;
} PendingObject;

#define MAX_WORKERS 2

/* The pool of this process: a FIFO of queued jobs and the threads taking them. */
static struct {
    pthread_mutex_t lock;
    pthread_cond_t work; /* a job was queued */
    pthread_cond_t done; /* a job finished */
    Job *head, *tail;
    int workers; /* threads started */
    int idle;    /* of which waiting for work */
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_COND_INITIALIZER,
          NULL, NULL, 0, 0};

static PyTypeObject PublicKeyType;
static PyTypeObject PendingType;

/* OpenSSL's answer for raw r || s over msg; any error is "does not verify". */
static int
check(EVP_PKEY *pkey, const unsigned char *raw, const unsigned char *msg, size_t msg_len)
{
    int ok = 0;
    unsigned char *der = NULL;
    EVP_MD_CTX *ctx = NULL;
    ECDSA_SIG *sig = ECDSA_SIG_new();
    BIGNUM *r = BN_bin2bn(raw, SCALAR_LEN, NULL);
    BIGNUM *s = BN_bin2bn(raw + SCALAR_LEN, SCALAR_LEN, NULL);
    if (sig == NULL || r == NULL || s == NULL || ECDSA_SIG_set0(sig, r, s) != 1) {
        BN_free(r);
        BN_free(s);
        ECDSA_SIG_free(sig);
        return 0;
    }
    /* sig owns r and s now. */
    int der_len = i2d_ECDSA_SIG(sig, &der);
    ctx = der_len > 0 ? EVP_MD_CTX_new() : NULL;
    if (ctx != NULL && EVP_DigestVerifyInit_ex(ctx, NULL, "SHA256", NULL, NULL, pkey, NULL) == 1)
        ok = EVP_DigestVerify(ctx, der, (size_t)der_len, msg, msg_len) == 1;
    EVP_MD_CTX_free(ctx);
    OPENSSL_free(der);
    ECDSA_SIG_free(sig);
    return ok;
}

static void
job_free(Job *job)
{
    if (job == NULL)
        return;
    EVP_PKEY_free(job->pkey);
    PyMem_RawFree(job->message);
    PyMem_RawFree(job);
}

static int
run(const Job *job)
{
    return check(job->pkey, job->signature, job->message, job->message_len);
}

static void *
worker(void *unused)
{
    (void)unused;
    pthread_mutex_lock(&pool.lock);
    for (;;) {
        pool.idle++;
        while (pool.head == NULL)
            pthread_cond_wait(&pool.work, &pool.lock);
        pool.idle--;
        Job *job = pool.head;
        pool.head = job->next;
        if (pool.head == NULL)
            pool.tail = NULL;
        job->next = NULL;
        job->state = RUNNING;
        pthread_mutex_unlock(&pool.lock);
        int result = run(job);
        pthread_mutex_lock(&pool.lock);
        /* The job's owner frees it once DONE: nothing here touches it afterwards. */
        job->result = result;
        job->state = DONE;
        pthread_cond_broadcast(&pool.done);
    }
    return NULL;
}

/* Queue job (pool.lock held), starting a thread when none is idle.  With no thread at all
 * it stays QUEUED outside the queue, and finish() runs it in its owner. */
static void
enqueue(Job *job)
{
    if (pool.idle == 0 && pool.workers < MAX_WORKERS) {
        pthread_attr_t attr;
        pthread_t thread;
        if (pthread_attr_init(&attr) == 0) {
            /* Signals are the interpreter's business: the thread starts with all blocked
             * (it inherits this mask), so its own threads take them. */
            sigset_t all, before;
            sigfillset(&all);
            pthread_sigmask(SIG_BLOCK, &all, &before);
            pthread_attr_setstacksize(&attr, THREAD_STACK);
            pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
            if (pthread_create(&thread, &attr, worker, NULL) == 0)
                pool.workers++;
            pthread_sigmask(SIG_SETMASK, &before, NULL);
            pthread_attr_destroy(&attr);
        }
    }
    if (pool.workers == 0)
        return;
    job->next = NULL;
    if (pool.tail != NULL)
        pool.tail->next = job;
    else
        pool.head = job;
    pool.tail = job;
    pthread_cond_signal(&pool.work);
}

/* A child of fork has none of the parent's threads: it starts its own pool. */
static void
before_fork(void)
{
    pthread_mutex_lock(&pool.lock);
}

static void
after_fork_parent(void)
{
    pthread_mutex_unlock(&pool.lock);
}

static void
after_fork_child(void)
{
    pthread_mutex_init(&pool.lock, NULL);
    pthread_cond_init(&pool.work, NULL);
    pthread_cond_init(&pool.done, NULL);
    pool.head = pool.tail = NULL;
    pool.workers = pool.idle = 0;
}

/* The answer for job, waiting for a thread running it, running it here otherwise.  Called
 * without the GIL. */
static int
finish(Job *job)
{
    if (job->pid != getpid()) {
        /* Queued or run in the parent before a fork: not this pool's. */
        if (job->state != DONE) {
            job->result = run(job);
            job->state = DONE;
        }
        return job->result;
    }
    pthread_mutex_lock(&pool.lock);
    if (job->state == QUEUED) {
        /* No thread took it yet (or none could be started): take it out, run it here. */
        Job **link = &pool.head;
        Job *prev = NULL;
        while (*link != NULL && *link != job) {
            prev = *link;
            link = &(*link)->next;
        }
        if (*link == job) {
            *link = job->next;
            if (pool.tail == job)
                pool.tail = prev;
        }
        job->next = NULL;
        job->state = RUNNING;
        pthread_mutex_unlock(&pool.lock);
        int result = run(job);
        pthread_mutex_lock(&pool.lock);
        job->result = result;
        job->state = DONE;
    }
    while (job->state != DONE)
        pthread_cond_wait(&pool.done, &pool.lock);
    pthread_mutex_unlock(&pool.lock);
    return job->result;
}

/* A raw signature and a bounded message; 0 with an exception set otherwise. */
static int
arguments_hold(const Py_buffer *sig, const Py_buffer *msg)
{
    if (sig->len != SIGNATURE_LEN) {
        PyErr_Format(PyExc_ValueError, "signature must be r || s, %d bytes", SIGNATURE_LEN);
        return 0;
    }
    if (msg->len <= 0 || msg->len > MAX_MESSAGE) {
        PyErr_Format(PyExc_ValueError, "message must be 1 to %d bytes", MAX_MESSAGE);
        return 0;
    }
    return 1;
}

/* -- PublicKey ---------------------------------------------------------------------------- */

static PyObject *
publickey_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"point", NULL};
    Py_buffer point;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*:PublicKey", kwlist, &point))
        return NULL;
    EVP_PKEY *pkey = NULL;
    EVP_PKEY_CTX *ctx = NULL;
    int ok = point.len == POINT_LEN && ((const unsigned char *)point.buf)[0] == 0x04;
    if (ok) {
        char group[] = "prime256v1";
        OSSL_PARAM params[] = {
            OSSL_PARAM_construct_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME, group, 0),
            OSSL_PARAM_construct_octet_string(OSSL_PKEY_PARAM_PUB_KEY, point.buf,
                                              (size_t)point.len),
            OSSL_PARAM_construct_end(),
        };
        ctx = EVP_PKEY_CTX_new_from_name(NULL, "EC", NULL);
        ok = ctx != NULL && EVP_PKEY_fromdata_init(ctx) == 1 &&
             EVP_PKEY_fromdata(ctx, &pkey, EVP_PKEY_PUBLIC_KEY, params) == 1;
        EVP_PKEY_CTX_free(ctx);
        ctx = NULL;
        if (ok) {
            /* On the curve, not the point at infinity, of the group's order. */
            ctx = EVP_PKEY_CTX_new_from_pkey(NULL, pkey, NULL);
            ok = ctx != NULL && EVP_PKEY_public_check(ctx) == 1;
            EVP_PKEY_CTX_free(ctx);
        }
    }
    PyBuffer_Release(&point);
    if (!ok) {
        EVP_PKEY_free(pkey);
        PyErr_SetString(PyExc_ValueError, "not an uncompressed point on P-256");
        return NULL;
    }
    PublicKeyObject *self = (PublicKeyObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        EVP_PKEY_free(pkey);
        return NULL;
    }
    self->pkey = pkey;
    return (PyObject *)self;
}

static void
publickey_dealloc(PublicKeyObject *self)
{
    EVP_PKEY_free(self->pkey);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
publickey_verify(PublicKeyObject *self, PyObject *args)
{
    Py_buffer sig, msg;
    if (!PyArg_ParseTuple(args, "y*y*:verify", &sig, &msg))
        return NULL;
    int ok = -1;
    if (arguments_hold(&sig, &msg)) {
        /* Held views of immutable bytes (or locked buffers) stay valid without the GIL. */
        Py_BEGIN_ALLOW_THREADS
        ok = check(self->pkey, sig.buf, msg.buf, (size_t)msg.len);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&sig);
    PyBuffer_Release(&msg);
    if (ok < 0)
        return NULL;
    return PyBool_FromLong(ok);
}

static Job *
job_new(EVP_PKEY *pkey, const Py_buffer *sig, const Py_buffer *msg)
{
    Job *job = PyMem_RawCalloc(1, sizeof(Job));
    if (job == NULL)
        return NULL;
    job->message = PyMem_RawMalloc((size_t)msg->len);
    if (job->message == NULL || EVP_PKEY_up_ref(pkey) != 1) {
        job_free(job);
        return NULL;
    }
    job->pkey = pkey;
    memcpy(job->signature, sig->buf, SIGNATURE_LEN);
    memcpy(job->message, msg->buf, (size_t)msg->len);
    job->message_len = (size_t)msg->len;
    return job;
}

static PyObject *
publickey_start(PublicKeyObject *self, PyObject *args)
{
    Py_buffer sig, msg;
    if (!PyArg_ParseTuple(args, "y*y*:start", &sig, &msg))
        return NULL;
    Job *job = NULL;
    if (arguments_hold(&sig, &msg)) {
        job = job_new(self->pkey, &sig, &msg);
        if (job == NULL)
            PyErr_NoMemory();
    }
    PyBuffer_Release(&sig);
    PyBuffer_Release(&msg);
    if (job == NULL)
        return NULL;
    PendingObject *pending = PyObject_New(PendingObject, &PendingType);
    if (pending == NULL) {
        job_free(job);
        return NULL;
    }
    pending->job = job;
    job->pid = getpid();
    job->state = QUEUED;
    /* Short critical sections only: no thread holds the lock while it verifies. */
    pthread_mutex_lock(&pool.lock);
    enqueue(job);
    pthread_mutex_unlock(&pool.lock);
    return (PyObject *)pending;
}

static PyMethodDef publickey_methods[] = {
    {"verify", (PyCFunction)publickey_verify, METH_VARARGS,
     "verify(signature, message) -> bool: raw r || s ECDSA signature over SHA-256(message)."},
    {"start", (PyCFunction)publickey_start, METH_VARARGS,
     "start(signature, message) -> Pending: verify on a pool thread."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject PublicKeyType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "sandboxsec.sessions._p256.PublicKey",
    .tp_basicsize = sizeof(PublicKeyObject),
    .tp_dealloc = (destructor)publickey_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A P-256 public key whose ECDSA/SHA-256 checks release the GIL.",
    .tp_methods = publickey_methods,
    .tp_new = publickey_new,
};

/* -- Pending ------------------------------------------------------------------------------ */

/* The answer if the job is DONE already (1 or 0), -1 otherwise; the lock is only ever held
 * for a few instructions, so it is taken with the GIL held. */
static int
answer_if_done(Job *job)
{
    int result = -1;
    if (job->pid != getpid())
        return -1;
    pthread_mutex_lock(&pool.lock);
    if (job->state == DONE)
        result = job->result;
    pthread_mutex_unlock(&pool.lock);
    return result;
}

/* The answer for job, called with the GIL: usually done by the time it is asked for, and
 * then given without giving up the GIL; otherwise finished without it. */
static int
answer(Job *job)
{
    int result = answer_if_done(job);
    if (result < 0) {
        Py_BEGIN_ALLOW_THREADS
        result = finish(job);
        Py_END_ALLOW_THREADS
    }
    return result;
}

static PyObject *
pending_result(PendingObject *self, PyObject *Py_UNUSED(ignored))
{
    return PyBool_FromLong(answer(self->job));
}

static void
pending_dealloc(PendingObject *self)
{
    Job *job = self->job;
    answer(job); /* a thread may still be reading it: finished before it is freed */
    job_free(job);
    PyObject_Free(self);
}

static PyMethodDef pending_methods[] = {
    {"result", (PyCFunction)pending_result, METH_NOARGS,
     "result() -> bool: the answer (waits for a running check, GIL released)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject PendingType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "sandboxsec.sessions._p256.Pending",
    .tp_basicsize = sizeof(PendingObject),
    .tp_dealloc = (destructor)pending_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A signature check queued for, or running on, a pool thread.",
    .tp_methods = pending_methods,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "sandboxsec.sessions._p256",
    .m_doc = "ECDSA P-256/SHA-256 signature checks without the GIL (OpenSSL EVP).",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__p256(void)
{
    static int registered;
    if (!registered) {
        if (pthread_atfork(before_fork, after_fork_parent, after_fork_child) != 0) {
            PyErr_SetString(PyExc_OSError, "pthread_atfork failed");
            return NULL;
        }
        registered = 1;
    }
    if (PyType_Ready(&PublicKeyType) < 0 || PyType_Ready(&PendingType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&PublicKeyType);
    if (PyModule_AddObject(m, "PublicKey", (PyObject *)&PublicKeyType) < 0) {
        Py_DECREF(&PublicKeyType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
