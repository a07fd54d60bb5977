//! The `template` provider: a complete plugin for an imaginary cloud, to be copied as the
//! start of a new cloud target (docs/plugins.md explains the contract). `build` writes
//! qcow2. `push` registers the image: with the provider's `endpoint` setting, by POSTing
//! JSON to `{endpoint}/images`; without one, in the host's per-provider state as
//! `template-<n>`. `delete` and `lookup` work on the same place. `check-account` accepts
//! any non-empty `username` and `password` except the password `invalid`. Push
//! parameter: `visibility` (`private`, the default, or `public`).

// Built for the host only by `cargo build --workspace`, where nothing is exported (see
// the export below) and so nothing is used.
#![cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]

use conductor_plugin_sdk::guest::host::{self, DiskReader, DiskWriter, Level};
use conductor_plugin_sdk::guest::types::{
    Account, BuildOutput, CredentialDefinition, DiskFormat, Error, ImageDetails, Provider,
    ProviderInfo, Template,
};
use conductor_plugin_sdk::guest::{Guest, build_image, lookup, target};
use conductor_plugin_sdk::http::{self, Request, Response};
use serde_json::{Value, json};

struct TemplateCloud;

// Exported only when built as a component: on the host (`cargo build --workspace`)
// the export's symbol names, which hold ':' and '@', are not valid for the linker.
#[cfg(target_arch = "wasm32")]
conductor_plugin_sdk::guest::export_provider!(TemplateCloud);

/// What the images need from their OS: a cloud's machines usually get their SSH keys
/// from a metadata service that cloud-init reads, and start with the firmware named
/// first. A target that boots nothing returns `OsNeeds::nothing()`.
impl target::Guest for TemplateCloud {
    fn needs() -> target::OsNeeds {
        target::OsNeeds {
            packages: vec!["cloud-init".into()],
            firmware: vec![target::Firmware::Uefi, target::Firmware::Bios],
        }
    }
}

/// How much is read at once: large reads keep the cost of crossing into the host small.
const CHUNK: u64 = 4 << 20;

/// The provider's `endpoint` setting without a trailing `/`, if it has one.
fn endpoint(provider: &Provider) -> Option<&str> {
    lookup(&provider.settings, "endpoint")
        .filter(|url| !url.is_empty())
        .map(|url| url.trim_end_matches('/'))
}

/// A request with the account's credentials. A real cloud has its own scheme (a token, a
/// request signature); the imaginary one takes two headers.
fn api(method: &str, url: String, account: &Account) -> Request {
    let credential = |name: &str| lookup(&account.credentials, name).unwrap_or_default();
    Request::new(method, url)
        .header("accept", "application/json")
        .header("x-auth-user", credential("username"))
        .header("x-auth-key", credential("password"))
}

/// What an error answer means. The server retries `unavailable`; any other kind fails the
/// job with the message, so it says what was tried and what the cloud answered.
fn failure(what: &str, response: &Response) -> Error {
    let said: String = response.text().chars().take(300).collect();
    let message = format!("{what}: HTTP {}: {said}", response.status);
    match response.status {
        401 | 403 => Error::BadCredentials(message),
        404 => Error::NotFound(message),
        // Throttling and server errors pass; the server tries the whole call again later.
        429 | 500.. => Error::Unavailable(message),
        _ => Error::Failed(message),
    }
}

fn parse_json(what: &str, bytes: &[u8]) -> Result<Value, Error> {
    serde_json::from_slice(bytes).map_err(|e| Error::Failed(format!("{what} is not JSON: {e}")))
}

/// An image id made safe to put in a URL path. Ids come from the cloud, but `lookup` gets
/// whatever a user typed for an import; an id that could change the path names no image.
fn path_segment(id: &str) -> Result<&str, Error> {
    let safe = |b: u8| b.is_ascii_alphanumeric() || b == b'-' || b == b'_';
    if id.is_empty() || !id.bytes().all(safe) {
        return Err(Error::NotFound(format!(
            "no template cloud image is named {id:?}"
        )));
    }
    Ok(id)
}

/// Where an image pushed without an endpoint is kept in the provider's state.
fn state_key(id: &str) -> String {
    format!("image/{id}")
}

/// Reads the image's allocated extents (holes read as zeros), with progress from 5 to 90 %.
/// A real plugin sends each piece here (`http::start_streaming`); this one only counts.
fn read_image(image: &DiskReader) -> Result<u64, Error> {
    let extents = image.extents()?;
    let total: u64 = extents.iter().map(|e| e.length).sum();
    let mut done = 0u64;
    for extent in &extents {
        let end = extent.offset + extent.length;
        let mut offset = extent.offset;
        while offset < end {
            let bytes = image.read(offset, (end - offset).min(CHUNK) as u32)?;
            if bytes.is_empty() {
                break; // the end of the image
            }
            offset += bytes.len() as u64;
            done += bytes.len() as u64;
            let percent = 5 + (done * 85 / total.max(1)) as u8;
            host::progress(percent, &format!("read {done} of {total} bytes"));
        }
    }
    Ok(done)
}

impl Guest for TemplateCloud {
    fn info() -> ProviderInfo {
        ProviderInfo {
            target: "template".into(),
            display_name: "Template cloud".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            credentials: vec![
                CredentialDefinition::new("username", "username", "text"),
                CredentialDefinition::new("password", "password", "password"),
            ],
            settings: vec!["endpoint".into()],
            format: DiskFormat::Qcow2,
            // Grants: a call may reach only hosts this list covers AND its provider's
            // settings name as URLs, so with `*` the operator's `endpoint` decides. No
            // endpoint, no network; builds (no provider) never have any. A cloud at fixed
            // addresses lists them instead: `api.{region}.example.com`, from `region`.
            hosts: vec!["*".into()],
        }
    }

