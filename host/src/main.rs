//! The `conductor` command. Thin: parses flags, sets up logging, hands over to the
//! library.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "conductor",
    version,
    about = "A cloud image server with WebAssembly provider plugins"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    connection: conductor::client::Connection,
    /// A TOML file of server settings (see the README's table); flags and environment
    /// variables override it.
    #[arg(long, global = true, env = "CONDUCTOR_CONFIG")]
    config: Option<PathBuf>,
    /// Log lines as text, or as JSON objects (one per line) for log collectors.
    #[arg(long, global = true, env = "CONDUCTOR_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq)]
enum LogFormat {
    Text,
    Json,
}

// Parsed once at start and matched at once: the size of `Serve` costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve {
        /// Address to listen on; port 0 picks a free port (the chosen address is printed).
        #[arg(long, env = "CONDUCTOR_LISTEN", default_value = "127.0.0.1:3000")]
        listen: String,
        /// Folder for the database, image files and work in progress.
        #[arg(long, env = "CONDUCTOR_DATA", default_value = "./data")]
        data: PathBuf,
        /// A folder of extra plugins (`*.wasm` components), loaded after the bundled ones.
        #[arg(long, env = "CONDUCTOR_PLUGINS")]
        plugins: Option<PathBuf>,
        /// The server's public URL, used for hrefs when it sits behind a proxy.
        #[arg(long, env = "CONDUCTOR_EXTERNAL_URL")]
        external_url: Option<String>,
        /// The 32-byte key file that seals account credentials (created with mode 0600 if
        /// missing); defaults to <data>/credentials.key.
        #[arg(long, env = "CONDUCTOR_CREDENTIALS_KEY")]
        credentials_key: Option<PathBuf>,
        /// A folder from which builds may take base images given as file:// URLs.
        #[arg(long, env = "CONDUCTOR_IMPORT_DIR")]
        import_dir: Option<PathBuf>,
        /// How many builds and pushes run at once.
        #[arg(long, env = "CONDUCTOR_WORKERS", default_value_t = 4)]
        workers: usize,
        /// How many builds (and, separately, pushes) for one target run at once; 0 for no
        /// limit beyond --workers.
        #[arg(long, env = "CONDUCTOR_MAX_PER_TARGET", default_value_t = 0)]
        max_per_target: usize,
        /// How many jobs of one environment run at once (its fair share of the workers);
        /// 0 for no limit beyond --workers. Unset, every worker but one, so another
        /// environment's job always finds a worker. An environment's quota may set less.
        #[arg(long, env = "CONDUCTOR_MAX_PER_ENVIRONMENT")]
        max_per_environment: Option<usize>,
        /// Limits of one provider type's plugin calls, or of all with `*`; repeatable:
        /// TARGET:memory=64MiB,timeout=30s,fuel=1000000000 (any of the three). Entries in
        /// the environment variable are separated by ';'.
        #[arg(
            long = "plugin-limit",
            env = "CONDUCTOR_PLUGIN_LIMITS",
            value_delimiter = ';'
        )]
        plugin_limits: Vec<conductor::plugins::PluginLimit>,
        /// How a plugin's memory is made blank between calls: `release` gives every page
        /// back (nothing a call wrote can reach the next); `scan` zeroes the pages a call
        /// wrote in place, about twice as fast, but a page the kernel is swapping or moving
        /// at that moment keeps its data: only for servers with a single tenant.
        #[arg(
            long = "plugin-memory-reset",
            env = "CONDUCTOR_PLUGIN_MEMORY_RESET",
            default_value = "release"
        )]
        plugin_memory_reset: conductor::plugins::MemoryReset,
        /// Where compiled plugins are kept (default `<data>/plugin-cache`). Servers of
        /// one build on one machine may share it; it runs as machine code, so only the
        /// server's user may write there.
        #[arg(long, env = "CONDUCTOR_PLUGIN_CACHE")]
        plugin_cache: Option<PathBuf>,
        /// A PEM certificate chain: with --tls-key, the API is served over HTTPS only.
        #[arg(long, env = "CONDUCTOR_TLS_CERT", requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// The PEM private key of --tls-cert.
        #[arg(long, env = "CONDUCTOR_TLS_KEY", requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Hosts and address ranges that base image downloads and webhooks may reach
        /// although they are not public (loopback, private, link-local): host names,
        /// addresses or CIDR ranges, comma-separated (`mirror.lan,10.1.0.0/16`).
        #[arg(long, env = "CONDUCTOR_FETCH_ALLOW", value_delimiter = ',')]
        fetch_allow: Vec<String>,
        /// The largest image a build may make or start from: a template's disk size, a
        /// base image's download and its virtual size (G, T, MiB, … as in TDL).
        #[arg(long, env = "CONDUCTOR_MAX_IMAGE_SIZE", default_value = "128G", value_parser = parse_size)]
        max_image_size: u64,
        /// Seconds a base image download may take in all.
        #[arg(long, env = "CONDUCTOR_FETCH_TIMEOUT", default_value_t = 3600)]
        fetch_timeout: u64,
        /// Seconds a download may go without receiving anything before it fails.
        #[arg(long, env = "CONDUCTOR_FETCH_STALL", default_value_t = 60)]
        fetch_stall: u64,
        // What one client may hold and how password checks are bounded.
        #[command(flatten)]
        edge: Box<EdgeLimits>,
        // Where OS installs may fetch from, and what they may take.
        #[command(flatten)]
        os: Box<OsLimits>,
    },
    /// Build, push, list, show, import and delete images on a server.
    #[command(subcommand)]
    Image(conductor::client::ImageCommand),
    /// Manage a server's providers.
    #[command(subcommand)]
    Provider(conductor::client::ProviderCommand),
    /// Manage a server's provider accounts.
    #[command(subcommand)]
    Account(conductor::client::AccountCommand),
}

