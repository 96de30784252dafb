/*
 * leaky_ext: a C extension that leaks on purpose, each leak beside its clean twin, for
 * psleak's Python tests. Every leaking function is named after what it forgets, so that a test
 * can check that psleak blames it by name.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <fcntl.h>
#include <malloc.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/mman.h>
#include <unistd.h>

#if PY_VERSION_HEX < 0x030A0000
/* 3.10's, for 3.9. */
static inline PyObject *Py_NewRef(PyObject *o)
{
	Py_INCREF(o);
	return o;
}
#endif

/* Keeps the compiler from dropping an allocation it can see is never used. */
static void *volatile sink;

static PyObject *forget_free(PyObject *self, PyObject *arg)
{
	Py_ssize_t size = PyLong_AsSsize_t(arg);
	if (size < 0 && PyErr_Occurred())
		return NULL;
	char *p = malloc(size);
	p[0] = 1;
	sink = p;
	Py_RETURN_NONE;
}

static PyObject *malloc_and_free(PyObject *self, PyObject *arg)
{
	Py_ssize_t size = PyLong_AsSsize_t(arg);
	if (size < 0 && PyErr_Occurred())
		return NULL;
	char *p = malloc(size);
	p[0] = 1;
	sink = p;
	free(p);
	Py_RETURN_NONE;
}

static PyObject *forget_munmap(PyObject *self, PyObject *arg)
{
	Py_ssize_t size = PyLong_AsSsize_t(arg);
	void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED)
		return PyErr_SetFromErrno(PyExc_OSError);
	Py_RETURN_NONE;
}

static PyObject *mmap_and_munmap(PyObject *self, PyObject *arg)
{
	Py_ssize_t size = PyLong_AsSsize_t(arg);
	void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED)
		return PyErr_SetFromErrno(PyExc_OSError);
	munmap(p, size);
	Py_RETURN_NONE;
}

/* Forgotten Py_DECREF: each builds an object, uses it, and drops the reference on the floor. */
static PyObject *forget_decref_list(PyObject *self, PyObject *noarg)
{
	PyObject *list = PyList_New(8);
	if (!list)
		return NULL;
	for (Py_ssize_t i = 0; i < 8; i++)
		PyList_SET_ITEM(list, i, Py_NewRef(Py_None));
	Py_RETURN_NONE;
}

static PyObject *decref_list(PyObject *self, PyObject *noarg)
{
	PyObject *list = PyList_New(8);
	if (!list)
		return NULL;
	for (Py_ssize_t i = 0; i < 8; i++)
		PyList_SET_ITEM(list, i, Py_NewRef(Py_None));
	Py_DECREF(list);
	Py_RETURN_NONE;
}

static PyObject *forget_decref_int(PyObject *self, PyObject *noarg)
{
	PyObject *n = PyLong_FromLongLong(1LL << 40); /* not a cached small int */
	if (!n)
		return NULL;
	Py_RETURN_NONE;
}

static PyObject *decref_int(PyObject *self, PyObject *noarg)
{
	PyObject *n = PyLong_FromLongLong(1LL << 40);
	Py_XDECREF(n);
	Py_RETURN_NONE;
}

static PyObject *forget_decref_tuple(PyObject *self, PyObject *noarg)
{
	PyObject *t = PyTuple_Pack(2, Py_None, Py_True);
	if (!t)
		return NULL;
	Py_RETURN_NONE;
}

static PyObject *decref_tuple(PyObject *self, PyObject *noarg)
{
	PyObject *t = PyTuple_Pack(2, Py_None, Py_True);
	Py_XDECREF(t);
	Py_RETURN_NONE;
}

static PyObject *forget_decref_dict(PyObject *self, PyObject *noarg)
{
	PyObject *d = PyDict_New();
	if (!d || PyDict_SetItemString(d, "key", Py_None) < 0)
		return NULL;
	Py_RETURN_NONE;
}

static PyObject *decref_dict(PyObject *self, PyObject *noarg)
{
	PyObject *d = PyDict_New();
	if (!d)
		return NULL;
	if (PyDict_SetItemString(d, "key", Py_None) < 0) {
		Py_DECREF(d);
		return NULL;
	}
	Py_DECREF(d);
	Py_RETURN_NONE;
}

/* A list that holds itself, with the extension's reference never dropped: the collector cannot
 * free it either, since that reference keeps it alive from outside the cycle. */
