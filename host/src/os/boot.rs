//! The boot check: the finished image started in qemu until its serial console shows a
//! login prompt, within a deadline.
//!
//! qemu runs in bubblewrap with every namespace of its own (no network), as an
//! unprivileged user with no capabilities, seeing only `/usr` (read-only), the image
//! (read-only: writes go to a temporary file in the sandbox's own `/var/tmp`) and the
//! check's folder, where the console is written. The guest has no network card. KVM is
//! used when it runs a guest, TCG (emulation) otherwise. A cancel, a shutdown or the
//! deadline kills the whole process group (`run.rs`).

use super::run::{Log, Step, StepError, run};
use super::{InstallError, Progress, which};
use crate::model::{BootCheck, CheckResult, DiskFormat, Firmware};
use std::cell::RefCell;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// What a booted Debian prints on its serial console once it is up.
pub const LOGIN_PROMPT: &str = "login:";
/// What the console shows when a boot has failed for good, though the machine goes on
/// running: the firmware fell back to its shell or found no disk to boot, or the kernel
/// panicked (which waits forever). The check ends there instead of at its deadline.
const GAVE_UP: &[&str] = &[
    "UEFI Interactive Shell",
    "No bootable device",
    "Kernel panic - not syncing",
];
/// UEFI firmware for x86_64 (Debian's `ovmf`): code, and the variables each boot copies.
const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
/// A console larger than this ends the check: a guest printing without end is not
/// booting, and the file must stay small.
const MAX_CONSOLE: u64 = 4 << 20;
/// How many of the console's last lines a failed check quotes.
const TAIL_LINES: usize = 15;

/// Why this server cannot boot images, or `None` when it can: the programs and firmware
/// the check needs.
pub fn missing() -> Option<String> {
    let mut missing: Vec<&str> = ["qemu-system-x86_64", "bwrap"]
        .into_iter()
        .filter(|p| which(p).is_none())
        .collect();
    if !Path::new(OVMF_CODE).exists() || !Path::new(OVMF_VARS).exists() {
        missing.push("OVMF (package ovmf)");
    }
    (!missing.is_empty()).then(|| {
        format!(
            "this server cannot boot images to check them: it lacks {}",
            missing.join(", ")
        )
    })
}

/// The firmware a check boots with: UEFI when the image boots with it, else BIOS (an
/// image whose firmware is not known gets the PC BIOS, as most base images expect).
pub fn firmware_for(image: &[Firmware]) -> Firmware {
    if image.contains(&Firmware::Uefi) {
        Firmware::Uefi
    } else {
        Firmware::Bios
    }
}

/// Boots the machine's image until the console shows [`LOGIN_PROMPT`] or that the boot
/// gave up ([`GAVE_UP`]), qemu stops, or the deadline passes. The console is written
/// to `work/console`. `progress` gets the share of the deadline used, 0 to 99.
///
/// KVM is used when it works. A `/dev/kvm` that opens may still not run a guest (nested
/// virtualisation done in software fails on the first model-specific register): qemu
/// then stops before the guest printed anything, and the check runs again with TCG, as
/// every later check on this server does.
pub fn check(
    machine: &Machine,
    log: &Log,
    progress: Progress,
    stopped: &dyn Fn() -> bool,
) -> Result<BootCheck, InstallError> {
    let kvm = Path::new("/dev/kvm").exists() && !KVM_UNUSABLE.load(Ordering::Relaxed);
    if kvm {
        match boot(machine, true, log, &mut *progress, stopped) {
            Err(Boot::DidNotStart(e)) => {
                log.line(&format!(
                    "KVM does not run the guest here ({e}); booting with TCG (emulation)"
                ));
                KVM_UNUSABLE.store(true, Ordering::Relaxed);
            }
            other => return other.map_err(Boot::into_error),
        }
    }
    boot(machine, false, log, progress, stopped).map_err(Boot::into_error)
}