/// OS installs: the mirrors they may use, their deadlines, their cache (docs/os-builds.md).
#[derive(clap::Args)]
struct OsLimits {
    /// Package mirrors OS installs may fetch from, as URL prefixes, comma-separated. A
    /// template's install url and repositories must start with one of them. Unset: the
    /// mirrors this machine's apt sources name.
    #[arg(long, env = "CONDUCTOR_OS_MIRROR", value_delimiter = ',')]
    os_mirror: Vec<String>,
    /// Seconds one step of an OS install (the package install, a filesystem) may take.
    #[arg(long, env = "CONDUCTOR_OS_STEP_TIMEOUT", default_value_t = 1800)]
    os_step_timeout: u64,
    /// Seconds one of a template's commands may take.
    #[arg(long, env = "CONDUCTOR_OS_COMMAND_TIMEOUT", default_value_t = 600)]
    os_command_timeout: u64,
    /// What the cache of installed trees and disks may hold (G, T, MiB, … as in TDL).
    #[arg(long, env = "CONDUCTOR_OS_CACHE_SIZE", default_value = "20G", value_parser = parse_size)]
    os_cache_size: u64,
    /// Where installed trees, finished disks and downloaded packages are kept (default
    /// `<data>/os-cache`); servers on one machine may share it.
    #[arg(long, env = "CONDUCTOR_OS_CACHE")]
    os_cache: Option<PathBuf>,
    /// What a build that does not say (`<parameter name='verify'>`) is checked with:
    /// `boot` boots every finished image in qemu to see it reach a login prompt.
    #[arg(long, env = "CONDUCTOR_VERIFY", default_value = "none", value_parser = ["none", "boot"])]
    verify: String,
    /// Seconds a boot check may wait for a login prompt (TCG takes about 30).
    #[arg(long, env = "CONDUCTOR_BOOT_CHECK_TIMEOUT", default_value_t = 300)]
    boot_check_timeout: u64,
}

