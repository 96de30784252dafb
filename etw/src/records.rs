//! ETW payloads decoded into [`Record`]s, byte by byte as the providers document them (the MOF
//! classes `HeapTrace`, `PageFault_VirtualAlloc`, `ObHandleEvent`, `Thread_TypeGroup1`).
//! Pointers and `size_t`s take the width of the logging process (`EVENT_HEADER_FLAG_32_BIT_HEADER`).

use std::fmt;

/// The providers psleak listens to, by GUID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    Heap,
    PageFault,
    Object,
    Thread,
}

impl Provider {
    const ALL: [Self; 4] = [Self::Heap, Self::PageFault, Self::Object, Self::Thread];

    /// The provider's GUID, as a number (`0x222962ab_6180_...` for `222962ab-6180-...`).
    pub const fn guid(self) -> u128 {
        match self {
            Self::Heap => 0x222962ab_6180_4b88_a825_346b75f2a24a,
            Self::PageFault => 0x3d6fa8d3_fe05_11d0_9dda_00c04fd7ba7c,
            Self::Object => 0x89497f50_effe_4440_8cf2_ce6b1cdcaca7,
            Self::Thread => 0x3d6fa8d1_fe05_11d0_9dda_00c04fd7ba7c,
        }
    }

    /// The provider of a GUID written as `xxxxxxxx-xxxx-...` (any case, braces or not).
    pub fn of_guid(guid: &str) -> Option<Self> {
        let hex: String = guid.chars().filter(|c| !matches!(c, '{' | '}' | '-')).collect();
        Self::of_guid_value(u128::from_str_radix(&hex, 16).ok()?)
    }

    pub fn of_guid_value(guid: u128) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.guid() == guid)
    }
}

/// One decoded event. Addresses, sizes and handles are widened to 64 bits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    HeapCreate {
        heap: u64,
        flags: u32,
    },
    HeapDestroy {
        heap: u64,
    },
    HeapAlloc {
        heap: u64,
        addr: u64,
        size: u64,
    },
    HeapFree {
        heap: u64,
        addr: u64,
    },
    HeapRealloc {
        heap: u64,
        new: u64,
        old: u64,
        new_size: u64,
    },
    VirtualAlloc {
        pid: u32,
        addr: u64,
        len: u64,
        flags: u32,
    },
    VirtualFree {
        pid: u32,
        addr: u64,
        len: u64,
        flags: u32,
    },
    /// `object_type` is the kernel's type index (names come from `NtQueryObject`, per boot).
    HandleCreate {
        handle: u32,
        object: u64,
        object_type: u16,
        name: String,
    },
    HandleClose {
        handle: u32,
        object: u64,
        object_type: u16,
        name: String,
    },
    ThreadStart {
        pid: u32,
        tid: u32,
        start_addr: u64,
    },
    ThreadEnd {
        pid: u32,
        tid: u32,
    },
}

/// `VirtualFree`'s `MEM_RELEASE`: the region is gone, not only decommitted.
pub const MEM_RELEASE: u32 = 0x8000;
/// `VirtualAlloc`'s `MEM_RESERVE`.
pub const MEM_RESERVE: u32 = 0x2000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// The payload ended before `field`.
    Truncated { field: &'static str, len: usize },
    /// Pointers are 4 or 8 bytes.
    PointerSize(usize),
    /// A UTF-16 name that is not.
    BadName,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated { field, len } => write!(f, "ETW payload of {len} bytes ends before {field}"),
            Self::PointerSize(n) => write!(f, "ETW pointer size {n} (expected 4 or 8)"),
            Self::BadName => f.write_str("ETW object name is not UTF-16"),
        }
    }
}

impl std::error::Error for DecodeError {}

