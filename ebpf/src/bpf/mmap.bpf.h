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

static __always_inline void on_mmap(struct pt_regs *regs, long ret)
{
	struct event *e = reserve_syscall_event(EV_MMAP, regs);
	if (!e)
		return;
	e->addr = ret;
	e->size = PT_REGS_PARM2_CORE_SYSCALL(regs);
	if (in_allocator(e->tid, PT_REGS_SP_CORE(regs)))
		e->flags |= EVF_ALLOCATOR_INTERNAL;
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
	struct event *e = reserve_syscall_event(EV_MREMAP, regs);
	if (!e)
		return;
	e->addr = ret;
	e->size = PT_REGS_PARM3_CORE_SYSCALL(regs);
	e->old_addr = PT_REGS_PARM1_CORE_SYSCALL(regs);
	e->aux = PT_REGS_PARM2_CORE_SYSCALL(regs);
	if (in_allocator(e->tid, PT_REGS_SP_CORE(regs)))
		e->flags |= EVF_ALLOCATOR_INTERNAL;
	submit_event(e);
}

#endif
