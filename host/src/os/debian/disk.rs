//! The disk of a Debian image: the template's content applied in the sandbox over the
//! installed tree, the root file system and the EFI system partition made from it, and
//! the GPT disk that holds both and boots under UEFI and BIOS.

use super::*;

/// Makes the disk: `tree` with the template's content (in an overlay: the cached tree is
/// only read), its root filesystem, the EFI system partition, and the GPT disk holding
/// both. Returns the disk.
#[allow(clippy::too_many_arguments)]
pub fn make_disk(
    release: &Release,
    content: &Customization,
    settings: &Settings,
    tree: &Path,
    disk_size: u64,
    work: &Path,
    log: &Log,
    progress: Progress,
    stopped: &dyn Fn() -> bool,
) -> Result<PathBuf, InstallError> {
    let io = |what: &str| {
        let what = what.to_owned();
        move |e: std::io::Error| InstallError::io(&what, e)
    };
    let overlay = work.join("overlay");
    let control = work.join("control");
    let boot = work.join("boot");
    for dir in [&control, &boot] {
        std::fs::create_dir_all(dir).map_err(io("making the work directory"))?;
    }
    for layer in ["upper", "work", "merged"] {
        std::fs::create_dir_all(overlay.join(layer)).map_err(io("making the overlay"))?;
    }
    std::os::unix::fs::symlink(tree, overlay.join("lower")).map_err(io("making the overlay"))?;
    let merged = overlay.join("merged");
    let step = |what: &str, program: &str, args: Vec<String>| Step {
        what: what.to_owned(),
        program: program.into(),
        args,
        deadline: settings.step_deadline,
        env: vec![("MTOOLS_SKIP_CHECK".into(), "1".into())],
        stdin: None,
    };
    let sandbox = |what: &str, extra: &[&str], command: &[&str], deadline| Step {
        what: what.to_owned(),
        program: crate::os::own_binary(),
        args: sandbox_args(&overlay, &control, extra, command),
        deadline,
        env: vec![],
        stdin: None,
    };

    progress(54, "configuring the system");
    std::fs::write(control.join("configure.sh"), configure_script(release))
        .map_err(io("writing the configuration script"))?;
    if let Some(password) = &content.root_password {
        std::fs::write(control.join("rootpw"), password)
            .map_err(io("writing the root password"))?;
    }
    let configured = run(
        &sandbox(
            "configuring the system",
            &[],
            &["/bin/sh", "-e", "/run/control/configure.sh"],
            settings.step_deadline,
        ),
        work,
        log,
        stopped,
    );
    let _ = std::fs::remove_file(control.join("rootpw"));
    configured?;

    if !content.files.is_empty() {
        progress(58, "writing the template's files");
        let files = work.join("files");
        // Modes set here, not left to the server's umask: a file is 0644, and a folder
        // the image lacks is made 0755. Folders it has keep theirs (--no-overwrite-dir).
        let mode = |path: &Path, mode: u32| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        };
        for (path, body) in &content.files {
            let staged = files.join(path.trim_start_matches('/'));
            if let Some(parent) = staged.parent() {
                std::fs::create_dir_all(parent).map_err(io("staging the template's files"))?;
            }
            std::fs::write(&staged, body).map_err(io("staging the template's files"))?;
            mode(&staged, 0o644).map_err(io("staging the template's files"))?;
            let mut folder = staged.parent();
            while let Some(dir) = folder.filter(|d| d.starts_with(&files)) {
                mode(dir, 0o755).map_err(io("staging the template's files"))?;
                folder = dir.parent();
            }
        }
        // Copied inside the sandbox, so a symlink in the tree resolves inside the image,
        // never on the host.
        run(
            &sandbox(
                "writing the template's files",
                &["--ro-bind", &files.display().to_string(), "/run/files"],
                &[
                    "/bin/sh",
                    "-c",
                    "tar -C /run/files --owner=0 --group=0 --numeric-owner -cf - . | tar -C / --keep-directory-symlink --no-overwrite-dir -xpf -",
                ],
                settings.step_deadline,
            ),
            work,
            log,
            stopped,
        )?;
    }

    for (at, (name, script)) in content.commands.iter().enumerate() {
        progress(
            60,
            &format!(
                "running the template's command '{name}' ({} of {})",
                at + 1,
                content.commands.len()
            ),
        );
        let file = format!("command-{at}.sh");
        std::fs::write(control.join(&file), script).map_err(io("writing a command"))?;
        let path = format!("/run/control/{file}");
        run(
            &sandbox(
                &format!("the template's command '{name}'"),
                &[],
                &["/bin/sh", "-e", &path],
                settings.command_deadline,
            ),
            work,
            log,
            stopped,
        )?;
    }

    progress(64, "finishing the system");
    run(
        &sandbox(
            "finishing the system",
            &["--bind", &boot.display().to_string(), "/run/boot"],
            &["/bin/sh", "-e", "-c", FINISH],
            settings.step_deadline,
        ),
        work,
        log,
        stopped,
    )?;

    let mib = 1u64 << 20;
    let disk_mib = disk_size / mib;
    let root_start = 1 + ESP_MIB;
    // The last MiB holds the backup GPT.
    let root_mib = disk_mib - root_start - 1;
    progress(66, "laying out the disk");
    let disk = work.join("disk.raw");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(disk_mib * mib))
        .map_err(io("making the disk"))?;
    let layout = work.join("layout.sfdisk");
    std::fs::write(
        &layout,
        format!(
            "label: gpt\n\
             start=1MiB, size={ESP_MIB}MiB, type={ESP_TYPE}, name=\"esp\"\n\
             start={root_start}MiB, size={root_mib}MiB, type={ROOT_X86_64_TYPE}, name=\"root\"\n"
        ),
    )
    .map_err(io("writing the partition table"))?;
    let mut sfdisk = step(
        "writing the partition table",
        "sfdisk",
        vec!["-q".into(), disk.display().to_string()],
    );
    sfdisk.stdin = Some(layout);
    run(&sfdisk, work, log, stopped)?;
    let mbr = std::fs::read(GPT_MBR).map_err(io(GPT_MBR))?;
    {
        use std::os::unix::fs::FileExt;
        let code = &mbr[..mbr.len().min(440)];
        std::fs::OpenOptions::new()
            .write(true)
            .open(&disk)
            .and_then(|f| f.write_all_at(code, 0))
            .map_err(io("writing the BIOS boot code"))?;
    }
    run(
        &step(
            "marking the EFI system partition bootable under BIOS",
            "sfdisk",
            vec![
                "-q".into(),
                "--part-attrs".into(),
                disk.display().to_string(),
                "1".into(),
                "LegacyBIOSBootable".into(),
            ],
        ),
        work,
        log,
        stopped,
    )?;
    // The root filesystem is made in place, inside the disk at its partition's offset:
    // no image of it to copy afterwards.
    // mkfs.ext4 reads the merged tree, so it runs in the overlay's mount namespace (as
    // root of that user namespace, with the host's ids: ownership is read as it is).
    progress(68, "making the root filesystem");
    run(
        &Step {
            program: crate::os::own_binary(),
            ..step(
                "making the root filesystem",
                "mkfs.ext4",
                vec![
                    crate::os::userns::ENTRY.into(),
                    crate::os::userns::OVERLAY.into(),
                    overlay.display().to_string(),
                    "mkfs.ext4".into(),
                    "-q".into(),
                    "-F".into(),
                    "-L".into(),
                    "root".into(),
                    "-d".into(),
                    merged.display().to_string(),
                    "-E".into(),
                    // nodiscard: a new sparse file has nothing to discard, and the file
                    // holds the partition table and the ESP's place besides the file system.
                    format!("offset={},nodiscard", root_start * mib),
                    disk.display().to_string(),
                    format!("{root_mib}M"),
                ],
            )
        },
        work,
        log,
        stopped,
    )?;

    progress(74, "making the EFI system partition");
    let esp = work.join("esp.img");
    let esp_arg = esp.display().to_string();
    run(
        &step(
            "making the EFI system partition",
            "mkfs.vfat",
            vec![
                "-C".into(),
                "-F".into(),
                "32".into(),
                // The partition's first sector: syslinux finds itself by it under BIOS.
                "-h".into(),
                "2048".into(),
                "-n".into(),
                "ESP".into(),
                esp_arg.clone(),
                (ESP_MIB * 1024).to_string(),
            ],
        ),
        work,
        log,
        stopped,
    )?;
    std::fs::write(boot.join("loader.conf"), "default debian.conf\ntimeout 0\n")
        .map_err(io("writing the boot loader's configuration"))?;
    std::fs::write(
        boot.join("debian.conf"),
        format!(
            "title {}\nlinux /vmlinuz\ninitrd /initrd.img\noptions root=LABEL=root rw console=tty0 console=ttyS0,115200\n",
            release.title()
        ),
    )
    .map_err(io("writing the boot entry"))?;
    std::fs::write(
        boot.join("syslinux.cfg"),
        "DEFAULT debian\nPROMPT 0\nTIMEOUT 0\nSERIAL 0 115200\nLABEL debian\n  LINUX /vmlinuz\n  \
         INITRD /initrd.img\n  APPEND root=LABEL=root rw console=tty0 console=ttyS0,115200\n",
    )
    .map_err(io("writing the BIOS boot loader's configuration"))?;
    let image = esp_arg.clone();
    let in_boot = |name: &str| boot.join(name).display().to_string();
    let esp_steps: Vec<Vec<String>> = vec![
        vec![
            "mmd",
            "-i",
            &image,
            "::/EFI",
            "::/EFI/BOOT",
            "::/loader",
            "::/loader/entries",
        ]
        .into_iter()
        .map(str::to_owned)
        .collect(),
        vec![
            "mcopy".into(),
            "-i".into(),
            image.clone(),
            in_boot("BOOTX64.EFI"),
            "::/EFI/BOOT/BOOTX64.EFI".into(),
        ],
        vec![
            "mcopy".into(),
            "-i".into(),
            image.clone(),
            in_boot("vmlinuz"),
            in_boot("initrd.img"),
            "::/".into(),
        ],
        vec![
            "mcopy".into(),
            "-i".into(),
            image.clone(),
            in_boot("loader.conf"),
            "::/loader/loader.conf".into(),
        ],
        vec![
            "mcopy".into(),
            "-i".into(),
            image.clone(),
            in_boot("debian.conf"),
            "::/loader/entries/debian.conf".into(),
        ],
        // BIOS: syslinux installs itself into the FAT file system through mtools.
        vec![
            "mmd".into(),
            "-i".into(),
            image.clone(),
            "::/syslinux".into(),
        ],
        vec![
            "syslinux".into(),
            "--install".into(),
            "--directory".into(),
            "/syslinux".into(),
            image.clone(),
        ],
        vec![
            "mcopy".into(),
            "-i".into(),
            image.clone(),
            in_boot("syslinux.cfg"),
            "::/syslinux/syslinux.cfg".into(),
        ],
    ];
    for mut args in esp_steps {
        let program = args.remove(0);
        run(
            &step("filling the EFI system partition", &program, args),
            work,
            log,
            stopped,
        )?;
    }

    place(&esp, &disk, mib).map_err(io("writing the EFI system partition into the disk"))?;
    log.line(&format!(
        "made a {} MiB GPT disk: EFI system partition (systemd-boot for UEFI, syslinux for BIOS) and ext4 root",
        disk_mib
    ));
    progress(80, "installed the OS");
    Ok(disk)
}

