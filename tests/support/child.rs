//! Child processes of the multi-process tests: the test binary re-runs itself on one ignored
//! test (the child's entry point, which does nothing unless its role variable is set), and the
//! parent waits for what the children do.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The command that runs the ignored test `test` of this test binary in a new process; the
/// caller adds the environment that tells the child its role.
pub fn child_command(test: &str) -> Command {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args([
        "--exact",
        test,
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ]);
    c
}

/// [`child_command`] with no stdin and libtest's output of the child thrown away (only its exit
/// status and the files it writes count).
pub fn quiet_child_command(test: &str) -> Command {
    let mut c = child_command(test);
    c.stdin(Stdio::null()).stdout(Stdio::null());
    c
}

/// Children killed and reaped if the test fails before it waits for them.
#[derive(Debug, Default)]
pub struct Kids(pub Vec<Child>);

impl Drop for Kids {
    fn drop(&mut self) {
        for c in &mut self.0 {
            // A child the test stopped (SIGSTOP) is resumed first, so that nothing of it lingers
            // stopped whatever the kernel does with a stopped process's SIGKILL.
            send_signal(c, libc::SIGCONT);
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Sends `sig` to the child `c`.
pub fn send_signal(c: &Child, sig: libc::c_int) {
    // A signal to our own child, which is not yet reaped (`Child::wait` was not called), so the
    // PID is still its own; kill(2) takes no pointers.
    // SAFETY: sound for the reasons just given.
    unsafe { libc::kill(c.id() as libc::pid_t, sig) };
}

/// Polls `cond` every millisecond until it holds; a test failure naming `what` after `limit`.
pub fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Creates the marker file `name` in `dir`: how a child tells the parent (or the parent a
/// child) that it reached a point.
pub fn signal(dir: &Path, name: &str) {
    std::fs::File::create(dir.join(name)).unwrap();
}

/// The role (from `role_var`) and directory (from `dir_var`) a parent gave this child; `None` in
/// a normal test run, where the child's entry point returns at once.
pub fn role_and_dir(role_var: &str, dir_var: &str) -> Option<(String, PathBuf)> {
    let role = std::env::var(role_var).ok()?;
    Some((role, PathBuf::from(std::env::var(dir_var).unwrap())))
}

/// Waits for the `fork()`ed child `pid` (not a `Command`) and returns its exit status; a test
/// failure if it did not exit normally.
pub fn wait_exit_code(pid: libc::pid_t) -> i32 {
    let mut st = 0;
    // SAFETY: waiting for our own child; `st` is a valid out-pointer.
    let rc = unsafe { libc::waitpid(pid, &mut st, 0) };
    assert_eq!(rc, pid);
    assert!(libc::WIFEXITED(st), "child did not exit normally: {st:#x}");
    libc::WEXITSTATUS(st)
}
