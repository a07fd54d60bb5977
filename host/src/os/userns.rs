//! A user namespace in which the host's uids and gids 0–65535 keep their numbers.
//!
//! A template's commands run in bubblewrap, and bubblewrap's own user namespace maps one
//! uid and one gid: inside it a command cannot give a file to `www-data` or write
//! `/etc/shadow` (owned by group `shadow`), which ordinary image commands do. mmdebstrap
//! solves this with subordinate ids; a server running as root needs none: it may map
//! any range for a child. So bubblewrap is started inside a user namespace made here,
//! where uid 0 is root only over that namespace's own mounts and network, never the
//! host's: it cannot mount a host disk, load a module or reach a host device.
//!
//! The server runs this as `conductor __userns PROGRAM ARGS…` (main dispatches it before
//! anything else starts, while the process has one thread, which `fork` needs).
//!
//! `conductor __userns --overlay DIR PROGRAM ARGS…` also gives the program a mount
//! namespace of its own in which `DIR/merged` is an overlay: `DIR/lower` (a link to an
//! installed tree in the cache, never written) under `DIR/upper` (where every change
//! goes), with `DIR/work` as overlayfs's work folder. An image's customization then
//! changes a layer of its own instead of a copy of the whole tree, and the cached tree
//! stays as it was. The mount is seen by that program and its children alone, and ends
//! with them.

use std::ffi::{CString, OsString};
use std::os::unix::ffi::OsStrExt;

/// The argument that selects this entry point.
pub const ENTRY: &str = "__userns";
/// How many ids are mapped: the ids Debian gives system users and groups and the first
/// ordinary ones.
const IDS: u32 = 65536;

/// Runs `args[0]` with `args[1..]` in a new user namespace; exits with its status.
pub fn exec(args: &[OsString]) -> ! {
    match run(args) {
        Ok(code) => std::process::exit(code),
        Err(message) => {
            eprintln!("conductor {ENTRY}: {message}");
            std::process::exit(125)
        }
    }
}

/// The option that asks for an overlay, followed by its folder.
pub const OVERLAY: &str = "--overlay";

fn run(args: &[OsString]) -> Result<i32, String> {
    let (overlay, args) = match args {
        [flag, dir, rest @ ..] if flag == OVERLAY => (Some(dir), rest),
        [flag] if flag == OVERLAY => return Err("--overlay needs a folder".into()),
        _ => (None, args),
    };
    // Made before the fork: the child only makes system calls. Relative names, resolved
    // in the overlay's folder, so that no path needs escaping in the mount options.
    let overlay = overlay
        .map(|dir| -> Result<_, String> {
            let dir = CString::new(dir.as_bytes()).map_err(|_| "the overlay folder holds NUL")?;
            let options = CString::new("lowerdir=lower,upperdir=upper,workdir=work,userxattr")
                .map_err(|_| "NUL")?;
            Ok((dir, options))
        })
        .transpose()?;
    let Some(program) = args.first() else {
        return Err("no program given".into());
    };
    let argv: Vec<CString> = args
        .iter()
        .map(|a| CString::new(a.as_bytes()).map_err(|_| "an argument holds NUL".to_owned()))
        .collect::<Result<_, _>>()?;
    let program = CString::new(program.as_bytes()).map_err(|_| "the program holds NUL")?;
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    // Ends with the server, even when the server is killed: nothing an install started
    // outlives it.
    // SAFETY: prctl with PR_SET_PDEATHSIG only sets this process's death signal.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    let (mut unshared, mut mapped) = ([0; 2], [0; 2]);
    // SAFETY: pipe(2) writes two descriptors into each array.
    if unsafe { libc::pipe(unshared.as_mut_ptr()) } != 0
        || unsafe { libc::pipe(mapped.as_mut_ptr()) } != 0
    {
        return Err(format!("pipe: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: this process has one thread (main dispatches here first), so the child may
    // call anything; it uses only async-signal-safe calls until exec anyway.
    let child = unsafe { libc::fork() };
    if child < 0 {
        return Err(format!("fork: {}", std::io::Error::last_os_error()));
    }
    if child == 0 {
        // SAFETY: plain system calls on descriptors and buffers this child owns.
        unsafe {
            let mut byte = 0u8;
            // A fork clears the death signal; the child ends with this process too.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            if libc::unshare(libc::CLONE_NEWUSER) != 0 {
                libc::_exit(125);
            }
            libc::write(unshared[1], [1u8].as_ptr().cast(), 1);
            if libc::read(mapped[0], (&mut byte as *mut u8).cast(), 1) != 1 || byte != 1 {
                libc::_exit(125);
            }
            libc::setresgid(0, 0, 0);
            libc::setresuid(0, 0, 0);
            if let Some((dir, options)) = &overlay {
                // Root of this user namespace may make a mount namespace it owns, and
                // mount an overlay there (userxattr: its own marks go in user.*
                // attributes, which an unprivileged overlay must use).
                let failed = |what: &[u8]| {
                    libc::write(2, what.as_ptr().cast(), what.len());
                    libc::_exit(125);
                };
                if libc::unshare(libc::CLONE_NEWNS) != 0 {
                    failed(b"conductor __userns: could not make a mount namespace\n");
                }
                if libc::mount(
                    c"none".as_ptr(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ) != 0
                    || libc::chdir(dir.as_ptr()) != 0
                {
                    failed(b"conductor __userns: could not enter the overlay's folder\n");
                }
                if libc::mount(
                    c"overlay".as_ptr(),
                    c"merged".as_ptr(),
                    c"overlay".as_ptr(),
                    0,
                    options.as_ptr().cast(),
                ) != 0
                {
                    failed(b"conductor __userns: could not mount the overlay (overlayfs in a user namespace needs Linux 5.11)\n");
                }
            }
            libc::execvp(program.as_ptr(), argv_ptrs.as_ptr());
            libc::_exit(127);
        }
    }
    let mut byte = 0u8;
    // SAFETY: reads one byte into a local.
    if unsafe { libc::read(unshared[0], (&mut byte as *mut u8).cast(), 1) } != 1 {
        return Err("the child could not make a user namespace".into());
    }
    let map = format!("0 0 {IDS}\n");
    let written = std::fs::write(format!("/proc/{child}/uid_map"), &map)
        .and_then(|()| std::fs::write(format!("/proc/{child}/gid_map"), &map));
    let go = u8::from(written.is_ok());
    // SAFETY: writes one byte from a local.
    unsafe { libc::write(mapped[1], (&go as *const u8).cast(), 1) };
    written
        .map_err(|e| format!("mapping ids (the server must run as root for OS installs): {e}"))?;
    let mut status = 0;
    // SAFETY: waits for our own child.
    if unsafe { libc::waitpid(child, &mut status, 0) } < 0 {
        return Err(format!("waitpid: {}", std::io::Error::last_os_error()));
    }
    Ok(if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        128 + libc::WTERMSIG(status)
    })
}