/// The sandbox's arguments to this binary: a user namespace of its own with the
/// overlay of the installed tree mounted (see userns.rs), and in it bubblewrap with the
/// merged tree as `/`, fresh /dev, /proc and /tmp, new mount, pid,
/// network, IPC and UTS namespaces (so no network but loopback), no environment but a
/// PATH, the control directory read-only at /run/control, killed with its parent.
fn sandbox_args(overlay: &Path, control: &Path, extra: &[&str], command: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        crate::os::userns::ENTRY,
        crate::os::userns::OVERLAY,
        &overlay.display().to_string(),
        "bwrap",
        "--bind",
        &overlay.join("merged").display().to_string(),
        "/",
        "--dev",
        "/dev",
        "--proc",
        "/proc",
        "--tmpfs",
        "/tmp",
        "--tmpfs",
        "/run",
        "--ro-bind",
        &control.display().to_string(),
        "/run/control",
        "--unshare-ipc",
        "--unshare-pid",
        "--unshare-net",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--die-with-parent",
        "--hostname",
        "localhost",
        "--chdir",
        "/",
        "--clearenv",
        "--setenv",
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "--setenv",
        "HOME",
        "/root",
        "--setenv",
        "LANG",
        "C.UTF-8",
        "--setenv",
        "DEBIAN_FRONTEND",
        "noninteractive",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    args.extend(extra.iter().map(|a| a.to_string()));
    args.extend(command.iter().map(|a| a.to_string()));
    args
}

