use std::process::ExitCode;

#[cfg(any(target_os = "linux", windows))]
fn main() -> ExitCode {
    ExitCode::from(psleak::cli::run(std::env::args_os()))
}

#[cfg(not(any(target_os = "linux", windows)))]
fn main() -> ExitCode {
    eprintln!(
        "psleak: `trace` needs Linux (eBPF) or Windows (ETW); here, the Python package's \
         MemoryLeakTestCase polls instead"
    );
    ExitCode::from(2)
}
