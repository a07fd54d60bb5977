//! Wiring: opens the store, loads plugins, makes the first-start defaults, resumes
//! interrupted jobs, and serves the API until told to stop.

use crate::api::{self, AppState};
use crate::auth::{self, Authenticator, LoginLimits};
use crate::blobs::Blobs;
use crate::connections;
use crate::fetch::FetchPolicy;
use crate::jobs::{Concurrency, Jobs, Paths};
use crate::model::{Account, DEFAULT_ENVIRONMENT, Provider, User};
use crate::plugins::{Limits, MemoryReset, PluginLimit, Plugins};
use crate::store::Store;
use anyhow::Context;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// How the server is started (`conductor serve --help` documents each).
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: String,
    pub data: PathBuf,
    /// A folder of extra `*.wasm` plugins, loaded after (and overriding) the bundled ones.
    pub plugins: Option<PathBuf>,
    pub external_url: Option<String>,
    /// Where `file://` base images may be read from; none when unset.
    pub import_dir: Option<PathBuf>,
    /// The file holding the key that seals credentials; `<data>/credentials.key` when unset.
    pub credentials_key: Option<PathBuf>,
    /// How many builds and pushes run at once: in all, per target, per environment.
    pub concurrency: Concurrency,
    /// Limits of plugin calls (memory, time, fuel) for some or all provider types.
    pub plugin_limits: Vec<PluginLimit>,
    pub plugin_memory_reset: MemoryReset,
    /// Where compiled plugins are kept; `<data>/plugin-cache` when unset.
    pub plugin_cache: Option<PathBuf>,
    /// The bootstrap admin's password on first start; generated and printed when unset.
    pub admin_password: Option<String>,
    /// PEM certificate chain and private key: with both, the API is served over TLS only.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// What the server fetches for users (base images, webhooks) may reach, and how
    /// large an image may be.
    pub fetch: FetchPolicy,
    /// What one client may hold: a connection, and time to send each request.
    pub connections: connections::Limits,
    /// How many password checks run at once, and how wrong passwords are slowed down.
    pub logins: LoginLimits,
    /// Which mirrors OS installs may use, their deadlines and their cache's size.
    pub os: crate::os::Settings,
}

pub async fn serve(config: Config) -> anyhow::Result<()> {
    // A bad certificate stops the server before anything else, not at the first client.
    let tls = match &config.tls {
        Some((cert, key)) => Some(tls_acceptor(cert, key)?),
        None => None,
    };
    // Everything the server writes is for its own user alone: images, the database and
    // the credentials key are tenants' data. The data directory is closed too, so files
    // an earlier release wrote with wider modes are out of reach as well.
    // SAFETY: umask only sets the process's file mode mask.
    unsafe { libc::umask(0o077) };
    let mut limits = config.connections;
    connections::fit_descriptors(&mut limits);
    std::fs::create_dir_all(&config.data)
        .with_context(|| format!("creating the data directory {}", config.data.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&config.data, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("closing the data directory {}", config.data.display()))?;
    }
    let key = credential_key(&config)?;
    let store = Arc::new(
        Store::open(&config.data.join("conductor.redb"), &key)
            .with_context(|| format!("opening the database in {}", config.data.display()))?,
    );

    let plugins = Arc::new(Plugins::new(
        Limits::default(),
        &config.plugin_limits,
        config.plugin_memory_reset,
        Some(
            config
                .plugin_cache
                .clone()
                .unwrap_or_else(|| config.data.join("plugin-cache")),
        ),
        config.plugins.clone(),
    )?);
    plugins.load_bundled()?;
    if let Some(dir) = &config.plugins {
        let failures = plugins.load_dir(dir)?;
        for failure in failures {
            eprintln!("conductor: skipped a plugin: {failure}");
        }
    }

    bootstrap(&store, &plugins, &config)?;

    let paths = Paths::new(&config.data).context("creating the image folders")?;
    // Work directories belong to jobs; every unfinished job starts over below.
    if let Ok(entries) = std::fs::read_dir(&paths.work) {
        for entry in entries.flatten() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    let blobs = Arc::new(Blobs::open(&config.data).context("opening the blob store")?);
    let fetch = Arc::new(config.fetch.clone());
    let installer = Arc::new(
        crate::os::Installer::new(&config.data, config.os.clone())
            .context("creating the OS install folders")?,
    );
    for line in installer.describe() {
        tracing::info!("OS installs: {line}");
    }
    let jobs = Arc::new(Jobs::new(
        store.clone(),
        plugins.clone(),
        blobs,
        paths,
        config.import_dir.clone(),
        fetch.clone(),
        installer,
        config.concurrency,
    ));
    // Blobs of records deleted while the server was down, or of builds that finished
    // after their record was deleted.
    let collected = {
        let jobs = jobs.clone();
        tokio::task::spawn_blocking(move || jobs.collect_blobs()).await??
    };
    if collected > 0 {
        tracing::info!(collected, "removed unreferenced blobs");
    }
    let resumed = jobs.recover().await?;
    if resumed > 0 {
        tracing::info!(resumed, "resumed jobs interrupted by the last stop");
    }

    let state = Arc::new(AppState {
        store: store.clone(),
        plugins,
        auth: Arc::new(Authenticator::new(store, config.logins)?),
        jobs: jobs.clone(),
        external_url: config.external_url.clone(),
        import_dir: config.import_dir.clone(),
        fetch,
        rendered: Default::default(),
    });
    let listener = tokio::net::TcpListener::bind(&config.listen)
        .await
        .with_context(|| format!("listening on {}", config.listen))?;
    let address = listener.local_addr()?;
    // Webhook documents carry hrefs too; without a request, they use the public URL or
    // the address the server listens on.
    let scheme = if tls.is_some() { "https" } else { "http" };
    let hook_base = match &config.external_url {
        Some(url) => format!("{}/api", url.trim_end_matches('/')),
        None => format!("{scheme}://{address}/api"),
    };
    api::hooks::spawn_dispatcher(state.clone(), hook_base);
    // Tests and scripts read this line to find the port when listening on port 0.
    println!("conductor listening on {scheme}://{address}");
    tracing::info!(%address, scheme, "serving the API");
    // At SIGTERM or Ctrl-C the server stops accepting connections; requests in flight
    // (a download, a delete waiting on its provider) get up to DRAIN to finish.
    let (stop, stopping) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("stopping: no new connections; open ones may finish their requests");
        let _ = stop.send(true);
    });
    let drained_or_late = async {
        stopped(stopping.clone()).await;
        tokio::time::sleep(DRAIN).await;
        tracing::warn!("connections still open {DRAIN:?} after the stop signal; closing them");
    };
    tokio::select! {
        () = connections::serve(listener, api::router(state), tls, limits, stopping.clone()) => {}
        () = drained_or_late => {}
    }
    // Running plugin calls are interrupted; their jobs stay stored and resume at the
    // next start. redb commits every change, so nothing else needs flushing.
    jobs.shutdown(std::time::Duration::from_secs(30)).await;
    tracing::info!("stopped");
    Ok(())
}

