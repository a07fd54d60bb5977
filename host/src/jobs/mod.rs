//! Durable jobs: every build and push is a row in redb before it is announced, runs on a
//! worker with a concurrency limit, writes each status change before anyone can see it,
//! and is run again if the server stopped while it ran.
//!
//! Never imports axum. Plugin calls block for as long as the plugin works, so they run
//! on the blocking pool; the async side only waits for a permit.

use crate::model::{self, Disk, DiskFormat, Id, Job, JobKind, ProviderImage, Status, TargetImage};
use crate::plugins::{self, CallContext, PluginError, Plugins, Target, TemplateFacts};
use crate::store::{Store, StoreError};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// A job interrupted this many times (the server stopped under it) is failed rather than
/// run again, so one job that crashes the server cannot keep it crashing.
const MAX_ATTEMPTS: u32 = 3;
/// Progress is written at most this often; the final report is always written.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

#[derive(Debug, thiserror::Error)]
enum JobError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Io(String),
}

/// Where image files live: `<data>/images/<target image id>.<format>`, with work in
/// progress under `<data>/work/<job id>/`, so a half-written image never has a final name.
#[derive(Debug, Clone)]
pub struct Paths {
    pub images: PathBuf,
    pub work: PathBuf,
}

impl Paths {
    pub fn new(data: &Path) -> std::io::Result<Paths> {
        let paths = Paths {
            images: data.join("images"),
            work: data.join("work"),
        };
        std::fs::create_dir_all(&paths.images)?;
        std::fs::create_dir_all(&paths.work)?;
        Ok(paths)
    }

    pub fn image_file(&self, id: Id, format: DiskFormat) -> PathBuf {
        self.images.join(format!("{id}.{}", format.as_str()))
    }

    fn work_dir(&self, id: Id) -> PathBuf {
        self.work.join(id.to_string())
    }
}

pub struct Jobs {
    store: Arc<Store>,
    plugins: Arc<Plugins>,
    paths: Paths,
    permits: Arc<Semaphore>,
}

impl Jobs {
    pub fn new(store: Arc<Store>, plugins: Arc<Plugins>, paths: Paths, workers: usize) -> Jobs {
        Jobs {
            store,
            plugins,
            paths,
            permits: Arc::new(Semaphore::new(workers.max(1))),
        }
    }

    pub fn paths(&self) -> &Paths {
        &self.paths
    }

    /// Runs a job whose row is already stored.
    pub fn start(self: &Arc<Self>, job: Job) {
        let jobs = self.clone();
        tokio::spawn(async move { jobs.run(job).await });
    }

    /// Runs again every job the last run of the server left unfinished, counting the
    /// attempt, and clears work directories nobody owns any more.
    pub async fn recover(self: &Arc<Self>) -> Result<usize, StoreError> {
        let store = self.store.clone();
        let jobs = tokio::task::spawn_blocking(move || store.jobs())
            .await
            .map_err(|e| StoreError::Corrupt {
                table: "jobs",
                reason: e.to_string(),
            })??;
        let count = jobs.len();
        for job in jobs {
            tracing::info!(job = %job.id, kind = ?job.kind, attempts = job.attempts, "resuming an interrupted job");
            self.start(job);
        }
        Ok(count)
    }

    async fn run(self: Arc<Self>, mut job: Job) {
        if job.kind == JobKind::Push && !self.wait_for_target_image(job.id).await {
            self.finish(job.id);
            return;
        }
        let Ok(_permit) = self.permits.clone().acquire_owned().await else {
            return;
        };
        let jobs = self.clone();
        let id = job.id;
        let outcome = tokio::task::spawn_blocking(move || {
            job.attempts += 1;
            jobs.store.put_job(&job)?;
            match job.kind {
                JobKind::Build => jobs.build(&job),
                JobKind::Push => jobs.push(&job),
            }
        })
        .await;
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(job = %id, "job failed inside the server: {e}"),
            Err(e) => tracing::error!(job = %id, "job panicked: {e}"),
        }
        self.finish(id);
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

