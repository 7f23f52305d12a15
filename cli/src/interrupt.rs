//! Stopping a long copy, conversion or upload: Ctrl-C, SIGTERM (a `kill`) or SIGHUP (a closed
//! terminal) stops the work where it is and its temporary files are removed, instead of the
//! process dying with gigabytes left behind.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

/// The signal that asked the work to stop (0: none yet).
static SIGNAL: AtomicI32 = AtomicI32::new(0);
static PRESSED: tokio::sync::Notify = tokio::sync::Notify::const_new();
/// Temporary files and directories of the work under way: removed if a second Ctrl-C ends the
/// process at once, when no destructor runs.
static TEMPORARY: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
/// Child processes doing the work (qemu-img): killed when the work is asked to stop. A Ctrl-C
/// reaches them from the terminal; a SIGTERM or SIGHUP sent to this process alone does not.
static CHILDREN: Mutex<Vec<u32>> = Mutex::new(Vec::new());

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// While the returned guard lives, `path` (a file or a directory) is removed should a second
/// Ctrl-C end the process at once. Dropping the guard leaves the path to its owner (a
/// `tempfile` that removes or persists it).
pub fn remove_on_quit(path: &Path) -> Registered {
    lock(&TEMPORARY).push(path.to_owned());
    Registered(Entry::Temporary(path.to_owned()))
}

/// While the returned guard lives, the child process `pid` is killed when the work is asked
/// to stop (at once if it was). Drop the guard once the child is waited for.
pub fn kill_on_stop(pid: u32) -> Registered {
    lock(&CHILDREN).push(pid);
    if interrupted() {
        kill(pid);
    }
    Registered(Entry::Child(pid))
}

#[derive(Debug)]
enum Entry {
    Temporary(PathBuf),
    Child(u32),
}

/// A path or child registered with [`remove_on_quit`] or [`kill_on_stop`]; dropping it
/// forgets it.
#[derive(Debug)]
pub struct Registered(Entry);

impl Drop for Registered {
    fn drop(&mut self) {
        match &self.0 {
            Entry::Temporary(path) => forget(&TEMPORARY, path),
            Entry::Child(pid) => forget(&CHILDREN, pid),
        }
    }
}

fn forget<T: PartialEq>(list: &Mutex<Vec<T>>, item: &T) {
    let mut list = lock(list);
    if let Some(at) = list.iter().position(|x| x == item) {
        list.swap_remove(at);
    }
}

fn kill(pid: u32) {
    let pid = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw);
    if let Some(pid) = pid {
        // Gone already is fine: it is being waited for.
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
    }
}

/// Removes every registered temporary file and directory, as far as it can.
fn remove_temporary() {
    remove_all(&TEMPORARY);
}

/// Removes every file and directory of `list`, as far as it can.
fn remove_all(list: &Mutex<Vec<PathBuf>>) {
    for path in lock(list).iter() {
        let _ = if path.is_dir() {
            std::fs::remove_dir_all(path)
        } else {
            std::fs::remove_file(path)
        };
    }
}

/// SIGINT (Ctrl-C), SIGHUP and SIGTERM, as Linux numbers them.
const SIGINT: i32 = 2;
const SIGHUP: i32 = 1;
const SIGTERM: i32 = 15;

/// Takes over Ctrl-C, SIGTERM and SIGHUP: the first asks the work to stop (see
/// [`interrupted`]) and kills its child processes; a second Ctrl-C removes the temporary files
/// and ends the process at once.
pub fn install() {
    tokio::spawn(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).ok();
        let mut hangup = signal(SignalKind::hangup()).ok();
        let got = tokio::select! {
            c = tokio::signal::ctrl_c() => c.is_ok().then_some((SIGINT, "interrupted")),
            Some(()) = async { match term.as_mut() {
                Some(s) => s.recv().await,
                None => std::future::pending().await,
            } } => Some((SIGTERM, "terminated")),
            Some(()) = async { match hangup.as_mut() {
                Some(s) => s.recv().await,
                None => std::future::pending().await,
            } } => Some((SIGHUP, "hung up")),
        };
        let Some((number, why)) = got else { return };
        SIGNAL.store(number, Ordering::SeqCst);
        PRESSED.notify_waiters();
        for pid in lock(&CHILDREN).iter() {
            kill(*pid);
        }
        // After a hang-up stderr may be gone: a failed write is no reason to stop otherwise.
        let _ = writeln!(
            std::io::stderr(),
            "{why}: stopping and removing temporary files (Ctrl-C again to quit now)"
        );
        if tokio::signal::ctrl_c().await.is_ok() {
            // Exiting runs no destructor: the temporary files go first.
            remove_temporary();
            std::process::exit(128 + SIGINT);
        }
    });
}

/// Whether the work was asked to stop (Ctrl-C, SIGTERM or SIGHUP).
pub fn interrupted() -> bool {
    SIGNAL.load(Ordering::SeqCst) != 0
}

/// The exit status of a command stopped by a signal, as shells report it (128 + its number:
/// 130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP).
pub fn exit_status() -> i32 {
    128 + SIGNAL.load(Ordering::SeqCst)
}

/// Resolves once the work is asked to stop (at once if it was), for work that may wait on the
/// network.
pub async fn pressed() {
    let notified = PRESSED.notified();
    tokio::pin!(notified);
    notified.as_mut().enable();
    if interrupted() {
        return;
    }
    notified.await;
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_quit_removes_the_registered_temporary_files_and_not_the_forgotten_ones() {
        let dir = tempfile::tempdir().unwrap();
        let part = dir.path().join("upload.part");
        std::fs::write(&part, b"half an image").unwrap();
        let converted = dir.path().join("convert");
        std::fs::create_dir(&converted).unwrap();
        std::fs::write(converted.join("image.qcow2"), b"qcow").unwrap();
        let kept = dir.path().join("stored.raw");
        std::fs::write(&kept, b"a whole image").unwrap();

        // A list of the test's own: the process-wide one holds other tests' files too.
        let list = Mutex::new(Vec::new());
        lock(&list).push(part.clone());
        lock(&list).push(converted.clone());
        lock(&list).push(kept.clone());
        forget(&list, &kept);
        remove_all(&list);

        assert!(!part.exists());
        assert!(!converted.exists());
        assert!(
            kept.exists(),
            "a path whose guard was dropped is its owner's"
        );
    }
}
