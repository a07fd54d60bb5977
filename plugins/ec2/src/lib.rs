//! The `ec2` provider: Amazon EC2 images (AMIs) backed by EBS snapshots.
//!
//! - `build` writes the base disk as a raw image: EBS takes raw blocks, nothing to convert.
//! - `push` uploads the image with the EBS direct API (StartSnapshot, PutSnapshotBlock for
//!   every block that is not all zeros, several in flight, CompleteSnapshot), waits for
//!   the snapshot, registers an AMI on it and tags both, and answers the AMI id. No S3
//!   bucket, no import role and no import task are involved.
//! - `delete` deregisters the AMI and deletes its snapshots; `lookup` describes an AMI.
//! - `check-account` asks STS who the keys belong to, and checks the account number.
//!
//! Provider settings: `region` (or Conductor's `deltacloud_provider`), and `endpoint`,
//! one URL for EC2, EBS and STS together (an emulator, another partition); without it the
//! region's public endpoints are used. The server lets the plugin reach only those.
//!
//! Push parameters: `architecture` (`x86_64`, `arm64`, `i386`; default from the
//! template's arch), `boot_mode` (by default what the image boots with, as the server's
//! `image.firmware` says: `uefi-preferred` for both, `uefi`, `legacy-bios`; without it
//! `uefi-preferred` for x86 and `uefi` for arm64), `upload_concurrency` (blocks in
//! flight, 1 to 64, default 16).

// Built for the host only by `cargo build --workspace`, where nothing is exported (see
// the export below) and so nothing is used.
#![cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]

mod aws;

use aws::{Aws, aws_error};
use base64::Engine as _;
use conductor_plugin_sdk::guest::host::{self, DiskReader, DiskWriter, Level};
use conductor_plugin_sdk::guest::types::{
    Account, BuildOutput, CredentialDefinition, DiskFormat, Error, ImageDetails, Provider,
    ProviderInfo, Template,
};
use conductor_plugin_sdk::guest::{Guest, build_image, image_firmware, lookup, target};
use conductor_plugin_sdk::http::{Pending, Request};
use sha2::{Digest, Sha256};
use std::collections::VecDeque;

struct Ec2;

// Exported only when built as a component: on the host (`cargo build --workspace`)
// the export's symbol names, which hold ':' and '@', are not valid for the linker.
#[cfg(target_arch = "wasm32")]
conductor_plugin_sdk::guest::export_provider!(Ec2);

/// An instance gets its SSH key and user data from the instance metadata service, which
/// cloud-init reads; EC2 starts images with UEFI or BIOS (the image says which, see
/// `boot_mode`).
impl target::Guest for Ec2 {
    fn needs() -> target::OsNeeds {
        target::OsNeeds {
            packages: vec!["cloud-init".into(), "openssh-server".into()],
            firmware: vec![target::Firmware::Uefi, target::Firmware::Bios],
        }
    }
}

/// The tag that ties a snapshot to the AMI registered on it, so `delete` finds the
/// snapshot even where the AMI's block device mappings do not name it.
const AMI_TAG: &str = "conductor:ami";
/// The block size AWS answers; used only to check what an endpoint answers.
const AWS_BLOCK_SIZE: u64 = 512 << 10;
const GIB: u64 = 1 << 30;

impl Guest for Ec2 {
    fn info() -> ProviderInfo {
        ProviderInfo {
            target: "ec2".into(),
            display_name: "Amazon EC2".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            // Conductor's ec2 type: names as the API uses them, labels as people read them.
            // The x509 pair is for old bundle-based tooling and may be left out.
            credentials: vec![
                CredentialDefinition::new("username", "access_key", "text"),
                CredentialDefinition::new("password", "secret_access_key", "password"),
                CredentialDefinition::new("account_id", "account_number", "text"),
                CredentialDefinition::new("x509private", "key", "file?"),
                CredentialDefinition::new("x509public", "certificate", "file?"),
            ],
            settings: vec!["region".into(), "endpoint".into()],
            format: DiskFormat::Raw,
            // The region's public endpoints, filled in from the provider's region; and the
            // AWS domains and loopback, which an `endpoint` setting may name.
            hosts: vec![
                "ec2.{region|deltacloud_provider}.amazonaws.com".into(),
                "ebs.{region|deltacloud_provider}.amazonaws.com".into(),
                "sts.{region|deltacloud_provider}.amazonaws.com".into(),
                "*.amazonaws.com".into(),
                "*.amazonaws.com.cn".into(),
                "127.0.0.1".into(),
                "localhost".into(),
            ],
        }
    }

