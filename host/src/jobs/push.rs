//! The push of one target image to a provider account, with the parameters the server
//! adds for the plugin.

use super::*;
use crate::model::CheckResult;

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
        match self.template_for(&ti)? {
            Err(missing) => {
                // The push goes on without the template's parameters; the plugin sees
                // fewer settings, and the log says why.
                tracing::warn!(target_image = %ti.id, "pushing without the template's parameters: {missing}");
            }
            Ok((facts, _)) => parameters.extend([
                ("template.name".to_owned(), facts.name),
                ("template.os-name".to_owned(), facts.os_name),
                ("template.os-version".to_owned(), facts.os_version),
                ("template.arch".to_owned(), facts.arch),
                ("template.disk-size".to_owned(), facts.disk_size.to_string()),
            ]),
        }
        if let Some(disk) = ti.disk.as_ref().filter(|d| !d.firmware.is_empty()) {
            let firmware: Vec<&str> = disk.firmware.iter().map(|f| f.as_str()).collect();
            parameters.push(("image.firmware".to_owned(), firmware.join(",")));
        }
        Ok(parameters)
    }

    pub(super) fn push(&self, job: &Job, stop: &Stop) -> Result<Step, JobError> {
        let Some(pi) = self.store.provider_image(job.id)? else {
            return Ok(Step::failed("the provider image was deleted"));
        };
        if pi.progress.status.is_terminal() {
            return Ok(Step::Done(Ok(())));
        }
        let failed = |reason: String| -> Result<Step, JobError> {
            self.store
                .update_provider_image(pi.id, |pi| fail(&mut pi.progress, reason.clone()))?;
            Ok(Step::failed(reason))
        };
        if job.attempts > MAX_ATTEMPTS {
            return failed(format!(
                "gave up after {MAX_ATTEMPTS} attempts (the server stopped during the push or the provider stayed unavailable)"
            ));
        }
        let (target, provider_id, plugin, image, name) = match self.push_target(&pi)? {
            Ok(found) => found,
            Err(missing) => return failed(missing.to_string()),
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
    ) -> Result<Result<(Target, u64, Arc<plugins::Plugin>, PathBuf, String), Missing>, StoreError>
    {
        let Some(ti) = self.store.target_image(pi.target_image_id)? else {
            return Ok(Err(Missing::TargetImage));
        };
        let Some(disk) = ti.disk.as_ref() else {
            return Ok(Err(Missing::Body(ti.id)));
        };
        let Some(provider) = self.store.provider(pi.provider_id)? else {
            return Ok(Err(Missing::Provider(pi.provider_name.clone())));
        };
        let Some(account) = self.store.account(pi.account_id)? else {
            return Ok(Err(Missing::Account(pi.account_label.clone())));
        };
        let Some(plugin) = self.plugins.get(&provider.target) else {
            return Ok(Err(Missing::Plugin(provider.target.clone())));
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
            self.blobs.path(&disk.blob),
            name,
        )))
    }
}

/// Why a push cannot be planned as asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushPlanError {
    /// No account of this label that the user may see.
    NoAccount(String),
    /// The account is not in the image's environment; `valid` are the ones that are.
    NotInEnvironment { label: String, valid: Vec<String> },
    /// No target image of the account's provider type.
    NoTargetImage(String),
    /// The account names a provider that is not there (a broken store).
    NoProvider(String),
    /// The target image did not pass its boot check, and the push does not say to go on.
    BootCheckFailed {
        target_image: Id,
        result: CheckResult,
    },
}

/// The push parameter that sends an image whose boot check failed all the same.
pub const IGNORE_BOOT_CHECK: (&str, &str) = ("boot_check", "ignore");

/// Refuses a plan that would push an image whose boot check failed or timed out, unless
/// `parameters` hold [`IGNORE_BOOT_CHECK`]: an image that does not boot is no use in a
/// cloud. Images never checked go as they always did.
pub fn refuse_failed_checks(
    plan: &PushPlan<'_>,
    parameters: &[(String, String)],
) -> Result<(), PushPlanError> {
    let (name, value) = IGNORE_BOOT_CHECK;
    if parameters.iter().any(|(n, v)| n == name && v == value) {
        return Ok(());
    }
    for (_, _, ti) in plan {
        if let Some(check) = ti.disk.as_ref().and_then(|d| d.check.as_ref())
            && check.result != CheckResult::Passed
        {
            return Err(PushPlanError::BootCheckFailed {
                target_image: ti.id,
                result: check.result,
            });
        }
    }
    Ok(())
}

/// One push of a plan: the account, its provider, and the target image it gets.
pub type PushPlan<'a> = Vec<(&'a Account, &'a Provider, &'a TargetImage)>;

