//! What the benchmark programs print with: report lines, PASS/MISS, and facts about the machine.

use std::process::Command;

/// `PASS` or `MISS`.
pub fn pass(ok: bool) -> &'static str {
    if ok {
        "PASS"
    } else {
        "MISS"
    }
}

/// Prints a report line at once (so a later failure keeps what was measured).
pub fn out(line: impl AsRef<str>) {
    println!("{}", line.as_ref());
}

/// stdout of a command, trimmed, or a note why it could not run.
pub fn command_line(cmd: &str, args: &[&str]) -> String {
    match Command::new(cmd).args(args).output() {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_string(),
        Ok(o) => format!("<{cmd} exited {}>", o.status),
        Err(e) => format!("<cannot run {cmd}: {e}>"),
    }
}

/// The 1, 5 and 15 minute load averages of `/proc/loadavg`.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}