static PyObject *forget_decref_cycle(PyObject *self, PyObject *noarg)
{
	PyObject *list = PyList_New(0);
	if (!list || PyList_Append(list, list) < 0)
		return NULL;
	Py_RETURN_NONE;
}

static PyObject *decref_cycle(PyObject *self, PyObject *noarg)
{
	PyObject *list = PyList_New(0);
	if (!list || PyList_Append(list, list) < 0)
		return NULL;
	PyList_SetSlice(list, 0, 1, NULL); /* break the cycle */
	Py_DECREF(list);
	Py_RETURN_NONE;
}

static PyObject *forget_pymem_free(PyObject *self, PyObject *arg)
{
	sink = PyMem_Malloc(PyLong_AsSsize_t(arg));
	Py_RETURN_NONE;
}

static PyObject *pymem_malloc_and_free(PyObject *self, PyObject *arg)
{
	sink = PyMem_Malloc(PyLong_AsSsize_t(arg));
	PyMem_Free(sink);
	Py_RETURN_NONE;
}

static PyObject *forget_pyobject_free(PyObject *self, PyObject *arg)
{
	sink = PyObject_Malloc(PyLong_AsSsize_t(arg));
	Py_RETURN_NONE;
}

static PyObject *pyobject_malloc_and_free(PyObject *self, PyObject *arg)
{
	sink = PyObject_Malloc(PyLong_AsSsize_t(arg));
	PyObject_Free(sink);
	Py_RETURN_NONE;
}

static int stop_threads;

/* Leaked threads not yet stopped: counted before each starts, so that a stop sees them all. */
static int spinning;

static void *spin(void *arg)
{
	while (!__atomic_load_n(&stop_threads, __ATOMIC_RELAXED))
		usleep(1000);
	__atomic_sub_fetch(&spinning, 1, __ATOMIC_RELAXED);
	return NULL;
}

static void *quick(void *arg)
{
	return NULL;
}

static PyObject *forget_pthread_join(PyObject *self, PyObject *noarg)
{
	pthread_t t;
	__atomic_add_fetch(&spinning, 1, __ATOMIC_RELAXED);
	if (pthread_create(&t, NULL, spin, NULL) != 0) {
		__atomic_sub_fetch(&spinning, 1, __ATOMIC_RELAXED);
		return PyErr_Format(PyExc_OSError, "pthread_create failed");
	}
	pthread_detach(t);
	Py_RETURN_NONE;
}

static PyObject *pthread_create_and_join(PyObject *self, PyObject *noarg)
{
	pthread_t t;
	if (pthread_create(&t, NULL, quick, NULL) != 0)
		return PyErr_Format(PyExc_OSError, "pthread_create failed");
	pthread_join(t, NULL);
	Py_RETURN_NONE;
}

/* Lets the threads left running end, once a test is done with them. */
/* Stops the threads forget_pthread_join left, waits for them to end their loops, and lets later
 * calls leak again: a test after a leak test finds the process as it was. */
static PyObject *stop_leaked_threads(PyObject *self, PyObject *noarg)
{
	Py_BEGIN_ALLOW_THREADS
	__atomic_store_n(&stop_threads, 1, __ATOMIC_RELAXED);
	while (__atomic_load_n(&spinning, __ATOMIC_RELAXED) > 0)
		usleep(1000);
	__atomic_store_n(&stop_threads, 0, __ATOMIC_RELAXED);
	Py_END_ALLOW_THREADS
	Py_RETURN_NONE;
}

static PyObject *forget_close(PyObject *self, PyObject *noarg)
{
	int fd = open("/dev/null", O_RDONLY);
	if (fd < 0)
		return PyErr_SetFromErrno(PyExc_OSError);
	return PyLong_FromLong(fd);
}

static PyObject *open_and_close(PyObject *self, PyObject *noarg)
{
	int fd = open("/dev/null", O_RDONLY);
	if (fd < 0)
		return PyErr_SetFromErrno(PyExc_OSError);
	close(fd);
	Py_RETURN_NONE;
}

/* Parses a "positive number": the buffer is leaked only when the input is refused. */
static PyObject *leak_on_error_path(PyObject *self, PyObject *arg)
{
	char *scratch = malloc(256);
	sink = scratch;
	long n = PyLong_AsLong(arg);
	if (n <= 0)
		return PyErr_Format(PyExc_ValueError, "not a positive number: %ld", n); /* scratch leaks */
	free(scratch);
	return PyLong_FromLong(n);
}