/// Which target image goes to which account, for a push to `labels` of an image in
/// `environment`. Every account is checked before anything is pushed. Labels are
/// unique within an environment: an account of that label in the environment, else
/// one `sees` lets the user see elsewhere (which is refused as not in it); one the user
/// may not see does not exist for them. `target_images` are in order of preference
/// (newest build first), and each account gets the first of its provider's type.
pub fn plan_push<'a>(
    labels: &[String],
    environment: u64,
    accounts: &'a [Account],
    providers: &'a [Provider],
    target_images: &'a [TargetImage],
    sees: impl Fn(&Account) -> bool,
) -> Result<PushPlan<'a>, PushPlanError> {
    let mut plan = Vec::with_capacity(labels.len());
    for label in labels {
        let account = accounts
            .iter()
            .find(|a| &a.label == label && a.environments.contains(&environment))
            .or_else(|| accounts.iter().find(|a| &a.label == label && sees(a)))
            .ok_or_else(|| PushPlanError::NoAccount(label.clone()))?;
        if !account.environments.contains(&environment) {
            return Err(PushPlanError::NotInEnvironment {
                label: label.clone(),
                valid: accounts
                    .iter()
                    .filter(|a| a.environments.contains(&environment))
                    .map(|a| a.label.clone())
                    .collect(),
            });
        }
        let provider = providers
            .iter()
            .find(|p| p.id == account.provider_id)
            .ok_or_else(|| PushPlanError::NoProvider(label.clone()))?;
        let target_image = target_images
            .iter()
            .find(|ti| ti.target == provider.target)
            .ok_or_else(|| PushPlanError::NoTargetImage(label.clone()))?;
        plan.push((account, provider, target_image));
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Progress;

    fn account(id: u64, label: &str, provider_id: u64, environments: &[u64]) -> Account {
        Account {
            id,
            label: label.into(),
            provider_id,
            credentials: Vec::new(),
            environments: environments.to_vec(),
            priority: None,
            max_running_instances: None,
        }
    }

    fn provider(id: u64, target: &str) -> Provider {
        Provider {
            id,
            name: format!("{target}-{id}"),
            target: target.into(),
            settings: Vec::new(),
        }
    }

    fn target_image(n: u128, target: &str) -> TargetImage {
        TargetImage {
            id: Id::from_u128(n),
            build_id: Id::from_u128(100),
            target: target.into(),
            progress: Progress::new(),
            parameters: Vec::new(),
            base_image: None,
            disk: None,
        }
    }

    #[test]
    fn an_image_that_failed_its_boot_check_is_pushed_only_when_the_push_says_so() {
        let accounts = [account(1, "acc", 1, &[7])];
        let providers = [provider(1, "mock")];
        let mut images = [target_image(1, "mock")];
        let checked = |result| model::Disk {
            blob: "b".into(),
            format: model::DiskFormat::Raw,
            size: 1,
            virtual_size: 1,
            firmware: Vec::new(),
            packages: None,
            check: Some(model::BootCheck {
                result,
                seconds: 30,
                firmware: model::Firmware::Uefi,
                detail: String::new(),
            }),
        };
        let ignore = [(
            IGNORE_BOOT_CHECK.0.to_owned(),
            IGNORE_BOOT_CHECK.1.to_owned(),
        )];
        for (result, refused) in [
            (CheckResult::Passed, false),
            (CheckResult::Failed, true),
            (CheckResult::TimedOut, true),
        ] {
            images[0].disk = Some(checked(result));
            let plan = plan_push(&labels(&["acc"]), 7, &accounts, &providers, &images, |_| {
                true
            })
            .expect("a plan");
            assert_eq!(
                refuse_failed_checks(&plan, &[]).is_err(),
                refused,
                "{result:?}"
            );
            assert!(refuse_failed_checks(&plan, &ignore).is_ok());
        }
        images[0].disk = None;
        let plan = plan_push(&labels(&["acc"]), 7, &accounts, &providers, &images, |_| {
            true
        })
        .expect("a plan");
        assert!(refuse_failed_checks(&plan, &[]).is_ok());
    }

    fn labels(list: &[&str]) -> Vec<String> {
        list.iter().map(|l| l.to_string()).collect()
    }

    #[test]
    fn each_account_gets_the_first_target_image_of_its_type() {
        let accounts = [
            account(1, "ec2-acc", 1, &[7]),
            account(2, "mock-acc", 2, &[7]),
        ];
        let providers = [provider(1, "ec2"), provider(2, "mock")];
        // Newest build first: the second mock image is older.
        let images = [
            target_image(1, "mock"),
            target_image(2, "ec2"),
            target_image(3, "mock"),
        ];
        let plan = plan_push(
            &labels(&["mock-acc", "ec2-acc"]),
            7,
            &accounts,
            &providers,
            &images,
            |_| true,
        )
        .expect("a plan");
        let picked: Vec<(u64, u128)> = plan
            .iter()
            .map(|(a, _, ti)| (a.id, ti.id.as_u128()))
            .collect();
        assert_eq!(picked, [(2, 1), (1, 2)]);
    }

    #[test]
    fn an_account_elsewhere_is_named_with_the_ones_that_would_do() {
        let accounts = [
            account(1, "mine", 1, &[7]),
            account(2, "theirs", 1, &[8]),
            account(3, "hidden", 1, &[9]),
        ];
        let providers = [provider(1, "mock")];
        let images = [target_image(1, "mock")];
        let plan = |label: &str| {
            plan_push(&labels(&[label]), 7, &accounts, &providers, &images, |a| {
                a.id != 3
            })
        };
        assert_eq!(
            plan("theirs").expect_err("elsewhere"),
            PushPlanError::NotInEnvironment {
                label: "theirs".into(),
                valid: vec!["mine".into()],
            }
        );
        // One the user may not see does not exist for them.
        assert_eq!(
            plan("hidden").expect_err("unseen"),
            PushPlanError::NoAccount("hidden".into())
        );
        assert_eq!(
            plan("nobody").expect_err("missing"),
            PushPlanError::NoAccount("nobody".into())
        );
    }

    #[test]
    fn an_account_whose_type_was_not_built_is_refused_before_anything_is_pushed() {
        let accounts = [
            account(1, "mock-acc", 1, &[7]),
            account(2, "ec2-acc", 2, &[7]),
        ];
        let providers = [provider(1, "mock"), provider(2, "ec2")];
        let images = [target_image(1, "mock")];
        assert_eq!(
            plan_push(
                &labels(&["mock-acc", "ec2-acc"]),
                7,
                &accounts,
                &providers,
                &images,
                |_| true,
            )
            .expect_err("no ec2 image"),
            PushPlanError::NoTargetImage("ec2-acc".into())
        );
    }
}
