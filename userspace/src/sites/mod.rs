//! Where a resource was made: the frames of its stack, named. Linux unwinds the probes' stacks
//! and reads ELF symbols; Windows asks dbghelp.

pub mod frame;

#[cfg(windows)]
pub mod dbghelp;
#[cfg(target_os = "linux")]
pub mod elf;
#[cfg(target_os = "linux")]
pub mod symbols;
#[cfg(target_os = "linux")]
pub mod unwind;
