//! The wasmtime engine, loading provider plugins (WebAssembly components), the sandbox
//! each call runs in, and the host side of the `conductor:provider` WIT package.
//!
//! Owns every wasmtime type; callers see [`Plugin`], [`Info`] and [`PluginError`] only.
//! Never imports axum or redb. Calls are synchronous and may take minutes, so callers run
//! them on the blocking pool.
//!
//! Each call gets a fresh store with its provider type's [`Limits`]: memory, a
//! wall-clock deadline that also ends waits inside host calls, and optionally fuel.
//! Running past one fails that call with a [`PluginError`] that says which limit it was.

mod disk;
mod limits;
mod sandbox;

pub use disk::{DiskReader, DiskWriter, create_blank};
pub use limits::{LimitSyntaxError, Limits, PluginLimit, parse_duration};

use crate::model::DiskFormat;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use wasmtime::component::{Component, HasSelf, Linker, Resource, ResourceTable};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, UpdateDeadline,
};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{
    Error as HttpError, RequestOptions, WasiBody, WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks,
    WasiHttpView,
};

/// Every plugin since 0.1.0 has `provider`: plugins are loaded through this world.
mod bindings {
    wasmtime::component::bindgen!({
        path: "../plugins/sdk/wit",
        world: "provider-plugin",
        // Host functions may trap: a bad resource handle is a plugin bug, not an error
        // the plugin could handle.
        imports: { default: trappable },
        with: {
            "conductor:provider/host.disk-reader": super::DiskReader,
            "conductor:provider/host.disk-writer": super::DiskWriter,
        },
    });
}

/// `target`, added in 0.1.1, looked up apart where a plugin exports it.
mod target_bindings {
    wasmtime::component::bindgen!({
        path: "../plugins/sdk/wit",
        world: "target-plugin",
    });
}

/// The name a plugin exports `target` under (any 0.1.x matches it).
const TARGET_EXPORT: &str = "conductor:provider/target@0.1.1";

use bindings::conductor::provider::host as wit_host;
use bindings::conductor::provider::types as wit;
use target_bindings::exports::conductor::provider::target as wit_target;

include!(concat!(env!("OUT_DIR"), "/bundled_plugins.rs"));

/// How often the epoch advances; deadlines are counted in these ticks.
const EPOCH_TICK: Duration = Duration::from_millis(100);

/// Why a plugin call failed. The first five are the plugin's own answer; the rest are the
/// sandbox stopping it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PluginError {
    #[error("invalid input: {0}")]
    InvalidInput(String),
    #[error("credentials refused: {0}")]
    BadCredentials(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("provider unavailable: {0}")]
    Unavailable(String),
    #[error("{0}")]
    Failed(String),
    #[error("the plugin crashed: {0}")]
    Trap(String),
    #[error("the plugin ran past its time limit of {0:?} and was stopped")]
    Timeout(Duration),
    #[error(
        "the plugin used up its budget of {0} fuel units (instructions it may run) and was stopped"
    )]
    OutOfFuel(u64),
    #[error("the plugin ran out of memory (limit {} MiB)", .0 >> 20)]
    OutOfMemory(usize),
    /// The plugin failed after the host refused a write past the image's size limit.
    #[error("the plugin tried to write past the image size limit of {} MiB ({limit} bytes) and gave up: {reason}", limit >> 20)]
    ImageTooLarge { limit: u64, reason: String },
    /// The plugin failed after the host refused to let it reach a host its provider
    /// does not name (or that the plugin did not ask for).
    #[error(
        "the plugin tried to reach {hosts}, which its provider does not grant (granted: {granted})"
    )]
    Denied { hosts: String, granted: String },
    #[error("cancelled")]
    Cancelled,
    #[error("interrupted by the server shutting down")]
    Shutdown,
    #[error("the server could not run the plugin: {0}")]
    Host(String),
}

impl PluginError {
    /// Whether the server itself ended the call (a limit, a cancel, a shutdown, its own
    /// failure): such a reason stands as it is, whatever the plugin did before.
    fn is_the_servers(&self) -> bool {
        matches!(
            self,
            PluginError::Timeout(_)
                | PluginError::OutOfFuel(_)
                | PluginError::OutOfMemory(_)
                | PluginError::Cancelled
                | PluginError::Shutdown
                | PluginError::Host(_)
        )
    }
}

impl From<wit::Error> for PluginError {
    fn from(e: wit::Error) -> Self {
        match e {
            wit::Error::InvalidInput(m) => PluginError::InvalidInput(m),
            wit::Error::BadCredentials(m) => PluginError::BadCredentials(m),
            wit::Error::NotFound(m) => PluginError::NotFound(m),
            wit::Error::Unavailable(m) => PluginError::Unavailable(m),
            wit::Error::Failed(m) => PluginError::Failed(m),
        }
    }
}

/// A credential an account of a provider type carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialDefinition {
    pub name: String,
    pub label: String,
    /// `text`, `password` or `file`.
    pub input_type: String,
    /// Whether an account may leave it out (the plugin wrote its input type with a `?`).
    pub optional: bool,
}

/// What a plugin says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    pub target: String,
    pub display_name: String,
    pub version: String,
    pub credentials: Vec<CredentialDefinition>,
    pub settings: Vec<String>,
    pub format: DiskFormat,
    pub hosts: Vec<String>,
    /// What images for this target need from their OS (WIT `target.needs`); nothing for
    /// a plugin built before 0.1.1.
    pub needs: OsNeeds,
}

impl Info {
    /// Whether the target reaches a cloud (it names hosts), rather than keeping its
    /// images in the server (`mock`): a cloud boots what it is given.
    pub fn reaches_a_cloud(&self) -> bool {
        !self.hosts.is_empty()
    }
}

/// What a target needs from the OS in the images built for it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OsNeeds {
    /// Packages every image must hold (cloud-init, a guest agent).
    pub packages: Vec<String>,
    /// The firmware the target starts images with, preferred first; empty for any.
    pub firmware: Vec<crate::model::Firmware>,
}

/// The template facts a build starts from.
#[derive(Debug, Clone)]
pub struct TemplateFacts {
    pub xml: String,
    pub name: String,
    pub os_name: String,
    pub os_version: String,
    pub arch: String,
    pub disk_size: u64,
    /// How the template says to install the OS (`url`, `iso`), if it does.
    pub install: Option<String>,
}

/// A provider and account as a plugin sees them. Its Debug output leaves the
/// credentials' values out.
#[derive(Clone)]
pub struct Target {
    pub provider_name: String,
    pub settings: Vec<(String, String)>,
    pub account_name: String,
    pub credentials: Vec<(String, String)>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("provider_name", &self.provider_name)
            .field("account_name", &self.account_name)
            .finish_non_exhaustive()
    }
}

