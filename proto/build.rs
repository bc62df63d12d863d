fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A vendored protoc: a fresh machine needs nothing installed to build.
    if std::env::var_os("PROTOC").is_none() {
        std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    }
    tonic_prost_build::configure()
        // One encoded update is shared by every watcher of a group.
        .bytes(".peermesh.control.v1.SignedMapUpdate.update")
        .compile_protos(
            &[
                "peermesh/control/v1/control.proto",
                "peermesh/store/v1/store.proto",
            ],
            &["."],
        )?;
    Ok(())
}
