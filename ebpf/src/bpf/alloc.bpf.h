/* SPDX-License-Identifier: MIT */
/*
 * Allocator probes: libc's malloc family and CPython's allocator API.
 *
 * One entry program serves every allocation function: the loader attaches it with a
 * cookie that says which argument holds the size (ALLOC_OP_*) and which allocator family
 * it belongs to. The entry stashes the request per thread; the shared return program
 * turns it into an event once the address is known.
 *
 * Calls nest: PyObject_Malloc may call malloc, reallocarray calls realloc. Only the
 * outermost call of a thread is reported; nested ones are the allocator's own business.
 * A thread's call is known by its stack pointer at entry, not counted in and out: code whose
 * stack pointer is below that runs inside the call, and a return at any other height than
 * the call's own is not its return. So a return that never comes (a call under way while the
 * probes were being attached, a longjmp out of the allocator) cannot leave the thread looking
 * inside an allocator forever: the next probe above it sees that it is over, and counts it
 * as a loss.
 *
 * pthread_create is probed as a call of this layer too: what it allocates and maps (the
 * thread's stack, its TLS) belongs to the new thread, which is reported as a thread, and
 * glibc keeps those around after a join, so counting them would flag clean code.
 */
#ifndef PSLEAK_ALLOC_BPF_H
#define PSLEAK_ALLOC_BPF_H

#include "common.bpf.h"

struct alloc_call {
	__u64 size;
	__u64 old_addr;
	__u64 out_ptr; /* posix_memalign's result slot */
	__u64 caller;
	__u64 entry_ip; /* the probe's instruction: where the stack words' unwinding starts */
	__u64 entry_sp; /* the stack pointer there, still the entry's: the callers' frames above it */
	__u64 entry_bp; /* rbp there, still the caller's */
	__u8 op;
	__u8 domain;
};

/* In-flight calls per thread, one map per layer, so a libc call can tell it is inside Python's. */
struct alloc_calls {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32);
	__type(value, struct alloc_call);
};
struct alloc_calls libc_calls SEC(".maps");
struct alloc_calls python_calls SEC(".maps");

static __always_inline void *calls_of(__u8 domain)
{
	return domain == DOMAIN_LIBC ? (void *)&libc_calls : (void *)&python_calls;
}

/*
 * Whether `call` is under way for a probe in a function's prologue (stack pointer `sp`, still
 * the entry's: placement.rs; return address `ret`), i.e. the function was called from inside it. Below the call's entry stack
 * pointer it is. At the same height an allocator may have been tail-called from the call
 * (glibc's reallocarray jumps to realloc; a CPython built with PYTHONMALLOC=malloc jumps to
 * malloc): then the return slot holds the return probe's trampoline, which the call itself saw
 * replace its caller, whereas a later call from the same place finds that caller there again.
 * No allocator tail-calls free, so a free at the call's height comes after it.
 */
static __always_inline bool call_encloses_entry(const struct alloc_call *call, __u64 sp, __u64 ret, bool tail_callable)
{
	return sp < call->entry_sp || (tail_callable && sp == call->entry_sp && ret != call->caller);
}

/*
 * The thread's call of one layer, if it encloses a function entry at `sp` (see above); a call
 * that does not is over though its return was never seen: it is forgotten and counted.
 */
static __always_inline struct alloc_call *enclosing_call(void *calls, __u32 tid, __u64 sp, __u64 ret,
							  bool tail_callable)
{
	struct alloc_call *call = bpf_map_lookup_elem(calls, &tid);
	if (!call || call_encloses_entry(call, sp, ret, tail_callable))
		return call;
	bpf_map_delete_elem(calls, &tid);
	count_loss(LOSS_UNTRACKED_CALL);
	return NULL;
}

/* Whether the thread is inside a probed allocator call of either layer at user stack pointer
 * `sp`, deeper than any function entry (a syscall made by the allocator: used by mmap). */
static __always_inline bool in_allocator(__u32 tid, __u64 sp)
{
	struct alloc_call *libc = bpf_map_lookup_elem(&libc_calls, &tid);
	struct alloc_call *python = bpf_map_lookup_elem(&python_calls, &tid);
	return (libc && sp < libc->entry_sp) || (python && sp < python->entry_sp);
}

SEC("uprobe.multi")
int BPF_UPROBE(alloc_enter)
{
	if (empty_programs)
		return 0;
	__u64 cookie = bpf_get_attach_cookie(ctx);
	__u8 op = cookie & 0xff, domain = (cookie >> 8) & 0xff;
	__u32 tid = current_tid();
	__u64 sp = PT_REGS_SP(ctx), ret = return_address_at(sp);

	/* malloc under PyObject_Malloc belongs to the Python allocation. */
	if (domain == DOMAIN_LIBC && enclosing_call(&python_calls, tid, sp, ret, true))
		return 0;
	if (enclosing_call(calls_of(domain), tid, sp, ret, true))
		return 0;

	struct alloc_call call = { .op = op, .domain = domain };
	__u64 a1 = PT_REGS_PARM1(ctx), a2 = PT_REGS_PARM2(ctx), a3 = PT_REGS_PARM3(ctx);
	switch (op) {
	case ALLOC_OP_SIZE_ARG1: call.size = a1; break;
	case ALLOC_OP_CALLOC: call.size = a1 * a2; break;
	case ALLOC_OP_REALLOC: call.old_addr = a1; call.size = a2; break;
	case ALLOC_OP_REALLOCARRAY: call.old_addr = a1; call.size = a2 * a3; break;
	case ALLOC_OP_POSIX_MEMALIGN: call.out_ptr = a1; call.size = a3; break;
	case ALLOC_OP_SIZE_ARG2: call.size = a2; break;
	case ALLOC_OP_SPAWN: break;
	default: return 0;
	}
	call.caller = ret;
	call.entry_ip = PT_REGS_IP(ctx);
	call.entry_sp = sp;
	call.entry_bp = PT_REGS_FP(ctx);
	if (bpf_map_update_elem(calls_of(domain), &tid, &call, BPF_ANY))
		count_loss(LOSS_UNTRACKED_CALL); /* more threads in allocator calls than the map holds */
	return 0;
}

