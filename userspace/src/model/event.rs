//! The event model every backend feeds the ledger with. The eBPF backend decodes
//! `ebpf/src/bpf/events.h` into it; nothing here is re-derived from anything but the event.

use serde::Serialize;

/// Allocator families, counted apart (`enum alloc_domain` in events.h).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Domain {
    Libc,
    PymemRaw,
    Pymem,
    Pyobject,
    /// Windows HeapAlloc family, any heap.
    WinHeap,
}

impl Domain {
    pub fn name(self) -> &'static str {
        match self {
            Self::Libc => "malloc",
            Self::PymemRaw => "PyMem_Raw",
            Self::Pymem => "PyMem",
            Self::Pyobject => "PyObject",
            Self::WinHeap => "HeapAlloc",
        }
    }
}

/// What an fd refers to, as the kernel saw it when the fd was installed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum FdKind {
    File,
    Directory,
    Pipe,
    Socket {
        family: u16,
        sock_type: u16,
    },
    Device,
    /// eventfd, epoll, memfd, timerfd, signalfd, pidfd...: anonymous inodes.
    Other,
}

impl FdKind {
    /// From the inode mode and, for sockets, the socket's family and type.
    pub fn from_mode(mode: u64, family: u16, sock_type: u16) -> Self {
        match mode & 0o170000 {
            0o100000 => Self::File,
            0o040000 => Self::Directory,
            0o010000 => Self::Pipe,
            0o140000 => Self::Socket { family, sock_type },
            0o020000 | 0o060000 => Self::Device,
            _ => Self::Other,
        }
    }

    /// `AF_INET SOCK_STREAM`, `pipe`, `file`...
    pub fn describe(self) -> String {
        match self {
            Self::Socket { family, sock_type } => {
                format!("{} {}", family_name(family), sock_type_name(sock_type))
            }
            Self::File => "file".into(),
            Self::Directory => "directory".into(),
            Self::Pipe => "pipe".into(),
            Self::Device => "device".into(),
            Self::Other => "anonymous inode".into(),
        }
    }
}

// Linux's numbers, which the probes read from the kernel's sockets (and the Linux polling
// backend from getsockopt), whatever platform shows them.
fn family_name(family: u16) -> String {
    match family {
        1 => "AF_UNIX".into(),
        2 => "AF_INET".into(),
        10 => "AF_INET6".into(),
        16 => "AF_NETLINK".into(),
        17 => "AF_PACKET".into(),
        other => format!("AF_{other}"),
    }
}

fn sock_type_name(sock_type: u16) -> String {
    match sock_type {
        1 => "SOCK_STREAM".into(),
        2 => "SOCK_DGRAM".into(),
        3 => "SOCK_RAW".into(),
        5 => "SOCK_SEQPACKET".into(),
        other => format!("SOCK_{other}"),
    }
}

/// What a Windows handle refers to: the kernel's object type index (its name, `File`, `Event`...,
/// is the system's to tell, per boot) and the object's name when it has one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HandleKind {
    pub object_type: u16,
    pub name: String,
}

impl HandleKind {
    /// `type 37 \Device\Afd`, or `type 16` for an unnamed object.
    pub fn describe(&self) -> String {
        match self.name.as_str() {
            "" => format!("type {}", self.object_type),
            name => format!("type {} {name}", self.object_type),
        }
    }
}

/// Where a resource was created: the immediate caller of the probed function (exact even
/// without frame pointers) and the callers beyond it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Origin {
    pub caller: Option<u64>,
    /// The whole chain of return addresses, caller first, when there is more than the caller
    /// (interned by the backend): unwound with the CFI on Linux, ETW's stack on Windows.
    pub chain: Option<u32>,
    /// The Python frames of the thread, innermost first (interned by the decoder): two Python
    /// callers of one C function are two sites.
    pub python: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Alloc {
        domain: Domain,
        addr: u64,
        size: u64,
    },
    Free {
        domain: Domain,
        addr: u64,
    },
    /// `new` replaces `old` (which may be 0, as for realloc(NULL, n)).
    Realloc {
        domain: Domain,
        old: u64,
        new: u64,
        size: u64,
    },
    /// `allocator_internal`: made inside an allocator call, so already counted as heap.
    Map {
        addr: u64,
        len: u64,
        allocator_internal: bool,
    },
    Unmap {
        addr: u64,
        len: u64,
    },
    Remap {
        old: u64,
        old_len: u64,
        new: u64,
        new_len: u64,
        allocator_internal: bool,
    },
    FdOpen {
        fd: i32,
        kind: FdKind,
    },
    /// Closes every fd in `first..=last`.
    FdClose {
        first: i32,
        last: i32,
    },
    ThreadStart {
        tid: u32,
    },
    ThreadExit {
        tid: u32,
    },
    /// A Windows private heap (HeapCreate), a resource of its own.
    HeapCreate {
        heap: u64,
    },
    /// Destroying a heap also frees its blocks: the backend sends their frees before this.
    HeapDestroy {
        heap: u64,
    },
    HandleOpen {
        handle: u64,
        kind: HandleKind,
    },
    HandleClose {
        handle: u64,
    },
    /// The process runs a new program (execve): whatever its old one made went with it.
    Exec,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    /// The thread that caused it.
    pub tid: u32,
    pub origin: Origin,
    pub change: Change,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describes_fd_kinds() {
        assert_eq!(FdKind::from_mode(0o140000, 2, 1).describe(), "AF_INET SOCK_STREAM");
        assert_eq!(FdKind::from_mode(0o100644, 0, 0), FdKind::File);
        assert_eq!(FdKind::from_mode(0o010600, 0, 0).describe(), "pipe");
        assert_eq!(FdKind::from_mode(0, 0, 0), FdKind::Other);
    }
}
