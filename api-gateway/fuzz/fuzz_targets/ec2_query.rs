//! Fuzzes the EC2 Query face below HTTP: form decoding (`Params::from_request`), routing
//! (`router::route`), the error document (`Ec2Error::to_xml`) and SigV4 parsing (`sigv4::parse`,
//! then `canonical_request` / `verify` on what parses).
//!
//! Input: `query \0 body \0 authorization \0 headers`, every part optional (split at the first
//! three NUL bytes). `query` is the URL query string (lossily made UTF-8, as a URI's query always
//! is text), `body` the POST body, `authorization` the `Authorization` header value (absent when
//! empty or not a valid header value) and `headers` further `name: value` lines (e.g.
//! `x-amz-date`, `host`) so that a header signature can get past the date check.
//!
//! Any panic is a crash. Invariants checked besides:
//! - decoded parameters respect the documented bounds;
//! - a routing error has a 4xx/5xx status and its XML document is well-formed, with the code and
//!   message reading back exactly (after the writer's documented replacement of characters XML
//!   cannot carry);
//! - a routed request's `Action::name()` is the `Action` parameter and its version the `Version`
//!   parameter, and every parameter it reports as ignored was sent.

#![no_main]

use api_gateway::aws::sigv4::{self, PathStyle, SignedRequest, VerifyPolicy};
use api_gateway::ec2::error::Ec2Error;
use api_gateway::ec2::params::{Params, MAX_KEY_LEN, MAX_PARAMS, MAX_VALUE_LEN};
use api_gateway::ec2::router;
use api_gateway::ec2::xml::xml_safe;
use http::header::{HeaderName, AUTHORIZATION};
use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;
use quick_xml::events::Event;
use quick_xml::Reader;

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(4, |&b| b == 0);
    let query = String::from_utf8_lossy(parts.next().unwrap_or_default());
    let body = parts.next().unwrap_or_default();
    let authorization = parts.next().unwrap_or_default();
    let extra_headers = parts.next().unwrap_or_default();

    check_params_and_route(&query, body);
    check_sigv4(&query, body, authorization, extra_headers);
});

fn check_params_and_route(query: &str, body: &[u8]) {
    let params = match Params::from_request(Some(query), body) {
        Ok(params) => params,
        Err(err) => {
            check_error(&err);
            return;
        }
    };
    assert!(params.len() <= MAX_PARAMS, "{} parameters", params.len());
    for (key, value) in params.iter() {
        assert!(!key.is_empty(), "an empty parameter name was kept");
        assert!(key.len() <= MAX_KEY_LEN, "name of {} bytes", key.len());
        assert!(
            value.len() <= MAX_VALUE_LEN,
            "value of {} bytes",
            value.len()
        );
    }

    match router::route(&params) {
        Ok(request) => {
            let sent = params.iter().find(|(k, _)| *k == "Action").map(|(_, v)| v);
            assert_eq!(
                Some(request.action.name()),
                sent,
                "routed to an action other than the one sent"
            );
            let version = params.iter().find(|(k, _)| *k == "Version").map(|(_, v)| v);
            assert_eq!(Some(request.version.as_str()), version);
            assert!(!request.version.is_empty(), "an empty Version was accepted");
            for ignored in &request.ignored_params {
                assert!(params.contains(ignored), "ignored {ignored} was never sent");
            }
            assert_eq!(
                request.action.response_name(),
                format!("{}Response", request.action.name())
            );
        }
        Err(err) => check_error(&err),
    }
}

/// An error has an error status, a code, and an XML document that reads back to the same code
/// and message.
fn check_error(err: &Ec2Error) {
    assert!(
        (400..=599).contains(&err.status),
        "{} has status {}",
        err.code,
        err.status
    );
    assert!(!err.code.is_empty(), "an error without a code: {err:?}");
    let xml = err.to_xml("r");
    let read = read_back(&xml);
    let expect = |path: &str, text: &str| {
        let got = read
            .iter()
            .find(|(p, _)| p == path)
            .map(|(_, t)| t.as_str());
        // An empty leaf has no text event at all.
        let got = got.unwrap_or("");
        assert_eq!(got, xml_safe(text), "{path} of {xml}");
    };
    expect("Response/Errors/Error/Code", &err.code);
    expect("Response/Errors/Error/Message", &err.message);
    expect("Response/RequestID", "r");
}

