//! The XML writer of the EC2 face: success responses in the EC2 namespace (and the bare
//! `<Response>` document that errors use), written with `quick_xml` into one pre-sized buffer.
//!
//! The writer is a flat element API (`open` / `close` / `leaf` …) plus closure helpers
//! (`element`, `set`) for nesting. Text is escaped by `quick_xml::escape::escape`; characters that
//! XML 1.0 cannot carry at all (C0 controls other than tab, LF and CR, U+FFFE, U+FFFF) are replaced
//! by U+FFFD so that a stray byte in a tag value can never make a response unparsable, and CR is
//! written as `&#13;` so that it survives a parser's line-end normalisation.
//!
//! ```text
//! let mut r = Response::new("DescribeKeyPairsResponse", request_id);
//! r.set("keySet", &pairs, |r, k| { r.leaf("keyName", &k.name); });
//! let body: String = r.finish();
//! ```

use std::borrow::Cow;
use std::fmt::Write as _;

use chrono::{DateTime, Datelike, Timelike, Utc};
use quick_xml::events::{BytesEnd, BytesStart, BytesText, Event};
use quick_xml::Writer;

/// The XML namespace of EC2 API version 2016-11-15, on the root element of every success response.
pub const EC2_NAMESPACE: &str = "http://ec2.amazonaws.com/doc/2016-11-15/";

/// The XML declaration every EC2 document starts with (followed by a newline).
pub const XML_DECLARATION: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n";

/// Initial buffer size of [`Response::new`]; big responses should use [`Response::with_capacity`].
pub const DEFAULT_CAPACITY: usize = 4 * 1024;

/// An XML document being written: a success response (`<FooResponse xmlns=…><requestId>…`) or a
/// bare document such as the error `<Response>`. Every element still open is closed by
/// [`Response::finish`].
pub struct Response {
    writer: Writer<Vec<u8>>,
    /// Names of the elements currently open, innermost last (the root is the first).
    stack: Vec<Cow<'static, str>>,
    /// Scratch space for numbers and timestamps.
    scratch: String,
}

impl std::fmt::Debug for Response {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Response")
            .field("open", &self.stack)
            .field("bytes", &self.len())
            .finish()
    }
}

impl Response {
    /// Starts an EC2 success response: the XML declaration, `<{root} xmlns="EC2_NAMESPACE">` and
    /// `<requestId>{request_id}</requestId>`. `root` is the action name plus `Response`, for
    /// example `DescribeInstancesResponse`.
    pub fn new(root: impl Into<Cow<'static, str>>, request_id: &str) -> Self {
        Self::with_capacity(root, request_id, DEFAULT_CAPACITY)
    }

    /// Like [`Response::new`], with a buffer of `capacity` bytes reserved up front (for example
    /// about 2 KiB per instance for `DescribeInstances`).
    pub fn with_capacity(
        root: impl Into<Cow<'static, str>>,
        request_id: &str,
        capacity: usize,
    ) -> Self {
        let mut response = Self::empty_document(capacity);
        let root = root.into();
        let start = BytesStart::new(root.as_ref()).with_attributes([("xmlns", EC2_NAMESPACE)]);
        response.write(Event::Start(start));
        response.stack.push(root);
        response.leaf("requestId", request_id);
        response
    }

    /// Starts a bare document: the XML declaration and `<{root}>` with no namespace and no request
    /// id (the shape of EC2 error responses, whose root is `Response`).
    pub fn document(root: impl Into<Cow<'static, str>>) -> Self {
        let mut response = Self::empty_document(512);
        response.open(root);
        response
    }

    /// Starts a fragment: elements written with no declaration and no root, for
    /// [`Response::raw`] to put into a document later.
    pub fn fragment(capacity: usize) -> Self {
        Response {
            writer: Writer::new(Vec::with_capacity(capacity)),
            stack: Vec::with_capacity(16),
            scratch: String::with_capacity(32),
        }
    }

