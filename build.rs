//! Compiles `proto/` with protox (pure Rust, so no `protoc` is needed on the machine) and writes the
//! descriptor set that server reflection serves.

use prost::Message;
use std::{env, fs, path::PathBuf};

const PROTOS: &[&str] = &[
    "proto/userguide/v1/userguide.proto",
    "proto/meshlb/admin/v1/admin.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(PROTOS, ["proto"])?;
    // compile_fds does not write the descriptor set, and reflection needs it.
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out.join("meshlb_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .emit_rerun_if_changed(false)
        .compile_fds(fds)?;
    Ok(())
}
