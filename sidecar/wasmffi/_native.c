/* The sidecar's per-call and per-tick work that must not wait for the GIL, in C.
 *
 * 1. The data half of guest ABI v1: `input_len`, `input_read`, `output_write`, `response_len`
 *    and `response_read`. A host function written in Python costs a guest 1-4 µs per call on
 *    the request path (the ctypes callback machinery, taking the GIL, arguments as Python
 *    objects), and a typical guest call makes four of these. Here each is a bounds check and a
 *    memcpy, run without the GIL.
 * 2. The epoch ticker: one native thread that advances every engine's epoch each tick. A Python
 *    thread would take the GIL every millisecond, right when a running guest's deadline check
 *    wants it too.
 * 3. `changed_runs`, the scan behind a snapshot: which fixed-size chunks of a linear memory differ
 *    from a baseline (zeros, or an image such as the module's data). In Python a 64 MiB scan is
 *    13 ms of slicing and comparing chunk by chunk; here it runs at memory bandwidth without the GIL.
 * 4. `restore_pages`, the rewind of a used instance to a pristine one's memory: only the pages the
 *    kernel says this mapping holds privately can differ, so only those are compared and copied
 *    back (a Python sandbox's eval dirties ~1.4 MiB of a 20 MiB memory).
 *
 * A `GuestIo` belongs to one instance and is the data of its store: the host functions take no
 * `env` of their own, so one linker (one definition of each) serves every instance of a module,
 * and each call finds its instance's GuestIo through the caller's store
 * (`wasmtime_context_get_data`). Its owner thread fills it before a call (`begin`: the input, the
 * output budget, the response) and reads it after (`output`, `fault`, `output_overflow`); while
 * the guest runs, only these functions touch it, on that same thread. They read the input and
 * response through the `bytes` objects it holds references to (immutable, alive while held) and
 * never call into Python, so they run without the GIL. A fault traps the calling guest and is
 * remembered for the call's error. A store without a GuestIo (made some other way) traps its
 * caller instead.
 *
 * Ownership: the store holds a reference to its GuestIo (`lend` makes it when the store is made,
 * the store's finalizer `release` drops it), so a GuestIo lives exactly as long as the store that
 * can call it, whoever else forgets it, and a linker that outlives the store holds nothing of
 * either. It holds nothing of the store's in return (the memory handle is copied, the context is
 * a plain address, valid while the store that calls is; `host` is meant to be a weak reference):
 * a reference back would be a cycle through wasmtime that no collector sees.
 *
 * The wasmtime functions come from the library wasmtime-py loaded, handed over once by
 * `setup`, so this module does not link against wasmtime. Build: the `hatch_build.py` hook.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

typedef union {
    int32_t i32;
    int64_t i64;
    uint8_t v128[16];
} raw_value; /* wasmtime_val_raw_t: one slot of an unchecked call's values */

typedef void *(*memory_data_fn)(void *context, const void *memory);
typedef size_t (*memory_data_size_fn)(void *context, const void *memory);
typedef void *(*trap_new_fn)(const char *message, size_t length);
typedef void *(*caller_context_fn)(void *caller);
typedef bool (*caller_export_get_fn)(void *caller, const char *name, size_t length, void *item);
typedef void (*increment_epoch_fn)(void *engine);
typedef void *(*context_get_data_fn)(void *context);

#define EXTERN_BYTES_MAX 64
#define MEMORY_BYTES_MAX 32
/* The guest ABI's lengths are i32 (`input_len`, `response_len`, `host_call`'s result): a longer
 * input or response could not be told to the guest, so `begin` and the `response` setter refuse
 * one. vm_input_bytes and vm_host_call_bytes have this as their maximum. */
#define ABI_LENGTH_MAX INT32_MAX
#ifndef SIDECAR_SOURCE_SHA256
#define SIDECAR_SOURCE_SHA256 "" /* set by the build hook: how a stale build is noticed */
#endif

static struct {
    memory_data_fn memory_data;
    memory_data_size_fn memory_data_size;
    trap_new_fn trap_new;
    caller_context_fn caller_context;
    caller_export_get_fn caller_export_get;
    increment_epoch_fn increment_epoch;
    context_get_data_fn context_get_data;
    size_t extern_bytes;     /* sizeof(wasmtime_extern_t) */
    size_t extern_of_offset; /* offsetof(wasmtime_extern_t, of) */
    uint8_t extern_memory;   /* WASMTIME_EXTERN_MEMORY */
    size_t memory_bytes;     /* sizeof(wasmtime_memory_t) */
} api;

enum fault_kind { FAULT_NONE, FAULT_OUT_OF_BOUNDS, FAULT_NO_MEMORY };

/* A retained output buffer larger than this is freed before the next call: an idle instance
 * should not keep the biggest output it ever wrote. */
#define OUTPUT_KEEP_BYTES 65536
#define MESSAGE_BYTES 160

typedef struct {
    PyObject_HEAD
    /* The instance's ABI memory, once bound (context != NULL); until then it is looked up
     * through the caller. The handle is a copy: a value, valid as long as its store. */
    void *context;
    _Alignas(16) uint8_t memory[MEMORY_BYTES_MAX];
    /* What the current call reads. */
    PyObject *input;    /* bytes */
    PyObject *response; /* bytes */
    /* What it wrote. */
    char *output;
    size_t output_len, output_alloc, output_cap;
    uint64_t output_overflow; /* the size a refused output_write would have reached */
    enum fault_kind fault;
    char message[MESSAGE_BYTES];
    PyObject *host;     /* what `host_of` gives the Python host functions: None, or a weak reference */
    PyObject *weakrefs; /* so a test can watch its lifetime without holding it */
} GuestIo;

