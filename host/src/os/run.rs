//! One external program, run as one step of an OS install: a deadline, a work directory,
//! no inherited environment, its own process group (so a cancel, a shutdown or the
//! deadline ends everything it started), and its output appended to the build log.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How many of a step's last output lines a failure quotes.
const TAIL_LINES: usize = 12;
/// A line longer than this is cut in the log: a program that prints one endless line
/// cannot fill memory.
const MAX_LINE: usize = 4096;

/// A program and its arguments, with how long it may take.
pub struct Step {
    /// What the step does, for the log and the failure message ("installing Debian").
    pub what: String,
    pub program: PathBuf,
    pub args: Vec<String>,
    pub deadline: Duration,
    /// Extra environment variables; everything else is cleared.
    pub env: Vec<(String, String)>,
    /// A file to read as standard input; otherwise it reads nothing.
    pub stdin: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error("{what} could not start {program}: {error}")]
    Spawn {
        what: String,
        program: String,
        error: String,
    },
    #[error("{what} failed (exit status {status}); its last output:\n{tail}")]
    Failed {
        what: String,
        status: String,
        tail: String,
    },
    #[error("{what} took longer than its deadline of {} s and was stopped; its last output:\n{tail}", deadline.as_secs())]
    TimedOut {
        what: String,
        deadline: Duration,
        tail: String,
    },
    #[error("stopped")]
    Stopped,
}

/// The build log: every step's command line and output, in a file kept with the build,
/// and the last lines in memory for failure messages.
#[derive(Clone)]
pub struct Log {
    inner: Arc<Mutex<LogInner>>,
}

type Watcher = Box<dyn FnMut(&str) + Send>;

struct LogInner {
    file: std::fs::File,
    tail: std::collections::VecDeque<String>,
    /// Called with each line as it arrives, to turn a program's output into progress.
    watcher: Option<Watcher>,
    /// Whether a line could not be written (said once in the server's log).
    lost_lines: bool,
}

