//! Instance → libvirt domain XML, and back to the owner it records.
//!
//! [`render`] is a pure conversion: the same [`DomainSpec`] always gives the same bytes, which the
//! golden files in `tests/golden/` pin. XML is written and read with `quick-xml`, whose writer
//! escapes every text node and attribute value (`<`, `>`, `&`, `'`, `"`); what it cannot do —
//! refuse characters that XML 1.0 forbids even when escaped — [`render`] checks itself.
//!
//! Every domain Karri defines carries, in its `<metadata>`, an element in the [`XMLNS`] namespace
//! naming its owner: the record UID, the instance ID, the namespace and the node whose agent
//! manages it. [`ownership`] reads it back; a domain without it is not Karri's and is never
//! touched, and a domain of another node (a second agent on the same libvirtd) is left to that
//! node's agent.

use std::io;

use quick_xml::escape::resolve_predefined_entity;
use quick_xml::events::{BytesText, Event};
use quick_xml::name::ResolveResult;
use quick_xml::{NsReader, Writer};

/// XML namespace of Karri's element in a domain's `<metadata>`.
pub const XMLNS: &str = "https://karri.dev/xmlns/domain/1";

/// Prefix bound to [`XMLNS`] in the XML that [`render`] writes.
pub const XMLNS_PREFIX: &str = "karri";

/// Prefix of the libvirt name of every domain Karri defines: `karri-<instance id>`.
pub const NAME_PREFIX: &str = "karri-";

/// What SMBIOS reports as the system and chassis manufacturer, so that cloud-init picks its EC2
/// datasource.
pub const SMBIOS_MANUFACTURER: &str = "Amazon EC2";

/// Name of the local element under `<metadata>` that carries the owner.
const OWNER_ELEMENT: &str = "instance";

/// The libvirt domain name of an instance: `karri-` followed by its ID.
pub fn domain_name(instance_id: &str) -> String {
    format!("{NAME_PREFIX}{instance_id}")
}

/// libvirt domain type: which accelerator QEMU runs the guest with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DomainType {
    /// Hardware virtualisation through `/dev/kvm`.
    Kvm,
    /// Pure emulation (TCG); works everywhere, slowly. The libvirt test driver accepts it too.
    Qemu,
}

impl DomainType {
    /// The value of `<domain type='...'>`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Kvm => "kvm",
            Self::Qemu => "qemu",
        }
    }
}

/// On-disk format of a disk image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DiskFormat {
    /// QEMU copy-on-write image, e.g. an overlay over a cached base image.
    Qcow2,
    /// Plain image.
    Raw,
}

impl DiskFormat {
    /// The value of `<driver type='...'>`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Qcow2 => "qcow2",
            Self::Raw => "raw",
        }
    }
}

/// The root disk of a domain: a file on the host, attached as `vda` on virtio.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskSpec {
    /// Absolute path of the image file on the host.
    pub path: String,
    /// Format of the image file.
    pub format: DiskFormat,
}

/// A kernel booted directly by QEMU (the Eucalyptus EKI/ERI model), instead of a boot loader on
/// the root disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelBoot {
    /// Absolute path of the kernel image on the host.
    pub kernel: String,
    /// Absolute path of the initial ramdisk on the host.
    pub initrd: Option<String>,
    /// Kernel command line.
    pub cmdline: String,
}

/// The instance's network interface: a virtio NIC on a host bridge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NicSpec {
    /// MAC address, lower-case `02:00:…`.
    pub mac: String,
    /// Bridge the tap joins.
    pub bridge: String,
    /// Name of the tap, which the node's port guard knows before the domain starts
    /// ([`crate::portguard::tap_for`]).
    pub tap: String,
}

/// Everything [`render`] needs: the instance's identity, its size and the host's facts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainSpec {
    /// libvirt domain name, `karri-<instance id>` (see [`domain_name`]).
    pub name: String,
    /// UID of the Instance record. It must be a UUID: it becomes the domain UUID and the SMBIOS
    /// system UUID and serial, so a record re-created under the same name never matches the old
    /// domain.
    pub uid: String,
    /// EC2 instance ID, e.g. `i-0123456789abcdef0`; also the SMBIOS chassis asset tag.
    pub instance_id: String,
    /// Namespace (account) of the Instance record.
    pub namespace: String,
    /// Name of the node whose agent defines and manages the domain; only that agent touches it.
    pub node: String,
    /// Name of the instance type, e.g. `m1.small`; the SMBIOS product name, as on EC2.
    pub instance_type: String,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Accelerator, decided by the caller from the host (KVM when `/dev/kvm` works).
    pub domain_type: DomainType,
    /// Root disk; none for a domain that boots nothing (tests, the libvirt test driver).
    pub disk: Option<DiskSpec>,
    /// Kernel to boot directly; none to boot from the disk.
    pub kernel: Option<KernelBoot>,
    /// Network interface; none for a domain without network.
    pub nic: Option<NicSpec>,
    /// File the serial console is logged to (through virtlogd, which bounds its size).
    pub console_log: Option<String>,
}