/* -- the host functions ---------------------------------------------------------------------- */

static void *trap(const char *message) { return api.trap_new(message, strlen(message)); }

static void *fault(GuestIo *io, enum fault_kind kind, const char *message) {
    if (io->fault == FAULT_NONE && io->output_overflow == 0) {
        io->fault = kind;
        snprintf(io->message, MESSAGE_BYTES, "%s", message);
    }
    return trap(message);
}

/* The caller's memory as (base, size), or a trap in *failed when there is none. (A memory of
 * zero bytes may have a NULL base: only *failed says whether there is a memory.) */
static uint8_t *locate(GuestIo *io, void *caller, size_t *size, void **failed) {
    if (io->context != NULL) {
        *size = api.memory_data_size(io->context, io->memory);
        return api.memory_data(io->context, io->memory);
    }
    /* Not bound yet (a start function runs before its instance exists): the export by name. */
    _Alignas(16) uint8_t item[EXTERN_BYTES_MAX];
    if (!api.caller_export_get(caller, "memory", 6, item) || item[0] != api.extern_memory) {
        *failed = fault(io, FAULT_NO_MEMORY, "the guest exports no memory named `memory` (guest ABI v1)");
        return NULL;
    }
    void *context = api.caller_context(caller);
    *size = api.memory_data_size(context, item + api.extern_of_offset);
    return api.memory_data(context, item + api.extern_of_offset);
}

/* Whether [pointer, +length) lies inside a memory of `size` bytes (written so nothing overflows). */
static bool inside(uint32_t pointer, size_t length, size_t size) { return length <= size && pointer <= size - length; }

/* [pointer, +length) is not inside a memory of `size` bytes; i32 pointers are unsigned addresses. */
static void *outside(GuestIo *io, uint32_t pointer, int64_t length, size_t size) {
    char message[MESSAGE_BYTES];
    snprintf(message, sizeof message, "guest range [%u, +%lld) is outside its memory of %zu bytes", pointer,
             (long long)length, size);
    return fault(io, FAULT_OUT_OF_BOUNDS, message);
}

static void *copy_out(GuestIo *io, void *caller, uint32_t pointer, PyObject *data) {
    size_t size;
    void *failed = NULL;
    uint8_t *base = locate(io, caller, &size, &failed);
    if (failed != NULL) return failed;
    size_t length = (size_t)PyBytes_GET_SIZE(data);
    if (!inside(pointer, length, size)) return outside(io, pointer, (int64_t)length, size);
    if (length == 0) return NULL;
    memcpy(base + pointer, PyBytes_AS_STRING(data), length);
    return NULL;
}

/* The GuestIo of the store `caller` runs in: its data, when `store_for` made it. */
static GuestIo *caller_io(void *caller) { return api.context_get_data(api.caller_context(caller)); }

static void *no_io(void) { return trap("this store has no guest ABI state (it was not made for a guest ABI instance)"); }

/* The casts cannot truncate: nothing longer than ABI_LENGTH_MAX gets in (`abi_length`). */
static void *input_len(void *env, void *caller, raw_value *values, size_t count) {
    GuestIo *io = caller_io(caller);
    if (io == NULL) return no_io();
    values[0].i32 = (int32_t)PyBytes_GET_SIZE(io->input);
    return NULL;
}

static void *input_read(void *env, void *caller, raw_value *values, size_t count) {
    GuestIo *io = caller_io(caller);
    if (io == NULL) return no_io();
    return copy_out(io, caller, (uint32_t)values[0].i32, io->input);
}

static void *response_len(void *env, void *caller, raw_value *values, size_t count) {
    GuestIo *io = caller_io(caller);
    if (io == NULL) return no_io();
    values[0].i32 = (int32_t)PyBytes_GET_SIZE(io->response);
    return NULL;
}

static void *response_read(void *env, void *caller, raw_value *values, size_t count) {
    GuestIo *io = caller_io(caller);
    if (io == NULL) return no_io();
    return copy_out(io, caller, (uint32_t)values[0].i32, io->response);
}

static void *output_write(void *env, void *caller, raw_value *values, size_t count) {
    GuestIo *io = caller_io(caller);
    if (io == NULL) return no_io();
    uint32_t pointer = (uint32_t)values[0].i32;
    int32_t length = values[1].i32;
    size_t size;
    void *failed = NULL;
    uint8_t *base = locate(io, caller, &size, &failed);
    if (failed != NULL) return failed;
    if (length < 0 || !inside(pointer, (size_t)length, size)) return outside(io, pointer, length, size);
    if (length == 0) return NULL; /* nothing to keep; the buffer may not exist yet */
    if ((size_t)length > io->output_cap - io->output_len) { /* output_len <= output_cap, always */
        uint64_t wanted = (uint64_t)io->output_len + (uint64_t)length;
        char message[MESSAGE_BYTES];
        snprintf(message, sizeof message, "vm_output_bytes exceeded: %llu > %zu", (unsigned long long)wanted,
                 io->output_cap);
        if (io->fault == FAULT_NONE && io->output_overflow == 0) io->output_overflow = wanted;
        return trap(message);
    }
    size_t wanted = io->output_len + (size_t)length; /* <= output_cap: cannot overflow */
    if (wanted > io->output_alloc) {
        size_t grown = io->output_alloc ? io->output_alloc : 256;
        while (grown < wanted) grown = grown > io->output_cap / 2 ? io->output_cap : 2 * grown;
        if (grown > io->output_cap) grown = io->output_cap;
        char *output = PyMem_RawRealloc(io->output, grown); /* allowed without the GIL */
        if (output == NULL) return trap("the sidecar is out of memory for the guest's output");
        io->output = output;
        io->output_alloc = grown;
    }
    memcpy(io->output + io->output_len, base + pointer, (size_t)length);
    io->output_len = wanted;
    return NULL;
}

