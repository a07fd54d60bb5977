//! The engine and the loaded plugins: compiling components (with a cache of compiled
//! code), checking what they import, asking each for its info and its needs, and
//! finding the plugin for a target.

use super::*;

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
fn os_needs(needs: wit_target::OsNeeds) -> Result<OsNeeds, crate::os::Refusal> {
    for name in &needs.packages {
        crate::os::package_name(name)?;
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

pub(super) fn format_from_wit(format: wit::DiskFormat) -> DiskFormat {
    match format {
        wit::DiskFormat::Raw => DiskFormat::Raw,
        wit::DiskFormat::Qcow2 => DiskFormat::Qcow2,
        wit::DiskFormat::Vmdk => DiskFormat::Vmdk,
    }
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
        use std::hash::{Hash, Hasher};
        // Named by the wasm and by the engine's settings that compiled code depends on,
        // so servers with other settings sharing the folder keep apart entries.
        let mut engine = std::collections::hash_map::DefaultHasher::new();
        self.engine
            .precompile_compatibility_hash()
            .hash(&mut engine);
        let key = crate::blobs::hex(&sha2::Sha256::digest(bytes));
        let path = cache.join(format!("{key}-{:016x}.cwasm", engine.finish()));
        if path.exists() {
            // SAFETY: deserializing runs machine code from the file. The cache folder is
            // written only by servers of the operator's (--plugin-cache), each file renamed
            // into place whole, under a name derived from the wasm's own hash;
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
                // A name of this process's own: servers sharing the folder may compile
                // the same plugin at once, and each renames a whole file into place.
                let temp = path.with_extension(format!(
                    "{}.{:x}.tmp",
                    std::process::id(),
                    rand::random::<u64>()
                ));
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
                os_needs(needs).map_err(|e| invalid(format!("its needs are refused: {e}")))?
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
            let e = os_needs(needs(&[bad])).expect_err(bad).to_string();
            assert!(e.contains("not a package name"), "{e}");
        }
    }
}
