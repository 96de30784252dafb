/* SPDX-License-Identifier: MIT */
/*
 * File descriptors, at the syscall level: every syscall that returns a new fd (open, socket,
 * accept, dup, eventfd, epoll, memfd, ...) or writes two (pipe, socketpair), and close()
 * and close_range(). An fd replaced by dup2/dup3 is closed implicitly; the ledger infers
 * that from the new open of the same number. Called from syscalls.bpf.h.
 */
#ifndef PSLEAK_FD_BPF_H
#define PSLEAK_FD_BPF_H

#include "common.bpf.h"

#define CLOSE_RANGE_CLOEXEC (1U << 2)
#define F_DUPFD 0
#define F_DUPFD_CLOEXEC 1030

/* The file behind one of the current task's fds. */
static __always_inline struct file *fd_file(__u32 fd)
{
	struct task_struct *task = bpf_get_current_task_btf();
	struct fdtable *fdt = BPF_CORE_READ(task, files, fdt);
	struct file **fds = BPF_CORE_READ(fdt, fd);
	struct file *file = NULL;
	if (fd < BPF_CORE_READ(fdt, max_fds))
		bpf_probe_read_kernel(&file, sizeof(file), &fds[fd]);
	return file;
}

static __always_inline void emit_fd_open(struct pt_regs *regs, __u32 fd)
{
	struct event *e = reserve_syscall_event(EV_FD_OPEN, regs);
	if (!e)
		return;
	e->addr = fd;
	struct file *file = fd_file(fd);
	if (file) {
		__u16 mode = BPF_CORE_READ(file, f_inode, i_mode);
		e->aux = mode & S_IFMT;
		if ((mode & S_IFMT) == S_IFSOCK) {
			struct socket *sock = BPF_CORE_READ(file, private_data);
			e->sock_type = BPF_CORE_READ(sock, type);
			e->sock_family = BPF_CORE_READ(sock, sk, __sk_common.skc_family);
		}
	}
	submit_event(e);
}

/* pipe(), pipe2() and socketpair() write their two fds to user memory. */
static __always_inline void emit_fd_pair(struct pt_regs *regs, __u64 user_fds)
{
	int fds[2] = {};
	if (bpf_probe_read_user(fds, sizeof(fds), (void *)user_fds))
		return;
	emit_fd_open(regs, fds[0]);
	emit_fd_open(regs, fds[1]);
}

static __always_inline void emit_fd_close(__u64 first, __u64 last)
{
	struct event *e = reserve_event(EV_FD_CLOSE);
	if (!e)
		return;
	e->addr = first;
	e->aux = last;
	submit_event(e);
}

static __always_inline void on_fd_syscall(struct pt_regs *regs, long nr, long ret)
{
	switch (nr) {
	case __NR_open: case __NR_openat: case __NR_openat2: case __NR_creat:
	case __NR_open_by_handle_at: case __NR_socket: case __NR_accept: case __NR_accept4:
	case __NR_dup: case __NR_dup2: case __NR_dup3: case __NR_eventfd: case __NR_eventfd2:
	case __NR_epoll_create: case __NR_epoll_create1: case __NR_memfd_create:
	case __NR_memfd_secret: case __NR_signalfd: case __NR_signalfd4: case __NR_timerfd_create:
	case __NR_inotify_init: case __NR_inotify_init1: case __NR_fanotify_init:
	case __NR_pidfd_open: case __NR_pidfd_getfd: case __NR_userfaultfd:
	case __NR_perf_event_open: case __NR_io_uring_setup: case __NR_mq_open:
	case __NR_open_tree: case __NR_fsopen: case __NR_fsmount: case __NR_fspick:
		if (ret >= 0)
			emit_fd_open(regs, ret);
		return;
	case __NR_fcntl: {
		long cmd = PT_REGS_PARM2_CORE_SYSCALL(regs);
		if (ret >= 0 && (cmd == F_DUPFD || cmd == F_DUPFD_CLOEXEC))
			emit_fd_open(regs, ret);
		return;
	}
	case __NR_pipe: case __NR_pipe2:
		if (ret == 0)
			emit_fd_pair(regs, PT_REGS_PARM1_CORE_SYSCALL(regs));
		return;
	case __NR_socketpair:
		if (ret == 0)
			emit_fd_pair(regs, PT_REGS_PARM4_CORE_SYSCALL(regs));
		return;
	case __NR_close:
		/* close() releases the fd even when the final flush reports an error (EINTR, EIO) */
		if (ret != -9 /* EBADF */) {
			__u64 fd = (__u32)PT_REGS_PARM1_CORE_SYSCALL(regs);
			emit_fd_close(fd, fd);
		}
		return;
	case __NR_close_range:
		if (ret == 0 && !(PT_REGS_PARM3_CORE_SYSCALL(regs) & CLOSE_RANGE_CLOEXEC))
			emit_fd_close((__u32)PT_REGS_PARM1_CORE_SYSCALL(regs), (__u32)PT_REGS_PARM2_CORE_SYSCALL(regs));
		return;
	}
}

#endif
