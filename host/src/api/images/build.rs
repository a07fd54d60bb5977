//! `POST /api/images` with a template: the image, its build and a target image per
//! target, checked (the environment, the targets, what the server installs) and stored
//! with their jobs before anything is announced.

use super::*;

pub(super) async fn build(
    state: &Shared,
    headers: &HeaderMap,
    user: &CurrentUser,
    request: &Element,
) -> ApiResult {
    let base = base(state, headers);
    // Order of checks as Conductor's, so the same request fails with the same error.
    let tdl = request
        .child("tdl")
        .ok_or_else(|| insufficient("Please specify a type, build or import"))?;
    let template_xml = template_text(tdl)?;
    // The parser has bounds of its own (size, depth, nodes), so a hostile template is
    // refused for what it is before the stricter caps below.
    let template = model::tdl::parse(&template_xml).map_err(invalid_template)?;
    // Every image keeps its template, and lists carry each name and description: caps
    // keep a tenant's images from filling the database and every list.
    if template_xml.len() > MAX_TEMPLATE {
        return Err(invalid_template(format!(
            "the template is longer than the {MAX_TEMPLATE} bytes this server accepts"
        )));
    }
    if template.name.chars().count() > MAX_NAME {
        return Err(invalid_template(format!(
            "name is longer than {MAX_NAME} characters"
        )));
    }
    if template.description.chars().count() > MAX_DESCRIPTION {
        return Err(invalid_template(format!(
            "description is longer than {MAX_DESCRIPTION} characters"
        )));
    }
    let env_name = environment_named(request);
    let targets = split_list(&request.child_text("targets").unwrap_or_default());
    if targets.len() > crate::model::MAX_LIST {
        return Err(ApiError::Incorrect(format!(
            "At most {} targets may be built at once",
            crate::model::MAX_LIST
        )));
    }
    let parameters = parameters(request)?;

    let plugins = state.plugins.clone();
    let (environment, accounts, providers) = {
        let env_name = env_name.clone();
        blocking(state, move |store| {
            Ok((
                store.environment_by_name(&env_name)?,
                store.accounts()?,
                store.providers()?,
            ))
        })
        .await?
    };
    let environment = environment
        .filter(|e| user.0.sees(e.id))
        .ok_or_else(|| ApiError::EnvironmentNotFound(env_name.to_string()))?;
    user.require(environment.id, Action::ManageImages)?;
    // Only now, for a user who may build here, is anything said about a URL or a path.
    let base_image = request
        .child_text("base_image")
        .filter(|u| !u.is_empty())
        .map(|url| -> ApiResult<BaseImage> {
            let source = crate::blobs::BaseSource {
                import_dir: state.import_dir.as_deref(),
                policy: &state.fetch,
            };
            crate::blobs::check_base_url(&url, &source)
                .map_err(|refusal| ApiError::Incorrect(refusal.to_string()))?;
            Ok(BaseImage { url, digest: None })
        })
        .transpose()?;
    // With a base image the disk is the base image's size, held to the same limit when
    // it is fetched.
    let max = state.fetch.max_bytes;
    if base_image.is_none() && template.disk_size > max {
        return Err(invalid_template(format!(
            "disk/size is {} bytes, more than the {max} bytes this server allows for an image",
            template.disk_size
        )));
    }
    if targets.is_empty() {
        return Err(ApiError::Incorrect(
            "No targets given: name at least one target, such as <targets>mock</targets>".into(),
        ));
    }
    // A target can be built in an environment when one of its accounts is a member.
    let buildable: Vec<String> = {
        let mut names: Vec<String> = accounts
            .iter()
            .filter(|a| a.environments.contains(&environment.id))
            .filter_map(|a| providers.iter().find(|p| p.id == a.provider_id))
            .map(|p| p.target.clone())
            .collect();
        names.sort();
        names.dedup();
        names
    };
    let mut unknown = None;
    for target in &targets {
        if plugins.get(target).is_none() {
            unknown = Some(target.clone());
        } else if !buildable.contains(target) {
            return Err(ApiError::TargetNotBuildable {
                target: target.clone(),
                valid: buildable.clone(),
            });
        }
    }
    if let Some(target) = unknown {
        return Err(ApiError::TargetNotFound(target));
    }
    // Something to boot: an OS this server installs, or a base image from elsewhere.
    let bootable = match base_image {
        Some(_) => true,
        None => check_install(state.jobs.installer(), &plugins, &template, &targets)?,
    };
    let parameters = with_verify(parameters, state.jobs.installer(), bootable)?;

    let image = Image {
        id: model::new_id(),
        environment_id: environment.id,
        name: template.name.clone(),
        description: template.description.clone(),
        os: template.os_name.clone(),
        os_version: template.os_version.clone(),
        arch: template.arch.clone(),
        template_id: model::new_id(),
        template: template_xml,
    };
    let build = Build {
        id: model::new_id(),
        image_id: image.id,
    };
    let target_images: Vec<TargetImage> = targets
        .iter()
        .map(|target| TargetImage {
            id: model::new_id(),
            build_id: build.id,
            target: target.clone(),
            progress: Progress::new(),
            parameters: parameters.clone(),
            base_image: base_image.clone(),
            disk: None,
        })
        .collect();
    {
        let (image, build, target_images) = (image.clone(), build.clone(), target_images.clone());
        submit(state, move |jobs| {
            jobs.submit_build(Some(&image), &build, &target_images)
        })
        .await?;
    }

    let iid = image.id.to_string();
    let bid = build.id.to_string();
    let mut doc = Doc::new();
    doc.open(
        "image",
        &[("href", &format!("{base}/images/{iid}")), ("id", &iid)],
    )
    .open(
        "build",
        &[("href", &format!("{base}/builds/{bid}")), ("id", &bid)],
    )
    .open("target_images", &[]);
    for ti in &target_images {
        let tid = ti.id.to_string();
        doc.open(
            "target_image",
            &[
                ("href", &format!("{base}/target_images/{tid}")),
                ("id", &tid),
            ],
        )
        .text("status", ti.progress.status.as_str())
        .text("target", &ti.target)
        .open("provider_images", &[])
        .close("provider_images")
        .close("target_image");
    }
    doc.close("target_images").close("build").close("image");
    Ok(xml_ok(doc.finish()))
}