/// The record of one event, or None for opcodes psleak does not follow (heap expand and
/// contract, thread context switches, ...).
pub fn decode(provider: Provider, opcode: u8, pointer_size: usize, data: &[u8]) -> Result<Option<Record>, DecodeError> {
    if pointer_size != 4 && pointer_size != 8 {
        return Err(DecodeError::PointerSize(pointer_size));
    }
    let mut r = Reader { data, at: 0, pointer_size };
    let record = match (provider, opcode) {
        (Provider::Heap, 32) => Record::HeapCreate { heap: r.ptr("HeapHandle")?, flags: r.u32("HeapFlags")? },
        (Provider::Heap, 33) => {
            let heap = r.ptr("HeapHandle")?;
            let size = r.ptr("Size")?;
            Record::HeapAlloc { heap, size, addr: r.ptr("Address")? }
        }
        (Provider::Heap, 34) => Record::HeapRealloc {
            heap: r.ptr("HeapHandle")?,
            new: r.ptr("NewAddress")?,
            old: r.ptr("OldAddress")?,
            new_size: r.ptr("NewSize")?,
        },
        (Provider::Heap, 35) => Record::HeapDestroy { heap: r.ptr("HeapHandle")? },
        (Provider::Heap, 36) => Record::HeapFree { heap: r.ptr("HeapHandle")?, addr: r.ptr("Address")? },
        (Provider::PageFault, 98 | 99) => {
            let addr = r.ptr("BaseAddress")?;
            let len = r.ptr("RegionSize")?;
            let (pid, flags) = (r.u32("ProcessId")?, r.u32("Flags")?);
            if opcode == 98 {
                Record::VirtualAlloc { pid, addr, len, flags }
            } else {
                Record::VirtualFree { pid, addr, len, flags }
            }
        }
        (Provider::Object, 32 | 33) => {
            let object = r.ptr("Object")?;
            let handle = r.u32("Handle")?;
            let object_type = r.u16("ObjectType")?;
            let name = r.utf16z("ObjectName")?;
            if opcode == 32 {
                Record::HandleCreate { handle, object, object_type, name }
            } else {
                Record::HandleClose { handle, object, object_type, name }
            }
        }
        (Provider::Thread, 1..=4) => {
            let (pid, tid) = (r.u32("ProcessId")?, r.u32("TThreadId")?);
            if matches!(opcode, 2 | 4) {
                Record::ThreadEnd { pid, tid }
            } else {
                for field in ["StackBase", "StackLimit", "UserStackBase", "UserStackLimit", "Affinity"] {
                    r.ptr(field)?;
                }
                Record::ThreadStart { pid, tid, start_addr: r.ptr("Win32StartAddr")? }
            }
        }
        _ => return Ok(None),
    };
    Ok(Some(record))
}

