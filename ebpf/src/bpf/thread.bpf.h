/* SPDX-License-Identifier: MIT */
/*
 * Threads of the target. The kernel sees a thread start in the clone that makes it, deep in
 * pthread_create; the site is taken earlier, at pthread_create's entry, where the caller is
 * exact, and handed over per thread.
 */
#ifndef PSLEAK_THREAD_BPF_H
#define PSLEAK_THREAD_BPF_H

#include "common.bpf.h"
#include "alloc.bpf.h"

struct spawn_site {
	__u64 caller;
	__s32 stack_id;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, struct spawn_site);
} spawn_sites SEC(".maps");

SEC("uprobe")
int BPF_UPROBE(pthread_create_enter)
{
	__u32 tid = current_tid();
	struct spawn_site site = {
		.caller = return_address_at(PT_REGS_SP(ctx)),
		.stack_id = user_stack_id(ctx),
	};
	bpf_map_update_elem(&spawn_sites, &tid, &site, BPF_ANY);
	return 0;
}

SEC("tp_btf/sched_process_fork")
int BPF_PROG(thread_start, struct task_struct *parent, struct task_struct *child)
{
	if (!is_target() || BPF_CORE_READ(child, tgid) != target_tgid)
		return 0; /* a fork of the target is another process */
	__u32 tid = current_tid();
	struct spawn_site *site = bpf_map_lookup_elem(&spawn_sites, &tid);
	struct event *e;
	if (site) {
		e = reserve_event(EV_THREAD_START);
		if (!e)
			return 0;
		e->caller = site->caller;
		e->stack_id = site->stack_id;
		bpf_map_delete_elem(&spawn_sites, &tid);
	} else {
		/* a raw clone(): find the caller in the user stack */
		e = reserve_syscall_event(ctx, EV_THREAD_START, current_user_sp());
		if (!e)
			return 0;
	}
	e->addr = BPF_CORE_READ(child, pid);
	bpf_ringbuf_submit(e, 0);
	return 0;
}

SEC("tp_btf/sched_process_exit")
int BPF_PROG(thread_exit, struct task_struct *task)
{
	if (!is_target())
		return 0;
	__u32 tid = current_tid();
	/* a thread that dies inside an allocator call never returns from it */
	bpf_map_delete_elem(&libc_calls, &tid);
	bpf_map_delete_elem(&python_calls, &tid);
	bpf_map_delete_elem(&spawn_sites, &tid);
	struct event *e = reserve_event(EV_THREAD_EXIT);
	if (!e)
		return 0;
	e->addr = tid;
	bpf_ringbuf_submit(e, 0);
	return 0;
}

#endif