/// Set once KVM failed to run a guest: later checks go straight to TCG.
static KVM_UNUSABLE: AtomicBool = AtomicBool::new(false);

/// What a check boots, and where.
pub struct Machine<'a> {
    /// The image, a file of `format`.
    pub image: &'a Path,
    pub format: DiskFormat,
    pub firmware: Firmware,
    /// The longest the check waits for a prompt.
    pub deadline: Duration,
    /// The check's own folder: the console, the UEFI variables.
    pub work: &'a Path,
}

/// Why a boot gave no result.
enum Boot {
    /// qemu stopped with an error before the guest printed anything.
    DidNotStart(StepError),
    Error(InstallError),
}

impl Boot {
    fn into_error(self) -> InstallError {
        match self {
            Boot::DidNotStart(e) => InstallError::Step(e),
            Boot::Error(e) => e,
        }
    }
}

fn boot(
    machine: &Machine,
    kvm: bool,
    log: &Log,
    progress: Progress,
    stopped: &dyn Fn() -> bool,
) -> Result<BootCheck, Boot> {
    let Machine {
        image,
        format,
        firmware,
        deadline,
        work,
    } = *machine;
    let io = |what: &str, e: std::io::Error| Boot::Error(InstallError::io(what, e));
    std::fs::create_dir_all(work).map_err(|e| io("making the check's folder", e))?;
    let console = work.join("console");
    std::fs::File::create(&console).map_err(|e| io("making the console file", e))?;
    let mut qemu: Vec<String> = [
        "qemu-system-x86_64",
        "-accel",
        if kvm { "kvm" } else { "tcg" },
        "-cpu",
        "max",
        "-machine",
        "q35",
        "-smp",
        "1",
        "-m",
        "1024",
        "-nodefaults",
        "-display",
        "none",
        "-no-reboot",
        "-nic",
        "none",
        "-serial",
        "file:/check/console",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    if firmware == Firmware::Bios {
        // SeaBIOS prints on the screen only, unless told a serial port: then a disk it
        // cannot boot ("No bootable device") shows on the console like the rest.
        std::fs::write(work.join("sercon"), 0x3f8u16.to_le_bytes())
            .map_err(|e| io("writing the BIOS's serial setting", e))?;
        qemu.extend([
            "-fw_cfg".into(),
            "name=etc/sercon-port,file=/check/sercon".into(),
        ]);
    }
    if firmware == Firmware::Uefi {
        std::fs::copy(OVMF_VARS, work.join("vars.fd"))
            .map_err(|e| io("copying the UEFI variables", e))?;
        qemu.extend([
            "-drive".into(),
            format!("if=pflash,format=raw,readonly=on,file={OVMF_CODE}"),
            "-drive".into(),
            "if=pflash,format=raw,file=/check/vars.fd".into(),
        ]);
    }
    qemu.extend([
        "-drive".into(),
        format!(
            "file=/check/disk,format={},if=virtio,snapshot=on",
            format.as_str()
        ),
    ]);
    let mut args: Vec<String> = [
        "--unshare-all",
        "--die-with-parent",
        "--new-session",
        "--uid",
        "65534",
        "--gid",
        "65534",
        "--ro-bind",
        "/usr",
        "/usr",
        "--symlink",
        "usr/lib",
        "/lib",
        "--symlink",
        "usr/lib64",
        "/lib64",
        "--symlink",
        "usr/bin",
        "/bin",
        "--symlink",
        "usr/sbin",
        "/sbin",
        "--dev",
        "/dev",
        "--proc",
        "/proc",
        // qemu keeps a snapshot's writes in a file under /var/tmp.
        "--tmpfs",
        "/tmp",
        "--tmpfs",
        "/var/tmp",
        "--clearenv",
        "--setenv",
        "TMPDIR",
        "/tmp",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    if kvm {
        args.extend(["--dev-bind", "/dev/kvm", "/dev/kvm"].map(str::to_owned));
    }
    args.extend([
        "--bind".into(),
        work.display().to_string(),
        "/check".into(),
        "--ro-bind".into(),
        image.display().to_string(),
        "/check/disk".into(),
        "--".into(),
    ]);
    args.extend(qemu);
    let step = Step {
        what: format!(
            "booting the image ({}, {})",
            firmware.as_str(),
            if kvm { "KVM" } else { "TCG" }
        ),
        program: PathBuf::from("bwrap"),
        args,
        deadline,
        env: Vec::new(),
        stdin: None,
    };

    let started = Instant::now();
    let watch = RefCell::new(Watch::new(&console, progress));
    let result = run(&step, work, log, &|| {
        if stopped() {
            return true;
        }
        let mut watch = watch.borrow_mut();
        watch.look(started.elapsed(), deadline);
        watch.found || watch.gave_up.is_some() || watch.too_large
    });
    let seconds = started.elapsed().as_secs().try_into().unwrap_or(u32::MAX);
    let watch = watch.into_inner();
    let outcome = |result, detail: String| {
        Ok(BootCheck {
            result,
            seconds,
            firmware,
            detail,
        })
    };
    let tail = console_tail(&console);
    match result {
        _ if watch.found => outcome(CheckResult::Passed, String::new()),
        Err(StepError::Stopped) if watch.gave_up.is_some() => outcome(
            CheckResult::Failed,
            format!(
                "the boot failed (the console says \"{}\"); its last lines:\n{tail}",
                watch.gave_up.unwrap_or_default()
            ),
        ),
        Err(StepError::Stopped) if watch.too_large => outcome(
            CheckResult::Failed,
            format!(
                "the console passed {MAX_CONSOLE} bytes without a login prompt; its last lines:\n{tail}"
            ),
        ),
        Err(StepError::Stopped) => Err(Boot::Error(InstallError::Step(StepError::Stopped))),
        Err(StepError::TimedOut { .. }) => outcome(
            CheckResult::TimedOut,
            format!(
                "no login prompt within {} s; the console's last lines:\n{tail}",
                deadline.as_secs()
            ),
        ),
        Err(e @ StepError::Spawn { .. }) => Err(Boot::Error(InstallError::Step(e))),
        // An error before the guest printed a line is qemu's, not the image's.
        Err(e @ StepError::Failed { .. }) if tail.is_empty() => Err(Boot::DidNotStart(e)),
        Ok(()) | Err(StepError::Failed { .. }) => outcome(
            CheckResult::Failed,
            format!("the machine stopped before a login prompt; the console's last lines:\n{tail}"),
        ),
    }
}

/// Follows the console as qemu writes it.
struct Watch<'a> {
    console: &'a Path,
    read: u64,
    /// The end of what was read, so a prompt split between two reads is still seen.
    recent: String,
    found: bool,
    /// The sign of a failed boot the console showed, if it did.
    gave_up: Option<&'static str>,
    too_large: bool,
    progress: Progress<'a>,
    reported: u8,
}

impl<'a> Watch<'a> {
    fn new(console: &'a Path, progress: Progress<'a>) -> Self {
        Watch {
            console,
            read: 0,
            recent: String::new(),
            found: false,
            gave_up: None,
            too_large: false,
            progress,
            reported: 0,
        }
    }

    fn look(&mut self, elapsed: Duration, deadline: Duration) {
        let share = (elapsed.as_secs_f64() / deadline.as_secs_f64().max(1.0) * 100.0) as u8;
        let share = share.min(99);
        if share != self.reported {
            self.reported = share;
            (self.progress)(share, "booting the image to check it");
        }
        let Ok(mut file) = std::fs::File::open(self.console) else {
            return;
        };
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        if size > MAX_CONSOLE {
            self.too_large = true;
            return;
        }
        if size <= self.read || file.seek(SeekFrom::Start(self.read)).is_err() {
            return;
        }
        let mut fresh = Vec::new();
        if file.take(size - self.read).read_to_end(&mut fresh).is_err() {
            return;
        }
        self.read += fresh.len() as u64;
        self.recent.push_str(&String::from_utf8_lossy(&fresh));
        if self.recent.contains(LOGIN_PROMPT) {
            self.found = true;
        }
        if self.gave_up.is_none() {
            self.gave_up = GAVE_UP
                .iter()
                .copied()
                .find(|sign| self.recent.contains(sign));
        }
        // Enough is kept for the longest sign split between two reads.
        let longest = GAVE_UP.iter().map(|s| s.len()).max().unwrap_or(0);
        let keep = self
            .recent
            .len()
            .saturating_sub(longest.max(LOGIN_PROMPT.len()));
        let keep = (keep..=self.recent.len())
            .find(|&i| self.recent.is_char_boundary(i))
            .unwrap_or(self.recent.len());
        self.recent.drain(..keep);
    }
}

/// The console's last lines, without terminal control sequences.
pub fn console_tail(console: &Path) -> String {
    let text = std::fs::read(console).unwrap_or_default();
    let start = text.len().saturating_sub(64 << 10);
    let text = String::from_utf8_lossy(&text[start..]);
    let lines: Vec<String> = text
        .lines()
        .map(|line| plain(line).trim_end().to_owned())
        .filter(|line| !line.is_empty())
        .collect();
    lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n")
}

/// A console line without terminal control: escape sequences (`ESC [ … letter`, and
/// `ESC` with one character) and other control characters are left out.
fn plain(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => {
                if chars.next() == Some('[') {
                    for c in chars.by_ref() {
                        if c.is_ascii_alphabetic() {
                            break;
                        }
                    }
                }
            }
            '\t' => out.push(' '),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_console_is_followed_for_a_prompt_or_a_boot_that_gave_up() {
        let dir = tempfile::tempdir().expect("dir");
        let console = dir.path().join("console");
        let mut reports = Vec::new();
        let mut progress = |percent: u8, _: &str| reports.push(percent);
        let mut watch = Watch::new(&console, &mut progress);
        let deadline = Duration::from_secs(100);
        // A sign split between two reads is still seen.
        std::fs::write(&console, "BdsDxe: starting\r\nUEFI Interactive").expect("write");
        watch.look(Duration::from_secs(10), deadline);
        assert_eq!(watch.gave_up, None);
        std::fs::write(&console, "BdsDxe: starting\r\nUEFI Interactive Shell v2.2").expect("write");
        watch.look(Duration::from_secs(20), deadline);
        assert_eq!(watch.gave_up, Some("UEFI Interactive Shell"));
        assert!(!watch.found);
        let mut more = std::fs::read(&console).expect("read");
        more.extend_from_slice(b"\r\nlocalhost log");
        std::fs::write(&console, &more).expect("write");
        watch.look(Duration::from_secs(30), deadline);
        more.extend_from_slice(b"in: ");
        std::fs::write(&console, &more).expect("write");
        watch.look(Duration::from_secs(40), deadline);
        assert!(watch.found);
        drop(watch);
        assert_eq!(reports, [10, 20, 30, 40]);
    }

    #[test]
    fn the_console_tail_is_plain_text() {
        assert_eq!(
            plain("\x1b[0;32m  OK  \x1b[0m] Started\r"),
            "  OK  ] Started"
        );
        assert_eq!(plain("\x1bcreset\tdone"), "reset done");
        let dir = tempfile::tempdir().expect("dir");
        let console = dir.path().join("console");
        let text: String = (0..40).map(|i| format!("line {i}\r\n\r\n")).collect();
        std::fs::write(&console, text).expect("write");
        let tail = console_tail(&console);
        assert_eq!(tail.lines().count(), TAIL_LINES);
        assert!(
            tail.starts_with("line 25") && tail.ends_with("line 39"),
            "{tail}"
        );
    }
}