    fn check_account(_provider: Provider, account: Account) -> Result<(), Error> {
        // Called when an account is made or its credentials change. A real plugin asks
        // the cloud (a token, a "who am I" call) and answers `bad-credentials` if refused.
        let given = |name: &str| lookup(&account.credentials, name).filter(|v| !v.is_empty());
        match (given("username"), given("password")) {
            (Some(_), Some("invalid")) => Err(Error::BadCredentials(
                "the template cloud refuses the password 'invalid'".into(),
            )),
            (Some(_), Some(_)) => Ok(()),
            _ => Err(Error::BadCredentials(
                "a username and a password are needed".into(),
            )),
        }
    }

    fn build(
        template: Template,
        base: &DiskReader,
        output: &DiskWriter,
        _parameters: Vec<(String, String)>,
    ) -> Result<BuildOutput, Error> {
        // A build has no provider: no state and no network, only the two disks.
        host::log(Level::Info, &format!("building '{}'", template.name));
        // The SDK writes only the base disk's data (copied inside the server), reports
        // progress, and answers the format it wrote, which the server records.
        build_image(conductor_plugin_sdk::Format::Qcow2, base, output)
    }

    fn push(
        provider: Provider,
        account: Account,
        image: &DiskReader,
        name: String,
        parameters: Vec<(String, String)>,
    ) -> Result<String, Error> {
        // Check what can be checked before doing any work: a bad parameter is
        // `invalid-input`, which fails the job at once, with no retry.
        let visibility = lookup(&parameters, "visibility").unwrap_or("private");
        if !["private", "public"].contains(&visibility) {
            let problem = format!("visibility={visibility} is not one of private, public");
            return Err(Error::InvalidInput(problem));
        }
        // After the request's own parameters the server appends its ids
        // (`conductor.*`) and the template's facts (`template.*`).
        let arch = lookup(&parameters, "template.arch")
            .filter(|a| !a.is_empty())
            .unwrap_or("x86_64");
        host::progress(0, "reading the image");
        let allocated = read_image(image)?;
        let record = json!({
            "name": name, "arch": arch, "visibility": visibility, "format": "qcow2",
            "size": image.size(), "allocated": allocated,
            "conductor_provider_image": lookup(&parameters, "conductor.provider-image"),
        });
        let id = match endpoint(&provider) {
            Some(endpoint) => {
                host::progress(92, &format!("registering the image at {endpoint}"));
                // Connection failures come back from the SDK as `unavailable` already.
                let response = http::send(
                    &api("POST", format!("{endpoint}/images"), &account)
                        .header("content-type", "application/json")
                        .body(record.to_string()),
                )?;
                if !response.is_success() {
                    return Err(failure("registering the image", &response));
                }
                let answer = parse_json("the cloud's answer", &response.body)?;
                answer["id"]
                    .as_str()
                    .filter(|id| !id.is_empty())
                    .ok_or_else(|| Error::Failed("the cloud answered without an image id".into()))?
                    .to_owned()
            }
            None => {
                // No server: the image lives in the provider's state. The state has no
                // compare-and-set and pushes may run at once, so two can take the same
                // number: fine for a demonstration; a real cloud names images itself.
                host::progress(92, "keeping the image in the provider's state");
                let n = host::state_get("next-id")
                    .and_then(|v| String::from_utf8(v).ok())
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(1);
                host::state_set("next-id", (n + 1).to_string().as_bytes())?;
                let id = format!("template-{n}");
                host::state_set(&state_key(&id), record.to_string().as_bytes())?;
                id
            }
        };
        host::log(Level::Info, &format!("pushed '{name}' as {id}"));
        host::progress(100, &format!("pushed as {id}"));
        Ok(id)
    }

    fn delete(provider: Provider, account: Account, id: String) -> Result<(), Error> {
        let Some(endpoint) = endpoint(&provider) else {
            // Removing a missing key is not an error, so a second delete succeeds too.
            host::state_delete(&state_key(&id));
            return Ok(());
        };
        let url = format!("{endpoint}/images/{}", path_segment(&id)?);
        let response = http::send(&api("DELETE", url, &account))?;
        match response.status {
            // Already gone counts as deleted: a retry, or someone removed it by hand.
            200..=299 | 404 => Ok(()),
            _ => Err(failure(&format!("deleting image {id}"), &response)),
        }
    }

    fn lookup(provider: Provider, account: Account, id: String) -> Result<ImageDetails, Error> {
        // Used for an import: `not-found` (or any error) makes the import answer 404.
        let record = match endpoint(&provider) {
            Some(endpoint) => {
                let url = format!("{endpoint}/images/{}", path_segment(&id)?);
                let response = http::send(&api("GET", url, &account))?;
                if !response.is_success() {
                    return Err(failure(&format!("looking up image {id}"), &response));
                }
                parse_json("the cloud's image", &response.body)?
            }
            None => {
                let stored = host::state_get(&state_key(&id)).ok_or_else(|| {
                    Error::NotFound(format!("no image {id} on provider {}", provider.name))
                })?;
                parse_json("the stored image", &stored)?
            }
        };
        Ok(ImageDetails {
            name: record["name"].as_str().unwrap_or(&id).to_owned(),
            arch: record["arch"].as_str().unwrap_or("x86_64").to_owned(),
            target_identifier: id,
        })
    }
}
