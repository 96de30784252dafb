use std::process::ExitCode;

#[cfg(target_os = "linux")]
fn main() -> ExitCode {
    ExitCode::from(psleak::cli::run(std::env::args_os()))
}

#[cfg(not(target_os = "linux"))]
fn main() -> ExitCode {
    eprintln!(
        "psleak: `trace` and `daemon` need Linux (eBPF) for now; here, the Python package's \
         MemoryLeakTestCase polls instead"
    );
    ExitCode::from(2)
}