/// Reads `xml` with quick-xml, end names checked, panicking on anything malformed; returns the
/// text of each element by path, adjacent pieces (text and entity references) merged.
fn read_back(xml: &str) -> Vec<(String, String)> {
    let mut reader = Reader::from_str(xml);
    reader.config_mut().check_end_names = true;
    let mut path: Vec<String> = Vec::new();
    let mut out: Vec<(String, String)> = Vec::new();
    let mut roots = 0;
    loop {
        let event = reader
            .read_event()
            .unwrap_or_else(|e| panic!("malformed XML ({e}): {xml}"));
        match event {
            Event::Start(e) => {
                if path.is_empty() {
                    roots += 1;
                }
                path.push(String::from_utf8_lossy(e.name().as_ref()).into_owned());
            }
            Event::End(_) => {
                path.pop();
            }
            Event::Empty(_) => {
                assert!(!path.is_empty(), "an empty element outside the root: {xml}");
            }
            Event::Text(t) => {
                let text = t
                    .xml10_content()
                    .unwrap_or_else(|e| panic!("undecodable text ({e}): {xml}"));
                assert!(
                    !path.is_empty() || text.trim().is_empty(),
                    "text outside the root: {xml}"
                );
                push(&path, &text, &mut out);
            }
            Event::GeneralRef(r) => {
                let name = String::from_utf8_lossy(&r).into_owned();
                let text = match name.as_str() {
                    "amp" => "&".to_string(),
                    "lt" => "<".to_string(),
                    "gt" => ">".to_string(),
                    "quot" => "\"".to_string(),
                    "apos" => "'".to_string(),
                    other => match r.resolve_char_ref() {
                        Ok(Some(c)) => c.to_string(),
                        _ => panic!("unknown reference &{other}; in {xml}"),
                    },
                };
                push(&path, &text, &mut out);
            }
            Event::CData(_) | Event::DocType(_) | Event::PI(_) => {
                panic!("unexpected markup in {xml}")
            }
            Event::Eof => break,
            Event::Decl(_) | Event::Comment(_) => {}
        }
    }
    assert!(path.is_empty(), "unclosed elements {path:?}: {xml}");
    assert_eq!(roots, 1, "not exactly one root element: {xml}");
    out
}

/// Appends `text` to the text of the element at `path`.
fn push(path: &[String], text: &str, out: &mut Vec<(String, String)>) {
    let p = path.join("/");
    match out.last_mut() {
        Some((lp, lt)) if *lp == p => lt.push_str(text),
        _ => out.push((p, text.to_string())),
    }
}

fn check_sigv4(query: &str, body: &[u8], authorization: &[u8], extra_headers: &[u8]) {
    let mut headers = HeaderMap::new();
    if !authorization.is_empty() {
        if let Ok(value) = HeaderValue::from_bytes(authorization) {
            headers.insert(AUTHORIZATION, value);
        }
    }
    for line in extra_headers.split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        {
            headers.append(name, value);
        }
    }
    let payload_hash = sigv4::payload_sha256_hex(body);
    let request = SignedRequest {
        method: "POST",
        path: "/",
        query,
        headers: &headers,
        payload_hash: &payload_hash,
    };
    let _ = sigv4::canonical_query_string(query, true);
    match sigv4::parse(&request) {
        Ok(Some(parsed)) => {
            let _ = parsed.expires_at();
            let _ = sigv4::canonical_request(&parsed, &request, PathStyle::Normalized);
            let _ = sigv4::canonical_request(&parsed, &request, PathStyle::S3);
            let policy = VerifyPolicy::ec2("karri-1");
            if let Err(err) = sigv4::verify(
                &parsed,
                &request,
                "fuzz-secret",
                parsed.request_time,
                &policy,
            ) {
                assert!(!err.aws_code().is_empty());
                let _ = err.to_string();
            }
        }
        Ok(None) => {}
        Err(err) => {
            assert!(!err.aws_code().is_empty());
            let _ = err.to_string();
        }
    }
}
