//! What libvirt and QEMU take by themselves to start a batch of guests, measured beside Karri
//! in the same `bench-guests` run: the domains Karri defined, made independent of Karri, are
//! defined and started all at once through libvirt's API by this process alone, with no gateway,
//! operator or node agent on the way. Their start is part of what the launch goal allows Karri,
//! so this floor says how much of that allowance is left on this machine.

use std::sync::{Arc, Barrier};
use std::time::Instant;

use anyhow::{bail, Context};
use virt::connect::Connect;
use virt::domain::Domain;

/// The definition `xml` (libvirt's `dumpxml --inactive` of one of Karri's domains) as a domain
/// named `name` that shares nothing with Karri's: Karri's metadata removed (the node agent
/// takes a domain carrying it for one of its own and would remove it as an orphan), no UUID
/// (libvirt gives it a new one) and no SMBIOS `uuid` or `serial` entry (both the instance's
/// UID), and every `(from, to)` of `moves` replaced (the instance's overlay and console log,
/// which belong to Karri's domain). A `from` that is not in the definition is an error, so that
/// a floor domain never writes into Karri's files.
pub fn floor_definition<M: AsRef<str>>(
    xml: &str,
    name: &str,
    moves: &[(M, M)],
) -> anyhow::Result<String> {
    let mut out =
        replace_element(xml, "name", Some(name)).context("the definition has no <name>")?;
    out = replace_element(&out, "uuid", None).unwrap_or(out);
    out = remove_block(&out, "<metadata>", "</metadata>").unwrap_or(out);
    for entry in ["uuid", "serial"] {
        for quote in ['\'', '"'] {
            let open = format!("<entry name={quote}{entry}{quote}>");
            out = remove_block(&out, &open, "</entry>").unwrap_or(out);
        }
    }
    for (from, to) in moves {
        let (from, to) = (from.as_ref(), to.as_ref());
        if !out.contains(from) {
            bail!("the definition does not mention {from}");
        }
        out = out.replace(from, to);
    }
    Ok(out)
}

/// `xml` with the text of its first `<tag>…</tag>` replaced by `text`, or the element and the
/// rest of its line removed when `text` is `None`; `None` when there is no such element.
fn replace_element(xml: &str, tag: &str, text: Option<&str>) -> Option<String> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    match text {
        Some(text) => {
            let start = xml.find(&open)? + open.len();
            let end = start + xml[start..].find(&close)?;
            Some(format!("{}{text}{}", &xml[..start], &xml[end..]))
        }
        None => remove_block(xml, &open, &close),
    }
}

/// `xml` without the first span from `open` to the end of the next `close`, together with the
/// indentation before it and the line break after it; `None` when there is no such span.
fn remove_block(xml: &str, open: &str, close: &str) -> Option<String> {
    let start = xml.find(open)?;
    let end = start + xml[start..].find(close)? + close.len();
    let line_start = xml[..start].trim_end_matches([' ', '\t']).len();
    let line_end = if xml[end..].starts_with('\n') {
        end + 1
    } else {
        end
    };
    Some(format!("{}{}", &xml[..line_start], &xml[line_end..]))
}

/// When one floor domain was defined and running, and the error that stopped it, if any.
#[derive(Debug)]
pub struct FloorStart {
    /// The domain's name.
    pub name: String,
    /// When its thread was let go (every thread's connection open).
    pub released: Option<Instant>,
    /// When `virDomainDefineXML` returned.
    pub defined: Option<Instant>,
    /// When `virDomainCreate` returned: QEMU set up and its vCPUs resumed.
    pub running: Option<Instant>,
    /// What failed, if anything did (the define, the start, or the clean-up after).
    pub error: Option<String>,
}

/// Defines and starts every `(name, xml)` of `domains` at once on the libvirtd at `uri`, one
/// thread and one connection (opened before the start) each, as the node agent calls libvirt,
/// and returns when each was defined and running, beside the instant the first thread was let
/// go. When all are running (or failed), each domain is destroyed and undefined again, even
/// after a failure; their files are the caller's.
pub fn define_and_start_at_once(
    uri: &str,
    domains: Vec<(String, String)>,
) -> (Instant, Vec<FloorStart>) {
    let go = Arc::new(Barrier::new(domains.len()));
    let started = Arc::new(Barrier::new(domains.len()));
    let threads: Vec<_> = domains
        .into_iter()
        .map(|(name, xml)| {
            let (go, started, uri) = (go.clone(), started.clone(), uri.to_owned());
            std::thread::spawn(move || one_domain(&uri, name, &xml, &go, &started))
        })
        .collect();
    let results: Vec<FloorStart> = threads
        .into_iter()
        .map(|t| {
            t.join().unwrap_or_else(|_| FloorStart {
                name: "?".to_owned(),
                released: None,
                defined: None,
                running: None,
                error: Some("the thread panicked".to_owned()),
            })
        })
        .collect();
    let now = Instant::now();
    let t0 = results
        .iter()
        .filter_map(|r| r.released)
        .min()
        .unwrap_or(now);
    (t0, results)
}

