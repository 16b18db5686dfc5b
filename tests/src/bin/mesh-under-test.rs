//! `mesh` under test: the same program, built inside the test crate so tests can run it.
fn main() -> std::process::ExitCode {
    mesh_bot::cli::main()
}