/// What a finished build reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BuildOutput {
    pub format: DiskFormat,
    pub virtual_size: u64,
}

/// Receives a plugin's progress reports: percent and a one-line activity.
pub type ProgressSink = Box<dyn FnMut(u8, &str) + Send>;

/// The per-provider key-value store a plugin may keep (WIT `state-*`), supplied by
/// the caller so that this module stays free of storage.
pub trait StateStore: Send {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, String>;
    /// `Ok(false)` when the provider holds too many keys already.
    fn set(&self, key: &str, value: &[u8], max_keys: usize) -> Result<bool, String>;
    fn delete(&self, key: &str) -> Result<(), String>;
    fn keys(&self, prefix: &str, limit: usize) -> Result<Vec<String>, String>;
}

const STATE_MAX_KEY: usize = 256;
const STATE_MAX_VALUE: usize = 64 << 10;
const STATE_MAX_KEYS: usize = 10_000;
const STATE_MAX_LISTED: usize = 1_000;

/// A flag that stops a running call at the next epoch tick or host call: set by a
/// user's cancel or by the server shutting down.
#[derive(Debug, Clone, Default)]
pub struct Stop(Arc<AtomicU8>);

/// Why a call was stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    Cancelled,
    Shutdown,
}

impl Stop {
    pub fn new() -> Stop {
        Stop::default()
    }

    pub fn request(&self, reason: StopReason) {
        let value = match reason {
            StopReason::Cancelled => 1,
            StopReason::Shutdown => 2,
        };
        // The first reason wins: a cancelled job stays cancelled through a shutdown.
        let _ = self
            .0
            .compare_exchange(0, value, Ordering::SeqCst, Ordering::SeqCst);
    }

    pub fn reason(&self) -> Option<StopReason> {
        match self.0.load(Ordering::SeqCst) {
            1 => Some(StopReason::Cancelled),
            2 => Some(StopReason::Shutdown),
            _ => None,
        }
    }
}

/// What one call needs besides its arguments.
pub struct CallContext {
    /// Names the job in the log lines the plugin writes.
    pub label: String,
    pub progress: ProgressSink,
    /// The provider's state; `None` during a build.
    pub state: Option<Box<dyn StateStore>>,
    /// Stops the call when set.
    pub stop: Stop,
}

impl CallContext {
    /// A context that reports nowhere and has no state: for calls nobody watches.
    pub fn quiet(label: impl Into<String>) -> CallContext {
        CallContext {
            label: label.into(),
            progress: Box::new(|_, _| {}),
            state: None,
            stop: Stop::new(),
        }
    }
}

/// Per-call store data: the WASI context (no files, no environment, no network), the
/// resource table holding the disks, and what enforces the call's limits.
struct State {
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: sandbox::MemoryLimiter,
    /// The start of what the plugin wrote to stderr, for the message of a panic.
    stderr: sandbox::StderrTail,
    /// The deadline and stop flag, read by the epoch callback and by waits in host calls.
    watch: sandbox::Watch,
    log: sandbox::LogBudget,
    /// wasi:http for plugins that import it, behind the call's grants.
    http: WasiHttpCtx,
    grants: Grants,
    context: CallContext,
}

/// The outbound HTTP policy of one call: the authorities (`host[:port]`) the plugin may
/// reach, and the ones it tried and was refused.
struct Grants {
    allowed: Vec<String>,
    denied: Vec<String>,
}

impl WasiHttpHooks for Grants {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        fut: Box<dyn std::future::Future<Output = Result<(), HttpError>> + Send>,
    ) -> Box<
        dyn std::future::Future<
                Output = Result<
                    (
                        http::Response<WasiBody>,
                        Box<dyn std::future::Future<Output = Result<(), HttpError>> + Send>,
                    ),
                    HttpError,
                >,
            > + Send,
    > {
        let _ = fut;
        let authority = request
            .uri()
            .authority()
            .map(|a| a.as_str().to_ascii_lowercase())
            .unwrap_or_default();
        if !self.allowed.contains(&authority) {
            // Refused before any connection is made; the job reports it by name, since
            // the plugin itself only sees a failed request.
            tracing::warn!(%authority, "refused a plugin's request to a host it was not granted");
            if !self.denied.contains(&authority) {
                self.denied.push(authority);
            }
            return Box::new(async { Err(HttpError::HttpRequestDenied) });
        }
        Box::new(async move {
            use http_body_util::BodyExt;
            let (response, io) = wasmtime_wasi_http::default_send_request(request, options).await?;
            Ok((
                response.map(BodyExt::boxed_unsync),
                Box::new(io) as Box<dyn std::future::Future<Output = _> + Send>,
            ))
        })
    }
}

impl WasiHttpView for State {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.grants,
        }
    }
}

/// The authorities (`host[:port]`, lower case) a call may reach: what the plugin declares
/// in its info, narrowed by the provider's settings.
///
/// - A plain pattern (`*`, `*.amazonaws.com`, `127.0.0.1`) grants the authorities of the
///   provider's URL-valued settings that it covers: the provider chooses the endpoint,
///   the plugin bounds the choice.
/// - A pattern with placeholders (`ec2.{region}.amazonaws.com`) grants itself, with each
///   `{name}` filled in from the provider's setting of that name (`{a|b}`: the first of
///   the settings that is set). A value may hold only letters, digits and `-`, so a
///   setting can pick a region but never name another domain; a placeholder with no
///   value grants nothing.
pub fn grant(patterns: &[String], settings: &[(String, String)]) -> Vec<String> {
    let mut allowed: Vec<String> = provider_hosts(settings)
        .into_iter()
        .filter(|a| {
            patterns
                .iter()
                .filter(|p| !p.contains('{'))
                .any(|p| covers(p, a))
        })
        .collect();
    for expanded in patterns
        .iter()
        .filter(|p| p.contains('{'))
        .filter_map(|p| expand(p, settings))
    {
        if !allowed.contains(&expanded) {
            allowed.push(expanded);
        }
    }
    allowed
}

/// A host pattern with its `{setting}` placeholders filled in, if every one has a value
/// fit for a host name label.
fn expand(pattern: &str, settings: &[(String, String)]) -> Option<String> {
    let mut out = String::new();
    let mut rest = pattern;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let close = open + rest[open..].find('}')?;
        let value = rest[open + 1..close].split('|').find_map(|name| {
            settings
                .iter()
                .find(|(k, v)| k == name && !v.is_empty())
                .map(|(_, v)| v)
        })?;
        if !value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return None;
        }
        out.push_str(value);
        rest = &rest[close + 1..];
    }
    out.push_str(rest);
    Some(out.to_ascii_lowercase())
}