/// The build's `verify` parameter, checked: `boot` (boot the finished image to see it
/// reach a login prompt) or `none`. A boot check needs something to boot (`bootable`:
/// an OS this server installs, or a base image); a blank disk would only fail it.
/// Absent, it is the operator's default (`--verify`) for builds that have something to
/// boot, written into the parameters so the build does what was decided now.
fn with_verify(
    mut parameters: Vec<(String, String)>,
    installer: &crate::os::Installer,
    bootable: bool,
) -> ApiResult<Vec<(String, String)>> {
    let settings = installer.settings();
    let mut given = parameters.iter().filter(|(name, _)| name == "verify");
    let verify = match (given.next(), given.next()) {
        (Some(_), Some(_)) => {
            return Err(ApiError::Incorrect(
                "the parameter verify is given more than once".into(),
            ));
        }
        (Some((_, value)), None) => value.clone(),
        (None, _) if settings.check_every_build && bootable => {
            parameters.push(("verify".into(), "boot".into()));
            "boot".into()
        }
        (None, _) => return Ok(parameters),
    };
    match verify.as_str() {
        "none" => Ok(parameters),
        "boot" if !bootable => Err(ApiError::Incorrect(format!(
            "verify=boot needs an image with an operating system to boot: this server \
             installs {}, and builds a blank disk for any other OS unless the request gives \
             a <base_image>",
            installer.installable()
        ))),
        "boot" => match crate::os::boot::missing() {
            None => Ok(parameters),
            Some(missing) => Err(ApiError::Incorrect(format!(
                "verify=boot was asked for, but {missing}"
            ))),
        },
        other => Err(ApiError::Incorrect(format!(
            "the parameter verify must be boot or none, not '{other}'"
        ))),
    }
}

/// What a build without a base image installs, checked now and refused with the reason
/// rather than failed later: an OS this server installs must come from a mirror the
/// operator allows, with the packages each target needs, in a disk each target can
/// boot; and a cloud boots what it is given, so a cloud target of an OS this server
/// cannot install is refused (the mock target builds a blank disk for any OS). Answers
/// whether the build installs an OS.
fn check_install(
    installer: &crate::os::Installer,
    plugins: &crate::plugins::Plugins,
    template: &model::tdl::Template,
    targets: &[String],
) -> ApiResult<bool> {
    let refuse = |reason: String| ApiError::Incorrect(reason);
    let plan = installer
        .plan(template, &plugins.needed_packages(targets))
        .map_err(|refusal| refuse(refusal.to_string()))?;
    for target in targets {
        let Some(plugin) = plugins.get(target) else {
            continue;
        };
        let needs = &plugin.info.needs.firmware;
        match &plan {
            None if plugin.info.reaches_a_cloud() => {
                return Err(refuse(format!(
                    "Target {target} boots the image it is given, and this server cannot \
                     install {} {} {}: it installs {}. Name one of those in <os>, or give a \
                     <base_image> to build from.",
                    template.os_name,
                    template.os_version,
                    template.arch,
                    installer.installable()
                )));
            }
            Some(plan)
                if !needs.is_empty() && !needs.iter().any(|f| plan.firmware().contains(f)) =>
            {
                let names = |list: &[model::Firmware]| {
                    list.iter()
                        .map(|f| f.as_str())
                        .collect::<Vec<_>>()
                        .join(" or ")
                };
                return Err(refuse(format!(
                    "Target {target} boots with {}, and {} boots with {}",
                    names(needs),
                    plan.title,
                    names(&plan.firmware())
                )));
            }
            _ => {}
        }
    }
    Ok(plan.is_some())
}
