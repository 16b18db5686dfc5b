//! `mesh-listener`: forwards one agent's (or every agent's) mesh messages to
//! its gateway hook. All of it lives in [`mesh_listener::cli`].

fn main() -> std::process::ExitCode {
    mesh_listener::cli::main()
}
