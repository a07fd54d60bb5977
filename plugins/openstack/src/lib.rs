//! The `openstack` provider: images in OpenStack's image service (Glance v2), with
//! Keystone v3 password authentication.
//!
//! - `build` writes the base disk as qcow2 (`format=raw` for raw).
//! - `push` gets a token from Keystone, finds Glance (the provider's `glance_url`, or the
//!   `image` endpoint of the token's catalog), creates the image record, uploads the
//!   bytes streamed from the disk with progress, waits until Glance says `active`, and
//!   checks Glance's SHA-512 of what it stored against its own of what it sent.
//! - `delete` removes the image; `lookup` reads it; `check-account` asks for a token.
//!
//! Provider settings: `auth_url` (Keystone's v3 URL; Conductor's `url` also serves),
//! `domain` (of the user and the project; `Default` when absent), `region` (to choose
//! among catalog endpoints), `glance_url`. Account credentials: `username`, `password`,
//! `project`. The server lets the plugin reach only the hosts those URL settings name: a
//! catalog that points elsewhere is refused.
//!
//! Push parameters: `disk_format` (what Glance is told the data is; by default what the
//! data is: qcow2 or raw), `visibility` (`private` by default). The image's properties
//! say how to boot it: `os_distro`, `os_version` and `architecture` from the template,
//! and `hw_firmware_type` (with `hw_machine_type` q35 for UEFI) from the firmware the
//! server's OS install boots with.

// Built for the host only by `cargo build --workspace`, where nothing is exported (see
// the export below) and so nothing is used.
#![cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]

use conductor_plugin_sdk::guest::host::{self, DiskReader, DiskWriter, Level};
use conductor_plugin_sdk::guest::types::{
    Account, BuildOutput, CredentialDefinition, DiskFormat, Error, ImageDetails, Provider,
    ProviderInfo, Template,
};
use conductor_plugin_sdk::guest::{Guest, build_image, image_firmware, lookup, target};
use conductor_plugin_sdk::http::{self, Request, Response};
use serde_json::{Value, json};
use sha2::{Digest, Sha512};

struct OpenStack;

// Exported only when built as a component: on the host (`cargo build --workspace`)
// the export's symbol names, which hold ':' and '@', are not valid for the linker.
#[cfg(target_arch = "wasm32")]
conductor_plugin_sdk::guest::export_provider!(OpenStack);

/// A server gets its SSH key and user data from the metadata service or a config
/// drive, which cloud-init reads; Nova starts images with UEFI or BIOS as the image's
/// `hw_firmware_type` says.
impl target::Guest for OpenStack {
    fn needs() -> target::OsNeeds {
        target::OsNeeds {
            packages: vec!["cloud-init".into(), "openssh-server".into()],
            firmware: vec![target::Firmware::Uefi, target::Firmware::Bios],
        }
    }
}

/// How much of the image is read and sent at a time.
const CHUNK: u64 = 4 << 20;
const GIB: u64 = 1 << 30;

/// A scoped Keystone token and the Glance endpoint to use it with.
struct Session {
    token: String,
    glance: String,
}

