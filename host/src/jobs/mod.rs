//! Durable jobs: every build and push is a row in redb before it is announced, runs on a
//! worker with a concurrency limit, writes each status change before anyone can see it,
//! and is run again if the server stopped while it ran.
//!
//! Never imports axum. Plugin calls block for as long as the plugin works, so they run
//! on the blocking pool; the async side only waits for a permit.

mod build;
mod calls;
mod limits;
mod push;
mod submit;

pub use limits::Concurrency;

use calls::{ProviderState, target_of};
use limits::Gates;
pub use push::{IGNORE_BOOT_CHECK, PushPlan, PushPlanError, plan_push, refuse_failed_checks};
pub use submit::DeleteOutcome;

use crate::blobs::{self, BaseError, Blobs};
use crate::fetch::FetchPolicy;
use crate::lock;
use crate::model::{
    self, Account, Disk, Id, Job, JobKind, Provider, ProviderImage, Status, TargetImage,
};
use crate::os::{self, Installer};
use crate::plugins::{
    self, CallContext, ImageDetails, PluginError, Plugins, StateError, StateStore, Stop,
    StopReason, Target, TemplateFacts,
};
use crate::store::{Store, StoreError};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// A job is started at most this many times: retries after a provider was unavailable
/// and restarts after the server stopped under it both count, so neither a flaky
/// provider nor a job that crashes the server keeps a job alive forever.
const MAX_ATTEMPTS: u32 = 5;

/// The pause before attempt `n + 1` after an `unavailable` answer: 1 s, 2 s, 4 s, ….
fn backoff(attempts: u32) -> Duration {
    Duration::from_secs(1u64 << attempts.saturating_sub(1).min(6))
}

/// How a job ended without doing its work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobEnd {
    /// It failed, for the reason its record's `status_detail/error` gives.
    #[error("{0}")]
    Failed(String),
    /// A push whose target image has no body to push.
    #[error("the target image was not built")]
    NotBuilt,
    /// The server stopped first; the job stays stored and runs at the next start.
    #[error("interrupted by the server shutting down")]
    Interrupted,
    /// A fault of the server's (a panic, a database error); the job stays stored.
    #[error("the job crashed inside the server: {0}")]
    Crashed(String),
}

/// What a job needs and no longer finds (rows deleted meanwhile, a plugin removed), in
/// the words its record's `status_detail/error` gives.
#[derive(Debug, thiserror::Error)]
enum Missing {
    #[error("the build this target image belongs to was deleted")]
    Build,
    #[error("the image this target image belongs to was deleted")]
    Image,
    #[error("the stored template is not valid: {0}")]
    Template(model::tdl::TdlError),
    #[error("its target image was deleted")]
    TargetImage,
    #[error("target image {0} has no built image")]
    Body(Id),
    #[error("provider {0} no longer exists")]
    Provider(String),
    #[error("account {0} no longer exists")]
    Account(String),
    #[error("no plugin for target '{0}' is loaded on this server")]
    Plugin(String),
}

/// Where a job stands after one attempt.
enum Step {
    /// Finished, or failed and why.
    Done(Result<(), JobEnd>),
    /// Try again after the pause.
    Retry(Duration),
    /// Stopped by the server shutting down: the job stays stored for the next start.
    Suspend,
}

impl Step {
    fn failed(reason: impl Into<String>) -> Step {
        Step::Done(Err(JobEnd::Failed(reason.into())))
    }
}

/// Progress is written at most this often; the final report is always written.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Io(String),
}

/// Where work in progress lives: `<data>/work/<job id>/`. Finished images go to the
/// blob store, so a half-written image never has a final name.
#[derive(Debug, Clone)]
pub struct Paths {
    pub work: PathBuf,
    /// Build logs, one per target image: `<data>/logs/<target image id>.log`.
    pub logs: PathBuf,
}

impl Paths {
    pub fn new(data: &Path) -> std::io::Result<Paths> {
        let paths = Paths {
            work: data.join("work"),
            logs: data.join("logs"),
        };
        std::fs::create_dir_all(&paths.work)?;
        std::fs::create_dir_all(&paths.logs)?;
        Ok(paths)
    }

