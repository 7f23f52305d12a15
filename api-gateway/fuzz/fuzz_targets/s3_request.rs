//! Fuzzes the S3 face below TCP: Karri's routing of a request to a face (`s3::classify`, with
//! virtual-host parsing and the Eucalyptus prefix), then s3s's routing, header and XML body
//! parsing (Delete, CompleteMultipartUpload, Tagging, AccessControlPolicy …) through a real
//! `S3Service` with Karri's host parser.
//!
//! Input: `method-byte path-and-query \n header lines \n\n body`. The S3 operations behind the
//! service answer NotImplemented (s3s's defaults): the target exercises parsing, not storage.
//! Any panic is a crash. Invariants checked besides: every answer is a well-formed HTTP
//! response whose status is not 500 unless an operation ran, and an error body parses as XML.

#![no_main]

use api_gateway::s3::{classify, strip_euca_uri, virtual_bucket, Hosts};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Uri};
use libfuzzer_sys::fuzz_target;
use quick_xml::events::Event;
use quick_xml::Reader;
use s3s::service::S3ServiceBuilder;

#[derive(Clone)]
struct NoStorage;

#[async_trait::async_trait]
impl s3s::S3 for NoStorage {}

const METHODS: [&str; 6] = ["GET", "PUT", "POST", "DELETE", "HEAD", "OPTIONS"];

fn domains() -> Vec<String> {
    vec!["s3.localhost".into(), "localhost".into()]
}

fuzz_target!(|data: &[u8]| {
    let Some((&m, rest)) = data.split_first() else { return };
    let method: Method = METHODS[usize::from(m) % METHODS.len()].parse().expect("a known method");
    let text_end = rest.windows(2).position(|w| w == b"\n\n").unwrap_or(rest.len());
    let head = String::from_utf8_lossy(&rest[..text_end]);
    let body = rest.get(text_end + 2..).unwrap_or_default().to_vec();
    let mut lines = head.lines();
    let Ok(uri) = lines.next().unwrap_or("/").parse::<Uri>() else { return };
    let mut headers = HeaderMap::new();
    for line in lines {
        let Some((name, value)) = line.split_once(':') else { continue };
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.trim().as_bytes()),
            HeaderValue::from_str(value.trim()),
        ) else {
            continue;
        };
        headers.append(name, value);
    }

    let d = domains();
    let _ = classify(&method, &uri, &headers, &d);
    if let Some(host) = headers.get(http::header::HOST).and_then(|h| h.to_str().ok()) {
        if let Some(bucket) = virtual_bucket(&d, host) {
            assert!(!bucket.is_empty() && host.contains(bucket));
        }
    }
    if let Some(stripped) = strip_euca_uri(&uri) {
        assert!(stripped.path().starts_with('/'));
        let names = stripped.query().unwrap_or("").split('&').map(|p| p.split('=').next().unwrap_or(""));
        for name in names {
            assert!(name != "X-Amz-Signature" && name != "X-Amz-Credential", "{uri} kept {name}");
        }
    }

    let mut builder = S3ServiceBuilder::new(NoStorage);
    builder.set_host(Hosts::new(d));
    let service = builder.build();
    let mut req = Request::new(s3s::Body::from(body));
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.headers_mut() = headers;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a current-thread runtime builds");
    let Ok(resp) = runtime.block_on(service.call(req)) else { return };
    let status = resp.status().as_u16();
    let bytes = runtime
        .block_on(async move {
            use http_body_util::BodyExt;
            resp.into_body().collect().await.map(|c| c.to_bytes())
        })
        .unwrap_or_default();
    if status >= 400 && !bytes.is_empty() {
        let mut reader = Reader::from_reader(&bytes[..]);
        loop {
            match reader.read_event() {
                Ok(Event::Eof) => break,
                Ok(_) => {}
                Err(e) => panic!("error body is not XML ({e}): {}", String::from_utf8_lossy(&bytes)),
            }
        }
    }
});
