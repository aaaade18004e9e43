//! The `meshlb` binary: a thin shell over [`meshlb::cli`].

fn main() -> std::process::ExitCode {
    meshlb::cli::main()
}
