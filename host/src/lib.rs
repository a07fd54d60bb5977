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