    fn build(&self, job: &Job) -> Result<(), JobError> {
        let Some(ti) = self.store.target_image(job.id)? else {
            return Ok(());
        };
        if ti.progress.status.is_terminal() {
            return Ok(());
        }
        if job.attempts > MAX_ATTEMPTS {
            self.store.update_target_image(ti.id, |ti| {
                fail(
                    &mut ti.progress,
                    format!("the server stopped during this build {MAX_ATTEMPTS} times; giving up"),
                )
            })?;
            return Ok(());
        }
        let work = self.paths.work_dir(ti.id);
        let result = self.build_in(&ti, job, &work);
        // Whatever happened, nothing in the work directory is needed any more.
        let _ = std::fs::remove_dir_all(&work);
        result
    }

    fn build_in(&self, ti: &TargetImage, job: &Job, work: &Path) -> Result<(), JobError> {
        let retry_note = if job.attempts > 1 {
            format!(" (attempt {} after a server restart)", job.attempts)
        } else {
            String::new()
        };
        self.store.update_target_image(ti.id, |ti| {
            ti.progress.status = Status::Building;
            ti.progress.percent = 0;
            ti.progress.error.clear();
            ti.progress.activity = format!("preparing the base disk{retry_note}");
        })?;

        let facts = match self.template_for(ti)? {
            Ok(facts) => facts,
            Err(reason) => {
                self.store
                    .update_target_image(ti.id, |ti| fail(&mut ti.progress, reason))?;
                return Ok(());
            }
        };
        let Some(plugin) = self.plugins.get(&ti.target) else {
            self.store.update_target_image(ti.id, |ti| {
                fail(
                    &mut ti.progress,
                    format!(
                        "no plugin for target '{}' is loaded on this server",
                        ti.target
                    ),
                )
            })?;
            return Ok(());
        };

        let _ = std::fs::remove_dir_all(work);
        std::fs::create_dir_all(work)
            .map_err(|e| JobError::Io(format!("{}: {e}", work.display())))?;
        let base = work.join("base.raw");
        let output = work.join("output");
        plugins::create_blank(&base, facts.disk_size)
            .map_err(|e| JobError::Io(format!("creating the base disk: {e}")))?;

        let context = self.progress_context(ti.id, JobKind::Build);
        let started = Instant::now();
        let result = plugin.build(context, &facts, &base, &output, &ti.parameters);
        tracing::info!(job = %ti.id, target = %ti.target, elapsed = ?started.elapsed(), ok = result.is_ok(), "build finished");

        match result {
            Ok(built) => {
                let final_path = self.paths.image_file(ti.id, built.format);
                let size = std::fs::metadata(&output)
                    .map_err(|e| JobError::Io(format!("reading the built image: {e}")))?
                    .len();
                std::fs::rename(&output, &final_path)
                    .map_err(|e| JobError::Io(format!("storing the built image: {e}")))?;
                let blank_note = facts_note(&facts);
                let updated = self.store.update_target_image(ti.id, |ti| {
                    ti.progress.status = Status::Complete;
                    ti.progress.percent = 100;
                    ti.progress.activity =
                        format!("built a {} image{blank_note}", built.format.as_str());
                    ti.disk = Some(Disk {
                        format: built.format,
                        size,
                        virtual_size: built.virtual_size,
                    });
                })?;
                if updated.is_none() {
                    // Deleted while it was being built: the image has no owner.
                    let _ = std::fs::remove_file(&final_path);
                }
            }
            Err(e) => {
                self.store
                    .update_target_image(ti.id, |ti| fail(&mut ti.progress, describe(&e)))?;
            }
        }
        Ok(())
    }

