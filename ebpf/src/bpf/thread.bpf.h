/* SPDX-License-Identifier: MIT */
/*
 * Threads of the target. The kernel sees a thread start in the clone that makes it, deep in
 * pthread_create; its stack is the one pthread_create was entered with (alloc.bpf.h), still
 * intact above the call's entry.
 */
#ifndef PSLEAK_THREAD_BPF_H
#define PSLEAK_THREAD_BPF_H

#include "common.bpf.h"
#include "alloc.bpf.h"

SEC("tp_btf/sched_process_fork")
int BPF_PROG(thread_start, struct task_struct *parent, struct task_struct *child)
{
	/* A fork of the target is another process: a thread shares its creator's tgid. */
	if (empty_programs || !is_target() || BPF_CORE_READ(child, tgid) != BPF_CORE_READ(parent, tgid))
		return 0;
	__u32 tid = current_tid();
	struct alloc_call *spawn = bpf_map_lookup_elem(&libc_calls, &tid);
	struct pt_regs *regs = current_user_regs();
	struct event *e;
	if (spawn && spawn->op == ALLOC_OP_SPAWN && PT_REGS_SP_CORE(regs) < spawn->entry_sp) {
		e = reserve_alloc_event(spawn, EV_THREAD_START);
	} else {
		/* a raw clone(): its stack starts in libc's wrapper */
		e = reserve_syscall_event(EV_THREAD_START, regs);
	}
	if (!e)
		return 0;
	e->addr = task_tid(child);
	submit_event(e);
	return 0;
}

SEC("tp_btf/sched_process_exit")
int BPF_PROG(thread_exit, struct task_struct *task)
{
	if (empty_programs || !is_target())
		return 0;
	__u32 tid = current_tid();
	/* a thread that dies inside an allocator call never returns from it */
	bpf_map_delete_elem(&libc_calls, &tid);
	bpf_map_delete_elem(&python_calls, &tid);
	struct event *e = reserve_event(EV_THREAD_EXIT);
	if (!e)
		return 0;
	e->addr = tid;
	submit_event(e);
	return 0;
}

#endif
