//! Following a CPython Free function to the allocator's free it hands its call on to.
//!
//! CPython's allocator API dispatches through a table of the running allocator's functions
//! (the one PyMem_SetAllocator sets): PyObject_Free(p) is `_PyObject.free(_PyObject.ctx, p)`.
//! Built without LTO (pyenv's, python.org's), each Free is nothing but that tail call:
//! `mov %rdi,%rsi; mov ctx,%rdi; jmp *free` (from 3.12, the table's address is loaded into a
//! register first). No instruction of it is one the kernel emulates, so its probe would be
//! single-stepped on every block CPython frees. The function the jump lands on gets the same
//! pointer as its second argument, at the same stack pointer, and starts with something the
//! kernel emulates (pymalloc's free with a NULL check, PyMem_RawFree's with a jump to free):
//! its probe goes there.
//!
//! Where the jump lands is computed as the code computes it, from the process's memory: the
//! table names the allocator running now (pymalloc, malloc under PYTHONMALLOC=malloc, the debug
//! hooks, tracemalloc's). The process controls that memory, so the jump is followed only to the
//! entry of a function of the same binary, and its probe is then placed by that function's
//! code in the file. A table changed after the probes are attached sends frees elsewhere, unseen.

use crate::placement::ModRm;

/// What the decoder knows of a register: the first argument of the function decoded, a word
/// loaded from memory, or nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Value {
    FirstArgument,
    Word(u64),
    Unknown,
}

const RSI: u8 = 6;
const RDI: u8 = 7;

