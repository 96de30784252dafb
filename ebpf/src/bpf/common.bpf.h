/* SPDX-License-Identifier: MIT */
/* What every probe shares: the target, the event ring, the loss counters and the stack readers. */
#ifndef PSLEAK_COMMON_BPF_H
#define PSLEAK_COMMON_BPF_H

#include "kernel.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include "events.h"


/* Set by the loader before load; the verifier then prunes every other process's path. */
const volatile __u32 target_tgid = 0;
/* The pid namespace `target_tgid` (and every tid sent) is a number of, when psleak runs in one
 * other than the initial namespace (nsfs device and inode of /proc/self/ns/pid); else 0. */
const volatile __u64 pidns_dev = 0;
const volatile __u64 pidns_ino = 0;
/* Benchmark floor: the same probes fire but every program returns at once. */
const volatile bool empty_programs = false;
/* How many chunks of each creation's stack are copied (psleak trace --stack-depth): fewer is
 * cheaper per event and reaches fewer frames. */
const volatile __u32 scan_chunks = PSLEAK_SCAN_WORDS / PSLEAK_SCAN_CHUNK_WORDS;
/* How to read the Python stack (events.h); its runtime is 0 when the target is not Python. */
const volatile struct py_layout py_layout = {};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 32 << 20); /* resized by the loader */
} events SEC(".maps");

/* One counter per `enum loss_kind`. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, sizeof(__u64));
	__uint(max_entries, LOSS_KINDS);
} losses SEC(".maps");

static __always_inline void count_loss(enum loss_kind kind)
{
	__u32 which = kind;
	__u64 *n = bpf_map_lookup_elem(&losses, &which);
	if (n)
		(*n)++;
}

/* The current task's pid and tgid as psleak's pid namespace numbers them. */
static __always_inline __u64 current_pid_tgid(void)
{
	if (!pidns_ino)
		return bpf_get_current_pid_tgid();
	struct bpf_pidns_info ns = {};
	if (bpf_get_ns_current_pid_tgid(pidns_dev, pidns_ino, &ns, sizeof(ns)))
		return 0; /* not in that namespace: no tgid 0 is ever a target */
	return (__u64)ns.tgid << 32 | ns.pid;
}

static __always_inline __u32 current_tid(void)
{
	return (__u32)current_pid_tgid();
}

static __always_inline bool is_target(void)
{
	return (current_pid_tgid() >> 32) == target_tgid;
}

/* Pid namespaces nest this deep at most, as far as `task_tid` looks. */
#define PIDNS_LEVELS 8

/* A task's tid as psleak's pid namespace numbers it (0 if it has none there). */
static __always_inline __u32 task_tid(struct task_struct *task)
{
	if (!pidns_ino)
		return BPF_CORE_READ(task, pid);
	struct pid *pid = BPF_CORE_READ(task, thread_pid);
	unsigned int level = BPF_CORE_READ(pid, level);
	for (unsigned int i = 0; i < PIDNS_LEVELS && i <= level; i++) {
		struct upid number = {};
		bpf_probe_read_kernel(&number, sizeof(number), &pid->numbers[i]);
		if (BPF_CORE_READ(number.ns, ns.inum) == pidns_ino)
			return number.nr;
	}
	return 0;
}

/* The word at the user stack pointer: where a probe sits in a function's prologue, before it
 * moves the stack pointer (or in a leaf syscall wrapper), it is the return address, i.e. the
 * caller, frame pointers or not. */
static __always_inline __u64 return_address_at(__u64 user_sp)
{
	__u64 ret = 0;
	bpf_probe_read_user(&ret, sizeof(ret), (void *)user_sp);
	return ret;
}

/* Waking the collector for every event would cost the traced thread more than the probe:
 * it is woken only once this much is waiting, and drains the ring on a timer otherwise. */
#define WAKEUP_BYTES (256 << 10)

static __always_inline void submit_event(struct event *e)
{
	__u64 flags = bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA) >= WAKEUP_BYTES ? BPF_RB_FORCE_WAKEUP
										       : BPF_RB_NO_WAKEUP;
	bpf_ringbuf_submit(e, flags);
}

/* A ring record of `size` bytes (a constant at each inlined call) that starts with a zeroed
 * event of `kind`, made now by the current thread. What follows the event is its writers' to
 * fill: zeroing the 2 KiB of stack words that are read over at once would double their cost. */