    fn work_dir(&self, id: Id) -> PathBuf {
        self.work.join(id.to_string())
    }

    /// The build log of a target image.
    pub fn log(&self, target_image: Id) -> PathBuf {
        self.logs.join(format!("{target_image}.log"))
    }

    /// The package manifest of a target image whose OS this server installed.
    pub fn manifest(&self, target_image: Id) -> PathBuf {
        self.logs.join(format!("{target_image}.manifest.json"))
    }

    /// The serial console of a target image's boot check.
    pub fn console(&self, target_image: Id) -> PathBuf {
        self.logs.join(format!("{target_image}.console"))
    }
}

/// A status change or progress report of a target image or provider image, for
/// listeners such as webhooks. It carries the record as written, so a listener that
/// runs later still reports each state in order rather than whatever is current.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    TargetImage(Box<TargetImage>),
    ProviderImage(Box<ProviderImage>),
}

pub struct Jobs {
    store: Arc<Store>,
    plugins: Arc<Plugins>,
    blobs: Arc<Blobs>,
    paths: Paths,
    /// Where `file://` base images may come from.
    import_dir: Option<PathBuf>,
    /// What base image downloads may reach and how large they may be.
    fetch: Arc<FetchPolicy>,
    /// Installs the OS a template names, before the plugin's part of a build.
    installer: Arc<Installer>,
    concurrency: Concurrency,
    permits: Arc<Semaphore>,
    /// Jobs running per target name and per environment.
    gates: Arc<Gates>,
    /// The stop flag of every job whose plugin call is running.
    running: Mutex<HashMap<Id, Stop>>,
    changes: tokio::sync::broadcast::Sender<Change>,
}