/// Where the code of a function that starts with `code`, at address `entry` in the process,
/// jumps to, provided it does nothing but load registers and hand its first argument on as
/// the second. `read` reads a word of the process's memory. None for any other code.
pub fn tail_target(code: &[u8], entry: u64, read: impl Fn(u64) -> Option<u64>) -> Option<u64> {
    let mut registers = [Value::Unknown; 16];
    registers[RDI as usize] = Value::FirstArgument;
    let mut at = 0;
    while at < code.len() {
        if code[at..].starts_with(&[0xf3, 0x0f, 0x1e, 0xfa]) {
            at += 4; // endbr64
            continue;
        }
        let (rex, opcode_at) = match code[at] {
            b @ 0x40..=0x4f => (b, at + 1),
            _ => (0, at),
        };
        let (opcode, operand_at) = (*code.get(opcode_at)?, opcode_at + 1);
        let m = ModRm::decode(code, operand_at, rex)?;
        let next = operand_at + m.len;
        if next > code.len() {
            return None;
        }
        // The address a memory operand names, when the decoder can tell it.
        let address = || match m.mode {
            0 if m.rm & 7 == 5 => {
                Some(entry.wrapping_add(next as u64).wrapping_add_signed(m.displacement(code, operand_at)?))
            }
            1 | 2 if m.rm & 7 != 4 => match registers[m.rm as usize] {
                Value::Word(base) => Some(base.wrapping_add_signed(m.displacement(code, operand_at)?)),
                _ => None,
            },
            _ => None,
        };
        match (opcode, m.mode) {
            // A move that hands a pointer on is a 64-bit one (REX.W): a 32-bit one cuts it.
            (0x89 | 0x8b, _) if rex & 0x8 == 0 => return None,
            // mov r/m, r and mov r, r/m between registers
            (0x89, 3) => registers[m.rm as usize] = registers[m.reg as usize],
            (0x8b, 3) => registers[m.reg as usize] = registers[m.rm as usize],
            // mov r, [memory]
            (0x8b, _) => registers[m.reg as usize] = address().and_then(&read).map_or(Value::Unknown, Value::Word),
            // jmp *[memory], with the first argument handed on as the second
            (0xff, 0..=2) if m.reg & 7 == 4 => {
                return (registers[RSI as usize] == Value::FirstArgument).then(|| read(address()?)).flatten()
            }
            _ => return None,
        }
        at = next;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENTRY: u64 = 0x7f00_0000_1000;

    /// A process whose memory holds `words` (address, value) and nothing else.
    fn memory(words: &'static [(u64, u64)]) -> impl Fn(u64) -> Option<u64> {
        |addr| words.iter().find(|(a, _)| *a == addr).map(|(_, v)| *v)
    }

    /// (what it is, its code, the process's memory, where it jumps).
    type Case = (&'static str, &'static [u8], &'static [(u64, u64)], Option<u64>);

    /// The Free functions of this machine's pyenv builds, and code that must not be followed.
    #[test]
    fn tail_calls() {
        // pyenv 3.9-3.11: mov %rdi,%rsi; mov 0x2acfe6(%rip),%rdi; jmp *0x2ad000(%rip)
        const THREE_ELEVEN: &[u8] =
            &[0x48, 0x89, 0xfe, 0x48, 0x8b, 0x3d, 0xe6, 0xcf, 0x2a, 0x00, 0xff, 0x25, 0x00, 0xd0, 0x2a, 0x00];
        const SLOT_3_11: u64 = ENTRY + 16 + 0x2ad000;
        // pyenv 3.12-3.13: mov 0x374819(%rip),%rax; mov %rdi,%rsi; mov 0xb0(%rax),%rdi; jmp *0xd0(%rax)
        const THREE_TWELVE: &[u8] = &[
            0x48, 0x8b, 0x05, 0x19, 0x48, 0x37, 0x00, 0x48, 0x89, 0xfe, 0x48, 0x8b, 0xb8, 0xb0, 0x00, 0x00, 0x00, 0xff,
            0xa0, 0xd0, 0x00, 0x00, 0x00,
        ];
        const GOT_3_12: u64 = ENTRY + 7 + 0x374819;
        const TABLE: u64 = 0x5555_0000_0000;
        let cases: &[Case] = &[
            ("3.11: jmp *rip-relative", THREE_ELEVEN, &[(SLOT_3_11, 0xabc0)], Some(0xabc0)),
            ("3.11: its slot unreadable", THREE_ELEVEN, &[], None),
            (
                "3.12: jmp *disp32(%rax), rax loaded from the GOT",
                THREE_TWELVE,
                &[(GOT_3_12, TABLE), (TABLE + 0xd0, 0xdef0)],
                Some(0xdef0),
            ),
            ("3.12: the GOT entry unreadable", THREE_TWELVE, &[(TABLE + 0xd0, 0xdef0)], None),
            (
                "the pointer not handed on in rsi (mov %rdi,%rdx)",
                &[0x48, 0x89, 0xfa, 0xff, 0x25, 0, 0, 0, 0],
                &[(ENTRY + 9, 0xabc0)],
                None,
            ),
            (
                "a 32-bit move cuts the pointer (mov %edi,%esi)",
                &[0x89, 0xfe, 0xff, 0x25, 0, 0, 0, 0],
                &[(ENTRY + 8, 0xabc0)],
                None,
            ),
            (
                "rsi overwritten after (mov %rdi,%rsi; mov %rax,%rsi)",
                &[0x48, 0x89, 0xfe, 0x48, 0x89, 0xc6, 0xff, 0x25, 0, 0, 0, 0],
                &[(ENTRY + 12, 0xabc0)],
                None,
            ),
            (
                "a function that does something first (push %rbp)",
                &[0x55, 0x48, 0x89, 0xfe, 0xff, 0x25, 0, 0, 0, 0],
                &[],
                None,
            ),
            (
                "a call, not a jump (call *rip-relative)",
                &[0x48, 0x89, 0xfe, 0xff, 0x15, 0, 0, 0, 0],
                &[(ENTRY + 9, 1)],
                None,
            ),
            ("through a SIB operand", &[0x48, 0x89, 0xfe, 0xff, 0x24, 0x25, 0, 0, 0, 0], &[], None),
            ("code that ends before its jump", &[0x48, 0x89, 0xfe, 0x48, 0x8b], &[], None),
        ];
        for &(what, code, words, expected) in cases {
            assert_eq!(tail_target(code, ENTRY, memory(words)), expected, "{what}");
        }
    }
}