    /// The template facts for a target image's build, or why there are none.
    fn template_for(&self, ti: &TargetImage) -> Result<Result<TemplateFacts, String>, StoreError> {
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
            Ok(t) => Ok(TemplateFacts {
                xml: image.template.clone(),
                name: t.name,
                os_name: t.os_name,
                os_version: t.os_version,
                arch: t.arch,
                disk_size: t.disk_size,
                install: t.install,
            }),
            Err(e) => Err(format!("the stored template is not valid: {e}")),
        })
    }

    fn push(&self, job: &Job) -> Result<(), JobError> {
        let Some(pi) = self.store.provider_image(job.id)? else {
            return Ok(());
        };
        if pi.progress.status.is_terminal() {
            return Ok(());
        }
        if job.attempts > MAX_ATTEMPTS {
            self.store.update_provider_image(pi.id, |pi| {
                fail(
                    &mut pi.progress,
                    format!("the server stopped during this push {MAX_ATTEMPTS} times; giving up"),
                )
            })?;
            return Ok(());
        }
        match self.push_target(&pi)? {
            Ok((target, plugin, image, name)) => {
                self.store.update_provider_image(pi.id, |pi| {
                    pi.progress.status = Status::Pushing;
                    pi.progress.percent = 0;
                    pi.progress.error.clear();
                    pi.progress.activity = format!("pushing to {}", pi.provider_name);
                })?;
                let context = self.progress_context(pi.id, JobKind::Push);
                let result = plugin.push(context, &target, &image, &name, &pi.parameters);
                self.store.update_provider_image(pi.id, |pi| match result {
                    Ok(identifier) => {
                        pi.progress.status = Status::Complete;
                        pi.progress.percent = 100;
                        pi.progress.activity = format!("pushed as {identifier}");
                        pi.target_identifier = identifier;
                    }
                    Err(e) => fail(&mut pi.progress, describe(&e)),
                })?;
            }
            Err(reason) => {
                self.store
                    .update_provider_image(pi.id, |pi| fail(&mut pi.progress, reason))?;
            }
        }
        Ok(())
    }

    /// Everything a push needs: where to, with which plugin, which file, under what name.
    #[expect(
        clippy::type_complexity,
        reason = "a one-off tuple read straight back by the caller"
    )]
    fn push_target(
        &self,
        pi: &ProviderImage,
    ) -> Result<Result<(Target, Arc<plugins::Plugin>, PathBuf, String), String>, StoreError> {
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
        let target = Target {
            provider_name: provider.name,
            settings: provider.settings,
            account_name: account.label,
            credentials: account.credentials,
        };
        Ok(Ok((
            target,
            plugin,
            self.paths.image_file(ti.id, disk.format),
            name,
        )))
    }

    /// A progress sink that writes the plugin's reports into the record, at most every
    /// [`PROGRESS_EVERY`] unless the report is the last one.
    fn progress_context(&self, id: Id, kind: JobKind) -> CallContext {
        let store = self.store.clone();
        let mut last: Option<Instant> = None;
        let progress = Box::new(move |percent: u8, activity: &str| {
            if percent < 100 && last.is_some_and(|at| at.elapsed() < PROGRESS_EVERY) {
                return;
            }
            last = Some(Instant::now());
            let activity = activity.to_owned();
            let result = match kind {
                JobKind::Build => store
                    .update_target_image(id, |ti| {
                        if !ti.progress.status.is_terminal() {
                            ti.progress.percent = percent;
                            ti.progress.activity = activity;
                        }
                    })
                    .map(|_| ()),
                JobKind::Push => store
                    .update_provider_image(id, |pi| {
                        if !pi.progress.status.is_terminal() {
                            pi.progress.percent = percent;
                            pi.progress.activity = activity;
                        }
                    })
                    .map(|_| ()),
            };
            if let Err(e) = result {
                tracing::warn!(job = %id, "could not record progress: {e}");
            }
        });
        CallContext {
            label: id.to_string(),
            progress,
        }
    }
}

fn fail(progress: &mut model::Progress, reason: String) {
    progress.status = Status::Failed;
    progress.activity = "failed".into();
    progress.error = reason;
}

/// The sentence a user sees for a plugin failure.
fn describe(error: &PluginError) -> String {
    error.to_string()
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
