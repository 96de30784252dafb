/* SPDX-License-Identifier: MIT */
/*
 * Memory mappings made by the target, at the syscall level. A mapping made inside an
 * allocator call is flagged EVF_ALLOCATOR_INTERNAL: glibc's large mallocs and pymalloc's
 * arenas are heap, not mmap leaks. Called from the syscall-exit dispatcher (syscalls.bpf.h).
 */
#ifndef PSLEAK_MMAP_BPF_H
#define PSLEAK_MMAP_BPF_H

#include "common.bpf.h"
#include "alloc.bpf.h"

/* A mapping's event. One made inside an allocator call is heap, named by its block's own
 * event: it goes without the stack, which would only cost the thread its copy. */
static __always_inline struct event *reserve_mapping_event(__u8 kind, struct pt_regs *regs)
{
	if (!in_allocator(current_tid(), PT_REGS_SP_CORE(regs)))
		return reserve_syscall_event(kind, regs);
	struct event *e = reserve_event(kind);
	if (e)
		e->flags = EVF_ALLOCATOR_INTERNAL;
	return e;
}

static __always_inline void on_mmap(struct pt_regs *regs, long ret)
{
	struct event *e = reserve_mapping_event(EV_MMAP, regs);
	if (!e)
		return;
	e->addr = ret;
	e->size = PT_REGS_PARM2_CORE_SYSCALL(regs);
	submit_event(e);
}

static __always_inline void on_munmap(struct pt_regs *regs)
{
	struct event *e = reserve_event(EV_MUNMAP);
	if (!e)
		return;
	e->addr = PT_REGS_PARM1_CORE_SYSCALL(regs);
	e->size = PT_REGS_PARM2_CORE_SYSCALL(regs);
	submit_event(e);
}

static __always_inline void on_mremap(struct pt_regs *regs, long ret)
{
	struct event *e = reserve_mapping_event(EV_MREMAP, regs);
	if (!e)
		return;
	e->addr = ret;
	e->size = PT_REGS_PARM3_CORE_SYSCALL(regs);
	e->old_addr = PT_REGS_PARM1_CORE_SYSCALL(regs);
	e->aux = PT_REGS_PARM2_CORE_SYSCALL(regs);
	submit_event(e);
}

#endif
