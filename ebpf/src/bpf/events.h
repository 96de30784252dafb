/* SPDX-License-Identifier: MIT */
/*
 * The one definition of every event psleak's probes send to userspace.
 * The BPF side fills `struct event`; libbpf-cargo generates the Rust type from
 * this object's BTF, so userspace decodes exactly this layout and nothing else.
 */
#ifndef PSLEAK_EVENTS_H
#define PSLEAK_EVENTS_H

/* Depth of the user stacks kept in the stack map (frames per stack). */
#define PSLEAK_STACK_DEPTH 32

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
	/* A `struct stack_scan` follows the event in the same ring record. */
	EVF_STACK_SCAN = 2,
};

/* What the probes could not report, counted per CPU in the `losses` map, one slot per kind. */
enum loss_kind {
	/* events dropped because the ring was full */
	LOSS_RING_FULL = 0,
	/* events sent without a stack (stack map full, or no walkable stack) */
	LOSS_NO_STACK = 1,
	/* allocator calls whose result was not seen: their return was missed, or there was no room
	 * to follow the call */
	LOSS_UNTRACKED_CALL = 2,
	LOSS_KINDS = 3,
};

/* Words read upward from the user stack pointer for events raised inside a syscall, where the
 * libc wrapper may have pushed a frame: userspace finds the return address among them by
 * unwinding the wrapper's frame with its CFI (.eh_frame), at the user instruction pointer. */
#define PSLEAK_SCAN_WORDS 64

struct event {
	__u64 ts_ns;    /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
	__u64 addr;     /* see enum event_kind */
	__u64 size;
	__u64 old_addr;
	__u64 aux;
	__u64 caller;   /* return address of the probed call: the immediate caller, even without frame pointers */
	__s32 stack_id; /* user stack in the `stacks` map; negative when none was taken (the event carries stack words instead) or none could be */
	__u32 tid;      /* thread that caused the event */
	__u8 kind;      /* enum event_kind */
	__u8 domain;    /* enum alloc_domain, for allocation events */
	__u8 flags;     /* EVF_* */
	__u8 pad;
	__u16 sock_family;
	__u16 sock_type;
};

struct stack_scan {
	__u64 ip;                        /* user instruction pointer: where in libc the syscall was made */
	__u64 words[PSLEAK_SCAN_WORDS];  /* from the user stack pointer upward */
};

/* The record layout of an event carrying EVF_STACK_SCAN. */
struct event_with_scan {
	struct event event;
	struct stack_scan scan;
};

#endif
