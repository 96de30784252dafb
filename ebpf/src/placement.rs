//! Where in a function to put a uprobe so that the kernel emulates the instruction it sits on
//! instead of copying it out of line and single-stepping it (measured here: 0.7 µs against
//! 3.9 µs a hit; `cargo xtask bench-cost` has the table per function).
//!
//! x86-64 uprobes emulate a push of a register, a relative jmp or call, a conditional jump
//! and a nop; every other instruction is single-stepped. So a probe moves from the function's
//! entry to the first such instruction of its straight-line prologue, provided what runs
//! before it changes nothing the probe reads: no branch (every call reaches the probe), no
//! write to the argument registers its program reads, none to the frame pointer (the
//! frame-pointer stack walk starts from it), none to the stack pointer (the return
//! address stays at the top of the stack, where the entry program reads the caller and the
//! return probe, attached at the same place, swaps in its trampoline; and the unwind rules of
//! the entry still hold there). Prologues are read by a decoder that knows the few
//! instructions compilers put there and stops at anything else: an instruction it does not
//! know leaves the probe at the entry, where it was.
//!
//! A free's probe may also pass a NULL check (`test %rdi,%rdi; je`): the jump is taken only by
//! frees of nothing, which its program ignores anyway (glibc's free starts so). If nothing
//! emulated follows, the probe stays on the `je`.
//!
//! What the walk cannot see: a jump from later in the function back into the instructions it
//! passed (compilers put loop heads after a prologue, not inside its first instructions). A
//! probe hit twice in one call would show in the losses (an allocator call counted as lost, a
//! second free as a release of nothing), not go unseen.

/// A set of general-purpose registers, by their x86 number (rax 0, rcx 1, rdx 2, ... r15 15).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Registers(u16);

impl Registers {
    pub const NONE: Self = Self(0);
    pub const RDI: Self = Self(1 << 7);
    pub const RSI: Self = Self(1 << 6);
    pub const RDX: Self = Self(1 << 2);
    const RSP: u8 = 4;
    const RBP: u8 = 5;

    pub const fn and(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }

    fn has(self, register: u8) -> bool {
        self.0 & (1 << register) != 0
    }
}

/// The instruction a probe sits on, as the kernel handles it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Instruction {
    /// Emulated in the trap handler: push, jmp, call, jcc or nop.
    Emulated(&'static str),
    /// Copied out of line and single-stepped: a second trap, several times the cost.
    Stepped,
}

impl Instruction {
    pub fn name(self) -> &'static str {
        match self {
            Self::Emulated(name) => name,
            Self::Stepped => "single-stepped",
        }
    }
}

/// Where to probe a function whose code starts with `code`: the offset from its entry, and
/// what sits there. `reads` are the argument registers the probe's program reads.
pub fn place(code: &[u8], reads: Registers, pass_null_check: bool) -> (usize, Instruction) {
    match walk(code, reads, pass_null_check) {
        (_, Instruction::Stepped) if pass_null_check => walk(code, reads, false),
        placed => placed,
    }
}

fn walk(code: &[u8], reads: Registers, pass_null_check: bool) -> (usize, Instruction) {
    let mut at = 0;
    while at < code.len() {
        if let Some(name) = emulated(&code[at..]) {
            return (at, Instruction::Emulated(name));
        }
        if pass_null_check {
            if let Some(past) = null_check_of_rdi(&code[at..]) {
                at += past;
                continue;
            }
        }
        match harmless(&code[at..]) {
            Some((len, writes))
                if writes.is_none_or(|r| r != Registers::RSP && r != Registers::RBP && !reads.has(r)) =>
            {
                at += len
            }
            _ => break,
        }
    }
    (0, Instruction::Stepped)
}

/// What the instruction at the start of `code` is to the kernel.
pub fn instruction_at(code: &[u8]) -> Instruction {
    emulated(code).map_or(Instruction::Stepped, Instruction::Emulated)
}

/// The kind of instruction at the start of `code` if the kernel emulates it (see
/// arch/x86/kernel/uprobes.c: branch_setup_xol_ops, push_setup_xol_ops). Prefixed branches
/// are not emulated; a push may carry only REX.B.
fn emulated(code: &[u8]) -> Option<&'static str> {
    match *code {
        [0x50..=0x57, ..] | [0x41, 0x50..=0x57, ..] => Some("push"),
        [0x70..=0x7f, ..] | [0x0f, 0x80..=0x8f, ..] => Some("jcc"),
        [0xeb | 0xe9, ..] => Some("jmp"),
        [0xe8, ..] => Some("call"),
        [0x90, ..] => Some("nop"),
        _ => None,
    }
}

