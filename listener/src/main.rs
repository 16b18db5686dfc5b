//! `mesh-listener`: forwards one agent's (or every agent's) mesh messages to
//! its gateway hook. All of it lives in [`mesh_listener::cli`].

/// mimalloc: fewer CPU cycles per message than glibc's allocator under many threads (see BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    mesh_listener::cli::main()
}