/*
 * An allocation's event carries the callers' stack words as they were at the call's entry,
 * for userspace to unwind with each module's CFI (libpython and manylinux wheels have no
 * frame pointers). Read at return: the frames above the entry stack pointer are intact, but
 * the return address slot holds the uretprobe trampoline, so it is put back.
 */
static __always_inline struct event *reserve_alloc_event(struct alloc_call *call, __u8 kind)
{
	if (kind == EV_FREE)
		return reserve_event(kind);
	struct event *e = reserve_creation_event(kind, call->entry_ip, call->entry_sp, call->entry_bp);
	if (e)
		((struct event_with_scan *)e)->scan.words[0] = call->caller; /* the event comes first */
	return e;
}

static __always_inline void emit_alloc(struct alloc_call *call, __u8 kind, __u64 addr)
{
	struct event *e = reserve_alloc_event(call, kind);
	if (!e)
		return;
	e->domain = call->domain;
	e->addr = addr;
	e->size = kind == EV_FREE ? 0 : call->size;
	e->old_addr = kind == EV_REALLOC ? call->old_addr : 0;
	submit_event(e);
}

SEC("uretprobe.multi")
int BPF_URETPROBE(alloc_exit, __u64 ret)
{
	if (empty_programs)
		return 0;
	__u64 cookie = bpf_get_attach_cookie(ctx);
	__u32 tid = current_tid();
	void *calls = calls_of((cookie >> 8) & 0xff);
	struct alloc_call *call = bpf_map_lookup_elem(calls, &tid);
	if (!call)
		return 0; /* a call that began before the probes, or the second of a tail call's returns */
	/* Returning pops the return address: the call's own return is one word above its entry. */
	__u64 sp = PT_REGS_SP(ctx), own = call->entry_sp + 8;
	if (sp < own)
		return 0; /* a nested call returns */
	if (sp > own) {
		/* the call ended unseen (this return is of one that began before the probes) */
		bpf_map_delete_elem(calls, &tid);
		count_loss(LOSS_UNTRACKED_CALL);
		return 0;
	}

	switch (call->op) {
	case ALLOC_OP_REALLOC:
	case ALLOC_OP_REALLOCARRAY:
		if (ret)
			emit_alloc(call, EV_REALLOC, ret);
		else if (call->size == 0 && call->old_addr)
			emit_alloc(call, EV_FREE, call->old_addr); /* realloc(p, 0) frees p */
		break;
	case ALLOC_OP_SPAWN:
		break; /* the thread itself is reported at its clone (thread.bpf.h) */
	case ALLOC_OP_POSIX_MEMALIGN: {
		__u64 addr = 0;
		if (ret == 0 && bpf_probe_read_user(&addr, sizeof(addr), (void *)call->out_ptr) == 0 && addr)
			emit_alloc(call, EV_ALLOC, addr);
		break;
	}
	default:
		if (ret)
			emit_alloc(call, EV_ALLOC, ret);
	}
	bpf_map_delete_elem(calls, &tid);
	return 0;
}

/*
 * free(ptr) and Py*_Free(ptr). The loader may attach this past the function's NULL check
 * (glibc's free starts with `test %rdi,%rdi; je`): the probe then sits on a `push`, which
 * the kernel emulates, instead of the `test`, which it must single-step at five times the cost.
 * For the same reason a Py*_Free that only jumps on to the running allocator's free(ctx, ptr)
 * is probed there instead, where the pointer is the second argument (FREE_OP_PTR_ARG2).
 */
SEC("uprobe.multi")
int BPF_UPROBE(free_enter)
{
	if (empty_programs)
		return 0;
	__u64 cookie = bpf_get_attach_cookie(ctx);
	__u8 op = cookie & 0xff, domain = (cookie >> 8) & 0xff;
	/* Both read, and held in registers: a read of only the one asked for is compiled into one
	 * at a computed offset into ctx, which the verifier refuses. */
	__u64 a1 = PT_REGS_PARM1(ctx), a2 = PT_REGS_PARM2(ctx);
	barrier_var(a1);
	barrier_var(a2);
	__u64 addr = op == FREE_OP_PTR_ARG2 ? a2 : a1;
	__u32 tid = current_tid();
	if (!addr)
		return 0;
	/* free inside realloc, or PyObject_Free's own free: part of the outer call. The probe may
	 * sit past a NULL check, or in the function a Py*_Free jumped to: either leaves the stack
	 * pointer as it was at the entry. */
	__u64 sp = PT_REGS_SP(ctx);
	if (enclosing_call(&python_calls, tid, sp, 0, false))
		return 0;
	if (domain == DOMAIN_LIBC && enclosing_call(&libc_calls, tid, sp, 0, false))
		return 0;

	struct event *e = reserve_event(EV_FREE);
	if (!e)
		return 0;
	e->domain = domain;
	e->addr = addr;
	submit_event(e);
	return 0;
}

#endif