impl OsLimits {
    fn settings(&self) -> conductor::os::Settings {
        conductor::os::Settings {
            mirrors: self.os_mirror.clone(),
            step_deadline: std::time::Duration::from_secs(self.os_step_timeout.max(1)),
            command_deadline: std::time::Duration::from_secs(self.os_command_timeout.max(1)),
            cache_limit: self.os_cache_size,
            cache_dir: self.os_cache.clone(),
            boot_deadline: std::time::Duration::from_secs(self.boot_check_timeout.max(1)),
            check_every_build: self.verify == "boot",
        }
    }
}

/// What one client may hold (connections, time to send a request) and how password
/// checks are bounded: the defences of docs/security.md.
#[derive(clap::Args)]
struct EdgeLimits {
    /// Connections served at once; more wait in the kernel's queue until one ends.
    /// Lowered, with a warning, when the open-file limit leaves too little room.
    #[arg(long, env = "CONDUCTOR_MAX_CONNECTIONS", default_value_t = 4096)]
    max_connections: usize,
    /// How long a client has to send a whole request head, from the start of its
    /// connection (over TLS: after the handshake, which gets as long) or from the
    /// previous answer.
    #[arg(long, env = "CONDUCTOR_HEADER_TIMEOUT", default_value = "10s", value_parser = nonzero_duration)]
    header_timeout: Duration,
    /// How long an answered connection is kept open waiting for the next request.
    #[arg(long, env = "CONDUCTOR_KEEP_ALIVE_TIMEOUT", default_value = "5s", value_parser = nonzero_duration)]
    keep_alive_timeout: Duration,
    /// How long a client has to send a request body once the server reads it (408
    /// after that).
    #[arg(long, env = "CONDUCTOR_BODY_TIMEOUT", default_value = "30s", value_parser = nonzero_duration)]
    body_timeout: Duration,
    /// Password checks (argon2, about 19 MiB each) run at once, and as many again for
    /// credentials that proved themselves before; default: twice the number of cores.
    #[arg(long, env = "CONDUCTOR_LOGIN_CHECKS")]
    login_checks: Option<usize>,
    /// How long a login waits for a free password check before it is refused (503).
    #[arg(long, env = "CONDUCTOR_LOGIN_CHECK_WAIT", default_value = "5s", value_parser = conductor::plugins::parse_duration)]
    login_check_wait: Duration,
    /// Wrong passwords a client address, or a user name, may send before each further
    /// attempt must wait (1 s, then twice as long each time; 429 until then); 0 turns
    /// the waits off.
    #[arg(long, env = "CONDUCTOR_LOGIN_FAILURES", default_value_t = 5)]
    login_failures: u32,
    /// The longest wait after wrong passwords.
    #[arg(long, env = "CONDUCTOR_LOGIN_MAX_WAIT", default_value = "5m", value_parser = nonzero_duration)]
    login_max_wait: Duration,
}

impl EdgeLimits {
    fn connections(&self) -> conductor::connections::Limits {
        conductor::connections::Limits {
            max_connections: self.max_connections,
            header_timeout: self.header_timeout,
            keep_alive_timeout: self.keep_alive_timeout,
            body_timeout: self.body_timeout,
        }
    }

    fn logins(&self) -> conductor::auth::LoginLimits {
        conductor::auth::LoginLimits {
            checks: self
                .login_checks
                .unwrap_or_else(|| conductor::auth::LoginLimits::default().checks),
            check_wait: self.login_check_wait,
            free_failures: self.login_failures,
            max_wait: self.login_max_wait,
        }
    }
}