/// The owner a Karri domain records in its metadata.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Owner {
    /// UID of the Instance record.
    pub uid: String,
    /// EC2 instance ID.
    pub instance_id: String,
    /// Namespace of the Instance record.
    pub namespace: String,
    /// Node whose agent manages the domain.
    pub node: String,
}

/// Why a [`DomainSpec`] cannot be rendered.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// A required text field is empty.
    #[error("{field} is empty")]
    Empty {
        /// Name of the field.
        field: &'static str,
    },
    /// A field holds a character that XML 1.0 forbids, even escaped.
    #[error("{field} holds a character that XML cannot carry")]
    ForbiddenCharacter {
        /// Name of the field.
        field: &'static str,
    },
    /// The domain name holds a `/`, which libvirt refuses.
    #[error("the domain name holds a slash")]
    SlashInName,
    /// The record UID is not a UUID.
    #[error("the record UID {uid:?} is not a UUID")]
    UidNotUuid {
        /// The UID as given.
        uid: String,
    },
    /// A size is zero.
    #[error("{field} is zero")]
    Zero {
        /// Name of the field.
        field: &'static str,
    },
    /// The writer failed; it writes to memory, so this is not expected.
    #[error("the XML writer failed: {0}")]
    Write(#[source] io::Error),
}

/// Renders the libvirt domain XML for `spec`.
///
/// Pure: no I/O, and the same spec always gives the same bytes. The XML ends with a newline.
pub fn render(spec: &DomainSpec) -> Result<String, RenderError> {
    let uuid = check(spec)?;
    let mut writer = Writer::new_with_indent(Vec::new(), b' ', 2);
    write_domain(&mut writer, spec, &uuid).map_err(RenderError::Write)?;
    let mut bytes = writer.into_inner();
    bytes.push(b'\n');
    // The writer only copies the UTF-8 `str`s it is given, so this cannot fail.
    String::from_utf8(bytes)
        .map_err(|e| RenderError::Write(io::Error::new(io::ErrorKind::InvalidData, e)))
}

/// Validates `spec` and returns the canonical (lower-case, hyphenated) form of its UID.
fn check(spec: &DomainSpec) -> Result<String, RenderError> {
    let texts = [
        ("the domain name", spec.name.as_str()),
        ("the record UID", spec.uid.as_str()),
        ("the instance ID", spec.instance_id.as_str()),
        ("the namespace", spec.namespace.as_str()),
        ("the node name", spec.node.as_str()),
        ("the instance type", spec.instance_type.as_str()),
    ];
    for (field, value) in texts {
        if value.is_empty() {
            return Err(RenderError::Empty { field });
        }
        if !value.chars().all(is_xml_char) {
            return Err(RenderError::ForbiddenCharacter { field });
        }
    }
    if let Some(disk) = &spec.disk {
        if disk.path.is_empty() {
            return Err(RenderError::Empty {
                field: "the disk path",
            });
        }
        if !disk.path.chars().all(is_xml_char) {
            return Err(RenderError::ForbiddenCharacter {
                field: "the disk path",
            });
        }
    }
    let mut extra: Vec<(&'static str, &str)> = Vec::new();
    if let Some(k) = &spec.kernel {
        extra.push(("the kernel path", &k.kernel));
        extra.push(("the kernel command line", &k.cmdline));
        if let Some(initrd) = &k.initrd {
            extra.push(("the initrd path", initrd));
        }
    }
    if let Some(nic) = &spec.nic {
        extra.push(("the MAC address", &nic.mac));
        extra.push(("the bridge name", &nic.bridge));
    }
    if let Some(log) = &spec.console_log {
        extra.push(("the console log path", log));
    }
    for (field, value) in extra {
        if !value.chars().all(is_xml_char) {
            return Err(RenderError::ForbiddenCharacter { field });
        }
    }
    if spec.name.contains('/') {
        return Err(RenderError::SlashInName);
    }
    if spec.vcpus == 0 {
        return Err(RenderError::Zero {
            field: "the vCPU count",
        });
    }
    if spec.memory_mib == 0 {
        return Err(RenderError::Zero {
            field: "the memory size",
        });
    }
    let uuid = uuid::Uuid::parse_str(&spec.uid).map_err(|_| RenderError::UidNotUuid {
        uid: spec.uid.clone(),
    })?;
    Ok(uuid.hyphenated().to_string())
}

/// Whether XML 1.0 allows `c` in a document (production `Char`).
fn is_xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..)
}