static PyObject *free_on_error_path(PyObject *self, PyObject *arg)
{
	char *scratch = malloc(256);
	sink = scratch;
	long n = PyLong_AsLong(arg);
	free(scratch);
	if (n <= 0)
		return PyErr_Format(PyExc_ValueError, "not a positive number: %ld", n);
	return PyLong_FromLong(n);
}

/* Control: a cache that fills once. Its first 64 calls each keep a 1 KiB entry; later calls keep
 * nothing new. Not a leak. */
#define CACHE_ENTRIES 64
static void *cache[CACHE_ENTRIES];
static int cached;

static PyObject *fill_cache_once(PyObject *self, PyObject *noarg)
{
	if (cached < CACHE_ENTRIES) {
		char *entry = calloc(1, 1024);
		if (!entry)
			return PyErr_NoMemory();
		cache[cached++] = entry;
	}
	Py_RETURN_NONE;
}

/* Control: allocates and frees a lot in every call (256 blocks of 1 B to 32 KiB, a list of 256
 * ints). Not a leak. */
static PyObject *churn(PyObject *self, PyObject *noarg)
{
	void *blocks[256];
	PyObject *list = PyList_New(256);
	if (!list)
		return NULL;
	for (int i = 0; i < 256; i++) {
		blocks[i] = malloc((size_t)1 << (i % 16));
		PyList_SET_ITEM(list, i, PyLong_FromLong(1000003L * i));
	}
	for (int i = 0; i < 256; i++)
		free(blocks[i]);
	Py_DECREF(list);
	Py_RETURN_NONE;
}

/* The allocation-heavy pair: a linked list of n nodes (n mallocs) built, walked and freed in
 * every call; the leaky twin frees all of it but one node. Inlined, so that malloc's caller is
 * the function a test expects named (full native stacks are issue 16's). */
struct node {
	struct node *next;
	long value;
};

static inline __attribute__((always_inline)) long walk_list(long n, int keep_one)
{
	struct node *head = NULL;
	long sum = 0;
	for (long i = 0; i < n; i++) {
		struct node *node = malloc(sizeof *node);
		if (!node)
			break;
		node->next = head;
		node->value = i;
		head = node;
	}
	if (keep_one && head) {
		sink = head;
		head = head->next;
	}
	while (head) {
		struct node *next = head->next;
		sum += head->value;
		free(head);
		head = next;
	}
	return sum;
}

static PyObject *build_and_free_list(PyObject *self, PyObject *arg)
{
	long n = PyLong_AsLong(arg);
	if (n < 0 && PyErr_Occurred())
		return NULL;
	return PyLong_FromLong(walk_list(n, 0));
}

static PyObject *forget_free_of_a_node(PyObject *self, PyObject *arg)
{
	long n = PyLong_AsLong(arg);
	if (n < 0 && PyErr_Occurred())
		return NULL;
	return PyLong_FromLong(walk_list(n, 1));
}

/*
 * For the bench's table of probe costs (bench/probe_cost.py): N calls of the allocation
 * function NAME, each block freed by its family's free at once; nanoseconds per pair.
 */
static void *posix_memalign_64(void)
{
	void *p = NULL;
	return posix_memalign(&p, 64, 64) ? NULL : p;
}

/* One arm of time_allocator's choice: when NAME is FUNCTION, N pairs of ALLOCATION (a call
 * of FUNCTION) and RELEASE; the arms chain through the trailing else. */