impl Log {
    /// A log appended to `path` (created if missing).
    pub fn to_file(path: &Path) -> std::io::Result<Log> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(Log {
            inner: Arc::new(Mutex::new(LogInner {
                file,
                tail: Default::default(),
                watcher: None,
                lost_lines: false,
            })),
        })
    }

    /// Calls `watch` with every line written from now on.
    pub fn watch(&self, watch: impl FnMut(&str) + Send + 'static) {
        self.lock().watcher = Some(Box::new(watch));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LogInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn line(&self, line: &str) {
        let mut line = line.trim_end().to_owned();
        if line.len() > MAX_LINE {
            let mut cut = MAX_LINE;
            while !line.is_char_boundary(cut) {
                cut -= 1;
            }
            line.truncate(cut);
            line.push_str(" …");
        }
        let mut inner = self.lock();
        // A log that cannot be written loses lines, never the build; the server's log
        // says so once.
        if let Err(e) = writeln!(inner.file, "{line}")
            && !inner.lost_lines
        {
            inner.lost_lines = true;
            tracing::warn!("a build log loses lines: {e}");
        }
        if let Some(watcher) = inner.watcher.as_mut() {
            watcher(&line);
        }
        if inner.tail.len() == TAIL_LINES {
            inner.tail.pop_front();
        }
        inner.tail.push_back(line);
    }

    fn tail(&self) -> String {
        let inner = self.lock();
        inner.tail.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    fn clear_tail(&self) {
        self.lock().tail.clear();
    }
}

/// Runs `step` in `dir`, returning when it exits, its deadline passes or `stopped`
/// answers true; in the last two cases its whole process group is killed first.
pub fn run(
    step: &Step,
    dir: &Path,
    log: &Log,
    stopped: &dyn Fn() -> bool,
) -> Result<(), StepError> {
    log.clear_tail();
    log.line(&format!(
        "+ {} {}",
        step.program.display(),
        step.args.join(" ")
    ));
    let stdin = match &step.stdin {
        Some(path) => Stdio::from(std::fs::File::open(path).map_err(|e| StepError::Spawn {
            what: step.what.clone(),
            program: step.program.display().to_string(),
            error: format!("{}: {e}", path.display()),
        })?),
        None => Stdio::null(),
    };
    let mut command = Command::new(&step.program);
    command
        .args(&step.args)
        .current_dir(dir)
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("LC_ALL", "C.UTF-8")
        .env("HOME", dir)
        .env("TMPDIR", dir)
        .envs(step.env.iter().map(|(k, v)| (k, v)))
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group: the kill below reaches every process it started.
        .process_group(0);
    // SAFETY: only prctl, which is async-signal-safe, runs between fork and exec. The
    // death signal comes when the thread that started the step ends, and that thread
    // waits in this function until the step is over, so it fires only when the whole
    // server dies (a crash, a kill -9): the step does not go on without it.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let mut child = command.spawn().map_err(|e| StepError::Spawn {
        what: step.what.clone(),
        program: step.program.display().to_string(),
        error: e.to_string(),
    })?;
    let group = child.id() as i32;
    let readers: Vec<_> = [
        child
            .stdout
            .take()
            .map(|o| Box::new(o) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|e| Box::new(e) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .flatten()
    .map(|output| {
        let log = log.clone();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(output);
            let mut buffer = Vec::new();
            // Lines are read as bytes: a program's output need not be UTF-8.
            loop {
                match reader.read_until(b'\n', &mut buffer) {
                    Ok(0) => break,
                    Ok(_) => log.line(&String::from_utf8_lossy(&buffer)),
                    Err(e) => {
                        log.line(&format!("(the rest of this output could not be read: {e})"));
                        break;
                    }
                }
                buffer.clear();
            }
        })
    })
    .collect();
    let started = Instant::now();
    let kill = || {
        // SAFETY: kill(2) with a negative pid signals the group this child leads; it
        // touches no memory of ours.
        unsafe {
            libc::kill(-group, libc::SIGKILL);
        }
    };
    let mut pause = Duration::from_millis(2);
    let outcome = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) => {}
            Err(e) => break Err(e.to_string()),
        }
        if stopped() {
            kill();
            let _ = child.wait();
            break Err("stopped".into());
        }
        if started.elapsed() > step.deadline {
            kill();
            let _ = child.wait();
            break Err("deadline".into());
        }
        // Most steps take a fraction of a second: look again soon, then less often.
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    };
    // The group may outlive its leader (a daemon a package script started): end it
    // before the step counts as over, so nothing it started goes on running.
    kill();
    for reader in readers {
        let _ = reader.join();
    }
    log.line(&format!(
        "= {} after {:.1} s",
        step.what,
        started.elapsed().as_secs_f64()
    ));
    match outcome {
        Ok(status) if status.success() => Ok(()),
        Ok(status) => Err(StepError::Failed {
            what: step.what.clone(),
            status: status
                .code()
                .map_or_else(|| format!("{status}"), |c| c.to_string()),
            tail: log.tail(),
        }),
        Err(reason) if reason == "deadline" => Err(StepError::TimedOut {
            what: step.what.clone(),
            deadline: step.deadline,
            tail: log.tail(),
        }),
        Err(reason) if reason == "stopped" => Err(StepError::Stopped),
        Err(reason) => Err(StepError::Spawn {
            what: step.what.clone(),
            program: step.program.display().to_string(),
            error: reason,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str, deadline: Duration) -> Step {
        Step {
            what: "a test step".into(),
            program: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            deadline,
            env: vec![],
            stdin: None,
        }
    }

    #[test]
    fn a_failing_step_quotes_its_last_lines_and_exit_status() {
        let dir = tempfile::tempdir().expect("dir");
        let log = Log::to_file(&dir.path().join("log")).expect("log");
        let error = run(
            &sh(
                // stdout and stderr are read apart, so the error comes a moment later
                // to be sure of its place among the last lines.
                "for i in $(seq 1 20); do echo line $i; done; sleep 0.2; echo oops >&2; exit 3",
                Duration::from_secs(10),
            ),
            dir.path(),
            &log,
            &|| false,
        )
        .expect_err("exit 3");
        let message = error.to_string();
        assert!(message.contains("exit status 3"), "{message}");
        assert!(message.contains("oops"), "{message}");
        assert!(
            message.contains("line 20") && !message.contains("line 5\n"),
            "{message}"
        );
        let written = std::fs::read_to_string(dir.path().join("log")).expect("log");
        assert!(written.contains("line 1\n") && written.contains("oops"));
    }

    #[test]
    fn the_environment_is_cleared() {
        let dir = tempfile::tempdir().expect("dir");
        let log = Log::to_file(&dir.path().join("log")).expect("log");
        run(
            &sh("env", Duration::from_secs(10)),
            dir.path(),
            &log,
            &|| false,
        )
        .expect("env");
        let written = std::fs::read_to_string(dir.path().join("log")).expect("log");
        // Only what the step sets, and what the shell adds itself.
        let allowed = [
            "PATH", "LC_ALL", "HOME", "TMPDIR", "PWD", "SHLVL", "_", "OLDPWD",
        ];
        for line in written.lines().filter(|l| !l.starts_with(['+', '='])) {
            let name = line.split('=').next().unwrap_or_default();
            assert!(allowed.contains(&name), "{name} was inherited: {written}");
        }
        assert!(written.contains("PATH="), "{written}");
    }

    #[test]
    fn a_deadline_or_a_stop_ends_the_whole_group() {
        let dir = tempfile::tempdir().expect("dir");
        let log = Log::to_file(&dir.path().join("log")).expect("log");
        let pid_file = dir.path().join("pid");
        let script = format!("sleep 300 & echo $! > {}; wait", pid_file.display());
        let started = Instant::now();
        let error = run(
            &sh(&script, Duration::from_secs(1)),
            dir.path(),
            &log,
            &|| false,
        )
        .expect_err("deadline");
        assert!(matches!(error, StepError::TimedOut { .. }), "{error}");
        assert!(started.elapsed() < Duration::from_secs(60));
        let pid: i32 = std::fs::read_to_string(&pid_file)
            .expect("pid")
            .trim()
            .parse()
            .expect("a pid");
        // Killed, it may linger a moment as a zombie until init reaps it.
        let gone = (0..50).any(|_| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let state = status.rsplit(')').next().unwrap_or("").trim_start();
            let gone = status.is_empty() || state.starts_with('Z');
            if !gone {
                std::thread::sleep(Duration::from_millis(100));
            }
            gone
        });
        assert!(gone, "the background sleep outlived the step");

        let stop_at = Instant::now() + Duration::from_millis(300);
        let error = run(
            &sh("sleep 300", Duration::from_secs(600)),
            dir.path(),
            &log,
            &|| Instant::now() > stop_at,
        )
        .expect_err("stopped");
        assert!(matches!(error, StepError::Stopped));
    }
}
