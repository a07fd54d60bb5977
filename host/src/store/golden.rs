//! Golden rows: one row of each table and version, as a release wrote it, committed as
//! bytes under `store/golden/<table>-v<version>.hex`. Every later release must decode
//! each file to the same record, and the version a release writes must encode that
//! record to exactly those bytes. A file is only ever added, when a table gets a new
//! version (`CONDUCTOR_WRITE_GOLDEN=1 cargo test -p conductor golden` writes the missing
//! ones); changing one would hide the very break these tests exist to catch.

use super::{Row, SealedAccount};
use crate::model::{
    BaseImage, BootCheck, Build, CheckResult, Deletion, Disk, DiskFormat, Environment, Firmware,
    Hook, Image, Job, JobKind, Progress, Provider, ProviderImage, Quota, Role, Status, TargetImage,
    User,
};
use std::fmt::Debug;
use std::path::PathBuf;
use uuid::Uuid;

fn id(n: u128) -> Uuid {
    Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0000 | n)
}

fn progress(status: Status) -> Progress {
    Progress {
        status,
        percent: 42,
        activity: "pushing the image".into(),
        error: "the provider said no".into(),
    }
}

fn pairs() -> Vec<(String, String)> {
    vec![
        ("region".into(), "us-east-1".into()),
        ("k".into(), "v".into()),
    ]
}

/// Checks one golden file against the record it holds.
fn golden<T: Row + PartialEq + Debug>(version: u8, record: T) {
    let name = T::TABLE.replace(' ', "-");
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("src/store/golden")
        .join(format!("{name}-v{version}.hex"));
    let current = version == T::VERSION;
    if !path.exists() && current && std::env::var_os("CONDUCTOR_WRITE_GOLDEN").is_some() {
        let hex = crate::blobs::hex(&record.encode());
        std::fs::write(&path, hex + "\n").expect("write the golden file");
    }
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; a table's current version needs its golden file \
             (CONDUCTOR_WRITE_GOLDEN=1 writes it)",
            path.display()
        )
    });
    let text = text.trim();
    let bytes: Vec<u8> = (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex"))
        .collect();
    assert_eq!(
        bytes.first(),
        Some(&version),
        "{} starts with its version",
        path.display()
    );
    assert_eq!(
        T::decode(&bytes).unwrap_or_else(|e| panic!("{} does not decode: {e}", path.display())),
        record,
        "{} decodes to another record",
        path.display()
    );
    if current {
        assert_eq!(
            record.encode(),
            bytes,
            "{} is not what this release writes",
            path.display()
        );
    }
}

#[test]
fn environments_v1() {
    golden(
        1,
        Environment {
            id: 7,
            name: "team-a".into(),
            description: "the first team".into(),
        },
    );
}

#[test]
fn quotas_v1() {
    golden(
        1,
        Quota {
            images: Some(10),
            stored_bytes: None,
            running_jobs: Some(2),
            queued_jobs: Some(30),
        },
    );
}

#[test]
fn users_v1() {
    golden(
        1,
        User {
            name: "ana".into(),
            password_hash: "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA".into(),
            admin: false,
            disabled: true,
            roles: vec![(1, Role::Admin), (2, Role::ImageAdmin), (3, Role::Viewer)],
        },
    );
}

#[test]
fn providers_v1() {
    golden(
        1,
        Provider {
            id: 3,
            name: "ec2-us-east-1".into(),
            target: "ec2".into(),
            settings: pairs(),
        },
    );
}

#[test]
fn accounts_v1() {
    golden(
        1,
        SealedAccount {
            id: 4,
            label: "ec2-acc".into(),
            provider_id: 3,
            sealed_credentials: (0u8..40).collect(),
            environments: vec![1, 2],
            priority: Some(-5),
            max_running_instances: Some(9),
        },
    );
}

#[test]
fn images_v1() {
    golden(
        1,
        Image {
            id: id(1),
            environment_id: 1,
            name: "web".into(),
            description: "a web server".into(),
            os: "Debian".into(),
            os_version: "12".into(),
            arch: "x86_64".into(),
            template_id: id(2),
            template: "<template><name>web</name></template>".into(),
        },
    );
}

#[test]
fn builds_v1() {
    golden(
        1,
        Build {
            id: id(3),
            image_id: id(1),
        },
    );
}

#[test]
fn target_images_v1() {
    golden(
        1,
        TargetImage {
            id: id(4),
            build_id: id(3),
            target: "ec2".into(),
            progress: progress(Status::Building),
            parameters: pairs(),
            base_image: Some(BaseImage {
                url: "https://images.example/base.qcow2".into(),
                digest: Some("ab".repeat(32)),
            }),
            disk: Some(Disk {
                blob: "cd".repeat(32),
                format: DiskFormat::Qcow2,
                size: 123_456_789,
                virtual_size: 10 << 30,
                firmware: Vec::new(),
                packages: None,
                check: None,
            }),
        },
    );
}

