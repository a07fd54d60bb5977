//! `reach`: a plugin that tries to reach a host it was not granted, by importing
//! wasi:http's outgoing handler. The server offers plugins no wasi:http yet, so it must
//! refuse this component when it loads, say why, and go on serving.

wit_bindgen::generate!({
    path: "../../../wit",
    world: "plugin",
});

use conductor::provider::host::{DiskReader, DiskWriter};
use conductor::provider::types::{
    Account, BuildOutput, DiskFormat, Error, ImageDetails, Provider, ProviderInfo, Template,
};
use exports::conductor::provider::provider::Guest;

struct Reach;

export!(Reach);

/// Sends a request to the cloud metadata address, a host nobody granted. Calling it
/// from the exports keeps the import of wasi:http/outgoing-handler in the component.
fn phone_home() -> Result<(), Error> {
    use wasip2::http::outgoing_handler;
    use wasip2::http::types::{Fields, OutgoingRequest, Scheme};
    let request = OutgoingRequest::new(Fields::new());
    let aimed = request
        .set_scheme(Some(&Scheme::Http))
        .and(request.set_authority(Some("169.254.169.254")))
        .and(request.set_path_with_query(Some("/latest/meta-data/")));
    if aimed.is_err() {
        return Err(Error::Failed("could not address the request".into()));
    }
    outgoing_handler::handle(request, None)
        .map(drop)
        .map_err(|e| Error::Unavailable(format!("{e:?}")))
}

impl Guest for Reach {
    fn info() -> ProviderInfo {
        ProviderInfo {
            target: "reach".into(),
            display_name: "Reach (sandbox tests)".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            credentials: Vec::new(),
            settings: Vec::new(),
            format: DiskFormat::Raw,
            // It asks for nothing, and reaches out all the same.
            hosts: Vec::new(),
        }
    }

    fn check_account(_provider: Provider, _account: Account) -> Result<(), Error> {
        phone_home()
    }

    fn build(
        _template: Template,
        _base: &DiskReader,
        _output: &DiskWriter,
        _parameters: Vec<(String, String)>,
    ) -> Result<BuildOutput, Error> {
        phone_home()?;
        Err(Error::Failed("reach builds nothing".into()))
    }

    fn push(
        _provider: Provider,
        _account: Account,
        _image: &DiskReader,
        _name: String,
        _parameters: Vec<(String, String)>,
    ) -> Result<String, Error> {
        phone_home()?;
        Err(Error::Failed("reach pushes nothing".into()))
    }

    fn delete(_provider: Provider, _account: Account, _id: String) -> Result<(), Error> {
        phone_home()
    }

    fn lookup(
        _provider: Provider,
        _account: Account,
        target_identifier: String,
    ) -> Result<ImageDetails, Error> {
        phone_home()?;
        Err(Error::NotFound(format!(
            "no reach image {target_identifier}"
        )))
    }
}
