//! `mesh`: the agent mesh's command line. All of it lives in [`mesh_bot::cli`].

fn main() -> std::process::ExitCode {
    mesh_bot::cli::main()
}
