/* SPDX-License-Identifier: MIT */
/*
 * The one definition of every event psleak's probes send to userspace.
 * The BPF side fills `struct event`; libbpf-cargo generates the Rust type from
 * this object's BTF, so userspace decodes exactly this layout and nothing else.
 */
#ifndef PSLEAK_EVENTS_H
#define PSLEAK_EVENTS_H

enum event_kind {
	/* addr = new block, size = bytes asked for, domain = allocator family */
	EV_ALLOC = 1,
	/* addr = block freed, domain = allocator family */
	EV_FREE = 2,
	/* addr = new block (0 if the call failed), old_addr = block passed in, size = bytes asked for */
	EV_REALLOC = 3,
	/* addr = start, size = length; flags may hold EVF_ALLOCATOR_INTERNAL */
	EV_MMAP = 4,
	/* addr = start, size = length */
	EV_MUNMAP = 5,
	/* addr = new start, size = new length, old_addr = old start, aux = old length */
	EV_MREMAP = 6,
	/* addr = fd, aux = inode mode (S_IFMT bits), sock_family/sock_type for sockets */
	EV_FD_OPEN = 7,
	/* addr = first fd closed, aux = last fd closed (equal for close()) */
	EV_FD_CLOSE = 8,
	/* addr = tid of the new thread */
	EV_THREAD_START = 9,
	/* addr = tid of the thread that ended */
	EV_THREAD_EXIT = 10,
	/* the target ran execve(): what its old program made is gone with its address space */
	EV_EXEC = 11,
};

/* Allocator families, counted apart: a Python object allocation and the malloc under it are one leak. */
enum alloc_domain {
	DOMAIN_LIBC = 0,      /* malloc, calloc, realloc, posix_memalign, ... in the target's libc */
	DOMAIN_PYMEM_RAW = 1, /* PyMem_RawMalloc & co. */
	DOMAIN_PYMEM = 2,     /* PyMem_Malloc & co. */
	DOMAIN_PYOBJECT = 3,  /* PyObject_Malloc & co. */
};

/*
 * How the allocator entry probe reads a function's arguments. The loader attaches each
 * probed function with the cookie (op | domain << 8).
 */
enum alloc_op {
	ALLOC_OP_SIZE_ARG1 = 1,      /* malloc(size), valloc, pvalloc, Py*_Malloc */
	ALLOC_OP_CALLOC = 2,         /* calloc(n, size) */
	ALLOC_OP_REALLOC = 3,        /* realloc(ptr, size) */
	ALLOC_OP_REALLOCARRAY = 4,   /* reallocarray(ptr, n, size) */
	ALLOC_OP_POSIX_MEMALIGN = 5, /* posix_memalign(&ptr, align, size) */
	ALLOC_OP_SIZE_ARG2 = 6,      /* aligned_alloc(align, size), memalign(align, size) */
	ALLOC_OP_SPAWN = 7,          /* pthread_create(): allocates for a thread, reports nothing */
};

/*
 * Where the free probe finds the pointer: the cookie is (op | domain << 8) there too. A free's
 * own first argument, or the second of an allocator's free(ctx, ptr), probed in place of a
 * Py*_Free that only hands its call on to it (dispatch.rs).
 */
enum free_op {
	FREE_OP_PTR_ARG1 = 0,
	FREE_OP_PTR_ARG2 = 1,
};

enum event_flag {
	/* The mapping was made inside an allocator call: its bytes are already counted as heap. */
	EVF_ALLOCATOR_INTERNAL = 1,
	/* The record is a creation's `struct event_with_scan`: its stack words follow the event. */
	EVF_STACK_SCAN = 2,
	/* The record's `py` holds the Python stack of the thread that made the event. */
	EVF_PY_STACK = 4,
};

/* What the probes could not report, counted per CPU in the `losses` map, one slot per kind. */
enum loss_kind {
	/* events dropped because the ring was full */
	LOSS_RING_FULL = 0,
	/* creations sent without a stack (the words at the user stack pointer could not be read) */
	LOSS_NO_STACK = 1,
	/* allocator calls whose result was not seen: their return was missed, or there was no room
	 * to follow the call */
	LOSS_UNTRACKED_CALL = 2,
	LOSS_KINDS = 3,
};

/* Words of the user stack copied with every creation, from the stack pointer upward (2 KiB):
 * userspace unwinds them with the CFI (.eh_frame) of each module the stack passes through,
 * frame pointers or not. Read in chunks, so that a stack whose top is near still gives its
 * first ones. */
#define PSLEAK_SCAN_WORDS 256
#define PSLEAK_SCAN_CHUNK_WORDS 64

struct event {
	__u64 ts_ns;    /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
	__u64 addr;     /* see enum event_kind */
	__u64 size;
	__u64 old_addr;
	__u64 aux;
	__u32 tid;      /* thread that caused the event */
	__u8 kind;      /* enum event_kind */
	__u8 domain;    /* enum alloc_domain, for allocation events */
	__u8 flags;     /* EVF_* */
	__u8 pad;
	__u16 sock_family;
	__u16 sock_type;
	__u32 pad2;
};