/// Settings a config file may hold, each with the environment variable it stands for.
const SETTINGS: &[(&str, &str)] = &[
    ("listen", "CONDUCTOR_LISTEN"),
    ("data", "CONDUCTOR_DATA"),
    ("plugins", "CONDUCTOR_PLUGINS"),
    ("external_url", "CONDUCTOR_EXTERNAL_URL"),
    ("import_dir", "CONDUCTOR_IMPORT_DIR"),
    ("credentials_key", "CONDUCTOR_CREDENTIALS_KEY"),
    ("workers", "CONDUCTOR_WORKERS"),
    ("max_per_target", "CONDUCTOR_MAX_PER_TARGET"),
    ("max_per_environment", "CONDUCTOR_MAX_PER_ENVIRONMENT"),
    ("plugin_limits", "CONDUCTOR_PLUGIN_LIMITS"),
    ("plugin_memory_reset", "CONDUCTOR_PLUGIN_MEMORY_RESET"),
    ("plugin_cache", "CONDUCTOR_PLUGIN_CACHE"),
    ("tls_cert", "CONDUCTOR_TLS_CERT"),
    ("tls_key", "CONDUCTOR_TLS_KEY"),
    ("fetch_allow", "CONDUCTOR_FETCH_ALLOW"),
    ("max_image_size", "CONDUCTOR_MAX_IMAGE_SIZE"),
    ("fetch_timeout", "CONDUCTOR_FETCH_TIMEOUT"),
    ("fetch_stall", "CONDUCTOR_FETCH_STALL"),
    ("max_connections", "CONDUCTOR_MAX_CONNECTIONS"),
    ("header_timeout", "CONDUCTOR_HEADER_TIMEOUT"),
    ("keep_alive_timeout", "CONDUCTOR_KEEP_ALIVE_TIMEOUT"),
    ("body_timeout", "CONDUCTOR_BODY_TIMEOUT"),
    ("login_checks", "CONDUCTOR_LOGIN_CHECKS"),
    ("login_check_wait", "CONDUCTOR_LOGIN_CHECK_WAIT"),
    ("login_failures", "CONDUCTOR_LOGIN_FAILURES"),
    ("login_max_wait", "CONDUCTOR_LOGIN_MAX_WAIT"),
    ("os_mirror", "CONDUCTOR_OS_MIRROR"),
    ("os_step_timeout", "CONDUCTOR_OS_STEP_TIMEOUT"),
    ("os_command_timeout", "CONDUCTOR_OS_COMMAND_TIMEOUT"),
    ("os_cache_size", "CONDUCTOR_OS_CACHE_SIZE"),
    ("os_cache", "CONDUCTOR_OS_CACHE"),
    ("verify", "CONDUCTOR_VERIFY"),
    ("boot_check_timeout", "CONDUCTOR_BOOT_CHECK_TIMEOUT"),
    ("log", "CONDUCTOR_LOG"),
    ("log_format", "CONDUCTOR_LOG_FORMAT"),
];

/// A size flag, written as a TDL disk size is (`128G`, `512MiB`).
fn parse_size(raw: &str) -> Result<u64, conductor::model::tdl::SizeError> {
    conductor::model::tdl::parse_size(raw)
}

fn main() -> anyhow::Result<()> {
    // The OS installer's sandbox runs this binary to make a user namespace; that must
    // happen before any thread starts (os/userns.rs).
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args
        .get(1)
        .is_some_and(|a| a == conductor::os::userns::ENTRY)
    {
        conductor::os::userns::exec(&args[2..]);
    }
    apply_config_file()?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run())
}

/// A time for a flag where zero would make the server unusable.
fn nonzero_duration(value: &str) -> Result<Duration, String> {
    match conductor::plugins::parse_duration(value)? {
        zero if zero.is_zero() => Err("must be more than zero".into()),
        duration => Ok(duration),
    }
}