impl Jobs {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Arc<Store>,
        plugins: Arc<Plugins>,
        blobs: Arc<Blobs>,
        paths: Paths,
        import_dir: Option<PathBuf>,
        fetch: Arc<FetchPolicy>,
        installer: Arc<Installer>,
        concurrency: Concurrency,
    ) -> Jobs {
        Jobs {
            store,
            plugins,
            blobs,
            paths,
            import_dir,
            fetch,
            installer,
            concurrency,
            permits: Arc::new(Semaphore::new(concurrency.workers.max(1))),
            gates: Arc::new(Gates::default()),
            running: Mutex::new(HashMap::new()),
            changes: tokio::sync::broadcast::channel(4096).0,
        }
    }

    /// What decides which templates get an OS installed, for checks at request time.
    pub fn installer(&self) -> &Installer {
        &self.installer
    }

    /// Where build logs are kept.
    pub fn paths(&self) -> &Paths {
        &self.paths
    }

    /// Every status change and progress report, as it is written.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    /// Tells listeners that a record changed (after the change is stored).
    pub fn announce(&self, change: Change) {
        // No listener is not an error.
        let _ = self.changes.send(change);
    }

    /// Stops the job's plugin call if it is running. The job then marks its record
    /// CANCELLED. Returns whether a running call was told to stop.
    pub fn cancel(&self, id: Id) -> bool {
        match lock(&self.running).get(&id) {
            Some(stop) => {
                stop.request(StopReason::Cancelled);
                true
            }
            None => false,
        }
    }

    /// Stops taking jobs, interrupts running plugin calls (their jobs stay stored and
    /// run again at the next start) and waits up to `grace` for them to stop.
    pub async fn shutdown(&self, grace: Duration) {
        self.permits.close();
        for stop in lock(&self.running).values() {
            stop.request(StopReason::Shutdown);
        }
        let deadline = tokio::time::Instant::now() + grace;
        while !lock(&self.running).is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn blobs(&self) -> &Blobs {
        &self.blobs
    }

    /// Removes every blob no target image references. Blocking.
    pub fn collect_blobs(&self) -> Result<usize, JobError> {
        let target_images = self.store.target_images(None)?;
        // Build logs, manifests and consoles (`<id>.…`) go with their target images.
        let kept: std::collections::HashSet<String> =
            target_images.iter().map(|ti| ti.id.to_string()).collect();
        match std::fs::read_dir(&self.paths.logs) {
            Err(e) => {
                tracing::warn!(dir = %self.paths.logs.display(), "build logs cannot be pruned: {e}")
            }
            Ok(logs) => {
                for log in logs.flatten() {
                    let name = log.file_name().to_string_lossy().into_owned();
                    let owner = name.split('.').next().unwrap_or_default();
                    if !kept.contains(owner) {
                        let _ = std::fs::remove_file(log.path());
                    }
                }
            }
        }
        let referenced = target_images
            .into_iter()
            .filter_map(|ti| ti.disk.map(|d| d.blob))
            .collect();
        self.blobs
            .collect(&referenced)
            .map_err(|e| JobError::Io(format!("collecting unreferenced blobs: {e}")))
    }

    /// Runs a job whose row is already stored. The handle resolves when the job has
    /// finished, with the reason if it failed.
    pub fn start(self: &Arc<Self>, job: Job) -> tokio::task::JoinHandle<Result<(), JobEnd>> {
        let jobs = self.clone();
        tokio::spawn(async move { jobs.run(job).await })
    }

    /// Runs again every job the last run of the server left unfinished, counting the
    /// attempt.
    pub async fn recover(self: &Arc<Self>) -> Result<usize, StoreError> {
        let store = self.store.clone();
        let jobs = tokio::task::spawn_blocking(move || store.jobs())
            .await
            .map_err(|e| StoreError::Interrupted("jobs", e.to_string()))??;
        let count = jobs.len();
        for job in jobs {
            tracing::info!(job = %job.id, kind = ?job.kind, attempts = job.attempts, "resuming an interrupted job");
            self.start(job);
        }
        Ok(count)
    }

    async fn run(self: Arc<Self>, mut job: Job) -> Result<(), JobEnd> {
        if job.kind == JobKind::Push && !self.wait_for_target_image(job.id).await {
            self.finish(job.id);
            return Err(JobEnd::NotBuilt);
        }
        let started = Instant::now();
        let kind = format!("{:?}", job.kind).to_lowercase();
        let kind_label = [("kind", kind.as_str())];
        loop {
            // Waiting for a worker (or for the limits of its target or environment).
            crate::metrics::add("conductor_jobs_waiting", &kind_label, 1.0);
            let scoped = self.scoped_permits(&job).await;
            let permit = self.permits.clone().acquire_owned().await;
            crate::metrics::add("conductor_jobs_waiting", &kind_label, -1.0);
            let Ok(permit) = permit else {
                return Err(JobEnd::Interrupted);
            };
            let jobs = self.clone();
            let id = job.id;
            let stop = Stop::new();
            lock(&self.running).insert(id, stop.clone());
            crate::metrics::add("conductor_jobs_running", &kind_label, 1.0);
            let outcome = tokio::task::spawn_blocking(move || {
                job.attempts += 1;
                jobs.store.put_job(&job)?;
                let step = match job.kind {
                    JobKind::Build => jobs.build(&job, &stop),
                    JobKind::Push => jobs.push(&job, &stop),
                    JobKind::Delete => jobs.delete(&job),
                }?;
                if matches!(step, Step::Suspend) {
                    // A shutdown is not the job's fault: the attempt does not count.
                    job.attempts -= 1;
                    jobs.store.put_job(&job)?;
                }
                Ok::<_, JobError>((job, step))
            })
            .await;
            crate::metrics::add("conductor_jobs_running", &kind_label, -1.0);
            lock(&self.running).remove(&id);
            drop(permit);
            drop(scoped);
            match outcome {
                Ok(Ok((_, Step::Suspend))) => {
                    return Err(JobEnd::Interrupted);
                }
                Ok(Ok((back, Step::Retry(pause)))) => {
                    job = back;
                    tokio::time::sleep(pause).await;
                }
                Ok(Ok((_, Step::Done(result)))) => {
                    self.finish(id);
                    let outcome = if result.is_ok() { "ok" } else { "failed" };
                    crate::metrics::inc(
                        "conductor_jobs_finished_total",
                        &[("kind", kind.as_str()), ("outcome", outcome)],
                    );
                    crate::metrics::observe(
                        "conductor_job_duration_seconds",
                        &kind_label,
                        started.elapsed().as_secs_f64(),
                    );
                    return result;
                }
                Ok(Err(e)) => {
                    // Left in the table: the next start tries again.
                    tracing::error!(job = %id, "job failed inside the server: {e}");
                    return Err(JobEnd::Crashed(e.to_string()));
                }
                Err(e) => {
                    tracing::error!(job = %id, "job panicked: {e}");
                    return Err(JobEnd::Crashed("it panicked".into()));
                }
            }
        }
    }

    /// Removes an image from its provider after its record was deleted.
    fn delete(&self, job: &Job) -> Result<Step, JobError> {
        let Some(d) = &job.deletion else {
            return Ok(Step::Done(Ok(())));
        };
        let provider = self.store.provider(d.provider_id)?;
        let account = self.store.account(d.account_id)?;
        let (Some(provider), Some(account)) = (provider, account) else {
            return Ok(Step::failed(format!(
                "{} cannot be deleted from {}: its provider or account no longer exists",
                d.target_identifier, d.provider_name
            )));
        };
        let plugin = match self.plugin_for(&provider) {
            Ok(plugin) => plugin,
            Err(e) => return Ok(Step::failed(e.to_string())),
        };
        let context = self.call_context(format!("delete {}", d.target_identifier), &provider);
        let result = plugin.delete(
            context,
            &target_of(&provider, &account),
            &d.target_identifier,
        );
        Ok(match result {
            // Already gone is as good as deleted.
            Ok(()) | Err(PluginError::NotFound(_)) => {
                tracing::info!(provider = %d.provider_name, identifier = %d.target_identifier, "deleted on the provider");
                Step::Done(Ok(()))
            }
            Err(PluginError::Unavailable(reason)) if job.attempts < MAX_ATTEMPTS => {
                tracing::warn!(identifier = %d.target_identifier, "provider unavailable ({reason}); will retry the delete");
                Step::Retry(backoff(job.attempts))
            }
            Err(e) => {
                tracing::error!(provider = %d.provider_name, identifier = %d.target_identifier, "could not delete on the provider: {e}");
                Step::failed(e.to_string())
            }
        })
    }

    /// Changes a target image and tells listeners.
    fn set_ti(
        &self,
        id: Id,
        change: impl FnOnce(&mut TargetImage),
    ) -> Result<Option<TargetImage>, StoreError> {
        let updated = self.store.update_target_image(id, change)?;
        if let Some(ti) = &updated {
            self.announce(Change::TargetImage(Box::new(ti.clone())));
        }
        Ok(updated)
    }

    /// Changes a provider image and tells listeners.
    fn set_pi(
        &self,
        id: Id,
        change: impl FnOnce(&mut ProviderImage),
    ) -> Result<Option<ProviderImage>, StoreError> {
        let updated = self.store.update_provider_image(id, change)?;
        if let Some(pi) = &updated {
            self.announce(Change::ProviderImage(Box::new(pi.clone())));
        }
        Ok(updated)
    }

    /// Removes a finished job's row. A failure here only means the job is looked at
    /// once more after a restart, where its terminal status makes it a no-op.
    fn finish(&self, id: Id) {
        if let Err(e) = self.store.remove_job(id) {
            tracing::error!(job = %id, "could not remove a finished job: {e}");
        }
    }

    /// A push needs its target image built. Waits while the build runs; `false` when it
    /// will never be there (failed, cancelled, deleted), after failing the push.
    async fn wait_for_target_image(&self, push_id: Id) -> bool {
        loop {
            let store = self.store.clone();
            let lookup = tokio::task::spawn_blocking(move || -> Result<_, StoreError> {
                let Some(pi) = store.provider_image(push_id)? else {
                    return Ok(None);
                };
                Ok(Some((pi.clone(), store.target_image(pi.target_image_id)?)))
            })
            .await;
            let (pi, ti) = match lookup {
                Ok(Ok(Some(found))) => found,
                Ok(Ok(None)) => return false,
                Ok(Err(e)) => {
                    tracing::error!(job = %push_id, "{e}");
                    return false;
                }
                Err(e) => {
                    tracing::error!(job = %push_id, "looking the push up crashed: {e}");
                    return false;
                }
            };
            if pi.progress.status.is_terminal() {
                return true;
            }
            let reason = match ti {
                Some(ti) if ti.progress.status == Status::Complete => return true,
                Some(ti) if !ti.progress.status.is_terminal() => None,
                Some(ti) => Some(format!(
                    "target image {} is {}, so there is nothing to push",
                    ti.id,
                    ti.progress.status.as_str()
                )),
                None => Some(format!("target image {} was deleted", pi.target_image_id)),
            };
            let store = self.store.clone();
            let update = tokio::task::spawn_blocking(move || {
                store.update_provider_image(push_id, |pi| match reason {
                    Some(reason) => fail(&mut pi.progress, reason),
                    None => {
                        pi.progress.status = Status::Pending;
                        pi.progress.activity = "waiting for the target image to be built".into();
                    }
                })
            });
            let failed = match update.await {
                Ok(Ok(Some(pi))) => pi.progress.status.is_terminal(),
                Ok(Ok(None)) => true,
                Ok(Err(e)) => {
                    tracing::error!(job = %push_id, "recording that the push waits: {e}");
                    true
                }
                Err(e) => {
                    tracing::error!(job = %push_id, "recording that the push waits crashed: {e}");
                    true
                }
            };
            if failed {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// What a build or push does when its plugin call failed: a passing failure is retried
/// after a pause (while attempts remain), a cancel or a shutdown is recorded as such, and
/// anything else fails the job with its reason. `set` changes the record's progress.
fn on_plugin_error(
    job: &Job,
    error: PluginError,
    set: impl Fn(&dyn Fn(&mut model::Progress)) -> Result<(), StoreError>,
) -> Result<Step, JobError> {
    match error {
        PluginError::Unavailable(reason) if job.attempts < MAX_ATTEMPTS => {
            let pause = backoff(job.attempts);
            let activity = format!(
                "unavailable: {reason}; retrying in {} s (attempt {} of {MAX_ATTEMPTS})",
                pause.as_secs(),
                job.attempts
            );
            set(&|progress| progress.activity = activity.clone())?;
            Ok(Step::Retry(pause))
        }
        PluginError::Cancelled => {
            set(&|progress| progress.mark_cancelled())?;
            Ok(Step::failed("cancelled"))
        }
        PluginError::Shutdown => {
            set(&suspended)?;
            Ok(Step::Suspend)
        }
        other => {
            let reason = describe(&other);
            set(&|progress| fail(progress, reason.clone()))?;
            Ok(Step::failed(reason))
        }
    }
}

/// The plugin error that stands for a stop seen outside a plugin call (while fetching
/// or hashing), so it is recorded the same way.
fn stopped(stop: &Stop) -> PluginError {
    match stop.reason() {
        Some(StopReason::Shutdown) => PluginError::Shutdown,
        _ => PluginError::Cancelled,
    }
}

/// Back to waiting: the job runs again when the server starts.
fn suspended(progress: &mut model::Progress) {
    progress.status = Status::Pending;
    progress.activity =
        "interrupted by the server stopping; it runs again at the next start".into();
}

fn fail(progress: &mut model::Progress, reason: String) {
    progress.status = Status::Failed;
    progress.activity = "failed".into();
    progress.error = reason;
}

/// The sentence a user sees for a plugin failure.
fn describe(error: &PluginError) -> String {
    match error {
        PluginError::ImageTooLarge { .. } => {
            format!("{error} (a build may write its base disk's size plus an eighth, plus 64 MiB)")
        }
        _ => error.to_string(),
    }
}
