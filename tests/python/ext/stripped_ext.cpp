// A C++ extension built as wheels are (-O2 -fomit-frame-pointer, stripped): each leak is two
// static helpers deep, so only the CFI of the module can find the way back to Python
// (issue 16). No symbols: its frames are `stripped_ext...so+0xOFFSET`.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <fcntl.h>
#include <pthread.h>
#include <unistd.h>

#include <cstdlib>

namespace {

// noinline: -O2 would fold the helpers into their caller, and the test wants frames.
__attribute__((noinline)) void *grab(size_t size) {
    void *block = std::malloc(size);
    if (block) {
        static_cast<volatile char *>(block)[0] = 1;  // the allocation is not optimized out
    }
    return block;
}

__attribute__((noinline)) void stash(size_t size) {
    static void *kept[100000];
    static size_t count;
    if (count < sizeof kept / sizeof kept[0]) {
        kept[count++] = grab(size);
    }
}

// An object whose constructor opens a file and whose destructor is never run.
struct Holder {
    int fd;
    __attribute__((noinline)) Holder() : fd(open("/dev/null", O_RDONLY | O_CLOEXEC)) {}
};

__attribute__((noinline)) void *park(void *) {
    for (;;) {
        pause();
    }
    return nullptr;
}

__attribute__((noinline)) int start_parked() {
    pthread_t thread;
    int failed = pthread_create(&thread, nullptr, park, nullptr);
    if (!failed) {
        pthread_detach(thread);
    }
    return failed;
}

PyObject *leak_blocks(PyObject *, PyObject *arg) {
    Py_ssize_t n = PyLong_AsSsize_t(arg);
    if (n < 0 && PyErr_Occurred()) {
        return nullptr;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        stash(4000);
    }
    Py_RETURN_NONE;
}

PyObject *leak_fds(PyObject *, PyObject *arg) {
    Py_ssize_t n = PyLong_AsSsize_t(arg);
    if (n < 0 && PyErr_Occurred()) {
        return nullptr;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        Holder *holder = new Holder();
        if (holder->fd < 0) {
            return PyErr_SetFromErrno(PyExc_OSError);
        }
    }
    Py_RETURN_NONE;
}

PyObject *leak_threads(PyObject *, PyObject *arg) {
    Py_ssize_t n = PyLong_AsSsize_t(arg);
    if (n < 0 && PyErr_Occurred()) {
        return nullptr;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (start_parked() != 0) {
            return PyErr_Format(PyExc_OSError, "pthread_create failed");
        }
    }
    Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"leak_blocks", leak_blocks, METH_O, "Leaks N blocks of 4000 bytes."},
    {"leak_fds", leak_fds, METH_O, "Leaks N fds, each opened by a constructor."},
    {"leak_threads", leak_threads, METH_O, "Starts N threads that never end."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "stripped_ext", nullptr, -1, methods, nullptr, nullptr, nullptr, nullptr};

}  // namespace

PyMODINIT_FUNC PyInit_stripped_ext() { return PyModule_Create(&module); }