/* -- the Python side ----------------------------------------------------------------------- */

static int require_bytes(PyObject *value, const char *what) {
    if (PyBytes_CheckExact(value)) return 0;
    PyErr_Format(PyExc_TypeError, "%s must be bytes, not %.100s", what, Py_TYPE(value)->tp_name);
    return -1;
}

/* Bytes a guest may be told the length of. */
static int abi_length(PyObject *value, const char *what) {
    if (require_bytes(value, what) < 0) return -1;
    Py_ssize_t length = PyBytes_GET_SIZE(value);
    if ((size_t)length <= ABI_LENGTH_MAX) return 0;
    PyErr_Format(PyExc_ValueError, "%s of %zd bytes is longer than the guest ABI's i32 lengths allow (%d)", what,
                 length, ABI_LENGTH_MAX);
    return -1;
}

static PyObject *GuestIo_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    if (PyTuple_GET_SIZE(args) != 0 || (kwargs != NULL && PyDict_GET_SIZE(kwargs) != 0)) {
        PyErr_SetString(PyExc_TypeError, "GuestIo() takes no arguments");
        return NULL;
    }
    GuestIo *io = (GuestIo *)type->tp_alloc(type, 0);
    if (io == NULL) return NULL;
    io->input = PyBytes_FromStringAndSize(NULL, 0);
    if (io->input == NULL) {
        Py_DECREF(io);
        return NULL;
    }
    io->response = Py_NewRef(io->input);
    io->host = Py_NewRef(Py_None);
    return (PyObject *)io;
}

static void GuestIo_dealloc(GuestIo *io) {
    if (io->weakrefs != NULL) PyObject_ClearWeakRefs((PyObject *)io);
    Py_XDECREF(io->input);
    Py_XDECREF(io->response);
    Py_XDECREF(io->host);
    PyMem_RawFree(io->output);
    Py_TYPE(io)->tp_free((PyObject *)io);
}

PyDoc_STRVAR(begin_doc, "begin(input, output_cap, response)\n--\n\n"
                        "Start a call: what it reads, how much it may write; forgets the last call's output and fault.");

static PyObject *GuestIo_begin(GuestIo *io, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) return PyErr_Format(PyExc_TypeError, "begin() takes 3 arguments (%zd given)", nargs);
    if (abi_length(args[0], "input") < 0 || abi_length(args[2], "response") < 0) return NULL;
    Py_ssize_t cap = PyLong_AsSsize_t(args[1]);
    if (cap < 0) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "output_cap must be >= 0");
        return NULL;
    }
    Py_SETREF(io->input, Py_NewRef(args[0]));
    Py_SETREF(io->response, Py_NewRef(args[2]));
    if (io->output_alloc > OUTPUT_KEEP_BYTES) {
        PyMem_RawFree(io->output);
        io->output = NULL;
        io->output_alloc = 0;
    }
    io->output_len = 0;
    io->output_cap = (size_t)cap;
    io->output_overflow = 0;
    io->fault = FAULT_NONE;
    Py_RETURN_NONE;
}

PyDoc_STRVAR(output_doc, "output()\n--\n\nWhat the current (or last) call wrote with output_write.");

static PyObject *GuestIo_output(GuestIo *io, PyObject *unused) {
    return PyBytes_FromStringAndSize(io->output, (Py_ssize_t)io->output_len);
}

/* An address argument: a non-negative int that fits a pointer. -1 with an exception naming the
 * argument otherwise; callers return at once, so no C API call runs with an exception pending. */
static int address_arg(PyObject *value, const char *what, void **address) {
    if (!PyLong_Check(value)) {
        PyErr_Format(PyExc_TypeError, "%s must be an int (an address), not %.100s", what, Py_TYPE(value)->tp_name);
        return -1;
    }
    unsigned long long raw = PyLong_AsUnsignedLongLong(value);
    if ((raw == (unsigned long long)-1 && PyErr_Occurred()) || raw > UINTPTR_MAX) {
        PyErr_Format(PyExc_OverflowError, "%s is not an address (negative, or wider than a pointer)", what);
        return -1;
    }
    *address = (void *)(uintptr_t)raw;
    return 0;
}

PyDoc_STRVAR(bind_doc, "bind(context, memory)\n--\n\n"
                       "Use this memory from now on: addresses of the store's wasmtime_context_t and of a "
                       "wasmtime_memory_t, which is copied (0, 0: back to the lookup by name). The context must "
                       "be that of the store whose instances call these functions.");

static PyObject *GuestIo_bind(GuestIo *io, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) return PyErr_Format(PyExc_TypeError, "bind() takes 2 arguments (%zd given)", nargs);
    void *context, *memory;
    if (address_arg(args[0], "context", &context) < 0 || address_arg(args[1], "memory", &memory) < 0) return NULL;
    if ((context == NULL) != (memory == NULL)) {
        PyErr_SetString(PyExc_ValueError, "context and memory are both set or both 0");
        return NULL;
    }
    if (api.memory_bytes == 0) {
        PyErr_SetString(PyExc_RuntimeError, "setup() has not run");
        return NULL;
    }
    /* A copy, not a pointer into the Python object that holds the handle: nothing to keep alive. */
    if (memory != NULL) memcpy(io->memory, memory, api.memory_bytes);
    io->context = context;
    Py_RETURN_NONE;
}

