//! Compiles `proto/panes/v1/panes.proto` (feature `serve`) with protox, so no system
//! `protoc` is needed, and writes the descriptor set that server reflection serves.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    #[cfg(feature = "serve")]
    {
        let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
        let fds = protox::compile(["panes/v1/panes.proto"], ["proto"])?;
        std::fs::write(
            out.join("panes_descriptor.bin"),
            prost::Message::encode_to_vec(&fds),
        )?;
        // Malformed requests are INVALID_ARGUMENT, not INTERNAL: see src/serve/codec.rs.
        tonic_prost_build::configure()
            .codec_path("crate::serve::codec::PanesCodec")
            .compile_fds(fds)?;
    }
    Ok(())
}