static __always_inline struct event *reserve_record(__u64 size, __u8 kind)
{
	struct event *e = bpf_ringbuf_reserve(&events, size, 0);
	if (!e) {
		count_loss(LOSS_RING_FULL);
		return NULL;
	}
	__builtin_memset(e, 0, sizeof(*e));
	e->kind = kind;
	e->ts_ns = bpf_ktime_get_ns();
	e->tid = current_tid();
	return e;
}

static __always_inline struct event *reserve_event(__u8 kind)
{
	return reserve_record(sizeof(struct event), kind);
}

/* Frames walked per event at most: the stack's depth, and the shim frames skipped on the way. */
#define PY_WALK_STEPS (PSLEAK_PY_FRAMES + 4)

static __always_inline __u64 read_user_u64(__u64 addr)
{
	__u64 value = 0;
	bpf_probe_read_user(&value, sizeof(value), (void *)addr);
	return value;
}

/* A span of a struct, read in one go into 8-byte words, and its fields at the loader's
 * offsets: indexed as arrays of their own size (aligned loads), masked into the span, where
 * the verifier then sees them. */
#define SPAN_U64(words, n, offset) ((words)[((offset) >> 3) & ((n) - 1)])
#define SPAN_U32(words, n, offset) (((__u32 *)(words))[((offset) >> 2) & (2 * (n) - 1)])
#define SPAN_U8(words, n, offset) (((__u8 *)(words))[(offset) & (8 * (n) - 1)])

/* str's state bits that say how its text is kept: compact and ascii (the others change). */
#define STR_COMPACT_ASCII (0x20 | 0x40)

/* The stamp of the code object at `code` (events.h); what cannot be read counts as zeros. A
 * global function, verified once, as read_python_stack. */
__noinline __u64 code_stamp(__u64 code)
{
	__u64 span[PSLEAK_CODE_SPAN / 8] = {};
	bpf_probe_read_user(span, py_layout.code_span_len & (PSLEAK_CODE_SPAN - 1), (void *)(code + py_layout.code_span));
	__u64 qualname = SPAN_U64(span, PSLEAK_CODE_SPAN / 8, py_layout.code_qualname);
	__u64 stamp = qualname;
	stamp = PY_STAMP_MIX(stamp, SPAN_U64(span, PSLEAK_CODE_SPAN / 8, py_layout.code_filename));
	stamp = PY_STAMP_MIX(stamp, SPAN_U32(span, PSLEAK_CODE_SPAN / 8, py_layout.code_firstlineno));
	__u64 name[PSLEAK_NAME_SPAN / 8] = {};
	__u64 str = qualname + 0x10;
	bpf_probe_read_user(name, py_layout.name_span_len & (PSLEAK_NAME_SPAN - 1), (void *)str);
	__u64 length = name[0];
	stamp = PY_STAMP_MIX(stamp, length);
	__u64 hash = SPAN_U64(name, PSLEAK_NAME_SPAN / 8, py_layout.name_hash);
	if (hash != (__u64)-1)
		return PY_STAMP_MIX(stamp, hash) & ~(__u64)PY_STAMP_FROM_TEXT;
	if ((SPAN_U32(name, PSLEAK_NAME_SPAN / 8, py_layout.name_state) & STR_COMPACT_ASCII) == STR_COMPACT_ASCII) {
		/* Its text, and not a byte past it (the object may end there), into the code's span,
		 * which is done with. */
		__u64 *text = span;
		for (int i = 0; i < PSLEAK_NAME_TEXT / 8; i++)
			text[i] = 0;
		__u32 size = length < PSLEAK_NAME_TEXT ? length : PSLEAK_NAME_TEXT;
		bpf_probe_read_user(text, size, (void *)(str + py_layout.name_ascii));
		for (int i = 0; i < PSLEAK_NAME_TEXT / 8; i++)
			stamp = PY_STAMP_MIX(stamp, text[i]);
	}
	return stamp | PY_STAMP_FROM_TEXT;
}

/* The current thread's Python frames, innermost first, into `py`; how many. A global function,
 * verified once: inlined at each event's reservation, the walk made the programs too large. */
