// SPDX-License-Identifier: MIT
/*
 * psleak's probes, one header per concern. They form one object because they share state:
 * the event ring, the loss counters, and the per-thread "inside an allocator" maps that let the
 * mmap probes tell an allocator's own mappings from the program's.
 */
#include "common.bpf.h"
#include "alloc.bpf.h"
#include "syscalls.bpf.h"
#include "thread.bpf.h"
#include "exec.bpf.h"

char LICENSE[] SEC("license") = "Dual MIT/GPL";

/* Unused globals whose only purpose is to put the event types in the object's BTF, from which
 * libbpf-cargo generates their Rust twins (psleak_ebpf::types::event, ...). */
struct event_with_scan unused_event_with_scan = {};
struct py_layout unused_py_layout = {};
enum event_kind unused_event_kind = EV_ALLOC;
enum alloc_domain unused_alloc_domain = DOMAIN_LIBC;
enum alloc_op unused_alloc_op = ALLOC_OP_SIZE_ARG1;
enum free_op unused_free_op = FREE_OP_PTR_ARG1;
enum event_flag unused_event_flag = EVF_STACK_SCAN;
enum loss_kind unused_loss_kind = LOSS_RING_FULL;
enum py_span unused_py_span = PSLEAK_FRAME_SPAN;
enum py_stamp_flag unused_py_stamp_flag = PY_STAMP_FROM_TEXT;
