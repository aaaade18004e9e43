//! The `meshlb` binary: a thin shell over [`meshlb::cli`].

/// glibc's malloc cost the client a sixth of its instructions per call, more where spans are
/// built on one thread and freed on the exporter's; linkerd2-proxy, too, ships its own allocator.
/// Counted only while the scale benchmark measures a balancer's memory.
#[global_allocator]
static ALLOCATOR: meshlb::heap::Counting<mimalloc::MiMalloc> =
    meshlb::heap::Counting(mimalloc::MiMalloc);

fn main() -> std::process::ExitCode {
    meshlb::cli::main()
}
