//! The symbols of a Windows process, read by dbghelp: function, module and file:line of each
//! return address in an ETW stack. Type-checked in CI, never run (see the README).

use std::mem::size_of;

use windows_sys::Win32::Foundation::{CloseHandle, HANDLE};
use windows_sys::Win32::System::Diagnostics::Debug::{
    SymCleanup, SymFromAddrW, SymGetLineFromAddrW64, SymGetModuleInfoW64, SymInitializeW, SymRefreshModuleList,
    SymSetOptions, IMAGEHLP_LINEW64, IMAGEHLP_MODULEW64, SYMBOL_INFOW, SYMOPT_DEFERRED_LOADS,
    SYMOPT_FAIL_CRITICAL_ERRORS, SYMOPT_LOAD_LINES, SYMOPT_UNDNAME,
};
use windows_sys::Win32::System::Threading::{OpenProcess, PROCESS_QUERY_INFORMATION, PROCESS_VM_READ};

use crate::sites::frame::{Frame, Symbolize};

/// Longest symbol name read, in UTF-16 units.
const MAX_NAME: usize = 512;

/// dbghelp's view of one process. dbghelp is not thread-safe: one thread uses it.
pub struct Dbghelp {
    process: HANDLE,
}

/// SYMBOL_INFOW with room for the name that follows it.
#[repr(C)]
struct Symbol {
    info: SYMBOL_INFOW,
    name: [u16; MAX_NAME],
}

impl Dbghelp {
    /// Opens `pid`'s symbols; None when the process cannot be read (frames stay addresses).
    pub fn open(pid: u32) -> Option<Self> {
        // SAFETY: plain calls; the handle is closed by Drop, or here if dbghelp refuses it.
        unsafe {
            let process = OpenProcess(PROCESS_QUERY_INFORMATION | PROCESS_VM_READ, 0, pid);
            if process.is_null() {
                return None;
            }
            SymSetOptions(SYMOPT_UNDNAME | SYMOPT_DEFERRED_LOADS | SYMOPT_LOAD_LINES | SYMOPT_FAIL_CRITICAL_ERRORS);
            if SymInitializeW(process, std::ptr::null(), 1) == 0 {
                CloseHandle(process);
                return None;
            }
            Some(Self { process })
        }
    }

    fn frame(&self, addr: u64) -> Frame {
        // A return address follows its call: the call's own line is one byte before.
        let at = addr.saturating_sub(1);
        let mut frame = Frame::unknown(addr);
        // SAFETY: each structure is sized as its SizeOfStruct says; the name follows
        // SYMBOL_INFOW within `Symbol`, and dbghelp writes at most MaxNameLen units of it.
        unsafe {
            let mut symbol: Symbol = std::mem::zeroed();
            symbol.info.SizeOfStruct = size_of::<SYMBOL_INFOW>() as u32;
            symbol.info.MaxNameLen = MAX_NAME as u32 + 1;
            let mut displacement = 0u64;
            if SymFromAddrW(self.process, at, &mut displacement, &mut symbol.info) != 0 {
                let len = (symbol.info.NameLen as usize).min(MAX_NAME + 1);
                let name = std::slice::from_raw_parts(symbol.info.Name.as_ptr(), len);
                frame.function = Some(String::from_utf16_lossy(name));
            }
            let mut line =
                IMAGEHLP_LINEW64 { SizeOfStruct: size_of::<IMAGEHLP_LINEW64>() as u32, ..Default::default() };
            let mut line_displacement = 0u32;
            if SymGetLineFromAddrW64(self.process, at, &mut line_displacement, &mut line) != 0
                && !line.FileName.is_null()
            {
                let len = (0..).take_while(|&i| *line.FileName.add(i) != 0).count();
                frame.file = Some(String::from_utf16_lossy(std::slice::from_raw_parts(line.FileName, len)));
                frame.line = Some(line.LineNumber);
            }
            let mut module =
                IMAGEHLP_MODULEW64 { SizeOfStruct: size_of::<IMAGEHLP_MODULEW64>() as u32, ..Default::default() };
            if SymGetModuleInfoW64(self.process, at, &mut module) != 0 {
                let len = module.ImageName.iter().position(|&c| c == 0).unwrap_or(module.ImageName.len());
                frame.module = Some(String::from_utf16_lossy(&module.ImageName[..len]));
            }
        }
        frame
    }
}

impl Symbolize for Dbghelp {
    fn frames(&mut self, addrs: &[u64]) -> Vec<Frame> {
        addrs.iter().map(|&addr| self.frame(addr)).collect()
    }

    /// The extension under test is imported after attach.
    fn refresh(&mut self) {
        // SAFETY: a process handle dbghelp was initialized with.
        unsafe { SymRefreshModuleList(self.process) };
    }
}

impl Drop for Dbghelp {
    fn drop(&mut self) {
        // SAFETY: the handle dbghelp was initialized with, released once.
        unsafe {
            SymCleanup(self.process);
            CloseHandle(self.process);
        }
    }
}