struct stack_scan {
	__u64 ip;  /* user instruction pointer: the probed function's entry, or where libc made the syscall */
	__u64 sp;  /* user stack pointer there: the address of words[0] */
	__u64 bp;  /* rbp there, for code whose CFI finds its frame from it */
	__u32 len; /* words read */
	__u32 pad;
	__u64 words[PSLEAK_SCAN_WORDS];
};

/* Python frames read per event at most, innermost first (a power of two). */
#define PSLEAK_PY_FRAMES 16

/* One Python frame: its code object, and where in it the thread is (an instruction pointer
 * from 3.11 on, f_lasti before): userspace reads the code object for its name, file and line.
 * It reads it later (a drain may come tens of milliseconds after), when the code may have been
 * freed and another put at its address, its strings too. `stamp` is what the code was when the
 * event was made: userspace names the frame only from a code object that still has it. */
struct py_frame {
	__u64 code;
	__u64 instr;
	__u64 stamp;
};

/* Each frame is read in one go, the span of the fields needed (its code, caller, instruction
 * and owner), then its code object's span (the fields of the stamp), then its qualname's
 * (length, hash and state), and its text if it has no hash yet. Each span is the loader's (`py_layout`), read into a buffer of
 * these many bytes (powers of two), and never past its object: the probe cannot read a page
 * the process has not touched, which userspace, reading /proc/PID/mem, would. */
enum py_span {
	PSLEAK_FRAME_SPAN = 128,
	PSLEAK_CODE_SPAN = 128,
	PSLEAK_NAME_SPAN = 32,
	/* Bytes of an ASCII qualname's text in the stamp, at most: its first ones. */
	PSLEAK_NAME_TEXT = 64,
};
/* The stamp of a code object, from fields that do not change while it lives: the addresses of
 * its qualname and filename, its first line, and its qualname's length and hash (set once,
 * from its text; an interned name has it). A qualname without a hash yet gives its first
 * PSLEAK_NAME_TEXT bytes of text instead (an ASCII one's: others' bytes there are filled in
 * lazily), zero-padded, and the stamp says so (PY_STAMP_FROM_TEXT): its hash may be set by the
 * time userspace reads it. Userspace mixes the same. */
#define PY_STAMP_MIX(stamp, word) (((stamp) << 13 | (stamp) >> 51) ^ (__u64)(word))
enum py_stamp_flag {
	PY_STAMP_FROM_TEXT = 1,
};

struct py_stack {
	__u32 depth;
	__u32 pad;
	struct py_frame frames[PSLEAK_PY_FRAMES];
};

/*
 * How to read the Python stack of the current thread in the target, from its interpreter's
 * version (set by the loader; `runtime` 0 when the target is not Python). The thread's
 * PyThreadState is CPython's pthread key (`_PyRuntime.autoTSSkey`), read from glibc's
 * struct pthread at the thread's fsbase: it is set with the GIL held or released, on 3.9-3.13.
 */
struct py_layout {
	__u64 runtime;          /* address of _PyRuntime */
	__u32 key;              /* _PyRuntime's autoTSSkey._key */
	__u32 tstate_frame;     /* PyThreadState -> frame (3.9, 3.10), cframe (3.11, 3.12), current_frame (3.13) */
	__s32 cframe_frame;     /* _PyCFrame -> current_frame (3.11, 3.12); -1 when there is no cframe */
	__u32 instr_is_pointer; /* 1 from 3.11 on */
	__u32 pthread_specific; /* glibc: struct pthread's specific[] (second-level key blocks) */
	__u32 key_data_size;    /* glibc: sizeof(struct pthread_key_data) */
	__u32 key_data_data;    /* glibc: its `data` */
	/* A frame's span: where it starts in the frame, how long it is, and in it: */
	__u32 frame_span;
	__u32 frame_span_len;
	__u32 frame_code;       /* the frame's code object */
	__u32 frame_back;       /* the frame it was called from */
	__u32 frame_instr;      /* its instruction pointer, or its f_lasti (an int) before 3.11 */
	__s32 frame_owner;      /* 3.11+: who owns the frame (3: the C stack, a shim frame to skip); -1 before */
	/* A code object's span: where it starts in the code object, how long it is, and in it: */
	__u32 code_span;
	__u32 code_span_len;
	__u32 code_qualname;    /* co_qualname (3.11+), co_name before */
	__u32 code_filename;    /* co_filename */
	__u32 code_firstlineno; /* co_firstlineno, an int */
	/* A str's span starts at its length (0x10), and is this long; in it: */
	__u32 name_span_len;
	__u32 name_hash;        /* its hash, -1 until computed */
	__u32 name_state;       /* its state bits (compact, ascii) */
	__u32 name_ascii;       /* an ASCII str's text, from the span's start (past it) */
};

/* The record layout of an event carrying EVF_STACK_SCAN; `py` holds what EVF_PY_STACK says. */
struct event_with_scan {
	struct event event;
	struct stack_scan scan;
	struct py_stack py;
};

#endif
