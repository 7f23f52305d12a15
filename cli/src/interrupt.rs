//! Ctrl-C during a long copy, conversion or upload: the work stops where it is and its
//! temporary files are removed, instead of the process dying with gigabytes left behind.

use std::sync::atomic::{AtomicBool, Ordering};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
static PRESSED: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// Exit status of a command stopped by Ctrl-C (128 + SIGINT), as shells report it.
pub const EXIT_STATUS: i32 = 130;

/// Takes over Ctrl-C: the first one asks the work to stop (see [`interrupted`]); a second
/// one ends the process at once.
pub fn install() {
    tokio::spawn(async {
        if tokio::signal::ctrl_c().await.is_err() {
            return;
        }
        INTERRUPTED.store(true, Ordering::SeqCst);
        PRESSED.notify_waiters();
        eprintln!("interrupted: stopping and removing temporary files (Ctrl-C again to quit now)");
        if tokio::signal::ctrl_c().await.is_ok() {
            std::process::exit(EXIT_STATUS);
        }
    });
}

/// Whether Ctrl-C was pressed.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Resolves once Ctrl-C is pressed (at once if it was), for work that may wait on the network.
pub async fn pressed() {
    let notified = PRESSED.notified();
    tokio::pin!(notified);
    notified.as_mut().enable();
    if interrupted() {
        return;
    }
    notified.await;
}
