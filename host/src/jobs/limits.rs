//! How many jobs run at once, and who waits: the server's workers, and the per-target
//! and per-environment limits (with an environment's quota of running jobs) a job
//! passes before it takes a worker.

use super::*;

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
pub(super) struct Scope {
    target: Option<String>,
    environment: Option<u64>,
    quota: Option<u64>,
}

/// Counts of running jobs per scope (`target/build/mock`, `environment/3`), with the
/// limit given by each job as it enters, so that a limit changed while jobs run (a
/// quota) applies to the next job without rebuilding anything.
#[derive(Default)]
pub(super) struct Gates {
    running: Mutex<HashMap<String, usize>>,
    /// Woken whenever a job leaves a scope.
    left: tokio::sync::Notify,
}

/// A job's place in one scope, given back when dropped.
pub(super) struct Pass {
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
    pub(super) fn try_enter(self: &Arc<Self>, key: &str, limit: usize) -> Option<Pass> {
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

    pub(super) async fn enter(self: &Arc<Self>, key: String, limit: usize) -> Pass {
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

impl Jobs {
    /// The target and environment a job works for, and the environment's own limit of
    /// running jobs, for the per-scope limits.
    pub(super) fn scope(&self, job: &Job) -> Result<Scope, StoreError> {
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
    pub(super) async fn scoped_permits(self: &Arc<Self>, job: &Job) -> Vec<Pass> {
        let mut passes = Vec::new();
        let jobs = self.clone();
        let lookup = job.clone();
        let scope = match tokio::task::spawn_blocking(move || jobs.scope(&lookup)).await {
            Ok(Ok(scope)) => scope,
            Ok(Err(e)) => {
                tracing::error!(job = %job.id, "the limits of a job could not be read: {e}");
                return passes;
            }
            Err(e) => {
                tracing::error!(job = %job.id, "reading the limits of a job crashed: {e}");
                return passes;
            }
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

    pub(super) async fn note_waiting(self: &Arc<Self>, job: &Job, activity: String) {
        let jobs = self.clone();
        let (id, kind) = (job.id, job.kind);
        let written = tokio::task::spawn_blocking(move || match kind {
            JobKind::Build => jobs
                .store
                .update_target_image(id, |ti| ti.progress.activity = activity)
                .map(|_| ()),
            JobKind::Push => jobs
                .store
                .update_provider_image(id, |pi| pi.progress.activity = activity)
                .map(|_| ()),
            JobKind::Delete => Ok(()),
        })
        .await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(job = %id, "could not record what the job waits for: {e}"),
            Err(e) => tracing::warn!(job = %id, "recording what the job waits for crashed: {e}"),
        }
    }
}