/// `test %rdi,%rdi; je`: the length of both.
fn null_check_of_rdi(code: &[u8]) -> Option<usize> {
    match *code {
        [0x48, 0x85, 0xff, 0x74, ..] => Some(5),
        [0x48, 0x85, 0xff, 0x0f, 0x84, ..] => Some(9),
        _ => None,
    }
}

/// An instruction at the start of `code` that neither branches nor writes memory, with its
/// length and the register it writes, if any. None for anything else (or unknown).
fn harmless(code: &[u8]) -> Option<(usize, Option<u8>)> {
    if code.starts_with(&[0xf3, 0x0f, 0x1e, 0xfa]) {
        return Some((4, None)); // endbr64
    }
    let (rex, op_at) = match code.first() {
        Some(&b @ 0x40..=0x4f) => (b, 1),
        _ => (0, 0),
    };
    let wide = rex & 0x8 != 0;
    let opcode = *code.get(op_at)?;
    let modrm = |at: usize| ModRm::decode(code, at, rex);
    // The bytes after the opcode, and the register written.
    let (rest, writes) = match opcode {
        // mov r/m, r (only register to register: a store writes memory)
        0x89 => {
            let m = modrm(op_at + 1)?;
            (m.is_register()?, Some(m.rm))
        }
        // mov r, r/m
        0x8b => {
            let m = modrm(op_at + 1)?;
            (m.len, Some(m.reg))
        }
        // xor r/m, r and xor r, r/m, register forms
        0x31 | 0x33 => {
            let m = modrm(op_at + 1)?;
            (m.is_register()?, Some(if opcode == 0x31 { m.rm } else { m.reg }))
        }
        // test and cmp: flags only
        0x84 | 0x85 | 0x38 | 0x39 | 0x3a | 0x3b => (modrm(op_at + 1)?.len, None),
        // cmp al/eax/rax, imm
        0x3c => (1, None),
        0x3d => (4, None),
        // cmp r/m, imm (the group's /7; the others write)
        0x80 | 0x81 | 0x83 => {
            let m = modrm(op_at + 1)?;
            if m.reg & 7 != 7 {
                return None;
            }
            (m.len + if opcode == 0x81 { 4 } else { 1 }, None)
        }
        // mov r, imm32 (imm64 with REX.W)
        0xb8..=0xbf => (if wide { 8 } else { 4 }, Some((opcode - 0xb8) | (rex & 1) << 3)),
        _ => return None,
    };
    let len = op_at + 1 + rest;
    (len <= code.len()).then_some((len, writes))
}

/// A ModRM operand (and its SIB and displacement): the two registers it names, REX-extended,
/// and the length from the ModRM byte on.
pub(crate) struct ModRm {
    pub mode: u8,
    pub reg: u8,
    pub rm: u8,
    pub len: usize,
}

impl ModRm {
    pub fn decode(code: &[u8], at: usize, rex: u8) -> Option<Self> {
        let byte = *code.get(at)?;
        let (mode, reg, rm) = (byte >> 6, (byte >> 3) & 7, byte & 7);
        let mut len = 1;
        if mode != 3 && rm == 4 {
            let sib = *code.get(at + 1)?;
            len += 1;
            if mode == 0 && sib & 7 == 5 {
                len += 4; // no base: disp32
            }
        }
        len += match (mode, rm) {
            (0, 5) => 4, // rip-relative disp32
            (1, _) => 1,
            (2, _) => 4,
            _ => 0,
        };
        Some(Self { mode, reg: reg | (rex & 4) << 1, rm: rm | (rex & 1) << 3, len })
    }

    /// The signed displacement of a memory operand decoded at `at` in `code` (it ends the
    /// operand), if it has one.
    pub fn displacement(&self, code: &[u8], at: usize) -> Option<i64> {
        let end = at + self.len;
        match (self.mode, self.rm & 7) {
            (0, 5) | (2, _) => Some(i64::from(i32::from_le_bytes(code.get(end - 4..end)?.try_into().ok()?))),
            (1, _) => Some(i64::from(*code.get(end - 1)? as i8)),
            _ => None,
        }
    }

