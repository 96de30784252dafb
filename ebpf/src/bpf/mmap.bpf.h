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

static __always_inline void on_mmap(void *ctx, struct pt_regs *regs, long ret)
{
	struct event *e = reserve_syscall_event(ctx, EV_MMAP, regs);
	if (!e)
		return;
	e->addr = ret;
	e->size = BPF_CORE_READ(regs, si);
	if (in_allocator(e->tid, BPF_CORE_READ(regs, sp)))
		e->flags |= EVF_ALLOCATOR_INTERNAL;
	submit_event(e);
}

static __always_inline void on_munmap(struct pt_regs *regs)
{
	struct event *e = reserve_event(EV_MUNMAP);
	if (!e)
		return;
	e->addr = BPF_CORE_READ(regs, di);
	e->size = BPF_CORE_READ(regs, si);
	submit_event(e);
}

static __always_inline void on_mremap(void *ctx, struct pt_regs *regs, long ret)
{
	struct event *e = reserve_syscall_event(ctx, EV_MREMAP, regs);
	if (!e)
		return;
	e->addr = ret;
	e->size = BPF_CORE_READ(regs, dx);
	e->old_addr = BPF_CORE_READ(regs, di);
	e->aux = BPF_CORE_READ(regs, si);
	if (in_allocator(e->tid, BPF_CORE_READ(regs, sp)))
		e->flags |= EVF_ALLOCATOR_INTERNAL;
	submit_event(e);
}

#endif