impl Session {
    /// Authenticates with the account's password and finds Glance.
    fn open(provider: &Provider, account: &Account) -> Result<Session, Error> {
        let setting = |name: &str| lookup(&provider.settings, name).filter(|v| !v.is_empty());
        let auth_url = setting("auth_url")
            .or_else(|| setting("url"))
            .ok_or_else(|| {
                Error::InvalidInput(format!(
                    "provider {} has no auth_url setting (Keystone's v3 URL)",
                    provider.name
                ))
            })?
            .trim_end_matches('/');
        let domain = setting("domain").unwrap_or("Default");
        let credential = |name: &str| {
            lookup(&account.credentials, name)
                .filter(|v| !v.is_empty())
                .ok_or_else(|| {
                    Error::BadCredentials(format!("account {} has no {name}", account.name))
                })
        };
        let body = json!({
            "auth": {
                "identity": {
                    "methods": ["password"],
                    "password": {"user": {
                        "name": credential("username")?,
                        "domain": {"name": domain},
                        "password": credential("password")?,
                    }},
                },
                "scope": {"project": {
                    "name": credential("project")?,
                    "domain": {"name": domain},
                }},
            }
        });
        let response = http::send(
            &Request::new("POST", format!("{auth_url}/auth/tokens"))
                .header("content-type", "application/json")
                .header("accept", "application/json")
                .body(body.to_string()),
        )?;
        if response.status == 401 || response.status == 403 {
            return Err(Error::BadCredentials(format!(
                "Keystone refused the credentials: {}",
                openstack_message(&response)
            )));
        }
        if !response.is_success() {
            return Err(failure("Keystone token request", &response));
        }
        let token = response
            .header("x-subject-token")
            .ok_or_else(|| Error::Failed("Keystone answered without an X-Subject-Token".into()))?;
        let glance = match setting("glance_url") {
            Some(url) => url.trim_end_matches('/').to_owned(),
            None => {
                let answer: Value = serde_json::from_slice(&response.body)
                    .map_err(|e| Error::Failed(format!("Keystone's token is not JSON: {e}")))?;
                catalog_image_endpoint(&answer, setting("region")).ok_or_else(|| {
                    Error::Failed(
                        "the token's catalog has no public image endpoint; set glance_url".into(),
                    )
                })?
            }
        };
        Ok(Session { token, glance })
    }

    fn request(&self, method: &str, path: &str) -> Request {
        Request::new(method, format!("{}{path}", self.glance))
            .header("x-auth-token", self.token.clone())
            .header("accept", "application/json")
    }

    fn image(&self, id: &str) -> Result<Value, Error> {
        let response = http::send(&self.request("GET", &format!("/v2/images/{id}")))?;
        if !response.is_success() {
            return Err(failure(&format!("Glance GET image {id}"), &response));
        }
        serde_json::from_slice(&response.body)
            .map_err(|e| Error::Failed(format!("Glance's image {id} is not JSON: {e}")))
    }

    fn delete(&self, id: &str) -> Result<(), Error> {
        let response = http::send(&self.request("DELETE", &format!("/v2/images/{id}")))?;
        match response.status {
            204 | 200 | 404 => Ok(()),
            _ => Err(failure(&format!("Glance DELETE image {id}"), &response)),
        }
    }
}

/// The public `image` endpoint of a Keystone v3 token, in `region` if one is given.
fn catalog_image_endpoint(token: &Value, region: Option<&str>) -> Option<String> {
    token["token"]["catalog"]
        .as_array()?
        .iter()
        .filter(|service| service["type"] == "image")
        .flat_map(|service| service["endpoints"].as_array().into_iter().flatten())
        .filter(|e| e["interface"] == "public")
        .find(|e| region.is_none_or(|r| e["region"] == r || e["region_id"] == r))
        .and_then(|e| e["url"].as_str())
        .map(|url| url.trim_end_matches('/').to_owned())
}

/// The message of an OpenStack error answer: Keystone's `{"error": {"message"}}`, or
/// the words of the page Glance sends (its title, then the explanation).
fn openstack_message(response: &Response) -> String {
    if let Ok(value) = serde_json::from_slice::<Value>(&response.body)
        && let Some(message) = value["error"]["message"].as_str()
    {
        return message.to_owned();
    }
    // Glance's errors are small HTML pages: keep their words, drop the markup.
    let mut text = String::new();
    let mut in_tag = false;
    for c in response.text().chars() {
        match c {
            '<' => in_tag = true,
            '>' if in_tag => {
                in_tag = false;
                text.push(' ');
            }
            _ if !in_tag => text.push(c),
            _ => {}
        }
    }
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let text: String = text.chars().take(400).collect();
    if text.is_empty() {
        format!("HTTP {}", response.status)
    } else {
        text
    }
}

/// What an error answer means for the user, and whether it is worth retrying.
fn failure(what: &str, response: &Response) -> Error {
    let message = openstack_message(response);
    match response.status {
        401 | 403 => Error::BadCredentials(format!("{what}: {message}")),
        404 => Error::NotFound(format!("{what}: {message}")),
        409 => Error::Failed(format!(
            "{what}: Glance says the image is in a state that does not allow this (409): {message}"
        )),
        413 => Error::Failed(format!(
            "{what}: Glance refused the image as too large (413; the project's image quota or the store's size limit): {message}"
        )),
        415 => Error::Failed(format!("{what}: Glance refused the data (415): {message}")),
        429 | 500.. => Error::Unavailable(format!("{what} ({}): {message}", response.status)),
        status => Error::Failed(format!("{what} ({status}): {message}")),
    }
}