/// Our own configuration of the installed system, run inside the sandbox: fstab by
/// label, hostname, a serial console, DHCP on the first network interface, the extra
/// apt sources, and root's password hashed from the control directory or, without one,
/// no password at all (locked).
fn configure_script(release: &Release) -> String {
    let mut sources = String::new();
    for (name, line) in &release.repositories {
        let file: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        sources.push_str(&format!(
            "cat > /etc/apt/sources.list.d/{file}.list <<'CONDUCTOR_EOF'\n{line}\nCONDUCTOR_EOF\n"
        ));
    }
    format!(
        r#"printf 'LABEL=root / ext4 rw,errors=remount-ro 0 1\nLABEL=ESP /boot/efi vfat umask=0077,nofail 0 2\n' > /etc/fstab
mkdir -p /boot/efi
echo debian > /etc/hostname
printf '127.0.0.1\tlocalhost\n127.0.1.1\tdebian\n::1\tlocalhost ip6-localhost ip6-loopback\n' > /etc/hosts
: > /etc/resolv.conf
mkdir -p /etc/systemd/system/getty.target.wants /etc/systemd/network
ln -sf /lib/systemd/system/serial-getty@.service /etc/systemd/system/getty.target.wants/serial-getty@ttyS0.service
printf '[Match]\nName=en* eth*\n\n[Network]\nDHCP=yes\n' > /etc/systemd/network/80-dhcp.network
systemctl enable systemd-networkd.service
{sources}if [ -f /run/control/rootpw ]; then
  salt=$(head -c 12 /dev/urandom | base64 | tr '+' '.')
  hash=$(perl -e 'open(my $f, "<", "/run/control/rootpw") or die; local $/; my $p = <$f>; print crypt($p, "\$6\$" . $ARGV[0] . "\$")' "$salt")
  case "$hash" in '$6$'*) ;; *) echo "could not hash the root password" >&2; exit 1;; esac
  usermod -p "$hash" root
