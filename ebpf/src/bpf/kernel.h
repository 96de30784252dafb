/* SPDX-License-Identifier: MIT */
/*
 * The few kernel types psleak reads, declared for CO-RE: field offsets are
 * relocated against the running kernel's BTF at load time, so only the names
 * must match. This replaces a generated multi-megabyte vmlinux.h.
 */
#ifndef PSLEAK_KERNEL_H
#define PSLEAK_KERNEL_H

#include <linux/types.h>
#include <linux/bpf.h>
#include <asm/unistd.h>

/* bpf_tracing.h picks the kernel's pt_regs field names (di, si, ...) under this guard. */
#define __VMLINUX_H__

typedef _Bool bool;
#define true 1
#define false 0

#pragma clang attribute push(__attribute__((preserve_access_index)), apply_to = record)

struct pt_regs {
	unsigned long r15, r14, r13, r12, bp, bx, r11, r10, r9, r8;
	unsigned long ax, cx, dx, si, di, orig_ax, ip, cs, flags, sp, ss;
};

struct file;

struct fdtable {
	unsigned int max_fds;
	struct file **fd;
};

struct files_struct {
	struct fdtable *fdt;
};

struct ns_common {
	unsigned int inum;
};

struct pid_namespace {
	struct ns_common ns;
};

struct upid {
	int nr;
	struct pid_namespace *ns;
};

struct pid {
	unsigned int level;
	struct upid numbers[1];
};

struct thread_struct {
	unsigned long fsbase; /* x86-64: the thread's TLS pointer, glibc's struct pthread */
};

struct task_struct {
	int pid;
	int tgid;
	struct pid *thread_pid;
	struct files_struct *files;
	struct thread_struct thread;
};

struct inode {
	unsigned short i_mode;
};

struct file {
	struct inode *f_inode;
	void *private_data;
};

struct sock_common {
	unsigned short skc_family;
};

struct sock {
	struct sock_common __sk_common;
};

struct socket {
	short type;
	struct sock *sk;
};

#pragma clang attribute pop

#define S_IFMT 00170000
#define S_IFSOCK 0140000

#endif
