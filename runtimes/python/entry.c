/* The sidecar's CPython guest: a WASI reactor with two exports and one built-in module.

   py_init()  initializes an isolated interpreter whose only sys.path entry is the stdlib zip at
              GUEST_ZIP, imports the preimported modules and the driver, and forgets everything it
              learned from the host (preopens, environment), so that the sidecar can run it once and
              bake the result into a module whose instances start here.
   py_eval()  hands the current call's input to _sidecar_driver.run(), which writes one JSON result.
   _sidecar   the guest ABI as Python functions: the raw bytes in and out. Everything with a
              policy (JSON, exceptions, capture) is Python in the zip, where it is easier to read.

   The interpreter is single-threaded and the sidecar never runs two calls on one instance at a
   time, so nothing here locks. */

#include <Python.h>
#include <stdint.h>

/* Fixed because a baked interpreter holds zipimport's table of this path: the zip must sit here
   in every instance (the sidecar preopens the runtime directory read-only at /python). */
#define GUEST_ZIP L"/python/lib/python311.zip"

#define SIDECAR_IMPORT(name) __attribute__((import_module("sidecar"), import_name(name)))
SIDECAR_IMPORT("input_len") int32_t sidecar_input_len(void);
SIDECAR_IMPORT("input_read") void sidecar_input_read(void *ptr);
SIDECAR_IMPORT("output_write") void sidecar_output_write(const void *ptr, int32_t len);
SIDECAR_IMPORT("host_call") int32_t sidecar_host_call(const void *method, int32_t method_len,
                                                      const void *params, int32_t params_len);
SIDECAR_IMPORT("response_read") void sidecar_response_read(void *ptr);
SIDECAR_IMPORT("response_len") int32_t sidecar_response_len(void);

/* wasi-libc internals, declared in its private headers: the reactor entry, and the resets that
   exist for snapshotting tools like Wizer. */
void _initialize(void);
void __wasilibc_reset_preopens(void);
void __wasilibc_deinitialize_environ(void);
void __wasilibc_ensure_environ(void);
extern char **environ;

/* Bytes of `len` filled by `read(ptr)`; an import is not called for an empty copy. */
static PyObject *read_into_bytes(int32_t len, void (*read)(void *)) {
    PyObject *bytes = PyBytes_FromStringAndSize(NULL, len);
    if (bytes != NULL && len > 0) read(PyBytes_AS_STRING(bytes));
    return bytes;
}

static PyObject *read_input(PyObject *self, PyObject *unused) {
    return read_into_bytes(sidecar_input_len(), sidecar_input_read);
}

static PyObject *write_output(PyObject *self, PyObject *arg) {
    Py_buffer data;
    if (PyObject_GetBuffer(arg, &data, PyBUF_SIMPLE) < 0) return NULL;
    sidecar_output_write(data.buf, (int32_t)data.len);
    PyBuffer_Release(&data);
    Py_RETURN_NONE;
}

/* host_call(method: bytes, params: bytes) -> (status, payload): the payload is the result's
   JSON for a status >= 0, else whatever response_len says the sidecar left to read (the error
   or refusal JSON; nothing after a timeout). */
static PyObject *host_call(PyObject *self, PyObject *args) {
    Py_buffer method, params;
    if (!PyArg_ParseTuple(args, "y*y*:host_call", &method, &params)) return NULL;
    int32_t status = sidecar_host_call(method.buf, (int32_t)method.len, params.buf, (int32_t)params.len);
    PyBuffer_Release(&method);
    PyBuffer_Release(&params);
    PyObject *payload = read_into_bytes(status >= 0 ? status : sidecar_response_len(), sidecar_response_read);
    return payload == NULL ? NULL : Py_BuildValue("(iN)", status, payload);
}

/* The instance's own environment, as b"KEY=VALUE" entries: libc drops what it read before (at
   py_init, possibly in another process) and asks WASI again. */
static PyObject *host_environ(PyObject *self, PyObject *unused) {
    __wasilibc_deinitialize_environ();
    __wasilibc_ensure_environ();
    PyObject *entries = PyList_New(0);
    for (char **entry = environ; entries != NULL && *entry != NULL; entry++) {
        PyObject *bytes = PyBytes_FromString(*entry);
        if (bytes == NULL || PyList_Append(entries, bytes) < 0) Py_CLEAR(entries);
        Py_XDECREF(bytes);
    }
    return entries;
}

