#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    meshid::cli::main()
}
