//! Durable jobs: every build and push is a row in redb before it is announced, runs on a
//! worker with a concurrency limit, writes each status change before anyone can see it,
//! and is run again if the server stopped while it ran.
//!
//! Never imports axum. Plugin calls block for as long as the plugin works, so they run
//! on the blocking pool; the async side only waits for a permit.

use crate::blobs::{self, BaseError, Blobs};
use crate::fetch::FetchPolicy;
use crate::model::{
    self, Account, Disk, Id, Job, JobKind, Provider, ProviderImage, Status, TargetImage,
};
use crate::os::{self, Installer};
use crate::plugins::{
    self, CallContext, ImageDetails, PluginError, Plugins, StateStore, Stop, StopReason, Target,
    TemplateFacts,
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

/// Where a job stands after one attempt.
enum Step {
    /// Finished; `Err` carries the reason it failed.
    Done(Result<(), String>),
    /// Try again after the pause.
    Retry(Duration),
    /// Stopped by the server shutting down: the job stays stored for the next start.
    Suspend,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
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
}

/// How many jobs run at once: in all, per target (image builds are heavy; Image
/// Factory serialised them for the same reason) and per environment (the fair share, so
/// one team cannot take every worker). Zero means no limit for the last two.
#[derive(Debug, Clone, Copy)]
pub struct Concurrency {
    pub workers: usize,
    pub per_target: usize,
    pub per_environment: usize,
}

impl Concurrency {
    /// The fair share when none is set: every worker but one, so that however many jobs
    /// one environment queues, another environment's job finds a worker free.
    pub fn fair_share(workers: usize) -> usize {
        workers.saturating_sub(1).max(1)
    }
}

/// What limits a job: its target, its environment and that environment's quota.
struct Scope {
    target: Option<String>,
    environment: Option<u64>,
    quota: Option<u64>,
}

/// Counts of running jobs per scope (`target/build/mock`, `environment/3`), with the
/// limit given by each job as it enters, so that a limit changed while jobs run (a
/// quota) applies to the next job without rebuilding anything.
#[derive(Default)]
struct Gates {
    running: Mutex<HashMap<String, usize>>,
    /// Woken whenever a job leaves a scope.
    left: tokio::sync::Notify,
}

/// A job's place in one scope, given back when dropped.
struct Pass {
    gates: Arc<Gates>,
    key: String,
}

impl Drop for Pass {
    fn drop(&mut self) {
        if let Some(count) = lock(&self.gates.running).get_mut(&self.key) {
            *count = count.saturating_sub(1);
        }
        self.gates.left.notify_waiters();
    }
}

impl Gates {
    fn try_enter(self: &Arc<Self>, key: &str, limit: usize) -> Option<Pass> {
        let mut running = lock(&self.running);
        let count = running.entry(key.to_owned()).or_insert(0);
        if *count >= limit {
            return None;
        }
        *count += 1;
        Some(Pass {
            gates: self.clone(),
            key: key.to_owned(),
        })
    }

    async fn enter(self: &Arc<Self>, key: String, limit: usize) -> Pass {
        loop {
            // Registered before the look, so a job leaving in between still wakes us.
            let left = self.left.notified();
            tokio::pin!(left);
            left.as_mut().enable();
            if let Some(pass) = self.try_enter(&key, limit) {
                return pass;
            }
            left.await;
        }
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

    /// The target and environment a job works for, and the environment's own limit of
    /// running jobs, for the per-scope limits.
    fn scope(&self, job: &Job) -> Result<Scope, StoreError> {
        let environment_of_build = |build: Id| -> Result<Option<u64>, StoreError> {
            Ok(match self.store.build(build)? {
                Some(b) => self.store.image(b.image_id)?.map(|i| i.environment_id),
                None => None,
            })
        };
        let (target, environment) = match job.kind {
            JobKind::Build => match self.store.target_image(job.id)? {
                Some(ti) => (Some(ti.target.clone()), environment_of_build(ti.build_id)?),
                None => (None, None),
            },
            JobKind::Push => match self.store.provider_image(job.id)? {
                Some(pi) => {
                    let target = self.store.provider(pi.provider_id)?.map(|p| p.target);
                    let env = match self.store.target_image(pi.target_image_id)? {
                        Some(ti) => environment_of_build(ti.build_id)?,
                        None => None,
                    };
                    (target, env)
                }
                None => (None, None),
            },
            JobKind::Delete => {
                let target = match &job.deletion {
                    Some(d) => self.store.provider(d.provider_id)?.map(|p| p.target),
                    None => None,
                };
                (target, None)
            }
        };
        let quota = match environment {
            Some(env) => self.store.quota(env)?.running_jobs,
            None => None,
        };
        Ok(Scope {
            target,
            environment,
            quota,
        })
    }

    /// Waits until the job's target and environment have room, saying on the record what
    /// it waits for. An environment's room is the smaller of the server's fair share
    /// (`--max-per-environment`) and the environment's quota of running jobs.
    async fn scoped_permits(self: &Arc<Self>, job: &Job) -> Vec<Pass> {
        let mut passes = Vec::new();
        let jobs = self.clone();
        let lookup = job.clone();
        let scope = match tokio::task::spawn_blocking(move || jobs.scope(&lookup)).await {
            Ok(Ok(scope)) => scope,
            Ok(Err(e)) => {
                tracing::error!(job = %job.id, "the limits of a job could not be read: {e}");
                return passes;
            }
            Err(_) => return passes,
        };
        let per_target = self.concurrency.per_target;
        let mut scopes = Vec::new();
        if let (Some(target), true) = (scope.target, per_target > 0) {
            let kind = if job.kind == JobKind::Build {
                "build"
            } else {
                "push"
            };
            scopes.push((
                format!("target/{kind}/{target}"),
                per_target,
                format!("waiting: at most {per_target} {kind}(s) for target {target} run at once"),
            ));
        }
        if let Some(env) = scope.environment {
            let share = self.concurrency.per_environment;
            let quota = scope
                .quota
                .map(|q| usize::try_from(q).unwrap_or(usize::MAX));
            let limit = match (share, quota) {
                (0, quota) => quota,
                (share, None) => Some(share),
                (share, Some(quota)) => Some(share.min(quota)),
            };
            if let Some(limit) = limit {
                scopes.push((
                    format!("environment/{env}"),
                    limit,
                    format!("waiting: at most {limit} job(s) of this environment run at once"),
                ));
            }
        }
        for (key, limit, waiting) in scopes {
            let pass = match self.gates.try_enter(&key, limit) {
                Some(pass) => pass,
                None => {
                    self.note_waiting(job, waiting).await;
                    self.gates.enter(key, limit).await
                }
            };
            passes.push(pass);
        }
        passes
    }

    async fn note_waiting(self: &Arc<Self>, job: &Job, activity: String) {
        let jobs = self.clone();
        let (id, kind) = (job.id, job.kind);
        let _ = tokio::task::spawn_blocking(move || {
            let _ = match kind {
                JobKind::Build => jobs
                    .store
                    .update_target_image(id, |ti| ti.progress.activity = activity)
                    .map(|_| ()),
                JobKind::Push => jobs
                    .store
                    .update_provider_image(id, |pi| pi.progress.activity = activity)
                    .map(|_| ()),
                JobKind::Delete => Ok(()),
            };
        })
        .await;
    }

    pub fn blobs(&self) -> &Blobs {
        &self.blobs
    }

    /// Removes every blob no target image references. Blocking.
    pub fn collect_blobs(&self) -> Result<usize, JobError> {
        let target_images = self.store.target_images(None)?;
        // Build logs go with their target images.
        let kept: std::collections::HashSet<String> = target_images
            .iter()
            .map(|ti| format!("{}.log", ti.id))
            .collect();
        if let Ok(logs) = std::fs::read_dir(&self.paths.logs) {
            for log in logs.flatten() {
                if !kept.contains(log.file_name().to_string_lossy().as_ref()) {
                    let _ = std::fs::remove_file(log.path());
                }
            }
        }
        let referenced = target_images
            .into_iter()
            .filter_map(|ti| ti.disk.map(|d| d.sha256))
            .collect();
        self.blobs
            .collect(&referenced)
            .map_err(|e| JobError::Io(format!("collecting unreferenced blobs: {e}")))
    }

    /// Runs a job whose row is already stored. The handle resolves when the job has
    /// finished, with the reason if it failed.
    pub fn start(self: &Arc<Self>, job: Job) -> tokio::task::JoinHandle<Result<(), String>> {
        let jobs = self.clone();
        tokio::spawn(async move { jobs.run(job).await })
    }

    /// Runs again every job the last run of the server left unfinished, counting the
    /// attempt.
    pub async fn recover(self: &Arc<Self>) -> Result<usize, StoreError> {
        let store = self.store.clone();
        let jobs = tokio::task::spawn_blocking(move || store.jobs())
            .await
            .map_err(|e| StoreError::Corrupt {
                table: "jobs",
                key: "every row".into(),
                reason: e.to_string(),
            })??;
        let count = jobs.len();
        for job in jobs {
            tracing::info!(job = %job.id, kind = ?job.kind, attempts = job.attempts, "resuming an interrupted job");
            self.start(job);
        }
        Ok(count)
    }

    async fn run(self: Arc<Self>, mut job: Job) -> Result<(), String> {
        if job.kind == JobKind::Push && !self.wait_for_target_image(job.id).await {
            self.finish(job.id);
            return Err("the target image was not built".into());
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
                return Err("the server is shutting down".into());
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
                    return Err("interrupted by the server shutting down".into());
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
                    return Err(e.to_string());
                }
                Err(e) => {
                    tracing::error!(job = %id, "job panicked: {e}");
                    return Err("the job crashed inside the server".into());
                }
            }
        }
    }

    /// Asks the provider's plugin whether the account's credentials work.
    /// Blocking: it runs the plugin.
    pub fn check_account(&self, provider: &Provider, account: &Account) -> Result<(), PluginError> {
        let plugin = self.plugin_for(provider)?;
        let context = self.call_context(format!("check account {}", account.label), provider);
        plugin.check_account(context, &target_of(provider, account))
    }

    /// Looks an existing image up on the provider, for import. Blocking.
    pub fn lookup(
        &self,
        provider: &Provider,
        account: &Account,
        identifier: &str,
    ) -> Result<ImageDetails, PluginError> {
        let plugin = self.plugin_for(provider)?;
        let context = self.call_context(format!("lookup {identifier}"), provider);
        plugin.lookup(context, &target_of(provider, account), identifier)
    }

    fn plugin_for(&self, provider: &Provider) -> Result<Arc<plugins::Plugin>, PluginError> {
        self.plugins.get(&provider.target).ok_or_else(|| {
            PluginError::Failed(format!(
                "no plugin for target '{}' is loaded on this server",
                provider.target
            ))
        })
    }

    fn call_context(&self, label: String, provider: &Provider) -> CallContext {
        CallContext {
            label,
            progress: Box::new(|_, _| {}),
            state: Some(Box::new(ProviderState {
                store: self.store.clone(),
                provider: provider.id,
            })),
            stop: Stop::new(),
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
            return Ok(Step::Done(Err(format!(
                "{} cannot be deleted from {}: its provider or account no longer exists",
                d.target_identifier, d.provider_name
            ))));
        };
        let plugin = match self.plugin_for(&provider) {
            Ok(plugin) => plugin,
            Err(e) => return Ok(Step::Done(Err(e.to_string()))),
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
                Step::Done(Err(e.to_string()))
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
                Err(_) => return false,
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
                _ => true,
            };
            if failed {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn build(&self, job: &Job, stop: &Stop) -> Result<Step, JobError> {
        let Some(ti) = self.store.target_image(job.id)? else {
            return Ok(Step::Done(Err("the target image was deleted".into())));
        };
        if ti.progress.status.is_terminal() {
            return Ok(Step::Done(Ok(())));
        }
        if job.attempts > MAX_ATTEMPTS {
            let reason = format!(
                "gave up after {MAX_ATTEMPTS} attempts (the server stopped during the build or the provider stayed unavailable)"
            );
            self.store
                .update_target_image(ti.id, |ti| fail(&mut ti.progress, reason.clone()))?;
            return Ok(Step::Done(Err(reason)));
        }
        let work = self.paths.work_dir(ti.id);
        let result = self.build_in(&ti, job, &work, stop);
        // Whatever happened, nothing in the work directory is needed any more.
        let _ = std::fs::remove_dir_all(&work);
        match result {
            // A disk that refused a write (full, a size the file system cannot hold)
            // fails this build with the reason rather than leave it BUILDING and run it
            // again at every start.
            Err(JobError::Io(reason)) => {
                tracing::warn!(job = %ti.id, "build failed on the server's disk: {reason}");
                self.set_ti(ti.id, |ti| fail(&mut ti.progress, reason.clone()))?;
                Ok(Step::Done(Err(reason)))
            }
            other => other,
        }
    }

    fn build_in(
        &self,
        ti: &TargetImage,
        job: &Job,
        work: &Path,
        stop: &Stop,
    ) -> Result<Step, JobError> {
        let retry_note = if job.attempts > 1 {
            format!(" (attempt {} of {MAX_ATTEMPTS})", job.attempts)
        } else {
            String::new()
        };
        self.set_ti(ti.id, |ti| {
            ti.progress.status = Status::Building;
            ti.progress.percent = 0;
            ti.progress.error.clear();
            ti.progress.activity = format!("preparing the base disk{retry_note}");
        })?;

        let failed = |reason: String| -> Result<Step, JobError> {
            self.store
                .update_target_image(ti.id, |ti| fail(&mut ti.progress, reason.clone()))?;
            Ok(Step::Done(Err(reason)))
        };
        let (facts, template) = match self.template_for(ti)? {
            Ok(found) => found,
            Err(reason) => return failed(reason),
        };
        // The OS the template names, when this server installs it and the build does not
        // start from a base image.
        // All targets of the build share one install, so it holds what each one needs.
        let targets: Vec<String> = self
            .store
            .target_images(Some(ti.build_id))?
            .into_iter()
            .map(|t| t.target)
            .collect();
        let needed = self.plugins.needed_packages(&targets);
        let plan = match (&ti.base_image, self.installer.plan(&template, &needed)) {
            (Some(_), _) => None,
            (None, Ok(plan)) => plan,
            (None, Err(reason)) => return failed(reason),
        };
        let Some(plugin) = self.plugins.get(&ti.target) else {
            return failed(format!(
                "no plugin for target '{}' is loaded on this server",
                ti.target
            ));
        };

        let _ = std::fs::remove_dir_all(work);
        std::fs::create_dir_all(work)
            .map_err(|e| JobError::Io(format!("{}: {e}", work.display())))?;
        let log = os::Log::to_file(&self.paths.log(ti.id))
            .map_err(|e| JobError::Io(format!("opening the build log: {e}")))?;
        log.line(&format!(
            "== build of target image {} for {}, attempt {}: {} {} {}",
            ti.id, ti.target, job.attempts, facts.os_name, facts.os_version, facts.arch
        ));
        let base = work.join("base.raw");
        let output = work.join("output");
        let mut facts = facts;
        match &ti.base_image {
            Some(base_image) => {
                let store = self.store.clone();
                let id = ti.id;
                let mut last = Instant::now();
                let mut progress = |done: u64, total: Option<u64>| {
                    if last.elapsed() < PROGRESS_EVERY {
                        return;
                    }
                    last = Instant::now();
                    let of = total.map(|t| format!(" of {t}")).unwrap_or_default();
                    let _ = store.update_target_image(id, |ti| {
                        ti.progress.activity = format!("fetching the base image: {done}{of} bytes");
                    });
                };
                let source = blobs::BaseSource {
                    import_dir: self.import_dir.as_deref(),
                    policy: &self.fetch,
                };
                let fetched =
                    blobs::fetch_base(&base_image.url, &source, &base, &mut progress, &|| {
                        stop.reason().is_some()
                    });
                match fetched {
                    Ok((sha256, size)) => {
                        facts.disk_size = size;
                        self.set_ti(ti.id, |ti| {
                            if let Some(b) = ti.base_image.as_mut() {
                                b.sha256 = Some(sha256.clone());
                            }
                            ti.progress.activity = "building from the base image".into();
                        })?;
                    }
                    Err(BaseError::Stopped) => {
                        return on_plugin_error(job, stopped(stop), |change| {
                            self.set_ti(ti.id, |ti| change(&mut ti.progress)).map(drop)
                        });
                    }
                    // A network failure is worth another try; anything else is final.
                    Err(error) if error.is_passing() && job.attempts < MAX_ATTEMPTS => {
                        let pause = backoff(job.attempts);
                        self.set_ti(ti.id, |ti| {
                            ti.progress.activity =
                                format!("{error}; retrying in {} s", pause.as_secs());
                        })?;
                        return Ok(Step::Retry(pause));
                    }
                    Err(error) => return failed(error.to_string()),
                }
            }
            None => match &plan {
                Some(plan) => {
                    for (target, package) in &needed {
                        log.line(&format!("the {target} target needs {package} in the image"));
                    }
                    if let Some(step) = self.install_os(ti, job, plan, &base, &log, stop)? {
                        return Ok(step);
                    }
                }
                None => {
                    log.line(&format!("a blank base disk of {} bytes", facts.disk_size));
                    plugins::create_blank(&base, facts.disk_size)
                        .map_err(|e| JobError::Io(format!("creating the base disk: {e}")))?
                }
            },
        }

        let base_size = std::fs::metadata(&base)
            .map_err(|e| JobError::Io(format!("reading the base disk's size: {e}")))?
            .len();
        // After an install, the plugin's part is the last fifth of the build.
        let floor = if plan.is_some() {
            os::INSTALLED_PERCENT
        } else {
            0
        };
        let mut context = self.progress_context_from(ti.id, JobKind::Build, floor, PROGRESS_EVERY);
        context.state = None;
        context.stop = stop.clone();
        let started = Instant::now();
        let result = plugin.build(
            context,
            &facts,
            &base,
            &output,
            output_limit(base_size),
            &ti.parameters,
        );
        tracing::info!(job = %ti.id, target = %ti.target, elapsed = ?started.elapsed(), ok = result.is_ok(), "build finished");
        log.line(&match &result {
            Ok(built) => format!(
                "== the {} plugin built a {} image in {:.1} s",
                ti.target,
                built.format.as_str(),
                started.elapsed().as_secs_f64()
            ),
            Err(e) => format!(
                "== the {} plugin's build failed: {}",
                ti.target,
                describe(e)
            ),
        });

        let built = match result {
            Ok(built) => built,
            Err(e) => {
                return on_plugin_error(job, e, |change| {
                    self.set_ti(ti.id, |ti| change(&mut ti.progress)).map(drop)
                });
            }
        };
        self.set_ti(ti.id, |ti| {
            ti.progress.activity = "storing the image".into();
        })?;
        // Hashing takes as long as the image is large: it runs before the hold, which
        // collection waits for, and a cancel or a shutdown ends it.
        let blob = match blobs::hash_file(&output, &|| stop.reason().is_some()) {
            Ok((sha256, size)) => blobs::Blob { sha256, size },
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {
                return on_plugin_error(job, stopped(stop), |change| {
                    self.set_ti(ti.id, |ti| change(&mut ti.progress)).map(drop)
                });
            }
            Err(e) => return Err(JobError::Io(format!("reading the built image: {e}"))),
        };
        // Held until the record names the blob, so collection cannot take it first.
        let _hold = self.blobs.hold();
        self.blobs
            .ingest(&output, &blob)
            .map_err(|e| JobError::Io(format!("storing the built image: {e}")))?;
        let blank_note = if ti.base_image.is_some() || plan.is_some() {
            String::new()
        } else {
            facts_note(&facts)
        };
        self.set_ti(ti.id, |ti| {
            // A cancel that came too late to stop the plugin still wins.
            if ti.progress.status == Status::Cancelled {
                return;
            }
            ti.progress.status = Status::Complete;
            ti.progress.percent = 100;
            ti.progress.activity = match &plan {
                Some(plan) => format!("built a {} image of {}", built.format.as_str(), plan.title),
                None => format!("built a {} image{blank_note}", built.format.as_str()),
            };
            ti.disk = Some(Disk {
                sha256: blob.sha256.clone(),
                format: built.format,
                size: blob.size,
                virtual_size: built.virtual_size,
                firmware: plan.as_ref().map(os::Plan::firmware).unwrap_or_default(),
            });
        })?;
        // A target image deleted while it was built leaves its blob unreferenced; the
        // next collection removes it.
        Ok(Step::Done(Ok(())))
    }

    /// Installs the plan's OS (or finds the disk an earlier target of the same build or
    /// template made) and links it as the build's base disk. `Some(step)` when the build
    /// ends here: failed, cancelled or stopped.
    fn install_os(
        &self,
        ti: &TargetImage,
        job: &Job,
        plan: &os::Plan,
        base: &Path,
        log: &os::Log,
        stop: &Stop,
    ) -> Result<Option<Step>, JobError> {
        log.line(&format!("== installing {}", plan.title));
        // An install reports a few dozen stages, each worth showing: none is dropped.
        let mut context = self.progress_context_from(ti.id, JobKind::Build, 0, Duration::ZERO);
        let started = Instant::now();
        let installed = self.installer.install(
            plan,
            log,
            &mut |percent, activity| (context.progress)(percent, activity),
            &|| stop.reason().is_some(),
        );
        tracing::info!(job = %ti.id, os = %plan.title, elapsed = ?started.elapsed(), ok = installed.is_ok(), "OS install finished");
        let disk = match installed {
            Ok(disk) => disk,
            Err(e) if e.is_stop() => {
                log.line("== stopped");
                return on_plugin_error(job, stopped(stop), |change| {
                    self.set_ti(ti.id, |ti| change(&mut ti.progress)).map(drop)
                })
                .map(Some);
            }
            Err(e) => {
                let reason = e.to_string();
                log.line(&format!("== failed: {reason}"));
                self.store
                    .update_target_image(ti.id, |ti| fail(&mut ti.progress, reason.clone()))?;
                return Ok(Some(Step::Done(Err(reason))));
            }
        };
        // The cached disk is shared and never written: a link costs nothing; a copy is
        // the fallback where links cannot be made.
        if std::fs::hard_link(&disk, base).is_err() {
            std::fs::copy(&disk, base)
                .map_err(|e| JobError::Io(format!("copying the installed disk: {e}")))?;
        }
        log.line(&format!(
            "== installed {} in {:.0} s",
            plan.title,
            started.elapsed().as_secs_f64()
        ));
        Ok(None)
    }

    /// The template facts for a target image's build, or why there are none.
    fn template_for(
        &self,
        ti: &TargetImage,
    ) -> Result<Result<(TemplateFacts, model::tdl::Template), String>, StoreError> {
        let Some(build) = self.store.build(ti.build_id)? else {
            return Ok(Err(
                "the build this target image belongs to was deleted".into()
            ));
        };
        let Some(image) = self.store.image(build.image_id)? else {
            return Ok(Err(
                "the image this target image belongs to was deleted".into()
            ));
        };
        Ok(match model::tdl::parse(&image.template) {
            Ok(t) => Ok((
                TemplateFacts {
                    xml: image.template.clone(),
                    name: t.name.clone(),
                    os_name: t.os_name.clone(),
                    os_version: t.os_version.clone(),
                    arch: t.arch.clone(),
                    disk_size: t.disk_size,
                    install: t.install.clone(),
                },
                t,
            )),
            Err(e) => Err(format!("the stored template is not valid: {e}")),
        })
    }

    /// The push request's parameters and, after them, this server's ids of what is pushed
    /// (`conductor.image`, …), the facts of the template the image was built from
    /// (`template.arch`, …) and the firmware the image boots with (`image.firmware`,
    /// when this server installed its OS), which a cloud wants when it registers an image.
    fn push_parameters(&self, pi: &ProviderImage) -> Result<Vec<(String, String)>, StoreError> {
        let mut parameters = pi.parameters.clone();
        let Some(ti) = self.store.target_image(pi.target_image_id)? else {
            return Ok(parameters);
        };
        if let Some(build) = self.store.build(ti.build_id)? {
            parameters.push(("conductor.image".to_owned(), build.image_id.to_string()));
        }
        parameters.extend([
            ("conductor.build".to_owned(), ti.build_id.to_string()),
            ("conductor.target-image".to_owned(), ti.id.to_string()),
            ("conductor.provider-image".to_owned(), pi.id.to_string()),
        ]);
        if let Ok((facts, _)) = self.template_for(&ti)? {
            parameters.extend([
                ("template.name".to_owned(), facts.name),
                ("template.os-name".to_owned(), facts.os_name),
                ("template.os-version".to_owned(), facts.os_version),
                ("template.arch".to_owned(), facts.arch),
                ("template.disk-size".to_owned(), facts.disk_size.to_string()),
            ]);
        }
        if let Some(disk) = ti.disk.as_ref().filter(|d| !d.firmware.is_empty()) {
            let firmware: Vec<&str> = disk.firmware.iter().map(|f| f.as_str()).collect();
            parameters.push(("image.firmware".to_owned(), firmware.join(",")));
        }
        Ok(parameters)
    }

    fn push(&self, job: &Job, stop: &Stop) -> Result<Step, JobError> {
        let Some(pi) = self.store.provider_image(job.id)? else {
            return Ok(Step::Done(Err("the provider image was deleted".into())));
        };
        if pi.progress.status.is_terminal() {
            return Ok(Step::Done(Ok(())));
        }
        let failed = |reason: String| -> Result<Step, JobError> {
            self.store
                .update_provider_image(pi.id, |pi| fail(&mut pi.progress, reason.clone()))?;
            Ok(Step::Done(Err(reason)))
        };
        if job.attempts > MAX_ATTEMPTS {
            return failed(format!(
                "gave up after {MAX_ATTEMPTS} attempts (the server stopped during the push or the provider stayed unavailable)"
            ));
        }
        let (target, provider_id, plugin, image, name) = match self.push_target(&pi)? {
            Ok(found) => found,
            Err(reason) => return failed(reason),
        };
        self.set_pi(pi.id, |pi| {
            pi.progress.status = Status::Pushing;
            pi.progress.percent = 0;
            pi.progress.error.clear();
            pi.progress.activity = format!("pushing to {}", pi.provider_name);
        })?;
        let mut context = self.progress_context(pi.id, JobKind::Push);
        context.state = Some(Box::new(ProviderState {
            store: self.store.clone(),
            provider: provider_id,
        }));
        context.stop = stop.clone();
        let parameters = self.push_parameters(&pi)?;
        let identifier = match plugin.push(context, &target, &image, &name, &parameters) {
            Ok(identifier) => identifier,
            Err(e) => {
                return on_plugin_error(job, e, |change| {
                    self.set_pi(pi.id, |pi| change(&mut pi.progress)).map(drop)
                });
            }
        };
        let updated = self.set_pi(pi.id, |pi| {
            pi.progress.status = Status::Complete;
            pi.progress.percent = 100;
            pi.progress.activity = format!("pushed as {identifier}");
            pi.target_identifier = identifier.clone();
        })?;
        if updated.is_none() {
            // Deleted while it was pushed: remove what the push made, so the cloud is not
            // left with an image nobody knows about.
            let mut context = CallContext::quiet(format!("delete {identifier}"));
            context.state = Some(Box::new(ProviderState {
                store: self.store.clone(),
                provider: provider_id,
            }));
            if let Err(e) = plugin.delete(context, &target, &identifier) {
                tracing::error!(%identifier, "could not remove an image pushed for a deleted record: {e}");
            }
        }
        Ok(Step::Done(Ok(())))
    }

    /// Everything a push needs: where to, with which plugin, which file, under what name.
    #[expect(
        clippy::type_complexity,
        reason = "a one-off tuple read straight back by the caller"
    )]
    fn push_target(
        &self,
        pi: &ProviderImage,
    ) -> Result<Result<(Target, u64, Arc<plugins::Plugin>, PathBuf, String), String>, StoreError>
    {
        let Some(ti) = self.store.target_image(pi.target_image_id)? else {
            return Ok(Err("its target image was deleted".into()));
        };
        let Some(disk) = ti.disk.as_ref() else {
            return Ok(Err(format!("target image {} has no built image", ti.id)));
        };
        let Some(provider) = self.store.provider(pi.provider_id)? else {
            return Ok(Err(format!(
                "provider {} no longer exists",
                pi.provider_name
            )));
        };
        let Some(account) = self.store.account(pi.account_id)? else {
            return Ok(Err(format!(
                "account {} no longer exists",
                pi.account_label
            )));
        };
        let Some(plugin) = self.plugins.get(&provider.target) else {
            return Ok(Err(format!(
                "no plugin for target '{}' is loaded on this server",
                provider.target
            )));
        };
        let name = match self.store.build(ti.build_id)? {
            Some(build) => match self.store.image(build.image_id)? {
                Some(image) => format!("{}-{}", image.name, pi.id),
                None => pi.id.to_string(),
            },
            None => pi.id.to_string(),
        };
        Ok(Ok((
            target_of(&provider, &account),
            provider.id,
            plugin,
            self.blobs.path(&disk.sha256),
            name,
        )))
    }

    /// A progress sink that writes the plugin's reports into the record, at most every
    /// [`PROGRESS_EVERY`] unless the report is the first to reach 100 %. Only that one
    /// passes early: a plugin repeating 100 % in a loop is held to the pace like any
    /// other, so no plugin can turn its reports into a stream of writes.
    fn progress_context(&self, id: Id, kind: JobKind) -> CallContext {
        self.progress_context_from(id, kind, 0, PROGRESS_EVERY)
    }

    /// A call context whose progress reports fill the percent from `floor` to 100.
    /// Reports closer together than `every` are dropped (a plugin may report thousands).
    fn progress_context_from(
        &self,
        id: Id,
        kind: JobKind,
        floor: u8,
        every: Duration,
    ) -> CallContext {
        let store = self.store.clone();
        let changes = self.changes.clone();
        let mut last: Option<(Instant, u8)> = None;
        let progress = Box::new(move |percent: u8, activity: &str| {
            let percent =
                floor + (u16::from(percent.min(100)) * u16::from(100 - floor.min(100)) / 100) as u8;
            if let Some((at, written)) = last
                && at.elapsed() < every
                && (percent < 100 || written == 100)
            {
                return;
            }
            last = Some((Instant::now(), percent));
            let activity = activity.to_owned();
            let result = match kind {
                JobKind::Build => store
                    .update_target_image(id, |ti| {
                        if !ti.progress.status.is_terminal() {
                            ti.progress.percent = percent;
                            ti.progress.activity = activity;
                        }
                    })
                    .map(|ti| ti.map(|ti| Change::TargetImage(Box::new(ti)))),
                JobKind::Push | JobKind::Delete => store
                    .update_provider_image(id, |pi| {
                        if !pi.progress.status.is_terminal() {
                            pi.progress.percent = percent;
                            pi.progress.activity = activity;
                        }
                    })
                    .map(|pi| pi.map(|pi| Change::ProviderImage(Box::new(pi)))),
            };
            match result {
                Ok(Some(change)) => {
                    let _ = changes.send(change);
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(job = %id, "could not record progress: {e}"),
            }
        });
        CallContext {
            label: id.to_string(),
            progress,
            state: None,
            stop: Stop::new(),
        }
    }
}

fn target_of(provider: &Provider, account: &Account) -> Target {
    Target {
        provider_name: provider.name.clone(),
        settings: provider.settings.clone(),
        account_name: account.label.clone(),
        credentials: account.credentials.clone(),
    }
}

/// A provider's plugin state, kept in redb.
struct ProviderState {
    store: Arc<Store>,
    provider: u64,
}

impl StateStore for ProviderState {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, String> {
        self.store
            .plugin_state_get(self.provider, key)
            .map_err(|e| e.to_string())
    }

    fn set(&self, key: &str, value: &[u8], max_keys: usize) -> Result<bool, String> {
        self.store
            .plugin_state_set(self.provider, key, value, max_keys)
            .map_err(|e| e.to_string())
    }

    fn delete(&self, key: &str) -> Result<(), String> {
        self.store
            .plugin_state_delete(self.provider, key)
            .map_err(|e| e.to_string())
    }

    fn keys(&self, prefix: &str, limit: usize) -> Result<Vec<String>, String> {
        self.store
            .plugin_state_keys(self.provider, prefix, limit)
            .map_err(|e| e.to_string())
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
            Ok(Step::Done(Err("cancelled".into())))
        }
        PluginError::Shutdown => {
            set(&suspended)?;
            Ok(Step::Suspend)
        }
        other => {
            let reason = describe(&other);
            set(&|progress| fail(progress, reason.clone()))?;
            Ok(Step::Done(Err(reason)))
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

/// The most a build may write: the base disk, plus an eighth of it and 64 MiB for the
/// metadata of an image format (qcow2's tables and VMDK's grain tables and markers stay
/// well inside that), so a plugin cannot fill the data disk.
fn output_limit(base_size: u64) -> u64 {
    base_size
        .saturating_add(base_size / 8)
        .saturating_add(64 << 20)
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

/// Builds with an install tree start from a blank disk: say so instead of pretending the
/// OS was installed.
fn facts_note(facts: &TemplateFacts) -> String {
    match &facts.install {
        Some(kind) => format!(
            "; the base disk is blank: installing the OS from the template's {kind} install source is not supported, so no OS was installed"
        ),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_build_may_write_its_base_disk_an_eighth_more_and_64_mib() {
        assert_eq!(output_limit(0), 64 << 20);
        assert_eq!(output_limit(64 << 20), (64 + 8 + 64) << 20);
        assert_eq!(
            output_limit(10 << 30),
            (10 << 30) + (1280 << 20) + (64 << 20)
        );
        assert_eq!(output_limit(u64::MAX), u64::MAX);
    }
}