    fn check_account(provider: Provider, account: Account) -> Result<(), Error> {
        let aws = Aws::new(&provider, &account)?;
        let identity = aws.sts("GetCallerIdentity")?;
        let owner = identity.text_of("Account");
        if !aws.account_number.is_empty() && !owner.is_empty() && owner != aws.account_number {
            return Err(Error::BadCredentials(format!(
                "the access key belongs to AWS account {owner}, not to the account number {} given",
                aws.account_number
            )));
        }
        Ok(())
    }

    fn build(
        template: Template,
        base: &DiskReader,
        output: &DiskWriter,
        _parameters: Vec<(String, String)>,
    ) -> Result<BuildOutput, Error> {
        host::log(
            Level::Info,
            &format!("building '{}' for ec2 (raw)", template.name),
        );
        build_image(conductor_plugin_sdk::Format::Raw, base, output)
    }

    fn push(
        provider: Provider,
        account: Account,
        image: &DiskReader,
        name: String,
        parameters: Vec<(String, String)>,
    ) -> Result<String, Error> {
        let aws = Aws::new(&provider, &account)?;
        let architecture = architecture(&parameters)?;
        let boot_mode = match lookup(&parameters, "boot_mode") {
            Some(mode @ ("legacy-bios" | "uefi" | "uefi-preferred")) => mode.to_owned(),
            Some(other) => {
                return Err(Error::InvalidInput(format!(
                    "boot_mode={other} is not one of legacy-bios, uefi, uefi-preferred"
                )));
            }
            // The firmware the image boots with, when the server installed its OS.
            None => {
                let firmware = image_firmware(&parameters);
                let has = |f: target::Firmware| firmware.contains(&f);
                match (has(target::Firmware::Uefi), has(target::Firmware::Bios)) {
                    (true, true) => "uefi-preferred".into(),
                    (true, false) => "uefi".into(),
                    (false, true) => "legacy-bios".into(),
                    _ if architecture == "arm64" => "uefi".into(),
                    _ => "uefi-preferred".into(),
                }
            }
        };
        let concurrency = match lookup(&parameters, "upload_concurrency") {
            None => 16,
            Some(n) => n
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=64).contains(n))
                .ok_or_else(|| {
                    Error::InvalidInput(format!(
                        "upload_concurrency={n} is not a number from 1 to 64"
                    ))
                })?,
        };

        host::progress(0, "starting the EBS snapshot");
        let snapshot = upload(&aws, image, &name, concurrency)?;
        let registered = register(&aws, &snapshot, &name, &architecture, &boot_mode);
        let ami = match registered {
            Ok(ami) => ami,
            Err(e) => {
                // Leave nothing behind that nobody knows about.
                if let Err(cleanup) = aws.ec2("DeleteSnapshot", &[("SnapshotId", &snapshot)]) {
                    host::log(
                        Level::Warn,
                        &format!(
                            "could not delete snapshot {snapshot} after a failed registration: {}",
                            cleanup.message()
                        ),
                    );
                }
                return Err(e);
            }
        };
        host::progress(100, &format!("registered {ami}"));
        Ok(ami)
    }

    fn delete(provider: Provider, account: Account, ami: String) -> Result<(), Error> {
        let aws = Aws::new(&provider, &account)?;
        let mut snapshots: Vec<String> = Vec::new();
        match aws.ec2("DescribeImages", &[("ImageId.1", &ami)]) {
            Ok(found) => {
                for image in found.items("imagesSet") {
                    for mapping in image.items("blockDeviceMapping") {
                        let id = mapping.text_of("snapshotId");
                        if !id.is_empty() {
                            snapshots.push(id);
                        }
                    }
                }
            }
            Err(Error::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
        let tagged = aws.ec2(
            "DescribeSnapshots",
            &[
                ("Owner.1", "self"),
                ("Filter.1.Name", &format!("tag:{AMI_TAG}")),
                ("Filter.1.Value.1", &ami),
            ],
        )?;
        for snapshot in tagged.items("snapshotSet") {
            let id = snapshot.text_of("snapshotId");
            if !id.is_empty() && !snapshots.contains(&id) {
                snapshots.push(id);
            }
        }
        match aws.ec2("DeregisterImage", &[("ImageId", &ami)]) {
            Ok(_) => {}
            // Already gone: deleting what is gone succeeds.
            Err(Error::NotFound(_)) => {}
            Err(Error::Failed(m)) if m.contains("InvalidAMIID.Unavailable") => {}
            Err(e) => return Err(e),
        }
        for snapshot in &snapshots {
            match aws.ec2("DeleteSnapshot", &[("SnapshotId", snapshot)]) {
                Ok(_) | Err(Error::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        host::log(
            Level::Info,
            &format!(
                "deregistered {ami} and deleted snapshots [{}]",
                snapshots.join(", ")
            ),
        );
        Ok(())
    }

    fn lookup(provider: Provider, account: Account, ami: String) -> Result<ImageDetails, Error> {
        let aws = Aws::new(&provider, &account)?;
        let found = aws.ec2("DescribeImages", &[("ImageId.1", &ami)])?;
        let Some(image) = found.items("imagesSet").into_iter().next() else {
            return Err(Error::NotFound(format!(
                "no image {ami} in region {}",
                aws.region
            )));
        };
        let arch = image.text_of("architecture");
        Ok(ImageDetails {
            target_identifier: ami,
            name: image.text_of("name"),
            arch: if arch.is_empty() {
                "x86_64".into()
            } else {
                arch
            },
        })
    }
}

/// The AMI's architecture: the `architecture` parameter, or the template's arch.
fn architecture(parameters: &[(String, String)]) -> Result<String, Error> {
    let given = lookup(parameters, "architecture")
        .or_else(|| lookup(parameters, "template.arch"))
        .unwrap_or("x86_64");
    match given {
        "x86_64" | "amd64" => Ok("x86_64".into()),
        "i386" | "i686" => Ok("i386".into()),
        "arm64" | "aarch64" => Ok("arm64".into()),
        other => Err(Error::InvalidInput(format!(
            "architecture {other} is not one EC2 offers (x86_64, arm64, i386)"
        ))),
    }
}

/// Uploads the image as a new EBS snapshot and answers its id once it is completed.
fn upload(aws: &Aws, image: &DiskReader, name: &str, concurrency: usize) -> Result<String, Error> {
    let size = image.size();
    let volume_gib = size.div_ceil(GIB).max(1);
    let start = serde_json::json!({
        "VolumeSize": volume_gib,
        "Description": format!("conductor image {name}"),
        "Tags": [
            {"Key": "Name", "Value": name},
            {"Key": "conductor:image", "Value": name},
        ],
        "Timeout": 60,
    });
    let request = Request::new("POST", format!("{}/snapshots", aws.ebs))
        .header("content-type", "application/json")
        .body(start.to_string());
    let started = aws.ebs_start(request, false)?.wait()?;
    if !started.is_success() {
        return Err(aws_error("ebs StartSnapshot", &started));
    }
    let answer: serde_json::Value = serde_json::from_slice(&started.body)
        .map_err(|e| Error::Failed(format!("ebs StartSnapshot answered no JSON: {e}")))?;
    let snapshot = answer["SnapshotId"]
        .as_str()
        .ok_or_else(|| Error::Failed("ebs StartSnapshot answered no SnapshotId".into()))?
        .to_owned();
    // The block size is the service's to say; AWS says 512 KiB.
    let block_size = answer["BlockSize"].as_u64().unwrap_or(AWS_BLOCK_SIZE);
    if !block_size.is_power_of_two() || !(512..=(4 << 20)).contains(&block_size) {
        return Err(Error::Failed(format!(
            "ebs StartSnapshot answered a block size of {block_size} bytes, which this plugin cannot use"
        )));
    }
    host::log(
        Level::Info,
        &format!("snapshot {snapshot}: {volume_gib} GiB in blocks of {block_size} bytes"),
    );

    let blocks = allocated_blocks(image, block_size)?;
    let total = blocks.len() as u64;
    let mut in_flight: VecDeque<(u64, Pending)> = VecDeque::new();
    let mut sent = 0u64;
    let mut skipped = 0u64;
    let mut last_percent = 0u8;
    let finish_one = |in_flight: &mut VecDeque<(u64, Pending)>| -> Result<(), Error> {
        let Some((index, pending)) = in_flight.pop_front() else {
            return Ok(());
        };
        let answer = pending.wait()?;
        if !answer.is_success() {
            return Err(aws_error(&format!("ebs PutSnapshotBlock {index}"), &answer));
        }
        Ok(())
    };
    for (n, &index) in blocks.iter().enumerate() {
        let mut data = image.read(index * block_size, block_size as u32)?;
        // The last block of an image that is not a whole number of blocks long.
        data.resize(block_size as usize, 0);
        if conductor_plugin_sdk::is_zero(&data) {
            skipped += 1;
        } else {
            let checksum = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(&data));
            let percent = (n as u64 * 95 / total.max(1)) as u8;
            let request = Request::new(
                "PUT",
                format!("{}/snapshots/{snapshot}/blocks/{index}", aws.ebs),
            )
            .header("content-type", "application/octet-stream")
            .header("x-amz-data-length", block_size.to_string())
            .header("x-amz-checksum", checksum)
            .header("x-amz-checksum-algorithm", "SHA256")
            .header("x-amz-progress", percent.to_string())
            .body(data);
            if in_flight.len() >= concurrency {
                finish_one(&mut in_flight)?;
            }
            in_flight.push_back((index, aws.ebs_start(request, true)?));
            sent += 1;
        }
        let percent = ((n as u64 + 1) * 95 / total.max(1)) as u8;
        if percent != last_percent {
            last_percent = percent;
            host::progress(
                percent,
                &format!(
                    "uploaded {} of {total} allocated blocks of {} KiB ({skipped} all zeros, skipped)",
                    n + 1,
                    block_size >> 10
                ),
            );
        }
    }
    while !in_flight.is_empty() {
        finish_one(&mut in_flight)?;
    }

    host::progress(96, &format!("completing snapshot {snapshot}"));
    let request = Request::new(
        "POST",
        format!("{}/snapshots/completion/{snapshot}", aws.ebs),
    )
    .header("x-amz-changedblockscount", sent.to_string());
    let completed = aws.ebs_start(request, false)?.wait()?;
    if !completed.is_success() {
        return Err(aws_error("ebs CompleteSnapshot", &completed));
    }
    wait_for_snapshot(aws, &snapshot)?;
    host::log(
        Level::Info,
        &format!(
            "snapshot {snapshot} completed: {sent} blocks written, {skipped} zero blocks skipped"
        ),
    );
    Ok(snapshot)
}

/// The indexes of the blocks that hold allocated bytes, ascending; blocks entirely in a
/// hole are zeros and never read.
fn allocated_blocks(image: &DiskReader, block_size: u64) -> Result<Vec<u64>, Error> {
    let size = image.size();
    let mut blocks: Vec<u64> = Vec::new();
    for extent in image.extents()? {
        let end = extent.offset.saturating_add(extent.length).min(size);
        if extent.offset >= end {
            continue;
        }
        let first = extent.offset / block_size;
        let last = (end - 1) / block_size;
        let from = match blocks.last() {
            Some(&previous) if previous >= first => previous + 1,
            _ => first,
        };
        blocks.extend(from..=last);
    }
    Ok(blocks)
}

/// Polls EC2 until the snapshot is `completed`; EBS finishes the work in the background.
fn wait_for_snapshot(aws: &Aws, snapshot: &str) -> Result<(), Error> {
    for attempt in 0u32.. {
        let found = aws.ec2("DescribeSnapshots", &[("SnapshotId.1", snapshot)])?;
        let state = found
            .items("snapshotSet")
            .first()
            .map(|s| s.text_of("status"))
            .unwrap_or_default();
        match state.as_str() {
            "completed" => return Ok(()),
            "error" => {
                return Err(Error::Failed(format!(
                    "EBS reports snapshot {snapshot} in state error: {}",
                    found.text_of("statusMessage")
                )));
            }
            _ => {
                host::progress(97, &format!("waiting for snapshot {snapshot} ({state})"));
                // 1 s, 2 s, … up to 10 s between looks; the server's call timeout ends
                // a wait that never finishes.
                std::thread::sleep(std::time::Duration::from_secs(u64::from(
                    (attempt + 1).min(10),
                )));
            }
        }
    }
    unreachable!("the loop returns")
}

/// Registers an AMI on the snapshot, tags it and the snapshot, and answers the AMI id.
fn register(
    aws: &Aws,
    snapshot: &str,
    name: &str,
    architecture: &str,
    boot_mode: &str,
) -> Result<String, Error> {
    host::progress(98, &format!("registering an image on {snapshot}"));
    host::log(
        Level::Info,
        &format!("registering an AMI on {snapshot} with boot mode {boot_mode}"),
    );
    // AMI names are unique per account and region, and one image may be pushed to an
    // account more than once: the snapshot id makes each name unique.
    let ami_name = ami_name(name, snapshot);
    let description = format!("{name}, built by conductor");
    let registered = aws.ec2(
        "RegisterImage",
        &[
            ("Name", &ami_name),
            ("Description", &description),
            ("Architecture", architecture),
            ("VirtualizationType", "hvm"),
            ("RootDeviceName", "/dev/xvda"),
            ("BlockDeviceMapping.1.DeviceName", "/dev/xvda"),
            ("BlockDeviceMapping.1.Ebs.SnapshotId", snapshot),
            ("BlockDeviceMapping.1.Ebs.DeleteOnTermination", "true"),
            ("BlockDeviceMapping.1.Ebs.VolumeType", "gp3"),
            ("EnaSupport", "true"),
            ("BootMode", boot_mode),
        ],
    )?;
    let ami = registered.text_of("imageId");
    if !ami.starts_with("ami-") {
        return Err(Error::Failed(format!(
            "ec2 RegisterImage answered no image id (got '{ami}')"
        )));
    }
    aws.ec2(
        "CreateTags",
        &[
            ("ResourceId.1", &ami),
            ("Tag.1.Key", "Name"),
            ("Tag.1.Value", name),
        ],
    )?;
    aws.ec2(
        "CreateTags",
        &[
            ("ResourceId.1", snapshot),
            ("Tag.1.Key", AMI_TAG),
            ("Tag.1.Value", &ami),
        ],
    )?;
    Ok(ami)
}

/// An AMI name from the image's name: the characters AWS allows (others become `-`),
/// the snapshot id appended, at most 128 characters.
fn ami_name(name: &str, snapshot: &str) -> String {
    let clean: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "()[] ./-'@_".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    let room = 128 - snapshot.len().min(100) - 1;
    let clean: String = clean.chars().take(room).collect();
    format!("{clean}-{snapshot}")
}
