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
mod grants;
mod host;
mod limits;
mod loading;
mod sandbox;

pub use disk::{DiskReader, DiskWriter, create_blank};
use grants::Grants;
pub use grants::grant;
pub use limits::{LimitSyntaxError, Limits, PluginLimit, parse_duration};
use loading::format_from_wit;
pub use loading::{LoadError, MemoryReset, Plugins};

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
use wasmtime_wasi_http::WasiHttpCtx;

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
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StateError>;
    /// `Ok(false)` when the provider holds too many keys already.
    fn set(&self, key: &str, value: &[u8], max_keys: usize) -> Result<bool, StateError>;
    fn delete(&self, key: &str) -> Result<(), StateError>;
    fn keys(&self, prefix: &str, limit: usize) -> Result<Vec<String>, StateError>;
}

/// The storage under a [`StateStore`] failed; the cause is kept as its source, for the
/// log (a plugin is told only that its write failed).
#[derive(Debug, thiserror::Error)]
#[error("the plugin state store failed")]
pub struct StateError(#[source] pub Box<dyn std::error::Error + Send + Sync>);

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

impl WasiView for State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
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