    /// The length when both operands are registers.
    fn is_register(&self) -> Option<usize> {
        (self.mode == 3).then_some(self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RDI: Registers = Registers::RDI;
    const RDI_RSI: Registers = Registers::RDI.and(Registers::RSI);

    /// (what it is, its code, the registers read, whether the probe may pass a NULL check,
    /// where the probe goes).
    type Case = (&'static str, &'static [u8], Registers, bool, (usize, Instruction));

    /// Prologues seen in this machine's libc and CPython builds, and where their probes go.
    #[test]
    fn prologues() {
        let cases: &[Case] = &[
            ("glibc malloc: push at entry", &[0x41, 0x54, 0x55], RDI, false, (0, Instruction::Emulated("push"))),
            (
                "glibc free: past test %rdi,%rdi; je rel32, onto the push",
                &[0x48, 0x85, 0xff, 0x0f, 0x84, 0xbf, 0, 0, 0, 0x55],
                RDI,
                true,
                (9, Instruction::Emulated("push")),
            ),
            (
                "glibc free without passing the NULL check: on the je",
                &[0x48, 0x85, 0xff, 0x0f, 0x84, 0xbf, 0, 0, 0, 0x55],
                RDI,
                false,
                (3, Instruction::Emulated("jcc")),
            ),
            (
                "endbr64, NULL check with je rel8, push r12",
                &[0xf3, 0x0f, 0x1e, 0xfa, 0x48, 0x85, 0xff, 0x74, 0x10, 0x41, 0x54],
                RDI,
                true,
                (9, Instruction::Emulated("push")),
            ),
            (
                "glibc posix_memalign: cmpb $0,rip; push",
                &[0x80, 0x3d, 1, 2, 0x14, 0, 0, 0x41, 0x54],
                RDI.and(Registers::RDX),
                false,
                (7, Instruction::Emulated("push")),
            ),
            (
                "CPython 3.9-3.13 PyObject_Malloc: mov %rdi,%rsi; test; js",
                &[0x48, 0x89, 0xfe, 0x48, 0x85, 0xff, 0x78, 0x10],
                RDI,
                false,
                (6, Instruction::Emulated("jcc")),
            ),
            (
                "CPython PyObject_Realloc: mov %rsi,%rdx does not touch what realloc's probe reads",
                &[0x48, 0x89, 0xf2, 0x48, 0x85, 0xf6, 0x78, 0x10],
                RDI_RSI,
                false,
                (6, Instruction::Emulated("jcc")),
            ),
            (
                "Debian's CPython 3.11 PyObject_Free: two loads, cmp rax imm32, jne",
                &[
                    0x48, 0x8b, 0x05, 9, 0x96, 0x45, 0, 0x48, 0x8b, 0x15, 0xe2, 0x95, 0x45, 0, 0x48, 0x3d, 0xe0, 0x0f,
                    0x50, 0, 0x0f, 0x85, 0, 0, 0, 0,
                ],
                RDI,
                true,
                (20, Instruction::Emulated("jcc")),
            ),
            (
                "CPython 3.9 PyObject_Free: the argument's register is overwritten before any \
                 emulated instruction (mov %rdi,%rsi; mov rip,%rdi; jmp *rip)",
                &[0x48, 0x89, 0xfe, 0x48, 0x8b, 0x3d, 0x76, 0x78, 0x26, 0, 0xff, 0x25, 0x90, 0x78, 0x26, 0],
                RDI,
                true,
                (0, Instruction::Stepped),
            ),
            (
                "glibc reallocarray: mul writes rdx, its third argument",
                &[0x48, 0x89, 0xf0, 0x48, 0xf7, 0xe2, 0x48, 0x89, 0xc6, 0x70, 0x05],
                RDI_RSI.and(Registers::RDX),
                false,
                (0, Instruction::Stepped),
            ),
            (
                "a write to the stack pointer stops the walk",
                &[0x48, 0x89, 0xec, 0x55],
                Registers::NONE,
                false,
                (0, Instruction::Stepped),
            ),
            (
                "a load into an argument the probe reads stops the walk",
                &[0x48, 0x8b, 0x7f, 0x08, 0x55],
                RDI,
                false,
                (0, Instruction::Stepped),
            ),
            (
                "an operand-size prefixed jcc is not emulated",
                &[0x66, 0x0f, 0x84, 0, 0],
                RDI,
                false,
                (0, Instruction::Stepped),
            ),
            (
                "a write to the frame pointer stops the walk",
                &[0x48, 0x89, 0xe5, 0x55],
                Registers::NONE,
                false,
                (0, Instruction::Stepped),
            ),
            (
                "a NULL check followed by nothing emulated: the probe stays on its je",
                &[0x48, 0x85, 0xff, 0x74, 0x10, 0x48, 0x8b, 0x3f],
                RDI,
                true,
                (3, Instruction::Emulated("jcc")),
            ),
            ("code cut short", &[0x48, 0x8b], RDI, false, (0, Instruction::Stepped)),
            ("nothing", &[], RDI, false, (0, Instruction::Stepped)),
        ];
        for (name, code, reads, pass_null_check, expected) in cases {
            assert_eq!(place(code, *reads, *pass_null_check), *expected, "{name}");
        }
    }
}
