//! `reach`: a plugin that makes outgoing HTTP requests through wasi:http, for the tests
//! of the server's grants. It declares loopback (`127.0.0.1`, any port) as the hosts it
//! wants; a call reaches its provider's `url` setting when the provider names one, and
//! otherwise tries 127.0.0.1:9, which no provider grants. Builds have no provider, so a
//! build's request is always refused. An account named `panic-after-refusal` makes its
//! check panic after a refused request.

// Built for the host only by `cargo build --workspace`, where nothing is exported (see
// the export below) and so nothing is used.
#![cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]

wit_bindgen::generate!({
    path: "../../../plugins/sdk/wit",
    world: "provider-plugin",
});

use conductor::provider::host::{DiskReader, DiskWriter};
use conductor::provider::types::{
    Account, BuildOutput, DiskFormat, Error, ImageDetails, Provider, ProviderInfo, Template,
};
use exports::conductor::provider::provider::Guest;

struct Reach;

// Exported only when built as a component: on the host (`cargo build --workspace`)
// the export's symbol names, which hold ':' and '@', are not valid for the linker.
#[cfg(target_arch = "wasm32")]
export!(Reach);

/// Where a call sends its request: the provider's `url` authority, or a loopback port
/// nobody grants.
fn aim(provider: Option<&Provider>) -> String {
    provider
        .and_then(|p| p.settings.iter().find(|(k, _)| k == "url"))
        .and_then(|(_, url)| url.strip_prefix("http://"))
        .and_then(|rest| rest.split('/').next())
        .unwrap_or("127.0.0.1:9")
        .to_owned()
}

/// Sends a GET and waits for the answer's head.
fn phone_home(authority: &str) -> Result<(), Error> {
    use wasip2::http::outgoing_handler;
    use wasip2::http::types::{Fields, OutgoingRequest, Scheme};
    let request = OutgoingRequest::new(Fields::new());
    let aimed = request
        .set_scheme(Some(&Scheme::Http))
        .and(request.set_authority(Some(authority)))
        .and(request.set_path_with_query(Some("/reach")));
    if aimed.is_err() {
        return Err(Error::Failed("could not address the request".into()));
    }
    let response = outgoing_handler::handle(request, None)
        .map_err(|e| Error::Unavailable(format!("{e:?}")))?;
    response.subscribe().block();
    match response.get() {
        Some(Ok(Ok(_))) => Ok(()),
        Some(Ok(Err(e))) => Err(Error::Unavailable(format!("{e:?}"))),
        _ => Err(Error::Unavailable("no response".into())),
    }
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
            hosts: vec!["127.0.0.1".into()],
        }
    }

    fn check_account(provider: Provider, account: Account) -> Result<(), Error> {
        let reached = phone_home(&aim(Some(&provider)));
        // An account named so crashes after its request, as a plugin might that does not
        // expect a refusal: the host must still say the refusal was the cause.
        if reached.is_err() && account.name == "panic-after-refusal" {
            panic!("reach gives up after a refused request");
        }
        reached
    }

    fn build(
        _template: Template,
        _base: &DiskReader,
        _output: &DiskWriter,
        _parameters: Vec<(String, String)>,
    ) -> Result<BuildOutput, Error> {
        phone_home(&aim(None))?;
        Err(Error::Failed("reach builds nothing".into()))
    }

    fn push(
        _provider: Provider,
        _account: Account,
        _image: &DiskReader,
        _name: String,
        _parameters: Vec<(String, String)>,
    ) -> Result<String, Error> {
        phone_home(&aim(None))?;
        Err(Error::Failed("reach pushes nothing".into()))
    }

    fn delete(provider: Provider, _account: Account, _id: String) -> Result<(), Error> {
        phone_home(&aim(Some(&provider)))
    }

    fn lookup(
        _provider: Provider,
        _account: Account,
        target_identifier: String,
    ) -> Result<ImageDetails, Error> {
        phone_home(&aim(None))?;
        Err(Error::NotFound(format!(
            "no reach image {target_identifier}"
        )))
    }
}
