//! `hypha-cni`: see the library for how an invocation is handled.

fn main() -> std::process::ExitCode {
    hypha_cni::run()
}
