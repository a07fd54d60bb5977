//! The use cases that change what the server holds and start work: submitting a build,
//! submitting a push, recording an import, and finishing a cascading delete. Each
//! commits its rows (and jobs) in one transaction, then announces them, then starts the
//! jobs: nothing is announced before it is stored, and no job runs before it is
//! announced. API handlers parse the request, call one of these and render the answer.
//!
//! The `submit_*` functions block on the store: call them on the blocking pool.

use super::*;
use crate::model::{Build, Image};
use crate::store::Removed;

/// How long a delete waits for the provider-side deletes before it answers; what is not
/// done by then goes on in the background (the jobs are stored).
const PROVIDER_DELETE_WAIT: Duration = Duration::from_secs(20);

/// What became of one image on its provider after a delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeleteOutcome {
    /// The provider's identifier of the image.
    pub identifier: String,
    /// `DELETED`, `FAILED`, or `DELETING` when it goes on in the background.
    pub status: &'static str,
    pub error: String,
}

fn job_for(id: Id, kind: JobKind) -> Job {
    Job {
        id,
        kind,
        attempts: 0,
        deletion: None,
    }
}

impl Jobs {
    /// Stores a build (with its image when the image is new) and its target images, a
    /// build job for each; announces the target images; starts the jobs.
    pub fn submit_build(
        self: &Arc<Self>,
        image: Option<&Image>,
        build: &Build,
        target_images: &[TargetImage],
    ) -> Result<(), StoreError> {
        let jobs: Vec<Job> = target_images
            .iter()
            .map(|ti| job_for(ti.id, JobKind::Build))
            .collect();
        self.store
            .create_build(image, build, target_images, &jobs)?;
        for ti in target_images {
            self.announce(Change::TargetImage(Box::new(ti.clone())));
        }
        for job in jobs {
            self.start(job);
        }
        Ok(())
    }

    /// Stores the provider images of a push, in `environment`, a push job for each;
    /// announces them; starts the jobs.
    pub fn submit_push(
        self: &Arc<Self>,
        environment: u64,
        provider_images: &[ProviderImage],
    ) -> Result<(), StoreError> {
        let jobs: Vec<Job> = provider_images
            .iter()
            .map(|pi| job_for(pi.id, JobKind::Push))
            .collect();
        self.store
            .create_push(environment, provider_images, &jobs)?;
        for pi in provider_images {
            self.announce(Change::ProviderImage(Box::new(pi.clone())));
        }
        for job in jobs {
            self.start(job);
        }
        Ok(())
    }

    /// Stores an imported image: its image, build, target image and provider image, all
    /// complete. Nothing runs: the image is already on the provider.
    pub fn record_import(
        &self,
        image: &Image,
        build: &Build,
        target_image: &TargetImage,
        provider_image: &ProviderImage,
    ) -> Result<(), StoreError> {
        self.store
            .create_import(image, build, target_image, provider_image)
    }

    /// What a cascading delete leaves to do once its rows are gone: stops the deleted
    /// records' running jobs, removes the blobs deleted target images leave unreferenced,
    /// and runs the provider-side deletes the store queued, waiting for them a while.
    pub async fn finish_delete(self: &Arc<Self>, removed: &Removed) -> Vec<DeleteOutcome> {
        for ti in &removed.target_images {
            self.cancel(ti.id);
        }
        for pi in &removed.provider_images {
            self.cancel(pi.id);
        }
        if removed.target_images.iter().any(|ti| ti.disk.is_some()) {
            let jobs = self.clone();
            match tokio::task::spawn_blocking(move || jobs.collect_blobs()).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!("{e}"),
                Err(e) => tracing::warn!("{e}"),
            }
        }
        let handles: Vec<_> = removed
            .deletions
            .iter()
            .map(|job| {
                let identifier = job
                    .deletion
                    .as_ref()
                    .map(|d| d.target_identifier.clone())
                    .unwrap_or_default();
                (identifier, self.start(job.clone()))
            })
            .collect();
        let deadline = tokio::time::Instant::now() + PROVIDER_DELETE_WAIT;
        let mut outcomes = Vec::with_capacity(handles.len());
        for (identifier, handle) in handles {
            let (status, error) = match tokio::time::timeout_at(deadline, handle).await {
                Ok(Ok(Ok(()))) => ("DELETED", String::new()),
                Ok(Ok(Err(end))) => ("FAILED", end.to_string()),
                Ok(Err(_)) => ("FAILED", "the delete crashed inside the server".to_owned()),
                Err(_) => (
                    "DELETING",
                    "not finished yet; it goes on in the background".to_owned(),
                ),
            };
            outcomes.push(DeleteOutcome {
                identifier,
                status,
                error,
            });
        }
        outcomes
    }
}