PyDoc_STRVAR(lend_doc, "lend()\n--\n\n"
                       "A new reference to this GuestIo, as an address: the data of one store, whose "
                       "finalizer must be RELEASE, which drops it.");

static PyObject *GuestIo_lend(GuestIo *io, PyObject *unused) {
    PyObject *address = PyLong_FromVoidPtr(io);
    if (address != NULL) Py_INCREF(io);
    return address;
}

#if PY_VERSION_HEX >= 0x030D0000
#define interpreter_finalizing Py_IsFinalizing
#else
#define interpreter_finalizing _Py_IsFinalizing
#endif

/* The finalizer of a store's data (`lend`): wasmtime runs it when it drops the store. That is a Python thread closing or collecting one,
 * in practice, but wasmtime promises no thread, so the GIL is taken here (PyGILState_Ensure is
 * reentrant on a thread that holds it already). Once the interpreter is finalizing, the
 * reference is leaked on purpose: CPython ends a thread other than the finalizing one that asks
 * for the GIL then, and the process is about to return all its memory anyway. */
static void release(void *env) {
    if (!Py_IsInitialized() || interpreter_finalizing()) return;
    PyGILState_STATE gil = PyGILState_Ensure();
    Py_DECREF((PyObject *)env);
    PyGILState_Release(gil);
}

static PyObject *GuestIo_get_response(GuestIo *io, void *closure) { return Py_NewRef(io->response); }

static int GuestIo_set_response(GuestIo *io, PyObject *value, void *closure) {
    if (value == NULL || abi_length(value, "response") < 0) {
        if (value == NULL) PyErr_SetString(PyExc_AttributeError, "response cannot be deleted");
        return -1;
    }
    Py_SETREF(io->response, Py_NewRef(value));
    return 0;
}

static PyObject *GuestIo_get_host(GuestIo *io, void *closure) { return Py_NewRef(io->host); }

static int GuestIo_set_host(GuestIo *io, PyObject *value, void *closure) {
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "host cannot be deleted");
        return -1;
    }
    Py_SETREF(io->host, Py_NewRef(value));
    return 0;
}

static PyObject *GuestIo_get_fault(GuestIo *io, void *closure) {
    switch (io->fault) {
    case FAULT_OUT_OF_BOUNDS: return Py_BuildValue("(ss)", "memory_out_of_bounds", io->message);
    case FAULT_NO_MEMORY: return Py_BuildValue("(ss)", "abi_violation", io->message);
    default: Py_RETURN_NONE;
    }
}

static PyObject *GuestIo_get_overflow(GuestIo *io, void *closure) {
    return PyLong_FromUnsignedLongLong(io->output_overflow);
}

static PyMethodDef GuestIo_methods[] = {
    {"begin", (PyCFunction)(void (*)(void))GuestIo_begin, METH_FASTCALL, begin_doc},
    {"output", (PyCFunction)GuestIo_output, METH_NOARGS, output_doc},
    {"bind", (PyCFunction)(void (*)(void))GuestIo_bind, METH_FASTCALL, bind_doc},
    {"lend", (PyCFunction)GuestIo_lend, METH_NOARGS, lend_doc},
    {NULL},
};

static PyGetSetDef GuestIo_getset[] = {
    {"response", (getter)GuestIo_get_response, (setter)GuestIo_set_response,
     "What response_len/response_read give the guest: the last host answer (bytes).", NULL},
    {"host", (getter)GuestIo_get_host, (setter)GuestIo_set_host,
     "What host_of gives for a call in this GuestIo's store; a weak reference to the owner, so as not to "
     "make a cycle no collector sees.", NULL},
    {"fault", (getter)GuestIo_get_fault, NULL,
     "(trap code, message) of the ABI violation that trapped the call, or None.", NULL},
    {"output_overflow", (getter)GuestIo_get_overflow, NULL,
     "The output size a refused output_write would have reached (0: none was refused).", NULL},
    {NULL},
};

static PyTypeObject GuestIoType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "sidecar.wasmffi._native.GuestIo",
    .tp_doc = "One instance's guest ABI data: the call's input and response, the output it wrote.",
    .tp_basicsize = sizeof(GuestIo),
    .tp_weaklistoffset = offsetof(GuestIo, weakrefs),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = GuestIo_new,
    .tp_dealloc = (destructor)GuestIo_dealloc,
    .tp_methods = GuestIo_methods,
    .tp_getset = GuestIo_getset,
};

/* -- the epoch ticker ---------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    pthread_mutex_t lock; /* guards everything below; the thread holds it except while waiting */
    pthread_cond_t wake;  /* signalled by stop() */
    pthread_t thread;
    bool running, stopping;
    int64_t tick_ns;
    void **engines; /* wasm_engine_t*, each kept alive by `owners[i]` (same index) */
    size_t count, capacity;
    PyObject *owners; /* touched only with the GIL held, which also serialises add and remove */
} EpochTicker;

static void add_ns(struct timespec *at, int64_t ns) {
    int64_t total = at->tv_nsec + ns;
    at->tv_sec += total / 1000000000;
    at->tv_nsec = total % 1000000000;
}

static int64_t ns_between(const struct timespec *from, const struct timespec *to) {
    return (to->tv_sec - from->tv_sec) * 1000000000LL + (to->tv_nsec - from->tv_nsec);
}