/// A `<name>text</name>` element; the text is escaped by quick-xml.
fn text_element<W: io::Write>(w: &mut Writer<W>, name: &str, text: &str) -> io::Result<()> {
    w.create_element(name)
        .write_text_content(BytesText::new(text))?;
    Ok(())
}

/// An SMBIOS `<entry name='...'>value</entry>`.
fn entry<W: io::Write>(w: &mut Writer<W>, name: &str, value: &str) -> io::Result<()> {
    w.create_element("entry")
        .with_attribute(("name", name))
        .write_text_content(BytesText::new(value))?;
    Ok(())
}

fn write_domain<W: io::Write>(w: &mut Writer<W>, spec: &DomainSpec, uuid: &str) -> io::Result<()> {
    let memory = spec.memory_mib.to_string();
    let vcpus = spec.vcpus.to_string();
    let xmlns = format!("xmlns:{XMLNS_PREFIX}");
    let owner_element = format!("{XMLNS_PREFIX}:{OWNER_ELEMENT}");
    let uid_element = format!("{XMLNS_PREFIX}:uid");
    let id_element = format!("{XMLNS_PREFIX}:instanceId");
    let namespace_element = format!("{XMLNS_PREFIX}:namespace");
    let node_element = format!("{XMLNS_PREFIX}:node");

    w.create_element("domain")
        .with_attribute(("type", spec.domain_type.as_str()))
        .write_inner_content(|w| {
            text_element(w, "name", &spec.name)?;
            text_element(w, "uuid", uuid)?;
            w.create_element("metadata").write_inner_content(|w| {
                w.create_element(owner_element.as_str())
                    .with_attribute((xmlns.as_str(), XMLNS))
                    .write_inner_content(|w| {
                        text_element(w, &uid_element, &spec.uid)?;
                        text_element(w, &id_element, &spec.instance_id)?;
                        text_element(w, &namespace_element, &spec.namespace)?;
                        text_element(w, &node_element, &spec.node)
                    })?;
                Ok(())
            })?;
            w.create_element("memory")
                .with_attribute(("unit", "MiB"))
                .write_text_content(BytesText::new(&memory))?;
            text_element(w, "vcpu", &vcpus)?;
            w.create_element("sysinfo")
                .with_attribute(("type", "smbios"))
                .write_inner_content(|w| {
                    w.create_element("bios")
                        .write_inner_content(|w| entry(w, "vendor", SMBIOS_MANUFACTURER))?;
                    w.create_element("system").write_inner_content(|w| {
                        entry(w, "manufacturer", SMBIOS_MANUFACTURER)?;
                        entry(w, "product", &spec.instance_type)?;
                        entry(w, "serial", uuid)?;
                        entry(w, "uuid", uuid)
                    })?;
                    w.create_element("chassis").write_inner_content(|w| {
                        entry(w, "manufacturer", SMBIOS_MANUFACTURER)?;
                        entry(w, "asset", &spec.instance_id)
                    })?;
                    Ok(())
                })?;
            w.create_element("os").write_inner_content(|w| {
                w.create_element("type")
                    .with_attribute(("arch", "x86_64"))
                    .with_attribute(("machine", "pc"))
                    .write_text_content(BytesText::new("hvm"))?;
                if let Some(k) = &spec.kernel {
                    text_element(w, "kernel", &k.kernel)?;
                    if let Some(initrd) = &k.initrd {
                        text_element(w, "initrd", initrd)?;
                    }
                    text_element(w, "cmdline", &k.cmdline)?;
                } else {
                    w.create_element("boot")
                        .with_attribute(("dev", "hd"))
                        .write_empty()?;
                }
                w.create_element("smbios")
                    .with_attribute(("mode", "sysinfo"))
                    .write_empty()?;
                Ok(())
            })?;
            // Without ACPI a QEMU guest never sees the power button that `shutdown` presses.
            w.create_element("features").write_inner_content(|w| {
                w.create_element("acpi").write_empty()?;
                w.create_element("apic").write_empty()?;
                Ok(())
            })?;
            w.create_element("clock")
                .with_attribute(("offset", "utc"))
                .write_empty()?;
            text_element(w, "on_poweroff", "destroy")?;
            text_element(w, "on_reboot", "restart")?;
            text_element(w, "on_crash", "destroy")?;
            w.create_element("devices").write_inner_content(|w| {
                if let Some(disk) = &spec.disk {
                    write_disk(w, disk)?;
                }
                if let Some(nic) = &spec.nic {
                    write_nic(w, nic)?;
                }
                w.create_element("serial")
                    .with_attribute(("type", "pty"))
                    .write_inner_content(|w| {
                        if let Some(log) = &spec.console_log {
                            w.create_element("log")
                                .with_attribute(("file", log.as_str()))
                                .with_attribute(("append", "on"))
                                .write_empty()?;
                        }
                        w.create_element("target")
                            .with_attribute(("port", "0"))
                            .write_empty()?;
                        Ok(())
                    })?;
                // Nothing a cloud guest uses: no USB controller, no balloon (cheaper to start).
                w.create_element("controller")
                    .with_attribute(("type", "usb"))
                    .with_attribute(("model", "none"))
                    .write_empty()?;
                w.create_element("memballoon")
                    .with_attribute(("model", "none"))
                    .write_empty()?;
                w.create_element("console")
                    .with_attribute(("type", "pty"))
                    .write_inner_content(|w| {
                        w.create_element("target")
                            .with_attribute(("type", "serial"))
                            .with_attribute(("port", "0"))
                            .write_empty()?;
                        Ok(())
                    })?;
                Ok(())
            })?;
            Ok(())
        })?;
    Ok(())
}