    /// The bytes of a fragment, every element it opened closed.
    pub fn fragment_bytes(self) -> Vec<u8> {
        self.finish_bytes()
    }

    /// Appends `xml`, a [`Response::fragment`]'s bytes, where the next element would go.
    pub fn raw(&mut self, xml: &[u8]) -> &mut Self {
        self.writer.get_mut().extend_from_slice(xml);
        self
    }

    fn empty_document(capacity: usize) -> Self {
        let mut buffer = Vec::with_capacity(capacity.max(XML_DECLARATION.len()));
        buffer.extend_from_slice(XML_DECLARATION.as_bytes());
        Response {
            writer: Writer::new(buffer),
            stack: Vec::with_capacity(16),
            scratch: String::with_capacity(32),
        }
    }

    fn write(&mut self, event: Event<'_>) {
        // The sink is a Vec<u8>, whose io::Write implementation never fails.
        self.writer
            .write_event(event)
            .expect("writing XML into a Vec<u8> cannot fail");
    }

    fn text(&mut self, value: &str) {
        if value.is_empty() {
            return;
        }
        if is_plain_text(value) {
            // Nothing to escape or replace: the common case, written as is.
            self.write(Event::Text(BytesText::from_escaped(value)));
            return;
        }
        let clean = xml_safe(value);
        let escaped = quick_xml::escape::escape(clean.as_ref());
        let escaped = if escaped.contains('\r') {
            Cow::Owned(escaped.replace('\r', "&#13;"))
        } else {
            escaped
        };
        self.write(Event::Text(BytesText::from_escaped(escaped)));
    }

    /// Opens `<name>`; pair it with [`Response::close`].
    pub fn open(&mut self, name: impl Into<Cow<'static, str>>) -> &mut Self {
        let name = name.into();
        self.write(Event::Start(BytesStart::new(name.as_ref())));
        self.stack.push(name);
        self
    }

    /// Closes the innermost open element. Closing with nothing open does nothing (the root is
    /// closed by [`Response::finish`] in any case).
    pub fn close(&mut self) -> &mut Self {
        if let Some(name) = self.stack.pop() {
            self.write(Event::End(BytesEnd::new(name.as_ref())));
        }
        self
    }

    /// Opens `<item>`, the element of every entry of an EC2 list (`…Set`); pair it with
    /// [`Response::close`].
    pub fn item(&mut self) -> &mut Self {
        self.open("item")
    }

    /// Writes `<name>value</name>` (escaped); an empty value gives `<name></name>`.
    pub fn leaf(&mut self, name: &str, value: &str) -> &mut Self {
        self.write(Event::Start(BytesStart::new(name)));
        self.text(value);
        self.write(Event::End(BytesEnd::new(name)));
        self
    }

    /// Writes `<name>value</name>` when `value` is `Some`, nothing otherwise.
    pub fn leaf_opt(&mut self, name: &str, value: Option<&str>) -> &mut Self {
        if let Some(value) = value {
            self.leaf(name, value);
        }
        self
    }

    /// Writes `<name>true</name>` or `<name>false</name>`.
    pub fn leaf_bool(&mut self, name: &str, value: bool) -> &mut Self {
        self.leaf(name, bool_text(value))
    }

    /// Writes a number (any integer or float type, or anything else whose `Display` is what EC2
    /// expects) as `<name>value</name>`.
    pub fn leaf_display(&mut self, name: &str, value: impl std::fmt::Display) -> &mut Self {
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        // Writing into a String never fails.
        let _ = write!(scratch, "{value}");
        self.leaf(name, &scratch);
        self.scratch = scratch;
        self
    }

    /// Writes a timestamp the way EC2 does: `2016-11-15T12:34:56.000Z` (UTC, milliseconds).
    pub fn leaf_time(&mut self, name: &str, time: DateTime<Utc>) -> &mut Self {
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        format_time(&mut scratch, time);
        self.leaf(name, &scratch);
        self.scratch = scratch;
        self
    }