static void *tick_loop(void *arg) {
    EpochTicker *ticker = arg;
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL); /* signals go to Python's threads, never here */
    struct timespec next, now;
    clock_gettime(CLOCK_MONOTONIC, &next);
    pthread_mutex_lock(&ticker->lock);
    while (!ticker->stopping) {
        add_ns(&next, ticker->tick_ns);
        int waited = 0;
        while (!ticker->stopping && waited != ETIMEDOUT)
            waited = pthread_cond_timedwait(&ticker->wake, &ticker->lock, &next);
        if (ticker->stopping) break;
        for (size_t i = 0; i < ticker->count; i++) api.increment_epoch(ticker->engines[i]);
        clock_gettime(CLOCK_MONOTONIC, &now);
        if (ns_between(&next, &now) > ticker->tick_ns) next = now; /* fell behind: no burst of ticks */
    }
    pthread_mutex_unlock(&ticker->lock);
    return NULL;
}

static PyObject *EpochTicker_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"tick_ms", NULL};
    double tick_ms;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "d:EpochTicker", keywords, &tick_ms)) return NULL;
    if (!(tick_ms >= 0.001 && tick_ms <= 3600e3)) {
        PyErr_SetString(PyExc_ValueError, "tick_ms must be between 0.001 and 3600000");
        return NULL;
    }
    EpochTicker *ticker = (EpochTicker *)type->tp_alloc(type, 0);
    if (ticker == NULL) return NULL;
    ticker->tick_ns = (int64_t)(tick_ms * 1e6);
    ticker->owners = PyList_New(0);
    pthread_condattr_t attributes;
    if (ticker->owners == NULL || pthread_condattr_init(&attributes) != 0) {
        Py_XDECREF(ticker->owners);
        Py_TYPE(ticker)->tp_free((PyObject *)ticker);
        return PyErr_NoMemory();
    }
    pthread_condattr_setclock(&attributes, CLOCK_MONOTONIC);
    pthread_cond_init(&ticker->wake, &attributes);
    pthread_condattr_destroy(&attributes);
    pthread_mutex_init(&ticker->lock, NULL);
    return (PyObject *)ticker;
}

static void stop_ticking(EpochTicker *ticker) {
    if (!ticker->running) return;
    pthread_mutex_lock(&ticker->lock);
    ticker->stopping = true;
    pthread_cond_signal(&ticker->wake);
    pthread_mutex_unlock(&ticker->lock);
    Py_BEGIN_ALLOW_THREADS /* the thread never takes the GIL, but others may want it meanwhile */
    pthread_join(ticker->thread, NULL);
    Py_END_ALLOW_THREADS
    ticker->running = false;
}

static void EpochTicker_dealloc(EpochTicker *ticker) {
    stop_ticking(ticker);
    pthread_cond_destroy(&ticker->wake);
    pthread_mutex_destroy(&ticker->lock);
    PyMem_RawFree(ticker->engines);
    Py_XDECREF(ticker->owners);
    Py_TYPE(ticker)->tp_free((PyObject *)ticker);
}

PyDoc_STRVAR(add_doc, "add(engine, owner)\n--\n\n"
                      "Tick the engine at this address (a wasm_engine_t*) from now on; `owner` is kept "
                      "referenced, and must keep it alive, until remove() or for as long as this ticker lives.");

static PyObject *EpochTicker_add(EpochTicker *ticker, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) return PyErr_Format(PyExc_TypeError, "add() takes 2 arguments (%zd given)", nargs);
    void *engine = PyLong_AsVoidPtr(args[0]);
    if (engine == NULL) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "the engine address is 0");
        return NULL;
    }
    pthread_mutex_lock(&ticker->lock);
    if (ticker->count == ticker->capacity) {
        size_t capacity = ticker->capacity ? 2 * ticker->capacity : 4;
        void **engines = PyMem_RawRealloc(ticker->engines, capacity * sizeof(void *));
        if (engines == NULL) {
            pthread_mutex_unlock(&ticker->lock);
            return PyErr_NoMemory();
        }
        ticker->engines = engines;
        ticker->capacity = capacity;
    }
    pthread_mutex_unlock(&ticker->lock);
    /* The owner goes in only once the engine surely fits, so owners[i] always owns engines[i]. */
    if (PyList_Append(ticker->owners, args[1]) < 0) return NULL;
    pthread_mutex_lock(&ticker->lock);
    ticker->engines[ticker->count++] = engine;
    pthread_mutex_unlock(&ticker->lock);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(remove_doc, "remove(engine)\n--\n\n"
                         "Stop ticking the engine at this address and release its owner; once this returns, "
                         "the ticker thread no longer touches it. False if it was not ticked.");

static PyObject *EpochTicker_remove(EpochTicker *ticker, PyObject *address) {
    void *engine = PyLong_AsVoidPtr(address);
    if (engine == NULL && PyErr_Occurred()) return NULL;
    pthread_mutex_lock(&ticker->lock); /* waits out a tick in progress */
    size_t i = 0;
    while (i < ticker->count && ticker->engines[i] != engine) i++;
    bool found = i < ticker->count;
    if (found) {
        memmove(&ticker->engines[i], &ticker->engines[i + 1], (ticker->count - i - 1) * sizeof(void *));
        ticker->count--;
    }
    pthread_mutex_unlock(&ticker->lock);
    if (!found) Py_RETURN_FALSE;
    /* Only now may the owner go (and with it, perhaps, the engine): the thread cannot reach it. */
    if (PySequence_DelItem(ticker->owners, (Py_ssize_t)i) < 0) return NULL;
    Py_RETURN_TRUE;
}

PyDoc_STRVAR(start_doc, "start()\n--\n\nStart ticking (a no-op while it ticks).");