fn write_nic<W: io::Write>(w: &mut Writer<W>, nic: &NicSpec) -> io::Result<()> {
    w.create_element("interface")
        .with_attribute(("type", "bridge"))
        .write_inner_content(|w| {
            w.create_element("mac")
                .with_attribute(("address", nic.mac.as_str()))
                .write_empty()?;
            w.create_element("source")
                .with_attribute(("bridge", nic.bridge.as_str()))
                .write_empty()?;
            w.create_element("target")
                .with_attribute(("dev", nic.tap.as_str()))
                .write_empty()?;
            w.create_element("model")
                .with_attribute(("type", "virtio"))
                .write_empty()?;
            // No PXE option ROM: guests boot a kernel or a disk, never from the network.
            w.create_element("rom")
                .with_attribute(("enabled", "no"))
                .write_empty()?;
            Ok(())
        })?;
    Ok(())
}

fn write_disk<W: io::Write>(w: &mut Writer<W>, disk: &DiskSpec) -> io::Result<()> {
    w.create_element("disk")
        .with_attribute(("type", "file"))
        .with_attribute(("device", "disk"))
        .write_inner_content(|w| {
            w.create_element("driver")
                .with_attribute(("name", "qemu"))
                .with_attribute(("type", disk.format.as_str()))
                .write_empty()?;
            w.create_element("source")
                .with_attribute(("file", disk.path.as_str()))
                .write_empty()?;
            w.create_element("target")
                .with_attribute(("dev", "vda"))
                .with_attribute(("bus", "virtio"))
                .write_empty()?;
            Ok(())
        })?;
    Ok(())
}

/// Reads the owner back from a domain's XML (as `render` wrote it, or as libvirt returns it).
///
/// Looks for `/domain/metadata/instance` in the [`XMLNS`] namespace, whatever prefix binds it,
/// with non-empty `uid`, `instanceId`, `namespace` and `node` children. `None` when the element
/// is missing or incomplete, or the XML cannot be read: such a domain is not Karri's.
pub fn ownership(xml: &str) -> Option<Owner> {
    let parsed = parse(xml)?;
    let present = |field: Option<String>| field.filter(|value| !value.is_empty());
    Some(Owner {
        uid: present(parsed.uid)?,
        instance_id: present(parsed.instance_id)?,
        namespace: present(parsed.namespace)?,
        node: present(parsed.node)?,
    })
}

