//! Rows of the image tables: images, builds, target images, provider images, and the
//! jobs that make them.

use super::*;

// ---- images ----

#[derive(Serialize, Deserialize)]
struct ImageV1 {
    id: Id,
    environment_id: u64,
    name: String,
    description: String,
    os: String,
    os_version: String,
    arch: String,
    template_id: Id,
    template: String,
}

impl From<&Image> for ImageV1 {
    fn from(i: &Image) -> Self {
        ImageV1 {
            id: i.id,
            environment_id: i.environment_id,
            name: i.name.clone(),
            description: i.description.clone(),
            os: i.os.clone(),
            os_version: i.os_version.clone(),
            arch: i.arch.clone(),
            template_id: i.template_id,
            template: i.template.clone(),
        }
    }
}

impl From<ImageV1> for Image {
    fn from(i: ImageV1) -> Self {
        Image {
            id: i.id,
            environment_id: i.environment_id,
            name: i.name,
            description: i.description,
            os: i.os,
            os_version: i.os_version,
            arch: i.arch,
            template_id: i.template_id,
            template: i.template,
        }
    }
}

one_version!(Image, "images", ImageV1);

// ---- builds ----

#[derive(Serialize, Deserialize)]
struct BuildV1 {
    id: Id,
    image_id: Id,
}

impl From<&Build> for BuildV1 {
    fn from(b: &Build) -> Self {
        BuildV1 {
            id: b.id,
            image_id: b.image_id,
        }
    }
}

impl From<BuildV1> for Build {
    fn from(b: BuildV1) -> Self {
        Build {
            id: b.id,
            image_id: b.image_id,
        }
    }
}

one_version!(Build, "builds", BuildV1);

// ---- target images ----

#[derive(Serialize, Deserialize)]
struct BaseImageV1 {
    url: String,
    /// A blob name's form of the digest (`blobs::digest`): a plain SHA-256 in rows
    /// written before the sparse digest, the same position after.
    digest: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy)]
enum DiskFormatV1 {
    Raw,
    Qcow2,
    Vmdk,
}

#[derive(Serialize, Deserialize)]
struct DiskV1 {
    /// The blob's name: a plain SHA-256 then, either kind now (`blobs::digest`).
    blob: String,
    format: DiskFormatV1,
    size: u64,
    virtual_size: u64,
}

#[derive(Serialize, Deserialize)]
struct TargetImageV1 {
    id: Id,
    build_id: Id,
    target: String,
    progress: ProgressV1,
    parameters: Vec<(String, String)>,
    base_image: Option<BaseImageV1>,
    disk: Option<DiskV1>,
}

impl From<TargetImageV1> for TargetImage {
    fn from(t: TargetImageV1) -> Self {
        TargetImageV2 {
            id: t.id,
            build_id: t.build_id,
            target: t.target,
            progress: t.progress,
            parameters: t.parameters,
            base_image: t.base_image,
            // What version 1 did not record is not known.
            disk: t.disk.map(|d| DiskV2 {
                blob: d.blob,
                format: d.format,
                size: d.size,
                virtual_size: d.virtual_size,
                firmware: Vec::new(),
            }),
        }
        .into()
    }
}

#[derive(Serialize, Deserialize, Clone, Copy)]
enum FirmwareV1 {
    Bios,
    Uefi,
}

/// Version 2 adds the firmware a disk boots with.
#[derive(Serialize, Deserialize)]
struct DiskV2 {
    blob: String,
    format: DiskFormatV1,
    size: u64,
    virtual_size: u64,
    firmware: Vec<FirmwareV1>,
}

#[derive(Serialize, Deserialize)]
struct TargetImageV2 {
    id: Id,
    build_id: Id,
    target: String,
    progress: ProgressV1,
    parameters: Vec<(String, String)>,
    base_image: Option<BaseImageV1>,
    disk: Option<DiskV2>,
}

impl From<TargetImageV2> for TargetImage {
    fn from(t: TargetImageV2) -> Self {
        TargetImageV3 {
            id: t.id,
            build_id: t.build_id,
            target: t.target,
            progress: t.progress,
            parameters: t.parameters,
            base_image: t.base_image,
            // What version 2 did not record is not known.
            disk: t.disk.map(|d| DiskV3 {
                blob: d.blob,
                format: d.format,
                size: d.size,
                virtual_size: d.virtual_size,
                firmware: d.firmware,
                packages: None,
                check: None,
            }),
        }
        .into()
    }
}

