//! The `mock` provider: a target that needs no cloud. Builds copy the base disk into a
//! raw image at once, pushes "upload" by reading the image and answer a deterministic
//! `Mock_<provider>_<uuid>` identifier. Tests and demos use it to drive every API path.
//!
//! Failure injection, through the build or push request's parameters:
//! - `fail=build` makes `build` fail, `fail=push` makes `push` fail, with a message
//!   that names the parameter, so a test can check `status_detail/error`;
//! - `fail=trap` makes the call panic, which the host sees as a trap;
//! - `fail=unavailable:N` makes the first N attempts of a push answer `unavailable`
//!   (the host retries those), counted in the provider's state;
//! - `delay_ms=N` spreads the call over about N milliseconds in ten progress steps,
//!   so a test can watch a job while it runs or stop the server under it;
//! - `format=raw|qcow2|vmdk` picks the format `build` writes (raw by default), so the
//!   tests can check every writer of `plugins/sdk`.
//!
//! An account whose `password` is `invalid` is refused by `check-account`. A provider's
//! `images` setting (comma-separated identifiers) names images it holds from the start,
//! so an import can be tried without pushing first.
//!
//! The images a provider "holds" are kept in the host's per-provider state under
//! `image/<identifier>`, so `delete` really removes them and `lookup` (import) finds only
//! images that exist.

// Built for the host only by `cargo build --workspace`, where nothing is exported (see
// the export below) and so nothing is used.
#![cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]

use conductor_plugin_sdk as sdk;
use sdk::guest::host::{self, DiskReader, DiskWriter, Level};
use sdk::guest::types::{
    Account, BuildOutput, CredentialDefinition, DiskFormat, Error, ImageDetails, Provider,
    ProviderInfo, Template,
};
use sdk::guest::{Guest, lookup as param};
use std::hash::{DefaultHasher, Hash, Hasher};

struct Mock;

// Exported only when built as a component: on the host (`cargo build --workspace`)
// the export's symbol names, which hold ':' and '@', are not valid for the linker.
#[cfg(target_arch = "wasm32")]
sdk::guest::export_provider!(Mock);

/// The mock cloud boots nothing: its images need nothing from the OS.
impl sdk::guest::target::Guest for Mock {
    fn needs() -> sdk::guest::target::OsNeeds {
        sdk::guest::target::OsNeeds::nothing()
    }
}

/// Largest read the plugin asks for at once: big enough to keep the host boundary cheap,
/// small enough to keep the plugin's memory low.
const CHUNK: u64 = 4 << 20;

/// Honours `fail=<stage>` and `fail=trap` for the stage about to run.
fn injected_failure(parameters: &[(String, String)], stage: &str) -> Result<(), Error> {
    match param(parameters, "fail") {
        Some("trap") => panic!("mock plugin asked to trap by the fail=trap parameter"),
        Some(value) if value == stage => Err(Error::Failed(format!(
            "mock {stage} failed as requested by the fail={stage} parameter"
        ))),
        _ => Ok(()),
    }
}

/// Sleeps one tenth of `delay_ms`, so that ten steps take about the whole delay.
fn pause(parameters: &[(String, String)]) {
    if let Some(ms) = param(parameters, "delay_ms").and_then(|v| v.parse::<u64>().ok()) {
        std::thread::sleep(std::time::Duration::from_millis(ms / 10));
    }
}

/// Reads every allocated extent of `from`, as an upload would, reporting progress up to
/// 90 %. Holes are skipped: a provider would see zeros there anyway.
fn read_extents(
    from: &DiskReader,
    parameters: &[(String, String)],
    verb: &str,
) -> Result<u64, Error> {
    let extents = from.extents()?;
    let total: u64 = extents.iter().map(|e| e.length).sum();
    let mut done = 0u64;
    for extent in &extents {
        let mut offset = extent.offset;
        let end = extent.offset + extent.length;
        while offset < end {
            let length = (end - offset).min(CHUNK);
            let bytes = from.read(offset, length as u32)?;
            if bytes.is_empty() {
                break;
            }
            offset += bytes.len() as u64;
            done += bytes.len() as u64;
            let percent = (done * 90 / total.max(1)) as u8;
            host::progress(percent, &format!("{verb} {done} of {total} bytes"));
        }
    }
    finish_steps(parameters, verb);
    Ok(done)
}

/// Ten paced steps from 90 %, so `delay_ms` is visible as moving progress.
fn finish_steps(parameters: &[(String, String)], verb: &str) {
    for step in 1..=10u8 {
        pause(parameters);
        host::progress(90 + step - 1, &format!("{verb}: finishing"));
    }
}

