/* SPDX-License-Identifier: MIT */
/*
 * The target runs execve(): its probes stay on the files they were put on, but everything its
 * old program made went with the old address space. Also counted outside the ring, so that no
 * full ring can hide an exec (which may have changed who the target runs as) from userspace.
 */
#ifndef PSLEAK_EXEC_BPF_H
#define PSLEAK_EXEC_BPF_H

#include "common.bpf.h"
#include "alloc.bpf.h"

/* Execs of the target since attach; userspace reads it from the mapped .bss. */
__u64 target_execs = 0;

SEC("tp_btf/sched_process_exec")
int BPF_PROG(target_exec, struct task_struct *task, int old_pid, void *bprm)
{
	if (!is_target())
		return 0;
	__sync_fetch_and_add(&target_execs, 1);
	/* The thread that execs may take the leader's tid; no allocator call is under way. */
	__u32 tid = current_tid();
	bpf_map_delete_elem(&libc_calls, &tid);
	bpf_map_delete_elem(&python_calls, &tid);
	struct event *e = reserve_event(EV_EXEC);
	if (e)
		bpf_ringbuf_submit(e, BPF_RB_FORCE_WAKEUP);
	return 0;
}

#endif