impl Guest for OpenStack {
    fn info() -> ProviderInfo {
        ProviderInfo {
            target: "openstack".into(),
            display_name: "OpenStack".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            credentials: vec![
                CredentialDefinition::new("username", "username", "text"),
                CredentialDefinition::new("password", "password", "password"),
                CredentialDefinition::new("project", "project", "text"),
            ],
            settings: vec![
                "auth_url".into(),
                "domain".into(),
                "region".into(),
                "glance_url".into(),
            ],
            format: DiskFormat::Qcow2,
            // Any host, as far as the provider's URL settings name it: OpenStack clouds
            // live anywhere, and the operator who makes the provider says where.
            hosts: vec!["*".into()],
        }
    }

    fn check_account(provider: Provider, account: Account) -> Result<(), Error> {
        Session::open(&provider, &account).map(drop)
    }

    fn build(
        template: Template,
        base: &DiskReader,
        output: &DiskWriter,
        parameters: Vec<(String, String)>,
    ) -> Result<BuildOutput, Error> {
        let format = match lookup(&parameters, "format").unwrap_or("qcow2") {
            "qcow2" => conductor_plugin_sdk::Format::Qcow2,
            "raw" => conductor_plugin_sdk::Format::Raw,
            other => {
                return Err(Error::InvalidInput(format!(
                    "format={other} is not one of qcow2, raw"
                )));
            }
        };
        host::log(
            Level::Info,
            &format!("building '{}' for openstack ({format:?})", template.name),
        );
        build_image(format, base, output)
    }

    fn push(
        provider: Provider,
        account: Account,
        image: &DiskReader,
        name: String,
        parameters: Vec<(String, String)>,
    ) -> Result<String, Error> {
        host::progress(0, "authenticating with Keystone");
        let session = Session::open(&provider, &account)?;
        let size = image.size();
        let detected = if image.read(0, 4)? == b"QFI\xfb" {
            "qcow2"
        } else {
            "raw"
        };
        let disk_format = lookup(&parameters, "disk_format").unwrap_or(detected);
        let min_disk = lookup(&parameters, "template.disk-size")
            .and_then(|s| s.parse::<u64>().ok())
            .map_or(0, |bytes| bytes.div_ceil(GIB));
        let mut record = json!({
            "name": name,
            "disk_format": disk_format,
            "container_format": "bare",
            "min_disk": min_disk,
            "visibility": lookup(&parameters, "visibility").unwrap_or("private"),
        });
        // The server's ids and the template's facts as image properties, so an image in
        // Glance can be traced back to what made it.
        for (key, property) in [
            ("conductor.image", "conductor_image"),
            ("conductor.build", "conductor_build"),
            ("conductor.target-image", "conductor_target_image"),
            ("conductor.provider-image", "conductor_provider_image"),
            ("template.os-name", "os_distro"),
            ("template.os-version", "os_version"),
            ("template.arch", "architecture"),
        ] {
            if let Some(value) = lookup(&parameters, key).filter(|v| !v.is_empty()) {
                record[property] = json!(value.to_ascii_lowercase());
            }
        }
        // How Nova starts it: UEFI (on q35, the machine type OVMF is built for) where the
        // image boots with it, else the BIOS; nothing said when the firmware is not known.
        let firmware = image_firmware(&parameters);
        if firmware.contains(&target::Firmware::Uefi) {
            record["hw_firmware_type"] = json!("uefi");
            record["hw_machine_type"] = json!("q35");
        } else if firmware.contains(&target::Firmware::Bios) {
            record["hw_firmware_type"] = json!("bios");
        }
        host::progress(1, "creating the image in Glance");
        let created = http::send(
            &session
                .request("POST", "/v2/images")
                .header("content-type", "application/json")
                .body(record.to_string()),
        )?;
        if !created.is_success() {
            return Err(failure("Glance image create", &created));
        }
        let created: Value = serde_json::from_slice(&created.body)
            .map_err(|e| Error::Failed(format!("Glance's new image is not JSON: {e}")))?;
        let id = created["id"]
            .as_str()
            .ok_or_else(|| Error::Failed("Glance's new image has no id".into()))?
            .to_owned();
        host::log(Level::Info, &format!("created Glance image {id}"));
        match upload(&session, &id, image, size) {
            Ok(()) => {
                host::progress(100, &format!("Glance image {id} is active"));
                Ok(id)
            }
            Err(e) => {
                // Nothing half-made is left behind in the cloud.
                if let Err(cleanup) = session.delete(&id) {
                    host::log(
                        Level::Warn,
                        &format!(
                            "could not delete Glance image {id} after a failed upload: {}",
                            cleanup.message()
                        ),
                    );
                }
                Err(e)
            }
        }
    }

