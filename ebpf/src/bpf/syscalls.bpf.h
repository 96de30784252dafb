/* SPDX-License-Identifier: MIT */
/*
 * One program at every syscall exit (raw_syscalls/sys_exit through BTF: no kprobes, which this
 * kernel lacks, and no tracefs). Other processes leave at the first comparison. At exit the
 * saved user registers still hold the arguments, so one program sees arguments and result.
 */
#ifndef PSLEAK_SYSCALLS_BPF_H
#define PSLEAK_SYSCALLS_BPF_H

#include "common.bpf.h"
#include "mmap.bpf.h"
#include "fd.bpf.h"

#define IS_SYSCALL_ERROR(ret) ((unsigned long)(ret) >= (unsigned long)-4095)

SEC("tp_btf/sys_exit")
int BPF_PROG(syscall_exit, struct pt_regs *regs, long ret)
{
	if (empty_programs || !is_target())
		return 0;
	long nr = BPF_CORE_READ(regs, orig_ax); /* the syscall's number: bpf_tracing.h has no macro for it */
	switch (nr) {
	case __NR_mmap:
		if (!IS_SYSCALL_ERROR(ret))
			on_mmap(regs, ret);
		return 0;
	case __NR_munmap:
		if (ret == 0)
			on_munmap(regs);
		return 0;
	case __NR_mremap:
		if (!IS_SYSCALL_ERROR(ret))
			on_mremap(regs, ret);
		return 0;
	}
	on_fd_syscall(regs, nr, ret);
	return 0;
}

#endif
