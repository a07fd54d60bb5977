//! `testbed`: a second build target for the tests, so that a build for several targets
//! (`mock,testbed`) and a push that picks the target image matching each account's
//! provider type can be exercised before other real plugins exist. It builds a raw
//! image the way `mock` does, and names pushed images `Testbed_<provider>_<name>`.

// Built for the host only by `cargo build --workspace`, where nothing is exported (see
// the export below) and so nothing is used.
#![cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]

wit_bindgen::generate!({
    // Built against the contract as 0.1.0 released it (a copy kept in wit/), so the
    // tests show that plugins older than the host keep loading.
    path: "wit",
    world: "plugin",
});

use conductor::provider::host::{self, DiskReader, DiskWriter};
use conductor::provider::types::{
    Account, BuildOutput, CredentialDefinition, DiskFormat, Error, ImageDetails, Provider,
    ProviderInfo, Template,
};
use exports::conductor::provider::provider::Guest;

struct Testbed;

// Exported only when built as a component: on the host (`cargo build --workspace`)
// the export's symbol names, which hold ':' and '@', are not valid for the linker.
#[cfg(target_arch = "wasm32")]
export!(Testbed);

impl Guest for Testbed {
    fn info() -> ProviderInfo {
        ProviderInfo {
            target: "testbed".into(),
            display_name: "Test bed".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            credentials: vec![CredentialDefinition {
                name: "token".into(),
                label: "token".into(),
                input_type: "password".into(),
            }],
            settings: Vec::new(),
            format: DiskFormat::Raw,
            hosts: Vec::new(),
        }
    }

    fn check_account(_provider: Provider, _account: Account) -> Result<(), Error> {
        Ok(())
    }

    fn build(
        _template: Template,
        base: &DiskReader,
        output: &DiskWriter,
        _parameters: Vec<(String, String)>,
    ) -> Result<BuildOutput, Error> {
        let size = base.size();
        output.set_size(size)?;
        for extent in base.extents()? {
            let mut offset = extent.offset;
            while offset < extent.offset + extent.length {
                let length = (extent.offset + extent.length - offset).min(1 << 20) as u32;
                let bytes = base.read(offset, length)?;
                output.write(offset, &bytes)?;
                offset += u64::from(length);
            }
        }
        host::progress(100, "testbed build complete");
        Ok(BuildOutput {
            format: DiskFormat::Raw,
            virtual_size: size,
        })
    }

    fn push(
        provider: Provider,
        _account: Account,
        _image: &DiskReader,
        name: String,
        _parameters: Vec<(String, String)>,
    ) -> Result<String, Error> {
        host::progress(100, "testbed push complete");
        Ok(format!("Testbed_{}_{}", provider.name, name))
    }

    fn delete(_provider: Provider, _account: Account, _id: String) -> Result<(), Error> {
        Ok(())
    }

    fn lookup(
        _provider: Provider,
        _account: Account,
        target_identifier: String,
    ) -> Result<ImageDetails, Error> {
        Err(Error::NotFound(format!(
            "no testbed image {target_identifier}"
        )))
    }
}