    fn delete(provider: Provider, account: Account, id: String) -> Result<(), Error> {
        let session = Session::open(&provider, &account)?;
        session.delete(&id)
    }

    fn lookup(provider: Provider, account: Account, id: String) -> Result<ImageDetails, Error> {
        let session = Session::open(&provider, &account)?;
        let image = session.image(&id)?;
        Ok(ImageDetails {
            target_identifier: id,
            name: image["name"].as_str().unwrap_or_default().to_owned(),
            arch: image["architecture"]
                .as_str()
                .unwrap_or("x86_64")
                .to_owned(),
        })
    }
}

/// Sends the image's bytes, waits for `active` and checks the stored bytes' hash.
fn upload(session: &Session, id: &str, image: &DiskReader, size: u64) -> Result<(), Error> {
    let (pending, body) = http::start_streaming(
        &session
            .request("PUT", &format!("/v2/images/{id}/file"))
            .header("content-type", "application/octet-stream"),
        size,
    )?;
    let mut hash = Sha512::new();
    let mut sent = 0u64;
    let mut last = 0u8;
    let mut written = Ok(());
    while sent < size {
        let bytes = image.read(sent, (size - sent).min(CHUNK) as u32)?;
        if bytes.is_empty() {
            return Err(Error::Failed(format!(
                "the image ended at {sent} of its {size} bytes"
            )));
        }
        hash.update(&bytes);
        if let Err(e) = body.write(&bytes) {
            // The answer says why (Glance refuses a format as soon as it sees it).
            written = Err(e);
            break;
        }
        sent += bytes.len() as u64;
        let percent = (2 + sent * 93 / size.max(1)) as u8;
        if percent != last {
            last = percent;
            host::progress(
                percent,
                &format!("uploaded {} of {} MiB to Glance", sent >> 20, size >> 20),
            );
        }
    }
    if written.is_ok() {
        written = body.finish();
    }
    // The answer first: when Glance stops reading, what it says is the reason.
    let answer = pending.wait()?;
    if !answer.is_success() {
        return Err(failure("Glance upload", &answer));
    }
    written?;
    let ours = hex(&hash.finalize());
    host::progress(96, "waiting for Glance to make the image active");
    for attempt in 0u32.. {
        let record = session.image(id)?;
        match record["status"].as_str().unwrap_or_default() {
            "active" => {
                let theirs = record["os_hash_value"].as_str().unwrap_or_default();
                let algorithm = record["os_hash_algo"].as_str().unwrap_or_default();
                if algorithm == "sha512" && theirs != ours {
                    return Err(Error::Failed(format!(
                        "Glance stored different bytes: its sha512 is {theirs}, ours {ours}"
                    )));
                }
                host::log(
                    Level::Info,
                    &format!(
                        "Glance image {id} active, {} bytes, {algorithm} {}",
                        record["size"],
                        if algorithm == "sha512" {
                            "matches"
                        } else {
                            "not checked"
                        }
                    ),
                );
                return Ok(());
            }
            status @ ("killed" | "deleted" | "pending_delete") => {
                return Err(Error::Failed(format!(
                    "Glance put image {id} in state {status} after the upload"
                )));
            }
            status => {
                host::progress(97, &format!("Glance image {id} is {status}"));
                std::thread::sleep(std::time::Duration::from_millis(
                    200 * u64::from(attempt.min(10) + 1),
                ));
            }
        }
    }
    unreachable!("the loop returns")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
