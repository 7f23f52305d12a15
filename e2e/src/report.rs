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

/// The CPU model of this machine (`model name` of `/proc/cpuinfo`).
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// utime + stime, in clock ticks, of the process whose `stat` file is `stat_path`
/// (`/proc/<pid>/stat` or `/proc/self/stat`).
pub fn cpu_ticks(stat_path: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(stat_path).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// Clock ticks per second (`getconf CLK_TCK`, 100 when it cannot be read).
pub fn ticks_per_second() -> f64 {
    command_line("getconf", &["CLK_TCK"])
        .parse()
        .unwrap_or(100.0)
}

/// Nearest-rank percentile `p` (0–100) of `samples`, which it sorts; zero when empty.
pub fn pct(samples: &mut [std::time::Duration], p: f64) -> std::time::Duration {
    if samples.is_empty() {
        return std::time::Duration::ZERO;
    }
    samples.sort_unstable();
    let rank = ((p / 100.0) * samples.len() as f64).ceil() as usize;
    samples[rank.clamp(1, samples.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn percentiles_are_nearest_rank() {
        let ms = Duration::from_millis;
        let mut samples: Vec<Duration> = (1..=100).rev().map(ms).collect();
        assert_eq!(pct(&mut samples, 50.0), ms(50));
        assert_eq!(pct(&mut samples, 99.0), ms(99));
        assert_eq!(pct(&mut samples, 100.0), ms(100));
        assert_eq!(pct(&mut samples, 0.0), ms(1));
        assert_eq!(pct(&mut [], 99.0), Duration::ZERO);
    }
}
