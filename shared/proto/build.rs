//! Compiles `proto/stowage/v1/*.proto` with protox (pure Rust, no system `protoc`) and writes
//! the file descriptor set next to the generated code so servers can offer reflection.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let files = [
        "stowage/v1/common.proto",
        "stowage/v1/files.proto",
        "stowage/v1/quota.proto",
        "stowage/v1/ingest.proto",
        "stowage/v1/media.proto",
        "stowage/v1/lifecycle.proto",
    ];
    for file in &files {
        println!("cargo:rerun-if-changed={}", root.join(file).display());
    }
    let fds = protox::compile(files, [&root])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    std::fs::write(
        out.join("stowage_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // RPCs a service does not implement yet answer UNIMPLEMENTED instead of failing to build.
        .generate_default_stubs(true)
        // Upload bytes as `bytes::Bytes`: decoded without a copy out of the receive buffer,
        // and sliced out of a larger buffer without one on the client.
        .bytes(".stowage.v1.Chunk.data")
        .bytes(".stowage.v1.UploadRequest.data")
        .bytes(".stowage.v1.UploadFile.data")
        .bytes(".stowage.v1.GetScreenshotResponse.data")
        .compile_fds(fds)?;
    Ok(())
}