/// Reads `/domain/name` from a domain's XML; `None` when it is missing or the XML cannot be read.
pub fn name_of(xml: &str) -> Option<String> {
    parse(xml)?.name.filter(|name| !name.is_empty())
}

/// What [`parse`] collects from a domain's XML.
#[derive(Default)]
struct Parsed {
    name: Option<String>,
    uid: Option<String>,
    instance_id: Option<String>,
    namespace: Option<String>,
    node: Option<String>,
}

/// Where an element sits, as far as [`parse`] cares.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Node {
    Domain,
    Name,
    Metadata,
    Owner,
    Uid,
    InstanceId,
    Namespace,
    /// `node`: the node whose agent manages the domain.
    ManagedBy,
    Other,
}

/// One pass over the document with namespace resolution; the first occurrence of each field wins.
fn parse(xml: &str) -> Option<Parsed> {
    let mut reader = NsReader::from_str(xml);
    let mut stack: Vec<Node> = Vec::new();
    let mut text = String::new();
    let mut parsed = Parsed::default();
    loop {
        let (ns, event) = reader.read_resolved_event().ok()?;
        let ours = matches!(ns, ResolveResult::Bound(n) if n.as_ref() == XMLNS.as_bytes());
        match event {
            Event::Start(start) => {
                let parent = stack.last().copied();
                let local = start.local_name();
                let node = classify(parent, ours, local.as_ref());
                stack.push(node);
                text.clear();
            }
            Event::Empty(_) => {}
            Event::Text(t) => text.push_str(&t.xml10_content().ok()?),
            Event::CData(t) => text.push_str(&t.decode().ok()?),
            Event::GeneralRef(r) => match r.resolve_char_ref().ok()? {
                Some(c) => text.push(c),
                None => text.push_str(resolve_predefined_entity(&r.decode().ok()?)?),
            },
            Event::End(_) => {
                let slot = match stack.pop()? {
                    Node::Name => &mut parsed.name,
                    Node::Uid => &mut parsed.uid,
                    Node::InstanceId => &mut parsed.instance_id,
                    Node::Namespace => &mut parsed.namespace,
                    Node::ManagedBy => &mut parsed.node,
                    _ => {
                        text.clear();
                        continue;
                    }
                };
                if slot.is_none() {
                    *slot = Some(text.trim().to_owned());
                }
                text.clear();
            }
            Event::Eof => break,
            _ => {}
        }
    }
    Some(parsed)
}