/// The key that seals account credentials: read from `--credentials-key` (or
/// `<data>/credentials.key`), created there with mode 0600 on first start. Losing it
/// makes stored credentials unreadable, so it belongs in backups with the data.
fn credential_key(config: &Config) -> anyhow::Result<crate::store::CredentialKey> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = config
        .credentials_key
        .clone()
        .unwrap_or_else(|| config.data.join("credentials.key"));
    match std::fs::read(&path) {
        Ok(bytes) => bytes.as_slice().try_into().map_err(|_| {
            anyhow::anyhow!(
                "{} must hold exactly 32 bytes (it holds {})",
                path.display(),
                bytes.len()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key: crate::store::CredentialKey = rand::random();
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .with_context(|| format!("creating the credentials key {}", path.display()))?;
            file.write_all(&key)?;
            file.sync_all()?;
            tracing::info!(path = %path.display(), "created the key that seals account credentials");
            Ok(key)
        }
        Err(e) => Err(e).with_context(|| format!("reading the credentials key {}", path.display())),
    }
}

/// The TLS settings from a PEM certificate chain and its private key.
fn tls_acceptor(cert: &Path, key: &Path) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| anyhow::anyhow!("reading the TLS certificate {}: {e}", cert.display()))?;
    if chain.is_empty() {
        anyhow::bail!("{} holds no PEM certificate", cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| anyhow::anyhow!("reading the TLS key {}: {e}", key.display()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .context("the TLS certificate and key do not make a usable pair")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// How long requests in flight at a stop signal get to finish.
const DRAIN: std::time::Duration = std::time::Duration::from_secs(30);

/// Resolves once the stop signal has come.
async fn stopped(mut stopping: tokio::sync::watch::Receiver<bool>) {
    let _ = stopping.wait_for(|stop| *stop).await;
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            // Without a handler, Ctrl-C would end the server at once: wait for SIGTERM.
            tracing::warn!("Ctrl-C cannot be caught ({e}); stop the server with SIGTERM");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::warn!(
                    "SIGTERM cannot be caught ({e}): it ends the server without a drain"
                );
                std::future::pending::<()>().await
            }
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down; unfinished jobs resume at the next start");
}

/// First start with an empty data directory: the `default` environment, the admin user,
/// and for each loaded provider type that reaches no cloud (`mock`) a provider and an
/// account to start with, so a fresh server can build and push at once.
fn bootstrap(store: &Store, plugins: &Plugins, config: &Config) -> anyhow::Result<()> {
    if store.user("admin")?.is_none() {
        let (password, generated) = match &config.admin_password {
            Some(p) if !p.is_empty() => (p.clone(), false),
            _ => (auth::generate_password(), true),
        };
        store.put_user(&User {
            name: "admin".into(),
            password_hash: auth::hash_password(&password)?,
            admin: true,
            disabled: false,
            roles: Vec::new(),
        })?;
        if generated {
            // Printed once: it is not stored anywhere in clear.
            println!("conductor: created user 'admin' with password {password}");
        } else {
            println!(
                "conductor: created user 'admin' with the password from CONDUCTOR_ADMIN_PASSWORD"
            );
        }
    }
    if store.environments()?.is_empty() {
        let env = store.create_environment(DEFAULT_ENVIRONMENT, "default environment")?;
        // Only types that reach no cloud get one: a provider of a real cloud needs its
        // region or endpoint and an account its keys, which only an operator can give.
        for plugin in plugins
            .all()
            .into_iter()
            .filter(|p| p.info.hosts.is_empty())
        {
            let target = &plugin.info.target;
            let provider = store.create_provider(Provider {
                id: 0,
                name: target.clone(),
                target: target.clone(),
                settings: Vec::new(),
            })?;
            store.create_account(Account {
                id: 0,
                label: format!("{target}-acc"),
                provider_id: provider.id,
                credentials: Vec::new(),
                environments: vec![env.id],
                priority: None,
                max_running_instances: None,
            })?;
        }
    }
    Ok(())
}