#define PAIRS_OF(function, allocation, release)                                                    \
	if (!strcmp(name, #function)) {                                                            \
		for (long i = 0; i < n; i++) {                                                     \
			sink = (allocation);                                                       \
			release(sink);                                                             \
		}                                                                                  \
	} else

static PyObject *time_allocator(PyObject *self, PyObject *args)
{
	const char *name;
	long n;
	if (!PyArg_ParseTuple(args, "sl", &name, &n))
		return NULL;
	struct timespec a, b;
	clock_gettime(CLOCK_MONOTONIC, &a);
	PAIRS_OF(malloc, malloc(64), free)
	PAIRS_OF(calloc, calloc(1, 64), free)
	PAIRS_OF(realloc, realloc(NULL, 64), free)
	PAIRS_OF(posix_memalign, posix_memalign_64(), free)
	PAIRS_OF(aligned_alloc, aligned_alloc(64, 64), free)
	PAIRS_OF(memalign, memalign(64, 64), free)
	PAIRS_OF(valloc, valloc(64), free)
	PAIRS_OF(pvalloc, pvalloc(64), free)
	PAIRS_OF(reallocarray, reallocarray(NULL, 8, 8), free)
	PAIRS_OF(PyMem_RawMalloc, PyMem_RawMalloc(64), PyMem_RawFree)
	PAIRS_OF(PyMem_RawCalloc, PyMem_RawCalloc(1, 64), PyMem_RawFree)
	PAIRS_OF(PyMem_RawRealloc, PyMem_RawRealloc(NULL, 64), PyMem_RawFree)
	PAIRS_OF(PyMem_Malloc, PyMem_Malloc(64), PyMem_Free)
	PAIRS_OF(PyMem_Calloc, PyMem_Calloc(1, 64), PyMem_Free)
	PAIRS_OF(PyMem_Realloc, PyMem_Realloc(NULL, 64), PyMem_Free)
	PAIRS_OF(PyObject_Malloc, PyObject_Malloc(64), PyObject_Free)
	PAIRS_OF(PyObject_Calloc, PyObject_Calloc(1, 64), PyObject_Free)
	PAIRS_OF(PyObject_Realloc, PyObject_Realloc(NULL, 64), PyObject_Free)
		return PyErr_Format(PyExc_ValueError, "no allocation function %s", name);
	clock_gettime(CLOCK_MONOTONIC, &b);
	return PyFloat_FromDouble(((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / n);
}

static PyMethodDef methods[] = {
	{"time_allocator", time_allocator, METH_VARARGS, NULL},
	{"build_and_free_list", build_and_free_list, METH_O, NULL},
	{"forget_free_of_a_node", forget_free_of_a_node, METH_O, NULL},
	{"forget_free", forget_free, METH_O, NULL},
	{"malloc_and_free", malloc_and_free, METH_O, NULL},
	{"forget_munmap", forget_munmap, METH_O, NULL},
	{"mmap_and_munmap", mmap_and_munmap, METH_O, NULL},
	{"forget_decref_list", forget_decref_list, METH_NOARGS, NULL},
	{"decref_list", decref_list, METH_NOARGS, NULL},
	{"forget_decref_int", forget_decref_int, METH_NOARGS, NULL},
	{"decref_int", decref_int, METH_NOARGS, NULL},
	{"forget_decref_tuple", forget_decref_tuple, METH_NOARGS, NULL},
	{"decref_tuple", decref_tuple, METH_NOARGS, NULL},
	{"forget_decref_dict", forget_decref_dict, METH_NOARGS, NULL},
	{"decref_dict", decref_dict, METH_NOARGS, NULL},
	{"forget_decref_cycle", forget_decref_cycle, METH_NOARGS, NULL},
	{"decref_cycle", decref_cycle, METH_NOARGS, NULL},
	{"forget_pymem_free", forget_pymem_free, METH_O, NULL},
	{"pymem_malloc_and_free", pymem_malloc_and_free, METH_O, NULL},
	{"forget_pyobject_free", forget_pyobject_free, METH_O, NULL},
	{"pyobject_malloc_and_free", pyobject_malloc_and_free, METH_O, NULL},
	{"forget_pthread_join", forget_pthread_join, METH_NOARGS, NULL},
	{"pthread_create_and_join", pthread_create_and_join, METH_NOARGS, NULL},
	{"stop_leaked_threads", stop_leaked_threads, METH_NOARGS, NULL},
	{"forget_close", forget_close, METH_NOARGS, NULL},
	{"open_and_close", open_and_close, METH_NOARGS, NULL},
	{"leak_on_error_path", leak_on_error_path, METH_O, NULL},
	{"free_on_error_path", free_on_error_path, METH_O, NULL},
	{"fill_cache_once", fill_cache_once, METH_NOARGS, NULL},
	{"churn", churn, METH_NOARGS, NULL},
	{NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "leaky_ext", NULL, -1, methods};

PyMODINIT_FUNC PyInit_leaky_ext(void)
{
	return PyModule_Create(&module);
}