#[derive(Serialize, Deserialize, Clone, Copy)]
enum CheckResultV1 {
    Passed,
    Failed,
    TimedOut,
}

#[derive(Serialize, Deserialize)]
struct BootCheckV1 {
    result: CheckResultV1,
    seconds: u32,
    firmware: FirmwareV1,
    detail: String,
}

/// Version 3 adds the count of the manifest's packages and the boot check.
#[derive(Serialize, Deserialize)]
struct DiskV3 {
    blob: String,
    format: DiskFormatV1,
    size: u64,
    virtual_size: u64,
    firmware: Vec<FirmwareV1>,
    packages: Option<u32>,
    check: Option<BootCheckV1>,
}

#[derive(Serialize, Deserialize)]
struct TargetImageV3 {
    id: Id,
    build_id: Id,
    target: String,
    progress: ProgressV1,
    parameters: Vec<(String, String)>,
    base_image: Option<BaseImageV1>,
    disk: Option<DiskV3>,
}

fn firmware_v1(f: Firmware) -> FirmwareV1 {
    match f {
        Firmware::Bios => FirmwareV1::Bios,
        Firmware::Uefi => FirmwareV1::Uefi,
    }
}

fn firmware_of(f: FirmwareV1) -> Firmware {
    match f {
        FirmwareV1::Bios => Firmware::Bios,
        FirmwareV1::Uefi => Firmware::Uefi,
    }
}

impl From<&TargetImage> for TargetImageV3 {
    fn from(t: &TargetImage) -> Self {
        TargetImageV3 {
            id: t.id,
            build_id: t.build_id,
            target: t.target.clone(),
            progress: (&t.progress).into(),
            parameters: t.parameters.clone(),
            base_image: t.base_image.as_ref().map(|b| BaseImageV1 {
                url: b.url.clone(),
                digest: b.digest.clone(),
            }),
            disk: t.disk.as_ref().map(|d| DiskV3 {
                blob: d.blob.clone(),
                format: match d.format {
                    DiskFormat::Raw => DiskFormatV1::Raw,
                    DiskFormat::Qcow2 => DiskFormatV1::Qcow2,
                    DiskFormat::Vmdk => DiskFormatV1::Vmdk,
                },
                size: d.size,
                virtual_size: d.virtual_size,
                firmware: d.firmware.iter().copied().map(firmware_v1).collect(),
                packages: d.packages,
                check: d.check.as_ref().map(|c| BootCheckV1 {
                    result: match c.result {
                        CheckResult::Passed => CheckResultV1::Passed,
                        CheckResult::Failed => CheckResultV1::Failed,
                        CheckResult::TimedOut => CheckResultV1::TimedOut,
                    },
                    seconds: c.seconds,
                    firmware: firmware_v1(c.firmware),
                    detail: c.detail.clone(),
                }),
            }),
        }
    }
}

impl From<TargetImageV3> for TargetImage {
    fn from(t: TargetImageV3) -> Self {
        TargetImage {
            id: t.id,
            build_id: t.build_id,
            target: t.target,
            progress: t.progress.into(),
            parameters: t.parameters,
            base_image: t.base_image.map(|b| BaseImage {
                url: b.url,
                digest: b.digest,
            }),
            disk: t.disk.map(|d| Disk {
                blob: d.blob,
                format: match d.format {
                    DiskFormatV1::Raw => DiskFormat::Raw,
                    DiskFormatV1::Qcow2 => DiskFormat::Qcow2,
                    DiskFormatV1::Vmdk => DiskFormat::Vmdk,
                },
                size: d.size,
                virtual_size: d.virtual_size,
                firmware: d.firmware.into_iter().map(firmware_of).collect(),
                packages: d.packages,
                check: d.check.map(|c| BootCheck {
                    result: match c.result {
                        CheckResultV1::Passed => CheckResult::Passed,
                        CheckResultV1::Failed => CheckResult::Failed,
                        CheckResultV1::TimedOut => CheckResult::TimedOut,
                    },
                    seconds: c.seconds,
                    firmware: firmware_of(c.firmware),
                    detail: c.detail,
                }),
            }),
        }
    }
}