fn classify(parent: Option<Node>, ours: bool, local: &[u8]) -> Node {
    match (parent, ours, local) {
        (None, false, b"domain") => Node::Domain,
        (Some(Node::Domain), false, b"name") => Node::Name,
        (Some(Node::Domain), false, b"metadata") => Node::Metadata,
        (Some(Node::Metadata), true, b"instance") => Node::Owner,
        (Some(Node::Owner), true, b"uid") => Node::Uid,
        (Some(Node::Owner), true, b"instanceId") => Node::InstanceId,
        (Some(Node::Owner), true, b"namespace") => Node::Namespace,
        (Some(Node::Owner), true, b"node") => Node::ManagedBy,
        _ => Node::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> DomainSpec {
        DomainSpec {
            name: domain_name("i-0123456789abcdef0"),
            uid: "6f1f8d2e-1c1a-4d1e-9a55-2c7c1b7a0b11".into(),
            instance_id: "i-0123456789abcdef0".into(),
            namespace: "acct-1".into(),
            node: "node-1".into(),
            instance_type: "m1.small".into(),
            vcpus: 1,
            memory_mib: 256,
            domain_type: DomainType::Qemu,
            disk: None,
            kernel: None,
            nic: None,
            console_log: None,
        }
    }

    #[test]
    fn rendered_domain_reads_back_its_owner() {
        let xml = render(&spec()).expect("renders");
        assert_eq!(
            ownership(&xml),
            Some(Owner {
                uid: "6f1f8d2e-1c1a-4d1e-9a55-2c7c1b7a0b11".into(),
                instance_id: "i-0123456789abcdef0".into(),
                namespace: "acct-1".into(),
                node: "node-1".into(),
            })
        );
        assert_eq!(name_of(&xml).as_deref(), Some("karri-i-0123456789abcdef0"));
    }

    #[test]
    fn owner_is_found_whatever_prefix_binds_the_namespace() {
        let xml = r#"<domain type="kvm"><name>x</name><metadata>
            <k:instance xmlns:k="https://karri.dev/xmlns/domain/1">
              <k:uid>u</k:uid><k:instanceId>i-1</k:instanceId><k:namespace>a&amp;b&#x3c;</k:namespace>
              <k:node>n-1</k:node>
            </k:instance></metadata></domain>"#;
        let owner = ownership(xml).expect("owned");
        assert_eq!(owner.namespace, "a&b<");
        assert_eq!(owner.node, "n-1");
        let xml = r#"<domain><metadata><instance xmlns="https://karri.dev/xmlns/domain/1">
            <uid>u</uid><instanceId>i-1</instanceId><namespace><![CDATA[n]]></namespace>
            <node>n-2</node></instance></metadata></domain>"#;
        assert_eq!(
            ownership(xml).map(|o| (o.namespace, o.node)),
            Some(("n".into(), "n-2".into()))
        );
    }

    #[test]
    fn domain_without_our_metadata_has_no_owner() {
        let cases = [
            "<domain type='test'><name>test</name></domain>",
            "<domain><name>x</name><metadata><other xmlns='urn:x'/></metadata></domain>",
            // Our element names, but not in our namespace.
            "<domain><metadata><instance><uid>u</uid><instanceId>i</instanceId>\
             <namespace>n</namespace></instance></metadata></domain>",
            // Our namespace outside <metadata>.
            "<domain><devices><k:instance xmlns:k='https://karri.dev/xmlns/domain/1'>\
             <k:uid>u</k:uid><k:instanceId>i</k:instanceId><k:namespace>n</k:namespace>\
             </k:instance></devices></domain>",
            // Incomplete: no UID.
            "<domain><metadata><k:instance xmlns:k='https://karri.dev/xmlns/domain/1'>\
             <k:instanceId>i</k:instanceId><k:namespace>n</k:namespace><k:node>n</k:node>\
             </k:instance></metadata></domain>",
            // Incomplete: no node (as Karri wrote domains before they named their node).
            "<domain><metadata><k:instance xmlns:k='https://karri.dev/xmlns/domain/1'>\
             <k:uid>u</k:uid><k:instanceId>i</k:instanceId><k:namespace>n</k:namespace>\
             </k:instance></metadata></domain>",
            // Empty node.
            "<domain><metadata><k:instance xmlns:k='https://karri.dev/xmlns/domain/1'>\
             <k:uid>u</k:uid><k:instanceId>i</k:instanceId><k:namespace>n</k:namespace>\
             <k:node> </k:node></k:instance></metadata></domain>",
            // The node outside our namespace.
            "<domain><metadata><k:instance xmlns:k='https://karri.dev/xmlns/domain/1'>\
             <k:uid>u</k:uid><k:instanceId>i</k:instanceId><k:namespace>n</k:namespace>\
             <node>n</node></k:instance></metadata></domain>",
            // Not XML.
            "<domain><metadata>",
            "",
        ];
        for xml in cases {
            assert_eq!(ownership(xml), None, "{xml}");
        }
    }

    #[test]
    fn spec_with_bad_fields_is_refused() {
        let mut s = spec();
        s.uid = "not-a-uuid".into();
        assert!(matches!(render(&s), Err(RenderError::UidNotUuid { .. })));
        let mut s = spec();
        s.namespace = "a\u{1}b".into();
        assert!(matches!(
            render(&s),
            Err(RenderError::ForbiddenCharacter { .. })
        ));
        let mut s = spec();
        s.name = "karri/x".into();
        assert!(matches!(render(&s), Err(RenderError::SlashInName)));
        let mut s = spec();
        s.vcpus = 0;
        assert!(matches!(render(&s), Err(RenderError::Zero { .. })));
        let mut s = spec();
        s.instance_id.clear();
        assert!(matches!(render(&s), Err(RenderError::Empty { .. })));
        let mut s = spec();
        s.node.clear();
        assert!(matches!(
            render(&s),
            Err(RenderError::Empty {
                field: "the node name"
            })
        ));
    }

    #[test]
    fn upper_case_uid_becomes_lower_case_domain_uuid() {
        let mut s = spec();
        s.uid = s.uid.to_uppercase();
        let xml = render(&s).expect("renders");
        assert!(xml.contains("<uuid>6f1f8d2e-1c1a-4d1e-9a55-2c7c1b7a0b11</uuid>"));
        // The metadata keeps the UID exactly as the record has it.
        assert_eq!(ownership(&xml).map(|o| o.uid), Some(s.uid));
    }
}
