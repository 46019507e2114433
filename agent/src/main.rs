//! The `wsagent` binary: a thin shell over the library (see `cli.rs`).
fn main() -> std::process::ExitCode {
    agent::cli::main()
}