/// The authorities a provider's settings name: every setting whose value is an http or
/// https URL.
fn provider_hosts(settings: &[(String, String)]) -> Vec<String> {
    settings
        .iter()
        .filter_map(|(_, value)| {
            let rest = value
                .strip_prefix("http://")
                .or_else(|| value.strip_prefix("https://"))?;
            let authority = rest.split(['/', '?', '#']).next()?;
            (!authority.is_empty()).then(|| authority.to_ascii_lowercase())
        })
        .collect()
}

/// Whether a plugin's declared host pattern covers an authority: `*` covers any,
/// `*.example.com` a subdomain, `host` any port of that host, `host:port` exactly.
fn covers(pattern: &str, authority: &str) -> bool {
    let pattern = pattern.to_ascii_lowercase();
    let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
    if pattern == "*" || pattern == authority || pattern == host {
        return true;
    }
    pattern
        .strip_prefix("*.")
        .is_some_and(|suffix| host.ends_with(&format!(".{suffix}")))
}

impl WasiView for State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl wit::Host for State {}

impl wit_host::Host for State {
    fn progress(&mut self, percent: u8, activity: String) -> wasmtime::Result<()> {
        // Plugins that sleep or wait in host calls still report progress: a stop request
        // takes effect here as well as at the next epoch tick.
        if self.context.stop.reason().is_some() {
            return Err(wasmtime::Error::from(wasmtime::Trap::Interrupt));
        }
        // Activities are one line and short; a plugin cannot flood the status with text.
        let line: String = activity
            .lines()
            .next()
            .unwrap_or("")
            .chars()
            .take(200)
            .collect();
        (self.context.progress)(percent.min(100), &line);
        Ok(())
    }

    fn log(&mut self, level: wit_host::Level, message: String) -> wasmtime::Result<()> {
        let job = &self.context.label;
        match self.log.next() {
            sandbox::LogLine::Write => {}
            sandbox::LogLine::WriteDroppedNotice => {
                tracing::warn!(
                    job,
                    "plugin: further log lines dropped: a call may write {} lines",
                    sandbox::MAX_LOG_LINES
                );
                return Ok(());
            }
            sandbox::LogLine::Drop => return Ok(()),
        }
        let message: String = message.chars().take(2000).collect();
        match level {
            wit_host::Level::Debug => tracing::debug!(job, "plugin: {message}"),
            wit_host::Level::Info => tracing::info!(job, "plugin: {message}"),
            wit_host::Level::Warn => tracing::warn!(job, "plugin: {message}"),
            wit_host::Level::Error => tracing::error!(job, "plugin: {message}"),
        }
        Ok(())
    }

    fn state_get(&mut self, key: String) -> wasmtime::Result<Option<Vec<u8>>> {
        if key.len() > STATE_MAX_KEY {
            return Ok(None);
        }
        Ok(self.with_state(None, |s| s.get(&key)))
    }

    fn state_set(
        &mut self,
        key: String,
        value: Vec<u8>,
    ) -> wasmtime::Result<Result<(), wit::Error>> {
        if key.len() > STATE_MAX_KEY || value.len() > STATE_MAX_VALUE {
            return Ok(Err(wit::Error::InvalidInput(format!(
                "state keys are at most {STATE_MAX_KEY} bytes and values at most {STATE_MAX_VALUE} bytes"
            ))));
        }
        if self.context.state.is_none() {
            return Ok(Err(wit::Error::InvalidInput(
                "there is no provider state during a build".into(),
            )));
        }
        let stored = self.with_state(false, |s| s.set(&key, &value, STATE_MAX_KEYS));
        Ok(if stored {
            Ok(())
        } else {
            Err(wit::Error::Failed(format!(
                "the provider's state is full ({STATE_MAX_KEYS} keys) or could not be written"
            )))
        })
    }

    fn state_delete(&mut self, key: String) -> wasmtime::Result<()> {
        self.with_state((), |s| s.delete(&key));
        Ok(())
    }

    fn state_keys(&mut self, prefix: String) -> wasmtime::Result<Vec<String>> {
        Ok(self.with_state(Vec::new(), |s| s.keys(&prefix, STATE_MAX_LISTED)))
    }
}

impl State {
    /// Runs `f` on the state store, logging (not trapping on) storage failures: a
    /// plugin sees a missing value or a failed write, never a host crash.
    fn with_state<T>(&self, default: T, f: impl FnOnce(&dyn StateStore) -> Result<T, String>) -> T {
        match &self.context.state {
            Some(state) => match f(state.as_ref()) {
                Ok(value) => value,
                Err(e) => {
                    tracing::error!(job = %self.context.label, "plugin state: {e}");
                    default
                }
            },
            None => default,
        }
    }
}

fn io_error(e: std::io::Error) -> wit::Error {
    wit::Error::Failed(format!("disk access failed: {e}"))
}

impl wit_host::HostDiskReader for State {
    fn size(&mut self, disk: Resource<DiskReader>) -> wasmtime::Result<u64> {
        Ok(self.table.get(&disk)?.size())
    }

    fn read(
        &mut self,
        disk: Resource<DiskReader>,
        offset: u64,
        length: u32,
    ) -> wasmtime::Result<Result<Vec<u8>, wit::Error>> {
        Ok(self
            .table
            .get(&disk)?
            .read(offset, length)
            .map_err(io_error))
    }

    fn extents(
        &mut self,
        disk: Resource<DiskReader>,
    ) -> wasmtime::Result<Result<Vec<wit_host::Extent>, wit::Error>> {
        Ok(self
            .table
            .get(&disk)?
            .extents()
            .map_err(io_error)
            .map(|runs| {
                runs.into_iter()
                    .map(|(offset, length)| wit_host::Extent { offset, length })
                    .collect()
            }))
    }

    fn data_runs(
        &mut self,
        disk: Resource<DiskReader>,
        offset: u64,
        length: u64,
        granule: u32,
    ) -> wasmtime::Result<Result<Vec<wit_host::Extent>, wit::Error>> {
        Ok(self
            .table
            .get(&disk)?
            .data_runs(offset, length, granule)
            .map_err(io_error)
            .map(|runs| {
                runs.into_iter()
                    .map(|(offset, length)| wit_host::Extent { offset, length })
                    .collect()
            }))
    }

    fn drop(&mut self, disk: Resource<DiskReader>) -> wasmtime::Result<()> {
        self.table.delete(disk)?;
        Ok(())
    }
}

impl wit_host::HostDiskWriter for State {
    fn write(
        &mut self,
        disk: Resource<DiskWriter>,
        offset: u64,
        data: Vec<u8>,
    ) -> wasmtime::Result<Result<(), wit::Error>> {
        Ok(self
            .table
            .get(&disk)?
            .write(offset, &data)
            .map_err(io_error))
    }