    /// Writes `<name/>`, what EC2 sends for an empty set such as `<tagSet/>`.
    pub fn empty(&mut self, name: &str) -> &mut Self {
        self.write(Event::Empty(BytesStart::new(name)));
        self
    }

    /// Writes `<name>`, the body `f` writes, and `</name>`.
    pub fn element(
        &mut self,
        name: impl Into<Cow<'static, str>>,
        f: impl FnOnce(&mut Self),
    ) -> &mut Self {
        let depth = self.stack.len();
        self.open(name);
        f(self);
        self.close_to(depth);
        self
    }

    /// Writes an EC2 list: `<name>` then, for each entry, `<item>` with the body `f` writes for it
    /// and `</item>`, then `</name>`. An empty list gives `<name/>`.
    pub fn set<I>(
        &mut self,
        name: impl Into<Cow<'static, str>>,
        items: I,
        mut f: impl FnMut(&mut Self, I::Item),
    ) -> &mut Self
    where
        I: IntoIterator,
    {
        let mut items = items.into_iter().peekable();
        let name = name.into();
        if items.peek().is_none() {
            return self.empty(name.as_ref());
        }
        let depth = self.stack.len();
        self.open(name);
        for entry in items {
            let item_depth = self.stack.len();
            self.item();
            f(self, entry);
            self.close_to(item_depth);
        }
        self.close_to(depth);
        self
    }

    /// Writes an EC2 list of strings: `<name><item>a</item><item>b</item></name>` (each entry is
    /// the text of its `<item>`, as botocore reads a list of strings). An empty list gives
    /// `<name/>`.
    pub fn string_set<I>(&mut self, name: impl Into<Cow<'static, str>>, items: I) -> &mut Self
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        self.set(name, items, |w, value| {
            w.text(value.as_ref());
        })
    }

    /// Closes elements until `depth` remain open (used by the closure helpers, so that a body
    /// that forgot a `close` cannot unbalance the document).
    fn close_to(&mut self, depth: usize) {
        while self.stack.len() > depth {
            self.close();
        }
    }

    /// How many elements are open, the root included.
    pub fn depth(&self) -> usize {
        self.stack.len()
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.writer.get_ref().len()
    }

    /// Whether nothing but the declaration has been written (never true for a started response).
    pub fn is_empty(&self) -> bool {
        self.len() <= XML_DECLARATION.len()
    }

    /// Closes every open element (the root included) and returns the document's bytes.
    pub fn finish_bytes(mut self) -> Vec<u8> {
        self.close_to(0);
        self.writer.into_inner()
    }

    /// Closes every open element (the root included) and returns the document.
    pub fn finish(self) -> String {
        match String::from_utf8(self.finish_bytes()) {
            Ok(text) => text,
            // Unreachable: only &str content and ASCII markup is ever written.
            Err(err) => String::from_utf8_lossy(err.as_bytes()).into_owned(),
        }
    }
}

/// Whether `value` can be written as XML text unchanged: no markup characters, no C0 control other
/// than tab and LF (CR is escaped to survive line-end normalisation), no byte 0xEF (which starts
/// U+FFFE / U+FFFF, and some harmless characters that then take the slow path).
fn is_plain_text(value: &str) -> bool {
    value.bytes().all(|b| {
        (b >= 0x20 && !matches!(b, b'<' | b'>' | b'&' | b'\'' | b'"' | 0xEF))
            || b == b'\t'
            || b == b'\n'
    })
}

/// A boolean as EC2 writes it (and as filters match it): `true` or `false`.
pub fn bool_text(value: bool) -> &'static str {
    if value {
        "true"
    } else {
        "false"
    }
}

/// A timestamp as EC2 writes it (and as filters match it): `2016-11-15T12:34:56.000Z`.
pub fn time_text(time: DateTime<Utc>) -> String {
    let mut out = String::with_capacity(24);
    format_time(&mut out, time);
    out
}