#[test]
fn target_images_v2() {
    golden(
        2,
        TargetImage {
            id: id(4),
            build_id: id(3),
            target: "ec2".into(),
            progress: progress(Status::Complete),
            parameters: pairs(),
            base_image: None,
            disk: Some(Disk {
                blob: "cd".repeat(32),
                format: DiskFormat::Raw,
                size: 123_456_789,
                virtual_size: 10 << 30,
                firmware: vec![Firmware::Uefi, Firmware::Bios],
                packages: None,
                check: None,
            }),
        },
    );
}

#[test]
fn target_images_v3() {
    golden(
        3,
        TargetImage {
            id: id(4),
            build_id: id(3),
            target: "openstack".into(),
            progress: progress(Status::Complete),
            parameters: vec![("verify".into(), "boot".into())],
            base_image: None,
            disk: Some(Disk {
                blob: format!("sparse-sha256-{}", "ef".repeat(32)),
                format: DiskFormat::Qcow2,
                size: 987_654_321,
                virtual_size: 10 << 30,
                firmware: vec![Firmware::Uefi, Firmware::Bios],
                packages: Some(312),
                check: Some(BootCheck {
                    result: CheckResult::TimedOut,
                    seconds: 300,
                    firmware: Firmware::Uefi,
                    detail: "no login prompt within 300 s".into(),
                }),
            }),
        },
    );
}

#[test]
fn provider_images_v1() {
    golden(
        1,
        ProviderImage {
            id: id(5),
            target_image_id: id(4),
            provider_id: 3,
            account_id: 4,
            provider_name: "ec2-us-east-1".into(),
            account_label: "ec2-acc".into(),
            target_identifier: "ami-0123456789abcdef0".into(),
            progress: progress(Status::Failed),
            parameters: vec![("architecture".into(), "x86_64".into())],
        },
    );
}

#[test]
fn jobs_v1() {
    golden(
        1,
        Job {
            id: id(6),
            kind: JobKind::Delete,
            attempts: 3,
            deletion: Some(Deletion {
                provider_id: 3,
                account_id: 4,
                provider_name: "ec2-us-east-1".into(),
                account_label: "ec2-acc".into(),
                target_identifier: "ami-0123456789abcdef0".into(),
            }),
        },
    );
}

#[test]
fn hooks_v1() {
    golden(
        1,
        Hook {
            id: 2,
            uri: "https://hooks.example/conductor".into(),
        },
    );
}

#[test]
fn every_status_kind_role_and_format_keeps_its_stored_number() {
    // The row enums' order is the on-disk number: each model variant must map to the
    // number it had when version 1 was written.
    let statuses = [
        Status::New,
        Status::Pending,
        Status::Building,
        Status::Pushing,
        Status::Complete,
        Status::Failed,
        Status::Deleting,
        Status::Cancelled,
    ];
    for (number, status) in statuses.into_iter().enumerate() {
        let row = TargetImage {
            id: id(9),
            build_id: id(9),
            target: String::new(),
            progress: progress(status),
            parameters: vec![],
            base_image: None,
            disk: None,
        }
        .encode();
        // version, two 17-byte ids (length then 16 bytes), empty target, then the status.
        assert_eq!(row[1 + 17 + 17 + 1], number as u8, "{status:?}");
    }
    for (number, kind) in [JobKind::Build, JobKind::Push, JobKind::Delete]
        .into_iter()
        .enumerate()
    {
        let row = Job {
            id: id(9),
            kind,
            attempts: 0,
            deletion: None,
        }
        .encode();
        assert_eq!(row[1 + 17], number as u8, "{kind:?}");
    }
    for (number, role) in [Role::Admin, Role::ImageAdmin, Role::Viewer]
        .into_iter()
        .enumerate()
    {
        let row = User {
            name: String::new(),
            password_hash: String::new(),
            admin: false,
            disabled: false,
            roles: vec![(0, role)],
        }
        .encode();
        // version, two empty strings, two bools, one role: (env 0, role).
        assert_eq!(row[1 + 1 + 1 + 1 + 1 + 1 + 1], number as u8, "{role:?}");
    }
}

#[test]
fn a_row_with_bytes_left_over_or_of_an_unknown_version_is_refused() {
    let mut row = Hook {
        id: 2,
        uri: "x".into(),
    }
    .encode();
    row.push(0);
    assert!(
        Hook::decode(&row)
            .expect_err("left over")
            .to_string()
            .contains("left over")
    );
    assert!(
        Hook::decode(&[9, 1, 2])
            .expect_err("version 9")
            .to_string()
            .contains("row version 9 is unknown")
    );
    assert!(Hook::decode(&[]).is_err());
}
