//! The serial console log of each domain: QEMU writes it through virtlogd (which rotates the
//! file at its size limit, keeping `<file>.0`, `<file>.1` …), and the agent reports its last
//! [`MAX_CONSOLE_BYTES`] in the instance's `status.consoleOutput`, which GetConsoleOutput and the
//! resource API serve.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// How much of the console output is reported: EC2's GetConsoleOutput gives the last 64 KiB.
pub const MAX_CONSOLE_BYTES: u64 = 64 * 1024;

/// The console log file of the instance `id` in `dir`.
pub fn log_path(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}.log"))
}

/// The instance whose console log (current or rotated) `file_name` is: `i-1` for `i-1.log`
/// and `i-1.log.3`. Pure.
pub fn log_owner(file_name: &str) -> Option<&str> {
    let (id, rest) = file_name.split_once(".log")?;
    let rotated = rest
        .strip_prefix('.')
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    (!id.is_empty() && (rest.is_empty() || rotated)).then_some(id)
}

/// The instances with console logs in `dir`.
pub fn owners_in(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut ids: Vec<String> = entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .filter_map(|name| log_owner(&name).map(str::to_owned))
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

/// Removes the console log of the instance `id` in `dir` and the files virtlogd rotated out of
/// it; none there is fine.
pub fn remove_logs(dir: &Path, id: &str) -> io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        if name.to_str().and_then(log_owner) == Some(id) {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

/// The last `max` bytes of `path`, if it exists.
fn read_tail(path: &Path, max: u64) -> io::Result<Option<Vec<u8>>> {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    let start = len.saturating_sub(max);
    file.seek(SeekFrom::Start(start))?;
    let mut buf = Vec::with_capacity(usize::try_from(len - start).unwrap_or(0));
    file.take(max).read_to_end(&mut buf)?;
    Ok(Some(buf))
}

/// What [`read`] found of a console log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tail {
    /// Its last part as text (see [`text`]).
    pub text: String,
    /// Whether the log holds at least [`MAX_CONSOLE_BYTES`] (so that the text is a window onto
    /// a longer output), judged on the bytes read, not on the text, which the dropped bytes of
    /// a cut character or NULs make shorter.
    pub full: bool,
}

/// The last [`MAX_CONSOLE_BYTES`] of the console log at `path`, continuing into the newest
/// rotated file when the current one is shorter; `None` when there is no log at all.
pub fn read(path: &Path) -> io::Result<Option<Tail>> {
    let Some(current) = read_tail(path, MAX_CONSOLE_BYTES)? else {
        return Ok(None);
    };
    let missing = MAX_CONSOLE_BYTES.saturating_sub(current.len() as u64);
    let mut rotated = PathBuf::from(path);
    rotated.as_mut_os_string().push(".0");
    let mut bytes = match read_tail(&rotated, missing)? {
        Some(older) if missing > 0 => older,
        _ => Vec::new(),
    };
    bytes.extend_from_slice(&current);
    Ok(Some(Tail {
        full: bytes.len() as u64 >= MAX_CONSOLE_BYTES,
        text: text(&bytes),
    }))
}

/// Console bytes as text: invalid UTF-8 replaced, a character cut by the tail dropped, and NUL
/// bytes (which JSON and XML consumers choke on) removed.
pub fn text(bytes: &[u8]) -> String {
    // A tail may start in the middle of a multi-byte character: skip continuation bytes.
    let start = bytes
        .iter()
        .take(3)
        .take_while(|b| (**b & 0xC0) == 0x80)
        .count();
    String::from_utf8_lossy(&bytes[start..]).replace('\0', "")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_text_survives_a_cut_character_and_nul_bytes() {
        let bytes = "é ok\0 done".as_bytes();
        assert_eq!(text(&bytes[1..]), " ok done");
        assert_eq!(text(b"\xffabc"), "\u{fffd}abc");
    }

    #[test]
    fn only_the_last_64_kib_are_read_and_a_missing_log_is_none() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = log_path(dir.path(), "i-1");
        assert_eq!(read(&path).expect("reads"), None);
        let mut big = vec![b'a'; 70 * 1024];
        big.extend_from_slice(b"last line\n");
        std::fs::write(&path, &big).expect("writes");
        let got = read(&path).expect("reads").expect("a log");
        assert_eq!(got.text.len() as u64, MAX_CONSOLE_BYTES);
        assert!(got.text.ends_with("last line\n"));
        assert!(got.full);
        // A window that starts inside a character or holds NULs is shorter as text, and still
        // full: a guest writing on and on is throttled all the same.
        let mut cut = "é".repeat(40 * 1024).into_bytes();
        cut.extend_from_slice(b"\0\0 tail\n");
        std::fs::write(&path, &cut).expect("writes");
        let got = read(&path).expect("reads").expect("a log");
        assert!((got.text.len() as u64) < MAX_CONSOLE_BYTES);
        assert!(got.full);
        std::fs::write(&path, b"short\n").expect("writes");
        assert!(!read(&path).expect("reads").expect("a log").full);
    }

    #[test]
    fn logs_and_their_rotations_belong_to_their_instance() {
        let rows = [
            ("i-1.log", Some("i-1")),
            ("i-1.log.0", Some("i-1")),
            ("i-1.log.12", Some("i-1")),
            ("i-1.log.x", None),
            ("i-1.log.", None),
            ("i-1.logs", None),
            (".log", None),
            ("i-1.held", None),
        ];
        for (name, owner) in rows {
            assert_eq!(log_owner(name), owner, "{name}");
        }
    }

    #[test]
    fn removing_an_instances_logs_takes_the_rotated_ones_and_leaves_the_others() {
        let dir = tempfile::tempdir().expect("temp dir");
        for name in ["i-1.log", "i-1.log.0", "i-1.log.1", "i-12.log", "i-2.log.0"] {
            std::fs::write(dir.path().join(name), "x").expect("writes");
        }
        assert_eq!(owners_in(dir.path()), ["i-1", "i-12", "i-2"]);
        remove_logs(dir.path(), "i-1").expect("removed");
        assert_eq!(owners_in(dir.path()), ["i-12", "i-2"]);
        remove_logs(dir.path(), "i-1").expect("nothing left is fine");
    }

    #[test]
    fn a_short_log_continues_into_the_rotated_one() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = log_path(dir.path(), "i-1");
        std::fs::write(dir.path().join("i-1.log.0"), "older\n").expect("writes");
        std::fs::write(&path, "newer\n").expect("writes");
        assert_eq!(
            read(&path).expect("reads").map(|t| t.text).as_deref(),
            Some("older\nnewer\n")
        );
    }
}