/// A UUID-shaped identifier derived from the inputs, so the same push always yields the
/// same identifier and tests can predict it.
fn stable_uuid(parts: &[&str]) -> String {
    let mut halves = [0u64; 2];
    for (salt, half) in halves.iter_mut().enumerate() {
        let mut hasher = DefaultHasher::new();
        salt.hash(&mut hasher);
        parts.hash(&mut hasher);
        *half = hasher.finish();
    }
    let hex = format!("{:016x}{:016x}", halves[0], halves[1]);
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

impl Guest for Mock {
    fn info() -> ProviderInfo {
        ProviderInfo {
            target: "mock".into(),
            display_name: "Mock".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            credentials: vec![
                CredentialDefinition::new("username", "username", "text"),
                CredentialDefinition::new("password", "password", "password"),
            ],
            settings: vec!["images".into()],
            format: DiskFormat::Raw,
            hosts: Vec::new(),
        }
    }

    fn check_account(_provider: Provider, account: Account) -> Result<(), Error> {
        let password = account
            .credentials
            .iter()
            .find(|(name, _)| name == "password")
            .map(|(_, value)| value.as_str());
        match password {
            Some("invalid") => Err(Error::BadCredentials(
                "the mock provider refuses the password 'invalid'".into(),
            )),
            _ => Ok(()),
        }
    }

    fn build(
        template: Template,
        base: &DiskReader,
        output: &DiskWriter,
        parameters: Vec<(String, String)>,
    ) -> Result<BuildOutput, Error> {
        host::log(
            Level::Info,
            &format!("building '{}' for mock", template.name),
        );
        injected_failure(&parameters, "build")?;
        let (format, wit_format) = match param(&parameters, "format").unwrap_or("raw") {
            "raw" => (sdk::Format::Raw, DiskFormat::Raw),
            "qcow2" => (sdk::Format::Qcow2, DiskFormat::Qcow2),
            "vmdk" => (sdk::Format::Vmdk, DiskFormat::Vmdk),
            other => {
                return Err(Error::InvalidInput(format!(
                    "format={other} is not one of raw, qcow2, vmdk"
                )));
            }
        };
        sdk::guest::write_disk(format, base, output, 90)?;
        finish_steps(&parameters, "written");
        host::progress(100, "build complete");
        Ok(BuildOutput {
            format: wit_format,
            virtual_size: base.size(),
        })
    }

    fn push(
        provider: Provider,
        account: Account,
        image: &DiskReader,
        name: String,
        parameters: Vec<(String, String)>,
    ) -> Result<String, Error> {
        host::progress(0, "uploading to the mock provider");
        injected_failure(&parameters, "push")?;
        if let Some(times) = param(&parameters, "fail")
            .and_then(|f| f.strip_prefix("unavailable:"))
            .and_then(|n| n.parse::<u32>().ok())
        {
            let key = format!("attempts/{name}");
            let seen = host::state_get(&key)
                .and_then(|v| String::from_utf8(v).ok())
                .and_then(|v| v.parse::<u32>().ok())
                .unwrap_or(0);
            if seen < times {
                host::state_set(&key, (seen + 1).to_string().as_bytes())?;
                return Err(Error::Unavailable(format!(
                    "the mock provider is unavailable (attempt {} of the {times} the fail parameter asks for)",
                    seen + 1
                )));
            }
        }
        read_extents(image, &parameters, "uploaded")?;
        let identifier = format!(
            "Mock_{}_{}",
            provider.name,
            stable_uuid(&[&provider.name, &account.name, &name])
        );
        host::state_set(&format!("image/{identifier}"), name.as_bytes())?;
        host::progress(100, "push complete");
        Ok(identifier)
    }

    fn delete(
        _provider: Provider,
        _account: Account,
        target_identifier: String,
    ) -> Result<(), Error> {
        host::state_delete(&format!("image/{target_identifier}"));
        Ok(())
    }

    fn lookup(
        provider: Provider,
        _account: Account,
        target_identifier: String,
    ) -> Result<ImageDetails, Error> {
        let preloaded = provider
            .settings
            .iter()
            .filter(|(key, _)| key == "images")
            .flat_map(|(_, list)| list.split(','))
            .any(|id| id.trim() == target_identifier);
        let held = host::state_get(&format!("image/{target_identifier}"))
            .or_else(|| preloaded.then(|| target_identifier.clone().into_bytes()));
        match held {
            Some(name) => Ok(ImageDetails {
                name: String::from_utf8_lossy(&name).into_owned(),
                target_identifier,
                arch: "x86_64".into(),
            }),
            None => Err(Error::NotFound(format!(
                "no mock image {target_identifier} on provider {}",
                provider.name
            ))),
        }
    }
}
