//! conductor: a cloud image server that speaks Aeolus Conductor's XML API and builds and
//! pushes images through provider plugins that run as sandboxed WebAssembly components.
//! `ARCHITECTURE.md` at the repository root maps the modules.

pub mod api;
pub mod auth;
pub mod blobs;
pub mod client;
pub mod connections;
pub mod fetch;
pub mod jobs;
pub mod metrics;
pub mod model;
pub mod os;
pub mod plugins;
pub mod server;
pub mod store;

/// Locks a mutex; a panic in another thread while it was held leaves the data usable,
/// since every value the server keeps behind one stays consistent between statements.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