    fn set_size(
        &mut self,
        disk: Resource<DiskWriter>,
        size: u64,
    ) -> wasmtime::Result<Result<(), wit::Error>> {
        Ok(self.table.get(&disk)?.set_size(size).map_err(io_error))
    }

    fn copy_from(
        &mut self,
        disk: Resource<DiskWriter>,
        source: Resource<DiskReader>,
        offset: u64,
        length: u64,
        at: u64,
    ) -> wasmtime::Result<Result<(), wit::Error>> {
        let source = self.table.get(&source)?;
        let writer = self.table.get(&disk)?;
        Ok(writer
            .copy_from(source, offset, length, at)
            .map_err(io_error))
    }

    fn drop(&mut self, disk: Resource<DiskWriter>) -> wasmtime::Result<()> {
        self.table.delete(disk)?;
        Ok(())
    }
}

/// Why a component does not link, leading with the import at fault: wasmtime's own
/// sentence is correct but reads as an internal error.
fn link_problem(error: &wasmtime::Error) -> String {
    let detail = format!("{error:#}");
    let import = detail
        .strip_prefix("component imports instance `")
        .and_then(|rest| rest.split_once('`'))
        .map(|(name, _)| name);
    match import {
        Some(name) => format!(
            "it imports {name}, which this server does not offer plugins (or not in that form); \
             a plugin gets conductor:provider's host interface and WASI without files, \
             environment or network ({detail})"
        ),
        None => detail,
    }
}

/// A plugin's needs, checked: its packages go onto an apt or dnf command line.
fn os_needs(needs: wit_target::OsNeeds) -> Result<OsNeeds, String> {
    for name in &needs.packages {
        crate::os::package_name(name).map_err(|e| format!("it needs {e}"))?;
    }
    let mut firmware = Vec::new();
    for f in needs.firmware {
        let f = match f {
            wit_target::Firmware::Bios => crate::model::Firmware::Bios,
            wit_target::Firmware::Uefi => crate::model::Firmware::Uefi,
        };
        if !firmware.contains(&f) {
            firmware.push(f);
        }
    }
    Ok(OsNeeds {
        packages: needs.packages,
        firmware,
    })
}

fn format_from_wit(format: wit::DiskFormat) -> DiskFormat {
    match format {
        wit::DiskFormat::Raw => DiskFormat::Raw,
        wit::DiskFormat::Qcow2 => DiskFormat::Qcow2,
        wit::DiskFormat::Vmdk => DiskFormat::Vmdk,
    }
}

