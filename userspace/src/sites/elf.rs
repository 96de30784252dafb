//! Where a module's file offsets sit in its own addresses: the one translation the unwinder
//! (to find CFI) and the symbols (to print `module+0xOFFSET`) both need.

use object::{Object, ObjectSegment};

/// The loadable segments of an ELF file: (file offset, size in the file, address) of each.
#[derive(Debug, Default)]
pub struct Segments(Vec<(u64, u64, u64)>);

impl Segments {
    pub fn of<'data>(file: &impl Object<'data>) -> Self {
        Self(
            file.segments()
                .map(|s| {
                    let (offset, size) = s.file_range();
                    (offset, size, s.address())
                })
                .collect(),
        )
    }

    /// The module's own address of a file offset in one of its segments. The headers may lie
    /// (it may be anyone's file): an address past the end of the address space is none.
    pub fn address_of(&self, file_offset: u64) -> Option<u64> {
        self.0
            .iter()
            .find(|&&(offset, size, _)| offset <= file_offset && file_offset - offset < size)
            .and_then(|&(offset, _, address)| address.checked_add(file_offset - offset))
    }
}
