//! The build of one target image: the base disk (fetched, installed or blank), the
//! plugin's build, and the image stored by its content.

use super::*;
use std::ops::ControlFlow;

/// Where a build's boot check starts in its percent.
const CHECK_PERCENT: u8 = 90;

impl Jobs {
    pub(super) fn build(&self, job: &Job, stop: &Stop) -> Result<Step, JobError> {
        let Some(ti) = self.store.target_image(job.id)? else {
            return Ok(Step::failed("the target image was deleted"));
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
            return Ok(Step::failed(reason));
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
                Ok(Step::failed(reason))
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
            Ok(Step::failed(reason))
        };
        let (facts, template) = match self.template_for(ti)? {
            Ok(found) => found,
            Err(missing) => return failed(missing.to_string()),
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
            (None, Err(refusal)) => return failed(refusal.to_string()),
        };
        let Some(plugin) = self.plugins.get(&ti.target) else {
            return failed(Missing::Plugin(ti.target.clone()).to_string());
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
        // What an install put in the image, for its manifest.
        let mut packages = None;
        let verify = ti
            .parameters
            .iter()
            .any(|(name, value)| name == "verify" && value == "boot");
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
                    let written = store.update_target_image(id, |ti| {
                        ti.progress.activity = format!("fetching the base image: {done}{of} bytes");
                    });
                    if let Err(e) = written {
                        tracing::warn!(job = %id, "could not record progress: {e}");
                    }
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
                    Ok((digest, size)) => {
                        facts.disk_size = size;
                        self.set_ti(ti.id, |ti| {
                            if let Some(b) = ti.base_image.as_mut() {
                                b.digest = Some(digest.clone());
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
                    match self.install_os(ti, job, plan, &base, &log, stop)? {
                        ControlFlow::Break(step) => return Ok(step),
                        ControlFlow::Continue(installed) => packages = Some(installed),
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
        // A boot check, when asked for, takes the last tenth.
        let ceiling = if verify { CHECK_PERCENT } else { 100 };
        let mut context =
            self.progress_context_from(ti.id, JobKind::Build, floor..=ceiling, PROGRESS_EVERY);
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
        let check = if verify {
            let firmware = plan.as_ref().map(os::Plan::firmware).unwrap_or_default();
            match self.boot_check(ti, job, &output, built.format, &firmware, work, &log, stop)? {
                ControlFlow::Break(step) => return Ok(step),
                ControlFlow::Continue(check) => Some(check),
            }
        } else {
            None
        };
        self.set_ti(ti.id, |ti| {
            ti.progress.activity = "storing the image".into();
        })?;
        // Hashing reads every allocated block (holes are only counted): it runs before
        // the hold, which collection waits for, and a cancel or a shutdown ends it.
        let blob = match blobs::hash_file(&output, &|| stop.reason().is_some()) {
            Ok((name, size)) => blobs::Blob { name, size },
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
        // The manifest is written before the record says COMPLETE, so a complete record
        // that counts packages always has its manifest.
        let package_count = match (&plan, packages) {
            (Some(plan), Some(packages)) => {
                let count = packages.len().try_into().unwrap_or(u32::MAX);
                let manifest = os::manifest::Manifest {
                    version: os::manifest::Manifest::VERSION,
                    os: plan.title.clone(),
                    mirror: plan.mirror().to_owned(),
                    created: now_rfc3339(),
                    packages,
                };
                let bytes = serde_json::to_vec(&manifest)
                    .map_err(|e| JobError::Io(format!("writing the package manifest: {e}")))?;
                write_atomically(&self.paths.manifest(ti.id), &bytes)
                    .map_err(|e| JobError::Io(format!("storing the package manifest: {e}")))?;
                Some(count)
            }
            _ => None,
        };
        let check_note = match &check {
            Some(check) => format!(
                "; the boot check {} in {} s",
                check.result.as_str(),
                check.seconds
            ),
            None => String::new(),
        };
        self.set_ti(ti.id, |ti| {
            // A cancel that came too late to stop the plugin still wins.
            if ti.progress.status == Status::Cancelled {
                return;
            }
            ti.progress.status = Status::Complete;
            ti.progress.percent = 100;
            ti.progress.activity = match &plan {
                Some(plan) => format!(
                    "built a {} image of {}{check_note}",
                    built.format.as_str(),
                    plan.title
                ),
                None => format!(
                    "built a {} image{blank_note}{check_note}",
                    built.format.as_str()
                ),
            };
            ti.disk = Some(Disk {
                blob: blob.name.clone(),
                format: built.format,
                size: blob.size,
                virtual_size: built.virtual_size,
                firmware: plan.as_ref().map(os::Plan::firmware).unwrap_or_default(),
                packages: package_count,
                check: check.clone(),
            });
        })?;
        // A target image deleted while it was built leaves its blob unreferenced; the
        // next collection removes it.
        Ok(Step::Done(Ok(())))
    }

    /// Boots the built image to see it reach a login prompt (the stage from
    /// [`CHECK_PERCENT`] to 99 %). The console is kept beside the build log. `Break` when
    /// the build ends here: cancelled, stopped, or the check could not run.
    #[allow(clippy::too_many_arguments)]
    fn boot_check(
        &self,
        ti: &TargetImage,
        job: &Job,
        image: &Path,
        format: model::DiskFormat,
        firmware: &[model::Firmware],
        work: &Path,
        log: &os::Log,
        stop: &Stop,
    ) -> Result<ControlFlow<Step, model::BootCheck>, JobError> {
        let firmware = os::boot::firmware_for(firmware);
        log.line(&format!(
            "== checking that the image boots ({}), within {} s",
            firmware.as_str(),
            self.installer.settings().boot_deadline.as_secs()
        ));
        let mut context =
            self.progress_context_from(ti.id, JobKind::Build, CHECK_PERCENT..=99, PROGRESS_EVERY);
        let check_dir = work.join("check");
        let machine = os::boot::Machine {
            image,
            format,
            firmware,
            deadline: self.installer.settings().boot_deadline,
            work: &check_dir,
        };
        let checked = os::boot::check(
            &machine,
            log,
            &mut |percent, activity| (context.progress)(percent, activity),
            &|| stop.reason().is_some(),
        );
        // The console stays with the target image, whatever the check found.
        let console = check_dir.join("console");
        if console.exists() {
            std::fs::copy(&console, self.paths.console(ti.id))
                .map_err(|e| JobError::Io(format!("keeping the boot console: {e}")))?;
        }
        match checked {
            Ok(check) => {
                log.line(&format!(
                    "== the boot check {} after {} s{}",
                    check.result.as_str(),
                    check.seconds,
                    if check.detail.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", check.detail)
                    }
                ));
                Ok(ControlFlow::Continue(check))
            }
            Err(e) if e.is_stop() => {
                log.line("== stopped");
                on_plugin_error(job, stopped(stop), |change| {
                    self.set_ti(ti.id, |ti| change(&mut ti.progress)).map(drop)
                })
                .map(ControlFlow::Break)
            }
            Err(e) => {
                let reason = format!("the boot check could not run: {e}");
                log.line(&format!("== failed: {reason}"));
                self.set_ti(ti.id, |ti| fail(&mut ti.progress, reason.clone()))?;
                Ok(ControlFlow::Break(Step::failed(reason)))
            }
        }
    }

    /// Installs the plan's OS (or finds the disk an earlier target of the same build or
    /// template made) and links it as the build's base disk, answering what it holds.
    /// `Break` when the build ends here: failed, cancelled or stopped.
    fn install_os(
        &self,
        ti: &TargetImage,
        job: &Job,
        plan: &os::Plan,
        base: &Path,
        log: &os::Log,
        stop: &Stop,
    ) -> Result<ControlFlow<Step, Vec<os::manifest::Package>>, JobError> {
        log.line(&format!("== installing {}", plan.title));
        // An install reports a few dozen stages, each worth showing: none is dropped.
        let mut context =
            self.progress_context_from(ti.id, JobKind::Build, 0..=100, Duration::ZERO);
        let started = Instant::now();
        let installed = self.installer.install(
            plan,
            log,
            &mut |percent, activity| (context.progress)(percent, activity),
            &|| stop.reason().is_some(),
        );
        tracing::info!(job = %ti.id, os = %plan.title, elapsed = ?started.elapsed(), ok = installed.is_ok(), "OS install finished");
        let os::Installed { disk, packages } = match installed {
            Ok(installed) => installed,
            Err(e) if e.is_stop() => {
                log.line("== stopped");
                return on_plugin_error(job, stopped(stop), |change| {
                    self.set_ti(ti.id, |ti| change(&mut ti.progress)).map(drop)
                })
                .map(ControlFlow::Break);
            }
            Err(e) => {
                let reason = e.to_string();
                log.line(&format!("== failed: {reason}"));
                self.store
                    .update_target_image(ti.id, |ti| fail(&mut ti.progress, reason.clone()))?;
                return Ok(ControlFlow::Break(Step::failed(reason)));
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
        Ok(ControlFlow::Continue(packages))
    }

    /// The template facts for a target image's build, or why there are none.
    pub(super) fn template_for(
        &self,
        ti: &TargetImage,
    ) -> Result<Result<(TemplateFacts, model::tdl::Template), Missing>, StoreError> {
        let Some(build) = self.store.build(ti.build_id)? else {
            return Ok(Err(Missing::Build));
        };
        let Some(image) = self.store.image(build.image_id)? else {
            return Ok(Err(Missing::Image));
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
            Err(e) => Err(Missing::Template(e)),
        })
    }
}

/// The most a build may write: the base disk, plus an eighth of it and 64 MiB for the
/// metadata of an image format (qcow2's tables and VMDK's grain tables and markers stay
/// well inside that), so a plugin cannot fill the data disk.
fn output_limit(base_size: u64) -> u64 {
    base_size
        .saturating_add(base_size / 8)
        .saturating_add(64 << 20)
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

/// Now, as RFC 3339 in UTC to the second (`2026-12-08T04:08:56Z`, the form SPDX asks
/// for).
fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap_or_else(|_| time::OffsetDateTime::now_utc())
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Writes `bytes` to `path` through a temporary file renamed into place, so a reader
/// finds the whole file or none.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let partial = path.with_extension("partial");
    std::fs::write(&partial, bytes)?;
    std::fs::File::open(&partial)?.sync_all()?;
    std::fs::rename(&partial, path)
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