/// A loaded plugin, ready to be instantiated for a call.
pub struct Plugin {
    pub info: Info,
    /// Where it came from: `bundled:mock.wasm` or a file path.
    pub source: String,
    pre: bindings::ProviderPluginPre<State>,
    engine: Engine,
    limits: Limits,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("info", &self.info)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl Plugin {
    /// A fresh store and instance for one call, with the sandbox's limits. The hosts the
    /// call may reach come from the settings of the provider it is handed (see
    /// [`grant`]): none for a build, which has no provider.
    fn instantiate(
        &self,
        context: CallContext,
        settings: &[(String, String)],
    ) -> Result<(Store<State>, bindings::ProviderPlugin), PluginError> {
        let mut store = self.store(context, settings)?;
        let instance = self
            .pre
            .instantiate(&mut store)
            .map_err(|e| self.not_instantiated(&store, e))?;
        Ok((store, instance))
    }

    /// The same as [`Plugin::instantiate`] with the instance itself, for looking up
    /// exports beyond the `provider-plugin` world's.
    fn instantiate_raw(
        &self,
        context: CallContext,
        settings: &[(String, String)],
    ) -> Result<(Store<State>, wasmtime::component::Instance), PluginError> {
        let mut store = self.store(context, settings)?;
        let instance = self
            .pre
            .instance_pre()
            .instantiate(&mut store)
            .map_err(|e| self.not_instantiated(&store, e))?;
        Ok((store, instance))
    }

    fn not_instantiated(&self, store: &Store<State>, e: wasmtime::Error) -> PluginError {
        if store.data().limiter.exhausted {
            // Its initial memory alone is more than the limit allows.
            PluginError::OutOfMemory(self.limits.memory_bytes)
        } else {
            PluginError::Host(format!("instantiating {}: {e}", self.source))
        }
    }

    /// A store with the sandbox's limits for one call.
    fn store(
        &self,
        context: CallContext,
        settings: &[(String, String)],
    ) -> Result<Store<State>, PluginError> {
        let stderr = sandbox::StderrTail::default();
        let state = State {
            // No preopened directories, no environment, no arguments: WASI here is only
            // clocks, randomness, an empty stdin, a stdout that goes nowhere and a stderr
            // kept for a panic's message.
            wasi: WasiCtx::builder().stderr(stderr.clone()).build(),
            stderr,
            table: ResourceTable::new(),
            limiter: sandbox::MemoryLimiter::new(self.limits.memory_bytes),
            watch: sandbox::Watch {
                stop: context.stop.clone(),
                deadline: Instant::now() + self.limits.call_timeout,
            },
            log: sandbox::LogBudget::default(),
            http: WasiHttpCtx::new(),
            grants: Grants {
                allowed: grant(&self.info.hosts, settings),
                denied: Vec::new(),
            },
            context,
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|state| &mut state.limiter);
        // The engine counts fuel for every plugin; a type without a budget gets all the
        // fuel there is, which no call can spend.
        store
            .set_fuel(self.limits.fuel.unwrap_or(u64::MAX))
            .map_err(|e| PluginError::Host(format!("setting the fuel budget: {e}")))?;
        // Every tick the callback decides: stop (cancel, shutdown, past the deadline) or
        // run one tick more. A call therefore stops within a tick of being told to.
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(|store| {
            if store.data().watch.should_stop() {
                Ok(UpdateDeadline::Interrupt)
            } else {
                Ok(UpdateDeadline::Continue(1))
            }
        });
        Ok(store)
    }

    /// A failure after a refused request is the refusal's fault, whatever the plugin made
    /// of it ("connection reset", "unavailable"): said so, with the hosts involved, so
    /// it is not retried as a passing failure.
    fn denied(&self, store: &Store<State>, error: PluginError) -> PluginError {
        let grants = &store.data().grants;
        match error {
            _ if error.is_the_servers() => error,
            _ if !grants.denied.is_empty() => PluginError::Denied {
                hosts: grants.denied.join(", "),
                granted: if grants.allowed.is_empty() {
                    "none".into()
                } else {
                    grants.allowed.join(", ")
                },
            },
            _ => error,
        }
    }

    /// What a call that ended in an error from wasmtime means for the user: which limit
    /// stopped it, or the crash.
    fn trap(&self, error: wasmtime::Error, store: &Store<State>) -> PluginError {
        let trap = error.downcast_ref::<wasmtime::Trap>();
        if trap == Some(&wasmtime::Trap::Interrupt) {
            return match store.data().context.stop.reason() {
                Some(StopReason::Cancelled) => PluginError::Cancelled,
                Some(StopReason::Shutdown) => PluginError::Shutdown,
                None => PluginError::Timeout(self.limits.call_timeout),
            };
        }
        if trap == Some(&wasmtime::Trap::OutOfFuel) {
            return PluginError::OutOfFuel(self.limits.fuel.unwrap_or(u64::MAX));
        }
        // A refused memory growth traps with wasmtime's words about growing memory.
        if store.data().limiter.exhausted {
            tracing::warn!(plugin = %self.source, "plugin ran out of memory: {error:#}");
            return PluginError::OutOfMemory(self.limits.memory_bytes);
        }
        // A Rust plugin's panic message says what went wrong; otherwise the root cause
        // is the useful line ("unreachable"). The backtrace goes to the log.
        tracing::warn!(plugin = %self.source, "plugin trapped: {error:?}");
        let reason = match (store.data().stderr.panic_message(), trap) {
            (Some(message), _) => message,
            (None, Some(trap)) => trap.to_string(),
            (None, None) => error.root_cause().to_string(),
        };
        PluginError::Trap(reason)
    }

    /// What a call's result means, the same for all six calls: a trap becomes the limit
    /// or crash that caused it, the plugin's own error its `PluginError`, and either one
    /// after a refused request the refusal (see [`Plugin::denied`]).
    fn outcome<T>(
        &self,
        store: &Store<State>,
        result: wasmtime::Result<Result<T, wit::Error>>,
    ) -> Result<T, PluginError> {
        result
            .map_err(|e| self.trap(e, store))
            .and_then(|answer| answer.map_err(PluginError::from))
            .map_err(|e| self.denied(store, e))
    }

    /// Runs one call and counts it, and its failure, in the server's metrics.
    fn counted<T>(
        &self,
        call: &'static str,
        run: impl FnOnce() -> Result<T, PluginError>,
    ) -> Result<T, PluginError> {
        let result = run();
        let labels = [("target", self.info.target.as_str()), ("call", call)];
        crate::metrics::inc("conductor_plugin_calls_total", &labels);
        if let Err(e) = &result
            && !matches!(e, PluginError::Cancelled | PluginError::Shutdown)
        {
            crate::metrics::inc("conductor_plugin_call_failures_total", &labels);
        }
        result
    }

    /// Builds the image for this plugin's target from `base` into a new file at `output`,
    /// which the plugin may not write past `output_limit` bytes.
    pub fn build(
        &self,
        context: CallContext,
        template: &TemplateFacts,
        base: &Path,
        output: &Path,
        output_limit: u64,
        parameters: &[(String, String)],
    ) -> Result<BuildOutput, PluginError> {
        self.counted("build", || {
            let (mut store, instance) = self.instantiate(context, &[])?;
            let reader = DiskReader::open(base)
                .map_err(|e| PluginError::Host(format!("opening the base disk: {e}")))?;
            let writer = DiskWriter::create(output, output_limit)
                .map_err(|e| PluginError::Host(format!("creating the output disk: {e}")))?;
            let table = &mut store.data_mut().table;
            let reader = table
                .push(reader)
                .map_err(|e| PluginError::Host(e.to_string()))?;
            let writer = table
                .push(writer)
                .map_err(|e| PluginError::Host(e.to_string()))?;
            let writer_handle = Resource::<DiskWriter>::new_borrow(writer.rep());
            let template = wit::Template {
                xml: template.xml.clone(),
                name: template.name.clone(),
                os_name: template.os_name.clone(),
                os_version: template.os_version.clone(),
                arch: template.arch.clone(),
                disk_size: template.disk_size,
            };
            let result = instance.conductor_provider_provider().call_build(
                &mut store,
                &template,
                Resource::new_borrow(reader.rep()),
                writer_handle,
                parameters,
            );
            let result = self.outcome(&store, result);
            let writer = store
                .data()
                .table
                .get(&writer)
                .map_err(|e| PluginError::Host(e.to_string()))?;
            let output = result.map_err(|error| match error {
                // The sandbox's own reasons stand as they are.
                _ if error.is_the_servers() => error,
                // A plugin that gives up (or crashes) after a write was refused failed
                // because of the limit, whatever words it found for it.
                _ if writer.refused() => PluginError::ImageTooLarge {
                    limit: output_limit,
                    reason: error.to_string(),
                },
                _ => error,
            })?;
            writer
                .sync()
                .map_err(|e| PluginError::Host(format!("flushing the image: {e}")))?;
            Ok(BuildOutput {
                format: format_from_wit(output.format),
                virtual_size: output.virtual_size,
            })
        })
    }

    /// Pushes the image at `image` to the account; returns the provider's identifier.
    pub fn push(
        &self,
        context: CallContext,
        target: &Target,
        image: &Path,
        name: &str,
        parameters: &[(String, String)],
    ) -> Result<String, PluginError> {
        self.counted("push", || {
            let (mut store, instance) = self.instantiate(context, &target.settings)?;
            let reader = DiskReader::open(image)
                .map_err(|e| PluginError::Host(format!("opening the image: {e}")))?;
            let reader = store
                .data_mut()
                .table
                .push(reader)
                .map_err(|e| PluginError::Host(e.to_string()))?;
            let (provider, account) = wit_target(target);
            let result = instance.conductor_provider_provider().call_push(
                &mut store,
                &provider,
                &account,
                Resource::new_borrow(reader.rep()),
                name,
                parameters,
            );
            self.outcome(&store, result)
        })
    }

    /// Asks the provider whether the account's credentials work.
    pub fn check_account(&self, context: CallContext, target: &Target) -> Result<(), PluginError> {
        self.counted("check-account", || {
            let (mut store, instance) = self.instantiate(context, &target.settings)?;
            let (provider, account) = wit_target(target);
            let result = instance
                .conductor_provider_provider()
                .call_check_account(&mut store, &provider, &account);
            self.outcome(&store, result)
        })
    }
}

/// What `lookup` found on the provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageDetails {
    pub target_identifier: String,
    pub name: String,
    pub arch: String,
}

impl Plugin {
    /// Removes an image from the provider.
    pub fn delete(
        &self,
        context: CallContext,
        target: &Target,
        identifier: &str,
    ) -> Result<(), PluginError> {
        self.counted("delete", || {
            let (mut store, instance) = self.instantiate(context, &target.settings)?;
            let (provider, account) = wit_target(target);
            let result = instance
                .conductor_provider_provider()
                .call_delete(&mut store, &provider, &account, identifier);
            self.outcome(&store, result)
        })
    }