struct Reader<'a> {
    data: &'a [u8],
    at: usize,
    pointer_size: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&[u8], DecodeError> {
        let bytes =
            self.data.get(self.at..self.at + n).ok_or(DecodeError::Truncated { field, len: self.data.len() })?;
        self.at += n;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        let mut bytes = [0; N];
        bytes.copy_from_slice(self.take(N, field)?);
        Ok(bytes)
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }

    fn ptr(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        let bytes = self.take(self.pointer_size, field)?;
        let mut wide = [0u8; 8];
        wide[..bytes.len()].copy_from_slice(bytes);
        Ok(u64::from_le_bytes(wide))
    }

    /// A NUL-terminated UTF-16LE string; a payload that ends without the NUL ends the string.
    fn utf16z(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let rest = self.data.get(self.at..).ok_or(DecodeError::Truncated { field, len: self.data.len() })?;
        let units: Vec<u16> =
            rest.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).take_while(|&u| u != 0).collect();
        self.at += (units.len() + 1) * 2;
        String::from_utf16(&units).map_err(|_| DecodeError::BadName)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Little-endian payload builder: each call appends one field as the provider lays it out.
    #[derive(Default)]
    struct Payload(Vec<u8>);

    impl Payload {
        fn ptr64(mut self, v: u64) -> Self {
            self.0.extend(v.to_le_bytes());
            self
        }
        fn ptr32(mut self, v: u32) -> Self {
            self.0.extend(v.to_le_bytes());
            self
        }
        fn u32(self, v: u32) -> Self {
            self.ptr32(v)
        }
        fn u16(mut self, v: u16) -> Self {
            self.0.extend(v.to_le_bytes());
            self
        }
        fn utf16z(mut self, s: &str) -> Self {
            for unit in s.encode_utf16().chain([0]) {
                self.0.extend(unit.to_le_bytes());
            }
            self
        }
    }

    #[test]
    fn heap_events_of_a_64_bit_process() {
        // ETW_HEAP_EVENT_ALLOC: HeapHandle, Size, Address, Source.
        let alloc = Payload::default().ptr64(0x1d0000).ptr64(24).ptr64(0x1d0a40).u32(3);
        assert_eq!(alloc.0.len(), 28);
        assert_eq!(
            decode(Provider::Heap, 33, 8, &alloc.0),
            Ok(Some(Record::HeapAlloc { heap: 0x1d0000, addr: 0x1d0a40, size: 24 }))
        );
        // ETW_HEAP_EVENT_FREE: HeapHandle, Address, Source.
        let free = Payload::default().ptr64(0x1d0000).ptr64(0x1d0a40).u32(3);
        assert_eq!(
            decode(Provider::Heap, 36, 8, &free.0),
            Ok(Some(Record::HeapFree { heap: 0x1d0000, addr: 0x1d0a40 }))
        );
        // ETW_HEAP_EVENT_REALLOC: HeapHandle, NewAddress, OldAddress, NewSize, OldSize, Source.
        let realloc = Payload::default().ptr64(0x1d0000).ptr64(0x1e0000).ptr64(0x1d0a40).ptr64(4096).ptr64(24).u32(4);
        assert_eq!(
            decode(Provider::Heap, 34, 8, &realloc.0),
            Ok(Some(Record::HeapRealloc { heap: 0x1d0000, new: 0x1e0000, old: 0x1d0a40, new_size: 4096 }))
        );
        // HeapCreate: HeapHandle, HeapFlags, then the reserved and committed sizes.
        let create = Payload::default().ptr64(0x2a0000).u32(0x2).ptr64(1 << 20).ptr64(4096);
        assert_eq!(decode(Provider::Heap, 32, 8, &create.0), Ok(Some(Record::HeapCreate { heap: 0x2a0000, flags: 2 })));
        let destroy = Payload::default().ptr64(0x2a0000);
        assert_eq!(decode(Provider::Heap, 35, 8, &destroy.0), Ok(Some(Record::HeapDestroy { heap: 0x2a0000 })));
    }

    #[test]
    fn pointers_are_four_bytes_for_a_32_bit_process() {
        let alloc = Payload::default().ptr32(0x0050_0000).ptr32(100).ptr32(0x0050_1000).u32(1);
        assert_eq!(alloc.0.len(), 16);
        assert_eq!(
            decode(Provider::Heap, 33, 4, &alloc.0),
            Ok(Some(Record::HeapAlloc { heap: 0x0050_0000, addr: 0x0050_1000, size: 100 }))
        );
    }

    #[test]
    fn virtual_memory_events() {
        // PageFault_VirtualAlloc: BaseAddress, RegionSize, ProcessId, Flags.
        let alloc = Payload::default().ptr64(0x7ff0_0000_0000).ptr64(1 << 16).u32(4242).u32(0x3000);
        assert_eq!(
            decode(Provider::PageFault, 98, 8, &alloc.0),
            Ok(Some(Record::VirtualAlloc { pid: 4242, addr: 0x7ff0_0000_0000, len: 1 << 16, flags: 0x3000 }))
        );
        let free = Payload::default().ptr64(0x7ff0_0000_0000).ptr64(1 << 16).u32(4242).u32(MEM_RELEASE);
        assert_eq!(
            decode(Provider::PageFault, 99, 8, &free.0),
            Ok(Some(Record::VirtualFree { pid: 4242, addr: 0x7ff0_0000_0000, len: 1 << 16, flags: MEM_RELEASE }))
        );
    }

    #[test]
    fn handle_events_carry_type_and_name() {
        // ObHandleEvent: Object, Handle, ObjectType, ObjectName.
        let create = Payload::default().ptr64(0xffff_a000_1234_5670).u32(0x1a4).u16(37).utf16z(r"\Device\Afd");
        assert_eq!(
            decode(Provider::Object, 32, 8, &create.0),
            Ok(Some(Record::HandleCreate {
                handle: 0x1a4,
                object: 0xffff_a000_1234_5670,
                object_type: 37,
                name: r"\Device\Afd".into()
            }))
        );
        let unnamed = Payload::default().ptr64(0xffff_a000_1234_5670).u32(0x1a4).u16(16).utf16z("");
        assert_eq!(
            decode(Provider::Object, 33, 8, &unnamed.0),
            Ok(Some(Record::HandleClose {
                handle: 0x1a4,
                object: 0xffff_a000_1234_5670,
                object_type: 16,
                name: "".into()
            }))
        );
    }

    #[test]
    fn thread_events() {
        // Thread_TypeGroup1: ProcessId, TThreadId, StackBase, StackLimit, UserStackBase,
        // UserStackLimit, Affinity, Win32StartAddr, TebBase, SubProcessTag, priorities, flags.
        let mut start = Payload::default().u32(4242).u32(77);
        for v in [0xf000, 0xe000, 0xd000, 0xc000, 0xff] {
            start = start.ptr64(v);
        }
        let start = start.ptr64(0x7ff6_1234_0000).ptr64(0x3000).u32(0).u32(0x0008_0205);
        assert_eq!(
            decode(Provider::Thread, 1, 8, &start.0),
            Ok(Some(Record::ThreadStart { pid: 4242, tid: 77, start_addr: 0x7ff6_1234_0000 }))
        );
        // The end carries the same class; only the ids are read.
        assert_eq!(decode(Provider::Thread, 2, 8, &start.0), Ok(Some(Record::ThreadEnd { pid: 4242, tid: 77 })));
        assert_eq!(decode(Provider::Thread, 36, 8, &start.0), Ok(None), "context switches are not followed");
    }

    #[test]
    fn short_or_odd_payloads_are_errors_not_panics() {
        let alloc = Payload::default().ptr64(0x1d0000).ptr64(24);
        assert_eq!(decode(Provider::Heap, 33, 8, &alloc.0), Err(DecodeError::Truncated { field: "Address", len: 16 }));
        assert_eq!(decode(Provider::Heap, 33, 2, &alloc.0), Err(DecodeError::PointerSize(2)));
        let bad_name = Payload::default().ptr64(1).u32(2).u16(3).u16(0xd800).u16(0);
        assert_eq!(decode(Provider::Object, 32, 8, &bad_name.0), Err(DecodeError::BadName));
        for len in 0..28 {
            let _ = decode(Provider::Thread, 1, 8, &vec![0xab; len]);
        }
    }

    #[test]
    fn providers_by_guid() {
        assert_eq!(Provider::of_guid("{222962AB-6180-4B88-A825-346B75F2A24A}"), Some(Provider::Heap));
        assert_eq!(Provider::of_guid("3d6fa8d1-fe05-11d0-9dda-00c04fd7ba7c"), Some(Provider::Thread));
        assert_eq!(Provider::Thread.guid(), 0x3d6fa8d1_fe05_11d0_9dda_00c04fd7ba7c);
        assert_eq!(Provider::of_guid("not a guid"), None);
        assert_eq!(Provider::of_guid("00000000-0000-0000-0000-000000000000"), None);
    }
}