__noinline int read_python_stack(struct py_stack *py)
{
	if (!py)
		return 0;
	py->depth = 0;
	if (!py_layout.runtime)
		return 0;
	struct task_struct *task = bpf_get_current_task_btf();
	__u64 fsbase = task->thread.fsbase;
	__u32 key = 0;
	bpf_probe_read_user(&key, sizeof(key), (void *)(py_layout.runtime + py_layout.key));
	/* pthread_getspecific(key): a block of 32 keys, then the key's slot in it. */
	__u64 block = read_user_u64(fsbase + py_layout.pthread_specific + 8 * (__u64)(key / 32));
	if (!block)
		return 0;
	__u64 tstate = read_user_u64(block + (__u64)py_layout.key_data_size * (key % 32) + py_layout.key_data_data);
	if (!tstate)
		return 0; /* a thread that never ran Python */
	__u64 frame = read_user_u64(tstate + py_layout.tstate_frame);
	if (py_layout.cframe_frame >= 0 && frame)
		frame = read_user_u64(frame + py_layout.cframe_frame);
	__u32 depth = 0;
	__u32 span_len = py_layout.frame_span_len & (PSLEAK_FRAME_SPAN - 1);
	const int words = PSLEAK_FRAME_SPAN / 8;
	for (int step = 0; step < PY_WALK_STEPS && frame && depth < PSLEAK_PY_FRAMES; step++) {
		/* Only the frame's own fields: past them, the thread's frame stack may end. */
		__u64 span[PSLEAK_FRAME_SPAN / 8] = {};
		if (bpf_probe_read_user(span, span_len, (void *)(frame + py_layout.frame_span)))
			break;
		__u8 owner = py_layout.frame_owner >= 0 ? SPAN_U8(span, words, py_layout.frame_owner) : 0;
		if (owner != 3) { /* FRAME_OWNED_BY_CSTACK: an entry shim, no code of the program's */
			struct py_frame *f = &py->frames[depth & (PSLEAK_PY_FRAMES - 1)];
			f->code = SPAN_U64(span, words, py_layout.frame_code);
			if (py_layout.instr_is_pointer)
				f->instr = SPAN_U64(span, words, py_layout.frame_instr);
			else
				f->instr = SPAN_U32(span, words, py_layout.frame_instr); /* f_lasti, an int */
			f->stamp = code_stamp(f->code);
			depth++;
		}
		frame = SPAN_U64(span, words, py_layout.frame_back);
	}
	py->depth = depth;
	return depth;
}

/* The user stack from `sp` upward into `scan`, a chunk at a time, until one cannot be read;
 * how many words. A global function, verified once, as read_python_stack. */
__noinline int read_stack_words(struct stack_scan *scan, __u64 ip, __u64 sp, __u64 bp)
{
	if (!scan)
		return 0;
	scan->ip = ip;
	scan->sp = sp;
	scan->bp = bp;
	scan->len = 0;
	for (int chunk = 0; chunk < PSLEAK_SCAN_WORDS / PSLEAK_SCAN_CHUNK_WORDS && chunk < scan_chunks; chunk++) {
		__u32 first = chunk * PSLEAK_SCAN_CHUNK_WORDS;
		if (bpf_probe_read_user(&scan->words[first], PSLEAK_SCAN_CHUNK_WORDS * 8, (void *)(sp + 8 * (__u64)first)))
			break;
		scan->len = first + PSLEAK_SCAN_CHUNK_WORDS;
	}
	if (!scan->len)
		count_loss(LOSS_NO_STACK);
	return scan->len;
}

/* A creation's event, followed by the user stack words from `sp` upward, for userspace to
 * unwind from `ip` (and `bp`) with the code's CFI, and by the thread's Python stack if it has one. */
static __always_inline struct event *reserve_creation_event(__u8 kind, __u64 ip, __u64 sp, __u64 bp)
{
	struct event_with_scan *r = (struct event_with_scan *)reserve_record(sizeof(*r), kind);
	if (!r)
		return NULL;
	r->event.flags = EVF_STACK_SCAN;
	read_stack_words(&r->scan, ip, sp, bp);
	if (read_python_stack(&r->py) > 0)
		r->event.flags |= EVF_PY_STACK;
	return &r->event;
}

/* An event raised inside a syscall made by the target: its stack starts where the syscall was
 * made, in libc's wrapper, which may have pushed a frame; its CFI says. */
static __always_inline struct event *reserve_syscall_event(__u8 kind, struct pt_regs *user_regs)
{
	return reserve_creation_event(kind, PT_REGS_IP_CORE(user_regs), PT_REGS_SP_CORE(user_regs),
				      PT_REGS_FP_CORE(user_regs));
}

/* The user registers of the current task, from inside the kernel. */
static __always_inline struct pt_regs *current_user_regs(void)
{
	return (struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());
}

#endif