else
  usermod -p '!' root
fi
"#
    )
}

/// The last step inside the image: an empty machine-id (made at first boot), no host
/// traces, and the kernel, initramfs and boot loader copied out for the EFI partition.
const FINISH: &str = ": > /etc/machine-id
rm -f /var/lib/dbus/machine-id /var/lib/systemd/random-seed
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /tmp/* /var/tmp/*
cp -L /vmlinuz /run/boot/vmlinuz
cp -L /initrd.img /run/boot/initrd.img
cp -L /usr/lib/systemd/boot/efi/systemd-bootx64.efi /run/boot/BOOTX64.EFI
";

/// Writes `part` into `disk` at `offset`, leaving its zero blocks as holes.
fn place(part: &Path, disk: &Path, offset: u64) -> std::io::Result<()> {
    let mut from = std::fs::File::open(part)?;
    let mut to = std::fs::OpenOptions::new().write(true).open(disk)?;
    let mut buffer = vec![0u8; 1 << 20];
    let mut at = offset;
    loop {
        let mut filled = 0;
        while filled < buffer.len() {
            let n = from.read(&mut buffer[filled..])?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            break;
        }
        let chunk = &buffer[..filled];
        if chunk.iter().any(|&b| b != 0) {
            to.seek(SeekFrom::Start(at))?;
            to.write_all(chunk)?;
        }
        at += filled as u64;
    }
    to.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placing_a_partition_keeps_its_zeros_as_holes() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().expect("dir");
        let part = dir.path().join("part");
        let disk = dir.path().join("disk");
        let mut bytes = vec![0u8; 8 << 20];
        bytes[3 << 20] = 7;
        std::fs::write(&part, &bytes).expect("part");
        std::fs::File::create(&disk)
            .and_then(|f| f.set_len(16 << 20))
            .expect("disk");
        place(&part, &disk, 1 << 20).expect("place");
        let written = std::fs::read(&disk).expect("disk");
        assert_eq!(written[(1 << 20) + (3 << 20)], 7);
        assert_eq!(written.iter().filter(|&&b| b != 0).count(), 1);
        assert!(std::fs::metadata(&disk).expect("meta").blocks() * 512 <= 2 << 20);
    }
}
