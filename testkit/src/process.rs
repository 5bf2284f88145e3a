//! Child-process plumbing shared by the gateway and redis-server handles: dying with the test,
//! signalling one child by pid (never a group or a name), reaping, and reading its memory.

use std::process::{Child, Command};

/// Makes a spawned server die with the spawning process even if that process is killed before
/// its destructors run (the signal fires when the spawning thread ends: servers are spawned from
/// a test's or a run's runtime threads, which live as long as the test or the run).
pub fn die_with_parent(cmd: &mut Command) {
    signal_with_parent(cmd, libc::SIGKILL)
}

/// Like [`die_with_parent`] with another signal, e.g. SIGTERM for a server that must stop its
/// own children on the way out.
pub fn signal_with_parent(cmd: &mut Command, sig: libc::c_int) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl(2) is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(move || {
            libc::prctl(libc::PR_SET_PDEATHSIG, sig);
            Ok(())
        });
    }
}

fn pid_of(child: &Child) -> libc::pid_t {
    libc::pid_t::try_from(child.id()).expect("pid fits pid_t")
}

/// Sends `sig` to one child process this kit spawned and has not reaped.
pub(crate) fn signal(child: &Child, sig: libc::c_int) {
    // SAFETY: kill(2) on the pid of a child we spawned and have not reaped yet.
    let rc = unsafe { libc::kill(pid_of(child), sig) };
    assert_eq!(rc, 0, "kill failed: {}", std::io::Error::last_os_error());
}

/// SIGKILL (unless it already exited) and reap.
pub(crate) fn kill_and_reap(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        signal(child, libc::SIGKILL);
    }
    let _ = child.wait();
}

/// VmRSS of a process from /proc/<pid>/status, in bytes (None once it is gone).
pub fn rss_bytes_of(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