    /// Finds an existing image on the provider.
    pub fn lookup(
        &self,
        context: CallContext,
        target: &Target,
        identifier: &str,
    ) -> Result<ImageDetails, PluginError> {
        self.counted("lookup", || {
            let (mut store, instance) = self.instantiate(context, &target.settings)?;
            let (provider, account) = wit_target(target);
            let result = instance
                .conductor_provider_provider()
                .call_lookup(&mut store, &provider, &account, identifier);
            let details = self.outcome(&store, result)?;
            Ok(ImageDetails {
                target_identifier: details.target_identifier,
                name: details.name,
                arch: details.arch,
            })
        })
    }
}

fn wit_target(target: &Target) -> (wit::Provider, wit::Account) {
    (
        wit::Provider {
            name: target.provider_name.clone(),
            settings: target.settings.clone(),
        },
        wit::Account {
            name: target.account_name.clone(),
            credentials: target.credentials.clone(),
        },
    )
}

/// How a plugin's memory slot is made blank for the next call (`--plugin-memory-reset`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MemoryReset {
    /// Every page is given back to the kernel (madvise); the next call faults in fresh
    /// zero pages. Nothing a call wrote can reach the next call in the slot.
    #[default]
    Release,
    /// The pages a call wrote are found with Linux's PAGEMAP_SCAN and zeroed in place,
    /// and stay resident: calls take about half the time. But wasmtime 48's scan skips
    /// a written page that is not resident at that moment (swapped out, or being moved
    /// by the kernel's compaction), which then keeps the last call's data: for servers
    /// whose plugins and accounts all belong to one tenant.
    Scan,
}

impl std::str::FromStr for MemoryReset {
    type Err = String;

    fn from_str(text: &str) -> Result<MemoryReset, String> {
        match text {
            "release" => Ok(MemoryReset::Release),
            "scan" => Ok(MemoryReset::Scan),
            other => Err(format!("'{other}' is not a memory reset: release or scan")),
        }
    }
}

/// What a memory slot keeps resident between calls when written pages are zeroed in
/// place: 128 pages, more than a short call writes. Across the 128 slots of the pool that
/// is at most 64 MiB held by idle slots.
const KEEP_RESIDENT: usize = 512 << 10;

/// Whether a page of this process could be swapped out: an active swap area is listed in
/// /proc/swaps, unless this process's cgroup may use none (memory.swap.max is 0). When
/// in doubt (a file cannot be read) it answers yes. Swap turned on after the server
/// started is not seen: restart it after `swapon`.
fn swap_possible() -> bool {
    let areas = match std::fs::read_to_string("/proc/swaps") {
        // The first line is the header.
        Ok(text) => text.lines().skip(1).any(|line| !line.trim().is_empty()),
        Err(_) => return true,
    };
    if !areas {
        return false;
    }
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let path = cgroup
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .unwrap_or("/");
    let max = std::fs::read_to_string(format!(
        "/sys/fs/cgroup{}/memory.swap.max",
        path.trim_end_matches('/')
    ));
    !matches!(max.as_deref().map(str::trim), Ok("0"))
}

/// The engine and every loaded plugin, by target name.
pub struct Plugins {
    engine: Engine,
    linker: Linker<State>,
    /// The limits of provider types no `--plugin-limit` names.
    default_limits: Limits,
    /// The limits of the provider types `--plugin-limit` names, by target name.
    limits_by_target: BTreeMap<String, Limits>,
    loaded: RwLock<BTreeMap<String, Arc<Plugin>>>,
    /// Compiled components, `<sha256 of the wasm>.cwasm`, so a restart does not compile
    /// again. Written only by this server.
    cache: Option<PathBuf>,
    /// The folder of extra plugins, read at start and on a rescan.
    dir: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{source_name}: not a usable plugin component: {reason}")]
    Invalid { source_name: String, reason: String },
    #[error("{source_name}: its info() failed: {reason}")]
    Info { source_name: String, reason: String },
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("wasmtime: {0}")]
    Engine(String),
}

