//! The push of one target image to a provider account, with the parameters the server
//! adds for the plugin.

use super::*;

impl Jobs {
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

    pub(super) fn push(&self, job: &Job, stop: &Stop) -> Result<Step, JobError> {
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
}