/// Reads the config file (`--config FILE` or CONDUCTOR_CONFIG) into the environment
/// variables its settings stand for, where those are not set already; flags and the
/// environment therefore win over the file, and clap reads all three the same way.
fn apply_config_file() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let path = args
        .windows(2)
        .find(|pair| pair[0] == "--config")
        .map(|pair| pair[1].clone())
        .or_else(|| {
            args.iter()
                .find_map(|a| a.strip_prefix("--config=").map(str::to_owned))
        })
        .or_else(|| std::env::var("CONDUCTOR_CONFIG").ok());
    let Some(path) = path else {
        return Ok(());
    };
    let text = std::fs::read_to_string(&path)
        .map_err(|e| anyhow::anyhow!("reading the config file {path}: {e}"))?;
    let table: toml::Table =
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("the config file {path}: {e}"))?;
    for (key, value) in table {
        let Some((_, variable)) = SETTINGS.iter().find(|(name, _)| *name == key) else {
            let known: Vec<&str> = SETTINGS.iter().map(|(name, _)| *name).collect();
            anyhow::bail!(
                "the config file {path} has an unknown setting '{key}' (known: {})",
                known.join(", ")
            );
        };
        let text = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(n) => n.to_string(),
            toml::Value::Array(items) => items
                .iter()
                .map(|item| item.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| anyhow::anyhow!("{path}: {key} must be a list of strings"))?
                .join(";"),
            other => anyhow::bail!("{path}: {key} cannot be {}", other.type_str()),
        };
        if std::env::var_os(variable).is_none() {
            // SAFETY: called from `main` before the runtime starts: no other thread
            // exists yet that could read the environment at the same time.
            unsafe { std::env::set_var(variable, text) };
        }
    }
    Ok(())
}

async fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The server logs what it does; the client only what went wrong.
    let default_filter = match cli.command {
        Command::Serve { .. } => "info",
        _ => "warn",
    };
    // A CONDUCTOR_LOG that is set but cannot be read is said once logging works.
    let mut unread_filter = None;
    let filter = match std::env::var("CONDUCTOR_LOG") {
        Ok(text) => tracing_subscriber::EnvFilter::try_new(&text).unwrap_or_else(|e| {
            unread_filter = Some(format!(
                "CONDUCTOR_LOG={text} is not a filter ({e}); logging at {default_filter}"
            ));
            tracing_subscriber::EnvFilter::new(default_filter)
        }),
        Err(_) => tracing_subscriber::EnvFilter::new(default_filter),
    };
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    if let Some(problem) = unread_filter {
        tracing::warn!("{problem}");
    }
    let client = match cli.command {
        Command::Image(command) => conductor::client::image(&cli.connection, command).await,
        Command::Provider(command) => conductor::client::provider(&cli.connection, command).await,
        Command::Account(command) => conductor::client::account(&cli.connection, command).await,
        Command::Serve {
            listen,
            data,
            plugins,
            external_url,
            import_dir,
            credentials_key,
            workers,
            max_per_target,
            max_per_environment,
            plugin_limits,
            plugin_memory_reset,
            plugin_cache,
            tls_cert,
            tls_key,
            fetch_allow,
            max_image_size,
            fetch_timeout,
            fetch_stall,
            edge,
            os,
        } => {
            let mut fetch = conductor::fetch::FetchPolicy::default().allow(&fetch_allow)?;
            fetch.max_bytes = max_image_size;
            fetch.deadline = std::time::Duration::from_secs(fetch_timeout);
            fetch.stall = std::time::Duration::from_secs(fetch_stall.max(1));
            return conductor::server::serve(conductor::server::Config {
                listen,
                data,
                plugins,
                external_url,
                import_dir,
                credentials_key,
                concurrency: conductor::jobs::Concurrency {
                    workers,
                    per_target: max_per_target,
                    per_environment: max_per_environment
                        .unwrap_or_else(|| conductor::jobs::Concurrency::fair_share(workers)),
                },
                admin_password: std::env::var("CONDUCTOR_ADMIN_PASSWORD").ok(),
                plugin_limits,
                plugin_memory_reset,
                plugin_cache,
                tls: tls_cert.zip(tls_key),
                fetch,
                connections: edge.connections(),
                logins: edge.logins(),
                os: os.settings(),
            })
            .await;
        }
    };
    // A client's failure is the server's answer or an unreachable server: one line, no
    // backtrace.
    if let Err(e) = client {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
    Ok(())
}