static PyObject *EpochTicker_start(EpochTicker *ticker, PyObject *unused) {
    if (ticker->running) Py_RETURN_NONE;
    if (api.increment_epoch == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "setup() has not run");
        return NULL;
    }
    ticker->stopping = false;
    int failed = pthread_create(&ticker->thread, NULL, tick_loop, ticker);
    if (failed) {
        errno = failed;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    ticker->running = true;
    Py_RETURN_NONE;
}

PyDoc_STRVAR(stop_doc, "stop()\n--\n\nStop ticking and wait for the thread to end (a no-op when stopped).");

static PyObject *EpochTicker_stop(EpochTicker *ticker, PyObject *unused) {
    stop_ticking(ticker);
    Py_RETURN_NONE;
}

static PyObject *EpochTicker_get_running(EpochTicker *ticker, void *closure) { return PyBool_FromLong(ticker->running); }

static PyMethodDef EpochTicker_methods[] = {
    {"add", (PyCFunction)(void (*)(void))EpochTicker_add, METH_FASTCALL, add_doc},
    {"remove", (PyCFunction)EpochTicker_remove, METH_O, remove_doc},
    {"start", (PyCFunction)EpochTicker_start, METH_NOARGS, start_doc},
    {"stop", (PyCFunction)EpochTicker_stop, METH_NOARGS, stop_doc},
    {NULL},
};

static PyGetSetDef EpochTicker_getset[] = {
    {"running", (getter)EpochTicker_get_running, NULL, "Whether the thread ticks.", NULL},
    {NULL},
};

static PyTypeObject EpochTickerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "sidecar.wasmffi._native.EpochTicker",
    .tp_doc = "EpochTicker(tick_ms): one native thread advancing the epoch of every added engine each tick.",
    .tp_basicsize = sizeof(EpochTicker),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = EpochTicker_new,
    .tp_dealloc = (destructor)EpochTicker_dealloc,
    .tp_methods = EpochTicker_methods,
    .tp_getset = EpochTicker_getset,
};

/* -- the snapshot scan ------------------------------------------------------------------------ */

/* Whether `length` bytes at `data` are all zero: an OR over whole words the compiler vectorizes,
 * then the tail. Memory-bound, so no early exit inside a chunk. */
static bool all_zero(const unsigned char *data, size_t length) {
    uint64_t any = 0;
    size_t words = length / sizeof(uint64_t);
    for (size_t i = 0; i < words; i++) {
        uint64_t word;
        memcpy(&word, data + i * sizeof(uint64_t), sizeof word); /* no alignment assumed */
        any |= word;
    }
    for (size_t i = words * sizeof(uint64_t); i < length; i++) any |= data[i];
    return any == 0;
}

/* Chunk `[start, start + length)` of `memory` differs from the baseline: the baseline's bytes where
 * it has them, zeros past its end. */
static bool chunk_changed(const unsigned char *memory, const unsigned char *baseline, size_t baseline_length,
                          size_t start, size_t length) {
    if (start >= baseline_length) return !all_zero(memory + start, length);
    size_t shared = baseline_length - start < length ? baseline_length - start : length;
    if (memcmp(memory + start, baseline + start, shared) != 0) return true;
    return !all_zero(memory + start + shared, length - shared);
}

typedef struct {
    size_t *bounds; /* start, stop, start, stop, ... */
    size_t count;   /* runs */
    size_t capacity;
} run_list;

static bool run_list_add(run_list *runs, size_t start, size_t stop) {
    if (runs->count == runs->capacity) {
        size_t capacity = runs->capacity ? runs->capacity * 2 : 64;
        size_t *grown = PyMem_RawRealloc(runs->bounds, capacity * 2 * sizeof(size_t));
        if (grown == NULL) return false;
        runs->bounds = grown;
        runs->capacity = capacity;
    }
    runs->bounds[2 * runs->count] = start;
    runs->bounds[2 * runs->count + 1] = stop;
    runs->count++;
    return true;
}

/* The runs of changed chunks, adjacent ones merged; false if out of memory. No Python in here. */
static bool scan_changed(const unsigned char *memory, size_t length, const unsigned char *baseline,
                         size_t baseline_length, size_t chunk, run_list *runs) {
    size_t open = SIZE_MAX; /* the start of the run being extended, SIZE_MAX when none is */
    for (size_t start = 0; start < length; start += chunk) {
        size_t size = length - start < chunk ? length - start : chunk;
        bool changed = chunk_changed(memory, baseline, baseline_length, start, size);
        if (changed && open == SIZE_MAX) {
            open = start;
        } else if (!changed && open != SIZE_MAX) {
            if (!run_list_add(runs, open, start)) return false;
            open = SIZE_MAX;
        }
    }
    return open == SIZE_MAX || run_list_add(runs, open, length);
}

PyDoc_STRVAR(changed_runs_doc,
             "changed_runs(memory, chunk_bytes, baseline=None)\n--\n\n"
             "The [start, stop) runs of `memory`'s chunk_bytes-sized chunks that differ from `baseline` (zeros "
             "past its end; all zeros when None), adjacent ones merged, as a list of (start, stop). Both are "
             "read-only buffers held for the scan, which runs without the GIL: nothing may write `memory` "
             "meanwhile.");