static PyMethodDef sidecar_methods[] = {
    {"read_input", read_input, METH_NOARGS, "The current call's input bytes."},
    {"write_output", write_output, METH_O, "Append bytes to the call's output."},
    {"host_call", host_call, METH_VARARGS, "host_call(method, params) -> (status, payload)"},
    {"environ", host_environ, METH_NOARGS, "This instance's WASI environment, as KEY=VALUE bytes."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef sidecar_module = {
    PyModuleDef_HEAD_INIT, "_sidecar", "The sidecar guest ABI, bytes in and out.", -1, sidecar_methods,
};

static PyObject *init_sidecar_module(void) { return PyModule_Create(&sidecar_module); }

/* Hosts that follow the reactor convention call _initialize before anything else (wasmtime's CLI,
   Wizer); the sidecar calls only py_init. A constructor tells which happened, because a second
   _initialize traps. */
static int constructors_ran;
__attribute__((constructor)) static void note_constructors(void) { constructors_ran = 1; }

static PyObject *driver_run;

/* wasi-libc reads the preopened directories once and keeps the table in linear memory, which a
   bake or a session snapshot carries to instances whose preopens differ in number and order.
   Forgetting it after each export makes the next path lookup ask this instance's WASI (a few
   fd_prestat calls, only when a path is used). */
static void forget_preopens(void) { __wasilibc_reset_preopens(); }

static int fail(const char *what, PyStatus status) {
    fprintf(stderr, "py_init: %s: %s\n", what, status.err_msg ? status.err_msg : "failed");
    return 1;
}

__attribute__((export_name("py_init"))) int py_init(void) {
    if (Py_IsInitialized()) return 1;
    if (!constructors_ran) _initialize();
    if (PyImport_AppendInittab("_sidecar", init_sidecar_module) < 0) return 1;

    PyPreConfig preconfig;
    PyPreConfig_InitIsolatedConfig(&preconfig);
    preconfig.utf8_mode = 1; /* WASI has no locale to ask */
    PyStatus status = Py_PreInitialize(&preconfig);
    if (PyStatus_Exception(status)) return fail("pre-initialize", status);

    PyConfig config;
    PyConfig_InitIsolatedConfig(&config);
    config.site_import = 0;
    /* A seed drawn now would be baked into every instance anyway (the dicts built during init
       depend on it), so fix it: bakes are reproducible, and hash() is documented as shared. */
    config.use_hash_seed = 1;
    config.hash_seed = 0;
    config.write_bytecode = 0;
    config.install_signal_handlers = 0;
    config.pathconfig_warnings = 0;
    config.module_search_paths_set = 1;
    status = PyWideStringList_Append(&config.module_search_paths, GUEST_ZIP);
    if (!PyStatus_Exception(status)) status = PyConfig_SetString(&config, &config.home, L"/python");
    if (!PyStatus_Exception(status)) status = Py_InitializeFromConfig(&config);
    PyConfig_Clear(&config);
    if (PyStatus_Exception(status)) return fail("initialize", status);

    PyObject *driver = PyImport_ImportModule("_sidecar_driver");
    PyObject *ready = driver ? PyObject_CallMethod(driver, "init", NULL) : NULL;
    if (ready != NULL) driver_run = PyObject_GetAttrString(driver, "run");
    Py_XDECREF(ready);
    Py_XDECREF(driver);
    if (driver_run == NULL) {
        PyErr_Print();
        return 1;
    }
    forget_preopens();
    return 0;
}

/* 0 when a result was written; 1 when none was (not initialized, a malformed request, or the
   driver itself failed: the message is on WASI stderr and the instance should be discarded). */
__attribute__((export_name("py_eval"))) int py_eval(void) {
    if (driver_run == NULL) return 1;
    PyObject *done = PyObject_CallNoArgs(driver_run);
    forget_preopens();
    if (done == NULL) {
        PyErr_WriteUnraisable(driver_run);
        return 1;
    }
    Py_DECREF(done);
    return 0;
}
