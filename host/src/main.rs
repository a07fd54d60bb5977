//! The `conductor` command. Thin: parses flags, sets up logging, hands over to the
//! library.

use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "conductor",
    version,
    about = "A cloud image server with WebAssembly provider plugins"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

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
        /// How many jobs of one environment run at once; 0 for no limit beyond --workers.
        #[arg(long, env = "CONDUCTOR_MAX_PER_ENVIRONMENT", default_value_t = 0)]
        max_per_environment: usize,
        /// Limits of one provider type's plugin calls, or of all with `*`; repeatable:
        /// TARGET:memory=64MiB,timeout=30s,fuel=1000000000 (any of the three). Entries in
        /// the environment variable are separated by ';'.
        #[arg(
            long = "plugin-limit",
            env = "CONDUCTOR_PLUGIN_LIMITS",
            value_delimiter = ';'
        )]
        plugin_limits: Vec<conductor::plugins::PluginLimit>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CONDUCTOR_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
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
        } => {
            conductor::server::serve(conductor::server::Config {
                listen,
                data,
                plugins,
                external_url,
                import_dir,
                credentials_key,
                concurrency: conductor::jobs::Concurrency {
                    workers,
                    per_target: max_per_target,
                    per_environment: max_per_environment,
                },
                admin_password: std::env::var("CONDUCTOR_ADMIN_PASSWORD").ok(),
                plugin_limits,
            })
            .await
        }
    }
}
