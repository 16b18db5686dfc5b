//! `mesh-listener` under test: the same program, built inside the test crate so tests can run it.
/// mimalloc: fewer CPU cycles per message than glibc's allocator under many threads (see BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    mesh_listener::cli::main()
}
