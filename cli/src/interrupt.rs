//! Stopping a long copy, conversion or upload: Ctrl-C, SIGTERM (a `kill`) or SIGHUP (a closed
//! terminal) stops the work where it is and its temporary files are removed, instead of the
//! process dying with gigabytes left behind.

use std::io::Write;
use std::sync::atomic::{AtomicI32, Ordering};

/// The signal that asked the work to stop (0: none yet).
static SIGNAL: AtomicI32 = AtomicI32::new(0);
static PRESSED: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// SIGINT (Ctrl-C), SIGHUP and SIGTERM, as Linux numbers them.
const SIGINT: i32 = 2;
const SIGHUP: i32 = 1;
const SIGTERM: i32 = 15;

/// Takes over Ctrl-C, SIGTERM and SIGHUP: the first asks the work to stop (see
/// [`interrupted`]); a second Ctrl-C ends the process at once.
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
        // After a hang-up stderr may be gone: a failed write is no reason to stop otherwise.
        let _ = writeln!(
            std::io::stderr(),
            "{why}: stopping and removing temporary files (Ctrl-C again to quit now)"
        );
        if tokio::signal::ctrl_c().await.is_ok() {
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