/// Appends `time` as EC2 writes timestamps: `2016-11-15T12:34:56.000Z`. Hand-rolled because
/// `chrono`'s `format` costs close to a microsecond per call, which shows at 10,000 instances.
fn format_time(out: &mut String, time: DateTime<Utc>) {
    fn two(out: &mut String, n: u32) {
        out.push(char::from(b'0' + (n / 10 % 10) as u8));
        out.push(char::from(b'0' + (n % 10) as u8));
    }
    let year = time.year();
    if !(0..=9999).contains(&year) {
        let _ = write!(out, "{}", time.format("%Y-%m-%dT%H:%M:%S%.3fZ"));
        return;
    }
    let year = year as u32;
    two(out, year / 100);
    two(out, year % 100);
    out.push('-');
    two(out, time.month());
    out.push('-');
    two(out, time.day());
    out.push('T');
    two(out, time.hour());
    out.push(':');
    two(out, time.minute());
    out.push(':');
    two(out, time.second());
    out.push('.');
    // A leap second shows as 1000+ milliseconds in chrono; EC2 has no leap seconds.
    let millis = time.timestamp_subsec_millis().min(999);
    out.push(char::from(b'0' + (millis / 100) as u8));
    two(out, millis % 100);
    out.push('Z');
}

/// `value` with the characters XML 1.0 cannot represent (C0 controls other than tab, LF and CR;
/// U+FFFE; U+FFFF) replaced by U+FFFD. Borrows when there is nothing to replace.
pub fn xml_safe(value: &str) -> Cow<'_, str> {
    let bad = |c: char| {
        (c < '\u{20}' && !matches!(c, '\t' | '\n' | '\r')) || c == '\u{FFFE}' || c == '\u{FFFF}'
    };
    let needs_work = value
        .bytes()
        .any(|b| (b < 0x20 && !matches!(b, b'\t' | b'\n' | b'\r')) || b == 0xEF)
        && value.chars().any(bad);
    if !needs_work {
        return Cow::Borrowed(value);
    }
    Cow::Owned(
        value
            .chars()
            .map(|c| if bad(c) { '\u{FFFD}' } else { c })
            .collect(),
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use quick_xml::Reader;

    /// Reads `xml` back with quick-xml (end names checked) and returns its text per element path.
    fn read_back(xml: &str) -> Vec<(String, String)> {
        let mut reader = Reader::from_str(xml);
        reader.config_mut().check_end_names = true;
        let mut path: Vec<String> = Vec::new();
        let mut out = Vec::new();
        loop {
            match reader.read_event().unwrap() {
                Event::Start(e) => {
                    path.push(String::from_utf8(e.name().as_ref().to_vec()).unwrap())
                }
                Event::End(_) => {
                    path.pop();
                }
                Event::Empty(e) => out.push((
                    format!(
                        "{}/{}",
                        path.join("/"),
                        String::from_utf8_lossy(e.name().as_ref())
                    ),
                    String::new(),
                )),
                Event::Text(t) => {
                    let text = t.xml10_content().unwrap();
                    out.push((path.join("/"), text.into_owned()));
                }
                Event::GeneralRef(r) => {
                    let name = String::from_utf8(r.to_vec()).unwrap();
                    let text = match name.as_str() {
                        "amp" => "&".to_string(),
                        "lt" => "<".to_string(),
                        "gt" => ">".to_string(),
                        "quot" => "\"".to_string(),
                        "apos" => "'".to_string(),
                        "#13" => "\r".to_string(),
                        other => panic!("unexpected reference {other}"),
                    };
                    out.push((path.join("/"), text));
                }
                Event::Eof => break,
                _ => {}
            }
        }
        assert!(path.is_empty(), "unclosed elements: {path:?}");
        // Merge adjacent text pieces of the same element.
        let mut merged: Vec<(String, String)> = Vec::new();
        for (p, t) in out {
            match merged.last_mut() {
                Some((lp, lt)) if *lp == p => lt.push_str(&t),
                _ => merged.push((p, t)),
            }
        }
        merged
    }

    #[test]
    fn a_response_starts_with_the_declaration_the_namespace_and_the_request_id() {
        let r = Response::new("CreateTagsResponse", "req-1");
        let xml = {
            let mut r = r;
            r.leaf_bool("return", true);
            r.finish()
        };
        assert_eq!(
            xml,
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
             <CreateTagsResponse xmlns=\"http://ec2.amazonaws.com/doc/2016-11-15/\">\
             <requestId>req-1</requestId><return>true</return></CreateTagsResponse>"
        );
    }

    #[test]
    fn text_is_escaped_and_survives_a_round_trip() {
        let rows = [
            "plain",
            "a & b",
            "<script>",
            "quote \" and apostrophe '",
            "tab\tnew\nline",
            "carriage\rreturn",
            "unicode ✓ — ünïcödé",
            "]]>",
        ];
        for value in rows {
            let mut r = Response::new("R", "id");
            r.leaf("v", value);
            let xml = r.finish();
            let back = read_back(&xml);
            let got = back
                .iter()
                .find(|(p, _)| p == "R/v")
                .map(|(_, t)| t.as_str());
            assert_eq!(got, Some(value), "{xml}");
        }
    }

    #[test]
    fn characters_xml_cannot_carry_become_replacement_characters() {
        let rows = [
            ("nul\u{0}byte", "nul\u{FFFD}byte"),
            ("bell\u{7}", "bell\u{FFFD}"),
            ("esc\u{1b}[0m", "esc\u{FFFD}[0m"),
            ("nonchar\u{FFFF}", "nonchar\u{FFFD}"),
            ("fine\u{FFFD}", "fine\u{FFFD}"),
            ("ok é", "ok é"),
        ];
        for (input, expected) in rows {
            assert_eq!(xml_safe(input), expected, "{input:?}");
            let mut r = Response::new("R", "id");
            r.leaf("v", input);
            let back = read_back(&r.finish());
            assert_eq!(back.last().map(|(_, t)| t.as_str()), Some(expected));
        }
    }

    #[test]
    fn empty_sets_are_self_closing_and_items_are_wrapped() {
        let mut r = Response::new("DescribeKeyPairsResponse", "id");
        r.set("keySet", ["a", "b"], |r, name| {
            r.leaf("keyName", name);
        });
        r.set("tagSet", Vec::<&str>::new(), |_, _| {});
        let xml = r.finish();
        assert!(xml.contains(
            "<keySet><item><keyName>a</keyName></item><item><keyName>b</keyName></item></keySet><tagSet/>"
        ), "{xml}");
    }

    #[test]
    fn a_string_set_puts_each_string_directly_in_its_item() {
        let mut r = Response::new("DescribeInstanceTypesResponse", "id");
        r.string_set("supportedArchitectures", ["x86_64", "i386"]);
        r.string_set("supportedBootModes", Vec::<&str>::new());
        let xml = r.finish();
        assert!(
            xml.contains(
                "<supportedArchitectures><item>x86_64</item><item>i386</item></supportedArchitectures><supportedBootModes/>"
            ),
            "{xml}"
        );
    }

    #[test]
    fn finish_closes_whatever_is_still_open() {
        let mut r = Response::new("RunInstancesResponse", "id");
        r.open("instancesSet").item().leaf("instanceId", "i-1");
        assert_eq!(r.depth(), 3);
        let xml = r.finish();
        assert!(xml.ends_with("</instanceId></item></instancesSet></RunInstancesResponse>"));
        read_back(&xml);
    }

    #[test]
    fn closure_helpers_keep_the_document_balanced_even_if_a_body_forgets_to_close() {
        let mut r = Response::new("R", "id");
        r.element("outer", |r| {
            r.open("forgotten").leaf("x", "1");
        });
        r.leaf("after", "2");
        let xml = r.finish();
        assert!(xml.contains("<outer><forgotten><x>1</x></forgotten></outer><after>2</after>"));
        read_back(&xml);
    }

    #[test]
    fn numbers_booleans_and_times_are_written_as_ec2_writes_them() {
        let mut r = Response::new("R", "id");
        let t = Utc.with_ymd_and_hms(2016, 11, 15, 1, 2, 3).unwrap();
        r.leaf_display("code", 16)
            .leaf_display("size", 8u64)
            .leaf_bool("b", false)
            .leaf_time("launchTime", t)
            .leaf_opt("absent", None)
            .leaf_opt("present", Some("yes"))
            .empty("nothing");
        let xml = r.finish();
        assert!(xml.contains(
            "<code>16</code><size>8</size><b>false</b><launchTime>2016-11-15T01:02:03.000Z</launchTime><present>yes</present><nothing/>"
        ), "{xml}");
    }

    #[test]
    fn timestamps_match_chrono_formatting_in_every_field() {
        let rows = [
            (2016, 11, 15, 1, 2, 3, 0),
            (1999, 12, 31, 23, 59, 59, 999),
            (2024, 2, 29, 0, 0, 0, 7),
            (1, 1, 1, 0, 0, 0, 10),
            (9999, 12, 31, 23, 59, 59, 123),
            (12345, 1, 1, 0, 0, 0, 0),
        ];
        for (y, mo, d, h, mi, s, ms) in rows {
            let t = Utc.with_ymd_and_hms(y, mo, d, h, mi, s).unwrap()
                + chrono::Duration::milliseconds(ms);
            let mut got = String::new();
            format_time(&mut got, t);
            assert_eq!(got, t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string());
        }
    }

    #[test]
    fn a_bare_document_has_no_namespace_and_no_request_id() {
        let mut r = Response::document("Response");
        r.leaf("RequestID", "x");
        assert_eq!(
            r.finish(),
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><RequestID>x</RequestID></Response>"
        );
    }

    #[test]
    fn ten_thousand_instances_serialize_into_a_well_formed_document() {
        let n = 10_000;
        let mut r = Response::with_capacity("DescribeInstancesResponse", "req", n * 1024);
        r.set("reservationSet", 0..n, |r, i| {
            r.leaf("reservationId", &format!("r-{i:017x}"))
                .leaf("ownerId", "123456789012")
                .empty("groupSet");
            r.set("instancesSet", [i], |r, i| {
                r.leaf("instanceId", &format!("i-{i:017x}"))
                    .leaf("imageId", "emi-0123456789abcdef0")
                    .element("instanceState", |r| {
                        r.leaf_display("code", 16).leaf("name", "running");
                    })
                    .leaf("privateDnsName", "ip-10-0-0-1.ec2.internal")
                    .leaf("keyName", "my & key <pair>")
                    .leaf("instanceType", "t2.micro")
                    .leaf_time("launchTime", Utc::now())
                    .element("placement", |r| {
                        r.leaf("availabilityZone", "karri-1a")
                            .leaf("tenancy", "default");
                    });
                r.set("tagSet", [("Name", "web")], |r, (k, v)| {
                    r.leaf("key", k).leaf("value", v);
                });
            });
        });
        let xml = r.finish();
        let mut reader = Reader::from_str(&xml);
        reader.config_mut().check_end_names = true;
        let (mut depth, mut instances, mut max_depth) = (0usize, 0usize, 0usize);
        loop {
            match reader.read_event().unwrap() {
                Event::Start(e) => {
                    depth += 1;
                    max_depth = max_depth.max(depth);
                    if e.name().as_ref() == b"instanceId" {
                        instances += 1;
                    }
                }
                Event::End(_) => depth -= 1,
                Event::Eof => break,
                _ => {}
            }
        }
        assert_eq!(depth, 0);
        assert_eq!(instances, n);
        assert_eq!(max_depth, 8);
    }
}