static PyObject *changed_runs(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 2 || nargs > 3) {
        PyErr_SetString(PyExc_TypeError, "changed_runs(memory, chunk_bytes, baseline=None)");
        return NULL;
    }
    Py_ssize_t chunk = PyLong_AsSsize_t(args[1]);
    if (chunk == -1 && PyErr_Occurred()) return NULL;
    if (chunk < 1) {
        PyErr_SetString(PyExc_ValueError, "chunk_bytes must be positive");
        return NULL;
    }
    Py_buffer memory, baseline = {.buf = NULL, .len = 0};
    bool has_baseline = nargs == 3 && args[2] != Py_None;
    if (PyObject_GetBuffer(args[0], &memory, PyBUF_SIMPLE) < 0) return NULL;
    if (has_baseline && PyObject_GetBuffer(args[2], &baseline, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&memory);
        return NULL;
    }
    run_list runs = {NULL, 0, 0};
    bool scanned;
    Py_BEGIN_ALLOW_THREADS
    scanned = scan_changed(memory.buf, (size_t)memory.len, baseline.buf, (size_t)baseline.len, (size_t)chunk, &runs);
    Py_END_ALLOW_THREADS
    if (has_baseline) PyBuffer_Release(&baseline);
    PyBuffer_Release(&memory);
    PyObject *result = scanned ? PyList_New((Py_ssize_t)runs.count) : PyErr_NoMemory();
    for (size_t i = 0; result != NULL && i < runs.count; i++) {
        PyObject *run = Py_BuildValue("(nn)", (Py_ssize_t)runs.bounds[2 * i], (Py_ssize_t)runs.bounds[2 * i + 1]);
        if (run == NULL) Py_CLEAR(result);
        else PyList_SET_ITEM(result, (Py_ssize_t)i, run);
    }
    PyMem_RawFree(runs.bounds);
    return result;
}

/* Whether a /proc/self/pagemap entry is a page this mapping may have written: present and not
 * file-backed (a private copy, or anonymous memory), or swapped out (only private pages swap). An
 * absent page, or one still shared with its file (the copy-on-write image), holds the image. */
static bool private_page(uint64_t entry) {
    bool present = entry >> 63 & 1, swapped = entry >> 62 & 1, file_or_shared = entry >> 61 & 1;
    return swapped || (present && !file_or_shared);
}

/* Copy back each private page of `memory` that differs from `pristine`; the number copied, or -1
 * with errno set when pagemap could not be read; `*private` counts the private pages. The compare
 * spares a page that only holds the zero page (read, never written) a copy-on-write fault. No
 * Python in here. */
static Py_ssize_t rewind_pages(unsigned char *memory, const unsigned char *pristine, size_t length, int pagemap,
                               size_t page, Py_ssize_t *private) {
    enum { BATCH = 512 };
    uint64_t entries[BATCH];
    Py_ssize_t copied = 0;
    size_t pages = length / page, first = (uintptr_t)memory / page;
    for (size_t done = 0; done < pages;) {
        size_t want = pages - done < BATCH ? pages - done : BATCH;
        ssize_t got = pread(pagemap, entries, want * sizeof(uint64_t), (off_t)((first + done) * sizeof(uint64_t)));
        if (got <= 0 || (size_t)got % sizeof(uint64_t) != 0) {
            if (got >= 0) errno = EIO;
            return -1;
        }
        size_t read = (size_t)got / sizeof(uint64_t);
        for (size_t i = 0; i < read; i++) {
            size_t offset = (done + i) * page;
            if (!private_page(entries[i])) continue;
            (*private)++;
            if (memcmp(memory + offset, pristine + offset, page) != 0) {
                memcpy(memory + offset, pristine + offset, page);
                copied++;
            }
        }
        done += read;
    }
    return copied;
}

PyDoc_STRVAR(restore_pages_doc,
             "restore_pages(memory, pristine, pagemap_fd)\n--\n\n"
             "Make `memory` equal `pristine` (a buffer of the same length, page-aligned) by copying back the pages "
             "that differ among those /proc/self/pagemap (open at `pagemap_fd`) shows `memory` holding privately; "
             "every other page still holds the image both were mapped from. (pages copied, private pages). Runs "
             "without the GIL: nothing may touch either memory meanwhile.");

static PyObject *restore_pages(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "restore_pages(memory, pristine, pagemap_fd)");
        return NULL;
    }
    long pagemap = PyLong_AsLong(args[2]);
    if (pagemap == -1 && PyErr_Occurred()) return NULL;
    if (pagemap < 0 || pagemap > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "pagemap_fd is not a file descriptor");
        return NULL;
    }
    Py_buffer memory, pristine;
    if (PyObject_GetBuffer(args[0], &memory, PyBUF_WRITABLE) < 0) return NULL;
    if (PyObject_GetBuffer(args[1], &pristine, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&memory);
        return NULL;
    }
    long page = sysconf(_SC_PAGESIZE);
    Py_ssize_t copied = -2, private = 0;
    if (page > 0 && memory.len == pristine.len && (uintptr_t)memory.buf % (size_t)page == 0 &&
        (size_t)memory.len % (size_t)page == 0) {
        Py_BEGIN_ALLOW_THREADS
        copied = rewind_pages(memory.buf, pristine.buf, (size_t)memory.len, (int)pagemap, (size_t)page, &private);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&pristine);
    PyBuffer_Release(&memory);
    if (copied == -2) {
        PyErr_SetString(PyExc_ValueError, "restore_pages wants two page-aligned buffers of one length");
        return NULL;
    }
    return copied < 0 ? PyErr_SetFromErrno(PyExc_OSError) : Py_BuildValue("(nn)", copied, private);
}

PyDoc_STRVAR(host_of_doc, "host_of(caller)\n--\n\n"
                          "The `host` of the GuestIo of the store a host function's caller (a wasmtime_caller_t "
                          "address, valid during that call only) runs in; None if that store has none.");

