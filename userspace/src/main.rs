use std::process::ExitCode;

fn main() -> ExitCode {
    ExitCode::from(psleak::cli::run(std::env::args_os()))
}