/// Waits on a barrier when dropped: a thread of [`define_and_start_at_once`] passes its
/// barriers even when it panics, so that no other thread waits for it forever.
struct PassOnDrop<'a>(&'a Barrier);

impl Drop for PassOnDrop<'_> {
    fn drop(&mut self) {
        self.0.wait();
    }
}

/// One thread of [`define_and_start_at_once`]. It passes both barriers whatever fails.
fn one_domain(uri: &str, name: String, xml: &str, go: &Barrier, started: &Barrier) -> FloorStart {
    // Dropped in reverse order: `go` first, then `started`, also when unwinding.
    let pass_started = PassOnDrop(started);
    let pass_go = PassOnDrop(go);
    let conn = Connect::open(Some(uri));
    drop(pass_go);
    let mut result = FloorStart {
        name,
        released: Some(Instant::now()),
        defined: None,
        running: None,
        error: None,
    };
    let dom = match conn {
        Err(e) => {
            result.error = Some(format!("connecting to {uri}: {e}"));
            None
        }
        Ok(ref conn) => match conn.define_domain_xml(xml) {
            Err(e) => {
                result.error = Some(format!("define: {e}"));
                None
            }
            Ok(dom) => {
                result.defined = Some(Instant::now());
                match dom.create() {
                    Ok(()) => result.running = Some(Instant::now()),
                    Err(e) => result.error = Some(format!("start: {e}")),
                }
                Some(dom)
            }
        },
    };
    // Every domain runs before any is destroyed: a destroy would free CPU the others use.
    drop(pass_started);
    if let Some(dom) = dom {
        if let Err(e) = remove(&dom, result.running.is_some()) {
            result.error.get_or_insert(e);
        }
    }
    result
}

/// Destroys (when `running`) and undefines `dom`; undefines it even when the destroy failed.
fn remove(dom: &Domain, running: bool) -> Result<(), String> {
    let destroyed = if running {
        dom.destroy().map_err(|e| format!("destroy: {e}"))
    } else {
        Ok(())
    };
    let undefined = dom.undefine().map_err(|e| format!("undefine: {e}"));
    destroyed.and(undefined)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shape of `virsh dumpxml --inactive` of a domain the node agent defined.
    const KARRI_DOMAIN: &str = "<domain type='qemu'>
  <name>karri-i-0123456789abcdef0</name>
  <uuid>3b7e1c52-9f0a-4c6d-8e2b-1a2b3c4d5e6f</uuid>
  <metadata>
    <karri:instance xmlns:karri=\"https://karri.dev/xmlns/domain/1\">
      <karri:node>node-1</karri:node>
    </karri:instance>
  </metadata>
  <memory unit='KiB'>262144</memory>
  <sysinfo type='smbios'>
    <system>
      <entry name='manufacturer'>Amazon EC2</entry>
      <entry name='serial'>3b7e1c52-9f0a-4c6d-8e2b-1a2b3c4d5e6f</entry>
      <entry name='uuid'>3b7e1c52-9f0a-4c6d-8e2b-1a2b3c4d5e6f</entry>
    </system>
  </sysinfo>
  <devices>
    <disk type='file' device='disk'>
      <source file='/data/instances/i-0123456789abcdef0/root.qcow2'/>
    </disk>
    <serial type='pty'>
      <log file='/data/console/i-0123456789abcdef0.log' append='on'/>
    </serial>
  </devices>
</domain>
";

    const MOVES: [(&str, &str); 2] = [
        (
            "/data/instances/i-0123456789abcdef0/root.qcow2",
            "/floor/0/root.qcow2",
        ),
        (
            "/data/console/i-0123456789abcdef0.log",
            "/floor/0/console.log",
        ),
    ];

    #[test]
    fn a_floor_domain_shares_no_name_uuid_owner_or_file_with_karris() {
        let floor = floor_definition(KARRI_DOMAIN, "floor-0", &MOVES).expect("the definition");
        let want = "<domain type='qemu'>
  <name>floor-0</name>
  <memory unit='KiB'>262144</memory>
  <sysinfo type='smbios'>
    <system>
      <entry name='manufacturer'>Amazon EC2</entry>
    </system>
  </sysinfo>
  <devices>
    <disk type='file' device='disk'>
      <source file='/floor/0/root.qcow2'/>
    </disk>
    <serial type='pty'>
      <log file='/floor/0/console.log' append='on'/>
    </serial>
  </devices>
</domain>
";
        assert_eq!(floor, want);
    }

    #[test]
    fn a_file_the_definition_does_not_mention_is_an_error() {
        let err = floor_definition(
            KARRI_DOMAIN,
            "floor-0",
            &[("/data/instances/i-other/root.qcow2", "/floor/0/root.qcow2")],
        )
        .expect_err("a move of a file that is not there");
        assert!(
            err.to_string()
                .contains("/data/instances/i-other/root.qcow2"),
            "{err}"
        );
    }

    #[test]
    fn a_definition_without_a_name_is_an_error() {
        assert!(floor_definition::<&str>("<domain type='qemu'/>", "floor-0", &[]).is_err());
    }
}