static PyObject *host_of(PyObject *module, PyObject *caller_address) {
    void *caller;
    if (address_arg(caller_address, "caller", &caller) < 0) return NULL;
    if (caller == NULL || api.context_get_data == NULL) {
        PyErr_SetString(PyExc_ValueError, caller == NULL ? "the caller address is 0" : "setup() has not run");
        return NULL;
    }
    GuestIo *io = caller_io(caller);
    if (io == NULL) Py_RETURN_NONE;
    return Py_NewRef(io->host);
}

/* -- the module ----------------------------------------------------------------------------- */

PyDoc_STRVAR(setup_doc,
             "setup(memory_data, memory_data_size, trap_new, caller_context, caller_export_get, increment_epoch, "
             "context_get_data, "
             "extern_bytes, extern_of_offset, extern_memory, raw_value_bytes, memory_bytes)\n--\n\n"
             "The wasmtime C functions (addresses) and the layout of wasmtime_extern_t, wasmtime_val_raw_t and "
             "wasmtime_memory_t; once, before any call.");

static PyObject *setup(PyObject *module, PyObject *args) {
    PyObject *addresses[7];
    void *pointers[7];
    Py_ssize_t raw_value_bytes, memory_bytes, extern_bytes, extern_of_offset;
    unsigned char extern_memory;
    /* "n", not "K": K masks a negative or too wide value into some other number, silently. */
    if (!PyArg_ParseTuple(args, "OOOOOOOnnbnn", &addresses[0], &addresses[1], &addresses[2], &addresses[3],
                          &addresses[4], &addresses[5], &addresses[6], &extern_bytes, &extern_of_offset, &extern_memory,
                          &raw_value_bytes, &memory_bytes))
        return NULL;
    for (int i = 0; i < 7; i++) {
        if (address_arg(addresses[i], "a wasmtime function", &pointers[i]) < 0) return NULL;
        if (pointers[i] == NULL) {
            PyErr_SetString(PyExc_ValueError, "a wasmtime function address is 0");
            return NULL;
        }
    }
    if (raw_value_bytes != sizeof(raw_value) || extern_bytes < 1 || extern_bytes > EXTERN_BYTES_MAX ||
        extern_of_offset < 0 || extern_of_offset >= extern_bytes || memory_bytes < 1 ||
        memory_bytes > MEMORY_BYTES_MAX) {
        PyErr_SetString(PyExc_RuntimeError, "this wasmtime's C API layout is not the one _native was written for");
        return NULL;
    }
    api.memory_data = (memory_data_fn)(uintptr_t)pointers[0];
    api.memory_data_size = (memory_data_size_fn)(uintptr_t)pointers[1];
    api.trap_new = (trap_new_fn)(uintptr_t)pointers[2];
    api.caller_context = (caller_context_fn)(uintptr_t)pointers[3];
    api.caller_export_get = (caller_export_get_fn)(uintptr_t)pointers[4];
    api.increment_epoch = (increment_epoch_fn)(uintptr_t)pointers[5];
    api.context_get_data = (context_get_data_fn)(uintptr_t)pointers[6];
    api.extern_bytes = (size_t)extern_bytes;
    api.extern_of_offset = (size_t)extern_of_offset;
    api.extern_memory = extern_memory;
    api.memory_bytes = (size_t)memory_bytes;
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"setup", setup, METH_VARARGS, setup_doc},
    {"changed_runs", (PyCFunction)(void (*)(void))changed_runs, METH_FASTCALL, changed_runs_doc},
    {"restore_pages", (PyCFunction)(void (*)(void))restore_pages, METH_FASTCALL, restore_pages_doc},
    {"host_of", host_of, METH_O, host_of_doc},
    {NULL},
};

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "sidecar.wasmffi._native",
    .m_doc = "The guest ABI's data calls as C host functions, the epoch ticker, the snapshot scan and the page rewind (see _native.c).",
    .m_size = -1,
    .m_methods = module_methods,
};

/* `function`'s address as `dict[name]`. */
static int add_address(PyObject *dict, const char *name, void *function) {
    PyObject *address = PyLong_FromVoidPtr(function);
    if (address == NULL) return -1;
    int failed = PyDict_SetItemString(dict, name, address);
    Py_DECREF(address);
    return failed;
}

PyMODINIT_FUNC PyInit__native(void) {
    if (PyType_Ready(&GuestIoType) < 0 || PyType_Ready(&EpochTickerType) < 0) return NULL;
    PyObject *module = PyModule_Create(&native_module);
    if (module == NULL) return NULL;
    PyObject *callbacks = PyDict_New();
    if (callbacks == NULL || add_address(callbacks, "input_len", input_len) < 0 ||
        add_address(callbacks, "input_read", input_read) < 0 ||
        add_address(callbacks, "output_write", output_write) < 0 ||
        add_address(callbacks, "response_len", response_len) < 0 ||
        add_address(callbacks, "response_read", response_read) < 0 ||
        PyModule_AddObjectRef(module, "CALLBACKS", callbacks) < 0 ||
        add_address(PyModule_GetDict(module), "RELEASE", release) < 0 ||
        PyModule_AddObjectRef(module, "GuestIo", (PyObject *)&GuestIoType) < 0 ||
        PyModule_AddObjectRef(module, "EpochTicker", (PyObject *)&EpochTickerType) < 0 ||
        PyModule_AddStringConstant(module, "SOURCE_SHA256", SIDECAR_SOURCE_SHA256) < 0) {
        Py_XDECREF(callbacks);
        Py_DECREF(module);
        return NULL;
    }
    Py_DECREF(callbacks);
    return module;
}
