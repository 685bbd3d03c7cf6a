//! Shared by the special-file tests of ferry-client and ferry-server (issue 15 §6): the three hostile inputs and
//! a runner that gives a child process a deadline and records its peak RSS.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Far above what any of these refusals takes, far below a hang.
const DEADLINE: Duration = Duration::from_secs(20);
/// A refusal that reads the 8 GiB file, or /dev/zero, would show as gigabytes.
const MAX_RSS_KB: u64 = 96 * 1024;

/// How a child process ended.
pub struct Run {
    /// Exit code.
    pub code: Option<i32>,
    /// Its stderr.
    pub stderr: String,
    /// Wall time.
    pub took: Duration,
    /// Peak resident memory.
    pub rss_kb: u64,
}

/// Run `bin` with `args` under the deadline; peak RSS read from /proc while it runs (VmHWM).
pub fn run(bin: &str, args: &[&std::ffi::OsStr]) -> Run {
    let start = Instant::now();
    let mut child = Command::new(bin)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let status_path = format!("/proc/{}/status", child.id());
    let mut rss_kb = 0;
    let status = loop {
        if let Ok(s) = std::fs::read_to_string(&status_path) {
            if let Some(kb) = s
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            {
                rss_kb = rss_kb.max(kb);
            }
        }
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if start.elapsed() > DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{bin} {args:?} still running after {DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let mut stderr = String::new();
    use std::io::Read;
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("stderr");
    Run {
        code: status.code(),
        stderr,
        took: start.elapsed(),
        rss_kb,
    }
}

/// The three hostile inputs in `dir`, with what the refusal must say.
pub fn hostile(dir: &Path) -> Vec<(PathBuf, &'static str)> {
    let sparse = dir.join("site-c-r0.ferry");
    std::fs::File::create(&sparse)
        .and_then(|f| f.set_len(8 << 30))
        .expect("sparse file");
    let zero = dir.join("zero.ferry");
    std::os::unix::fs::symlink("/dev/zero", &zero).expect("symlink");
    let fifo = dir.join("fifo.ferry");
    let made = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
    assert!(made.success(), "mkfifo failed");
    vec![
        (sparse, "not a ferry bundle: wrong magic bytes"),
        (zero, "is a character device, not a regular file"),
        (fifo, "is a FIFO (named pipe), not a regular file"),
    ]
}

/// A one-line refusal with exit code 1 that says `expect`, in little memory.
pub fn check(what: &str, r: &Run, expect: &str) {
    assert_eq!(r.code, Some(1), "{what}: exit code; stderr {:?}", r.stderr);
    assert_eq!(
        r.stderr.lines().count(),
        1,
        "{what}: one line expected: {:?}",
        r.stderr
    );
    assert!(
        r.stderr.contains(expect),
        "{what}: expected {expect:?} in {:?}",
        r.stderr
    );
    assert!(r.rss_kb < MAX_RSS_KB, "{what}: peak RSS {} KiB", r.rss_kb);
    eprintln!("{what}: refused in {:?}, peak RSS {} KiB", r.took, r.rss_kb);
}