impl Row for TargetImage {
    const TABLE: &'static str = "target images";
    const VERSION: u8 = 3;
    fn encode(&self) -> Vec<u8> {
        versioned(Self::VERSION, &TargetImageV3::from(self))
    }
    fn decode(bytes: &[u8]) -> Result<Self, RowError> {
        match version_of(bytes)? {
            (1, rest) => Ok(exactly::<TargetImageV1>(rest)?.into()),
            (2, rest) => Ok(exactly::<TargetImageV2>(rest)?.into()),
            (3, rest) => Ok(exactly::<TargetImageV3>(rest)?.into()),
            (version, _) => Err(unknown_version(Self::TABLE, version, Self::VERSION)),
        }
    }
}

// ---- provider images ----

#[derive(Serialize, Deserialize)]
struct ProviderImageV1 {
    id: Id,
    target_image_id: Id,
    provider_id: u64,
    account_id: u64,
    provider_name: String,
    account_label: String,
    target_identifier: String,
    progress: ProgressV1,
    parameters: Vec<(String, String)>,
}

impl From<&ProviderImage> for ProviderImageV1 {
    fn from(p: &ProviderImage) -> Self {
        ProviderImageV1 {
            id: p.id,
            target_image_id: p.target_image_id,
            provider_id: p.provider_id,
            account_id: p.account_id,
            provider_name: p.provider_name.clone(),
            account_label: p.account_label.clone(),
            target_identifier: p.target_identifier.clone(),
            progress: (&p.progress).into(),
            parameters: p.parameters.clone(),
        }
    }
}

impl From<ProviderImageV1> for ProviderImage {
    fn from(p: ProviderImageV1) -> Self {
        ProviderImage {
            id: p.id,
            target_image_id: p.target_image_id,
            provider_id: p.provider_id,
            account_id: p.account_id,
            provider_name: p.provider_name,
            account_label: p.account_label,
            target_identifier: p.target_identifier,
            progress: p.progress.into(),
            parameters: p.parameters,
        }
    }
}

one_version!(ProviderImage, "provider images", ProviderImageV1);

// ---- jobs ----

#[derive(Serialize, Deserialize, Clone, Copy)]
enum JobKindV1 {
    Build,
    Push,
    Delete,
}

#[derive(Serialize, Deserialize)]
struct DeletionV1 {
    provider_id: u64,
    account_id: u64,
    provider_name: String,
    account_label: String,
    target_identifier: String,
}

#[derive(Serialize, Deserialize)]
struct JobV1 {
    id: Id,
    kind: JobKindV1,
    attempts: u32,
    deletion: Option<DeletionV1>,
}

impl From<&Job> for JobV1 {
    fn from(j: &Job) -> Self {
        JobV1 {
            id: j.id,
            kind: match j.kind {
                JobKind::Build => JobKindV1::Build,
                JobKind::Push => JobKindV1::Push,
                JobKind::Delete => JobKindV1::Delete,
            },
            attempts: j.attempts,
            deletion: j.deletion.as_ref().map(|d| DeletionV1 {
                provider_id: d.provider_id,
                account_id: d.account_id,
                provider_name: d.provider_name.clone(),
                account_label: d.account_label.clone(),
                target_identifier: d.target_identifier.clone(),
            }),
        }
    }
}

impl From<JobV1> for Job {
    fn from(j: JobV1) -> Self {
        Job {
            id: j.id,
            kind: match j.kind {
                JobKindV1::Build => JobKind::Build,
                JobKindV1::Push => JobKind::Push,
                JobKindV1::Delete => JobKind::Delete,
            },
            attempts: j.attempts,
            deletion: j.deletion.map(|d| Deletion {
                provider_id: d.provider_id,
                account_id: d.account_id,
                provider_name: d.provider_name,
                account_label: d.account_label,
                target_identifier: d.target_identifier,
            }),
        }
    }
}

one_version!(Job, "jobs", JobV1);