impl Plugins {
    /// Sets up the engine (with epoch interruption for call deadlines) and a thread that
    /// advances the epoch. Calls run under `limits`, changed for the provider types (or
    /// all, for `*`) that `settings` name, later settings winning.
    pub fn new(
        limits: Limits,
        settings: &[PluginLimit],
        reset: MemoryReset,
        cache: Option<PathBuf>,
        dir: Option<PathBuf>,
    ) -> Result<Plugins, LoadError> {
        let default_limits = settings
            .iter()
            .filter(|s| s.is_default())
            .fold(limits, |limits, s| limits.with(s));
        let mut limits_by_target = BTreeMap::new();
        for setting in settings.iter().filter(|s| !s.is_default()) {
            let limits: &mut Limits = limits_by_target
                .entry(setting.target.clone())
                .or_insert_with(|| default_limits.clone());
            *limits = limits.with(setting);
        }
        let largest_memory = std::iter::once(&default_limits)
            .chain(limits_by_target.values())
            .map(|l| l.memory_bytes)
            .max()
            .unwrap_or(0);

        let mut config = Config::new();
        config.epoch_interruption(true);
        // Fuel is counted for every plugin, so that any provider type can be given a
        // budget; counting costs nothing measurable (benches/plugins.rs: within the noise
        // of instantiate + call, about 24 µs either way).
        config.consume_fuel(true);
        // Pre-reserved slots make instantiation a matter of microseconds. The pool is
        // sized for the workers and API calls that run plugins at once, with room to spare.
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(128)
            .total_core_instances(512)
            .total_memories(128)
            .total_tables(512)
            .total_stacks(128)
            .max_memory_size(largest_memory)
            // A plugin's tables are a page or so: zeroing them in place is cheaper than
            // giving the page back and faulting it in at the next call.
            .table_keep_resident(64 << 10);
        // Resetting a memory slot with madvise gives every page back, and the next call
        // takes a page fault for each one it touches again: some forty for a trivial call,
        // most of its 25 µs. The scan reset zeroes only what a call wrote and keeps it
        // resident (see MemoryReset::Scan for why it is not the default).
        if reset == MemoryReset::Scan {
            if swap_possible() {
                tracing::warn!(
                    "--plugin-memory-reset scan ignored: swap is active, and a swapped-out page would escape the reset"
                );
            } else if !PoolingAllocationConfig::is_pagemap_scan_available() {
                tracing::warn!(
                    "--plugin-memory-reset scan ignored: this kernel has no PAGEMAP_SCAN (Linux 6.7+)"
                );
            } else {
                pool.linear_memory_keep_resident(KEEP_RESIDENT)
                    .pagemap_scan(wasmtime::Enabled::Yes);
                // Said once, so an operator (and the sandbox test) can tell the mode
                // in effect from one that was asked for and refused above.
                tracing::info!(
                    "plugin memory reset: scan (written pages zeroed in place, kept resident)"
                );
            }
        }
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config).map_err(|e| LoadError::Engine(e.to_string()))?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)
            .map_err(|e| LoadError::Engine(e.to_string()))?;
        sandbox::add_interruptible_waits(&mut linker)
            .map_err(|e| LoadError::Engine(e.to_string()))?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_sync(&mut linker)
            .map_err(|e| LoadError::Engine(e.to_string()))?;
        bindings::ProviderPlugin::add_to_linker::<State, HasSelf<State>>(&mut linker, |state| {
            state
        })
        .map_err(|e| LoadError::Engine(e.to_string()))?;
        let weak = engine.weak();
        std::thread::Builder::new()
            .name("plugin-epoch".into())
            .spawn(move || {
                while let Some(engine) = weak.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(EPOCH_TICK);
                }
            })
            .map_err(|e| LoadError::Engine(e.to_string()))?;
        if let Some(cache) = &cache {
            std::fs::create_dir_all(cache).map_err(|error| LoadError::Io {
                path: cache.clone(),
                error,
            })?;
        }
        Ok(Plugins {
            engine,
            linker,
            default_limits,
            limits_by_target,
            loaded: RwLock::new(BTreeMap::new()),
            cache,
            dir,
        })
    }

    /// The limits calls of a provider type run under.
    pub fn limits_for(&self, target: &str) -> Limits {
        self.limits_by_target
            .get(target)
            .unwrap_or(&self.default_limits)
            .clone()
    }

    /// The folder of extra plugins, if one was configured.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// The compiled component: from the cache when a compatible one is there, else
    /// compiled now and cached.
    fn compile(&self, bytes: &[u8]) -> wasmtime::Result<Component> {
        let Some(cache) = &self.cache else {
            return Component::new(&self.engine, bytes);
        };
        use sha2::Digest;
        let key = crate::blobs::hex(&sha2::Sha256::digest(bytes));
        let path = cache.join(format!("{key}.cwasm"));
        if path.exists() {
            // SAFETY: deserializing runs machine code from the file. The cache folder is
            // written only by this server, under a name derived from the wasm's own hash;
            // wasmtime also refuses files from another engine version or configuration,
            // which are then compiled again below.
            match unsafe { Component::deserialize_file(&self.engine, &path) } {
                Ok(component) => return Ok(component),
                Err(e) => tracing::info!("recompiling a stale cache entry {}: {e}", path.display()),
            }
        }
        let component = Component::new(&self.engine, bytes)?;
        match component.serialize() {
            Ok(compiled) => {
                let temp = path.with_extension("tmp");
                let written =
                    std::fs::write(&temp, compiled).and_then(|()| std::fs::rename(&temp, &path));
                if let Err(e) = written {
                    tracing::warn!(
                        "could not cache a compiled plugin in {}: {e}",
                        path.display()
                    );
                }
            }
            Err(e) => tracing::warn!("could not serialize a compiled plugin: {e}"),
        }
        Ok(component)
    }

    /// Compiles a component, checks it links against what the host offers, asks it for
    /// its info and registers it under its target name (replacing an older one).
    pub fn load(&self, source_name: &str, bytes: &[u8]) -> Result<Arc<Plugin>, LoadError> {
        let invalid = |reason: String| LoadError::Invalid {
            source_name: source_name.to_owned(),
            reason,
        };
        let component = self.compile(bytes).map_err(|e| invalid(format!("{e:#}")))?;
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| invalid(link_problem(&e)))?;
        let pre = bindings::ProviderPluginPre::new(pre).map_err(|e| invalid(format!("{e:#}")))?;
        let mut plugin = Plugin {
            info: Info {
                target: String::new(),
                display_name: String::new(),
                version: String::new(),
                credentials: Vec::new(),
                settings: Vec::new(),
                format: DiskFormat::Raw,
                hosts: Vec::new(),
                needs: OsNeeds::default(),
            },
            source: source_name.to_owned(),
            pre,
            engine: self.engine.clone(),
            limits: Limits {
                // info() is a description, not work: it gets seconds, not an hour.
                call_timeout: Duration::from_secs(5),
                ..self.default_limits.clone()
            },
        };
        // `target` is optional (0.1.0 plugins lack it), but one exported with other
        // types is a broken plugin, not an old one.
        let target_indices = match component.get_export_index(None, TARGET_EXPORT) {
            None => None,
            Some(_) => Some(
                target_bindings::TargetPluginIndices::new(plugin.pre.instance_pre())
                    .map_err(|e| invalid(format!("its `target` interface: {e:#}")))?,
            ),
        };
        let context = CallContext::quiet(format!("load {source_name}"));
        let (mut store, instance) =
            plugin
                .instantiate_raw(context, &[])
                .map_err(|e| LoadError::Info {
                    source_name: source_name.to_owned(),
                    reason: e.to_string(),
                })?;
        let called = |e: wasmtime::Error, store: &Store<State>| LoadError::Info {
            source_name: source_name.to_owned(),
            reason: plugin.trap(e, store).to_string(),
        };
        let info = bindings::ProviderPlugin::new(&mut store, &instance)
            .and_then(|p| p.conductor_provider_provider().call_info(&mut store))
            .map_err(|e| called(e, &store))?;
        let needs = match &target_indices {
            None => OsNeeds::default(),
            Some(indices) => {
                let needs = indices
                    .load(&mut store, &instance)
                    .and_then(|t| t.conductor_provider_target().call_needs(&mut store))
                    .map_err(|e| called(e, &store))?;
                os_needs(needs).map_err(invalid)?
            }
        };
        if info.target.is_empty()
            || !info
                .target
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(invalid(format!(
                "target name {:?} must be non-empty letters, digits, '-' or '_'",
                info.target
            )));
        }
        plugin.info = Info {
            target: info.target,
            display_name: info.display_name,
            version: info.version,
            credentials: info
                .credentials
                .into_iter()
                .map(|c| {
                    let optional = c.input_type.ends_with('?');
                    CredentialDefinition {
                        name: c.name,
                        label: c.label,
                        input_type: c.input_type.trim_end_matches('?').to_owned(),
                        optional,
                    }
                })
                .collect(),
            settings: info.settings,
            format: format_from_wit(info.format),
            hosts: info.hosts,
            needs,
        };
        plugin.limits = self.limits_for(&plugin.info.target);
        let plugin = Arc::new(plugin);
        self.loaded
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(plugin.info.target.clone(), plugin.clone());
        tracing::info!(
            target_name = %plugin.info.target,
            version = %plugin.info.version,
            source = %source_name,
            memory_mib = plugin.limits.memory_bytes >> 20,
            timeout = ?plugin.limits.call_timeout,
            fuel = ?plugin.limits.fuel,
            "loaded plugin"
        );
        Ok(plugin)
    }

    /// Loads the plugins compiled into the server.
    pub fn load_bundled(&self) -> Result<(), LoadError> {
        for (name, bytes) in BUNDLED {
            self.load(&format!("bundled:{name}.wasm"), bytes)?;
        }
        Ok(())
    }

    /// Loads every `*.wasm` in `dir`, in name order. A plugin that fails to load is
    /// reported and skipped, so one bad file does not keep the server down.
    pub fn load_dir(&self, dir: &Path) -> Result<Vec<LoadError>, LoadError> {
        let entries = std::fs::read_dir(dir).map_err(|error| LoadError::Io {
            path: dir.to_owned(),
            error,
        })?;
        let mut paths: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "wasm"))
            .collect();
        paths.sort();
        let mut failures = Vec::new();
        for path in paths {
            let bytes = match std::fs::read(&path) {
                Ok(bytes) => bytes,
                Err(error) => {
                    failures.push(LoadError::Io { path, error });
                    continue;
                }
            };
            if let Err(e) = self.load(&path.display().to_string(), &bytes) {
                tracing::error!("{e}");
                failures.push(e);
            }
        }
        Ok(failures)
    }

    /// The plugin for a target name.
    pub fn get(&self, target: &str) -> Option<Arc<Plugin>> {
        self.loaded
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(target)
            .cloned()
    }

    /// Every loaded plugin, by target name.
    /// The packages `targets` need in their images, each with the first target that
    /// needs it, in order and without repeats.
    pub fn needed_packages(&self, targets: &[String]) -> Vec<(String, String)> {
        let mut needed: Vec<(String, String)> = Vec::new();
        for target in targets {
            let Some(plugin) = self.get(target) else {
                continue;
            };
            for package in &plugin.info.needs.packages {
                if !needed.iter().any(|(_, p)| p == package) {
                    needed.push((target.clone(), package.clone()));
                }
            }
        }
        needed
    }

    pub fn all(&self) -> Vec<Arc<Plugin>> {
        self.loaded
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .values()
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod grant_tests {
    use super::grant;

    fn strings(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    fn settings(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn url_settings_are_granted_only_where_a_declared_pattern_covers_them() {
        let patterns = strings(&["*.amazonaws.com", "127.0.0.1"]);
        let granted = grant(
            &patterns,
            &settings(&[
                ("endpoint", "http://127.0.0.1:5055/"),
                ("url", "https://evil.example.com/api"),
            ]),
        );
        assert_eq!(granted, strings(&["127.0.0.1:5055"]));
    }

    #[test]
    fn placeholders_are_filled_from_settings_and_cannot_name_another_domain() {
        let patterns = strings(&["ec2.{region|deltacloud_provider}.amazonaws.com"]);
        assert_eq!(
            grant(&patterns, &settings(&[("region", "eu-west-1")])),
            strings(&["ec2.eu-west-1.amazonaws.com"])
        );
        assert_eq!(
            grant(
                &patterns,
                &settings(&[("deltacloud_provider", "us-east-1")])
            ),
            strings(&["ec2.us-east-1.amazonaws.com"])
        );
        // A value that would smuggle in another host grants nothing.
        assert!(grant(&patterns, &settings(&[("region", "x.evil.com/")])).is_empty());
        assert!(grant(&patterns, &settings(&[("region", "a:1@evil")])).is_empty());
        // No value, no grant.
        assert!(grant(&patterns, &[]).is_empty());
    }
}

#[cfg(test)]
mod version_tests {
    use super::*;
    use crate::model::Firmware;

    fn plugins() -> Plugins {
        Plugins::new(Limits::default(), &[], MemoryReset::default(), None, None).expect("engine")
    }

    fn test_plugin(name: &str) -> Vec<u8> {
        let dir = Path::new(env!("CONDUCTOR_TEST_PLUGINS"));
        let path = [
            dir.join(format!("{name}.wasm")),
            dir.join("sandbox").join(format!("{name}.wasm")),
        ]
        .into_iter()
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("{name}.wasm under {}", dir.display()));
        std::fs::read(path).expect("read the test plugin")
    }

    /// `testbed` is built against conductor:provider@0.1.0 as released; `hostile`
    /// against 0.1.1's `provider-plugin` world, without `target`; `mock` against the
    /// whole of 0.1.1.
    #[test]
    fn plugins_of_every_0_1_version_load_and_say_what_their_images_need() {
        let plugins = plugins();
        let old = plugins
            .load("testbed.wasm", &test_plugin("testbed"))
            .expect("a 0.1.0 plugin loads");
        assert_eq!(old.info.needs, OsNeeds::default());
        let without = plugins
            .load("hostile.wasm", &test_plugin("hostile"))
            .expect("a plugin without `target` loads");
        assert_eq!(without.info.needs, OsNeeds::default());
        let (_, mock) = BUNDLED
            .iter()
            .find(|(name, _)| *name == "mock")
            .expect("mock");
        let mock = plugins.load("mock.wasm", mock).expect("mock loads");
        assert_eq!(mock.info.needs, OsNeeds::default());
        let (_, ec2) = BUNDLED
            .iter()
            .find(|(name, _)| *name == "ec2")
            .expect("ec2");
        let ec2 = plugins.load("ec2.wasm", ec2).expect("ec2 loads");
        assert_eq!(
            ec2.info.needs,
            OsNeeds {
                packages: vec!["cloud-init".into(), "openssh-server".into()],
                firmware: vec![Firmware::Uefi, Firmware::Bios],
            }
        );
        assert_eq!(
            plugins.needed_packages(&["mock".into(), "ec2".into(), "testbed".into()]),
            [
                ("ec2".to_owned(), "cloud-init".to_owned()),
                ("ec2".to_owned(), "openssh-server".to_owned()),
            ]
        );
    }

    #[test]
    fn needs_that_are_not_package_names_are_refused() {
        let needs = |packages: &[&str]| wit_target::OsNeeds {
            packages: packages.iter().map(|p| p.to_string()).collect(),
            firmware: vec![wit_target::Firmware::Bios, wit_target::Firmware::Bios],
        };
        assert_eq!(
            os_needs(needs(&["cloud-init"])).expect("fine").firmware,
            [Firmware::Bios]
        );
        for bad in ["-y", "a b", "x;rm", "", "é1"] {
            let e = os_needs(needs(&[bad])).expect_err(bad);
            assert!(e.contains("not a package name"), "{e}");
        }
    }
}
