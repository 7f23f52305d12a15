//! One page of a bucket listing (ListObjects v1 and v2, ListObjectVersions): keys and common
//! prefixes in key order, read from a sorted key source batch by batch, skipping over whole
//! common prefixes instead of reading every key under them.

/// Sorted keys of one bucket: up to `limit` entries whose key is at least `start` (bytes,
/// relative to the bucket) and starts with `prefix`.
#[async_trait::async_trait]
pub trait KeySource<V: Send> {
    /// The error of a read.
    type Error: Send;
    /// Reads one batch.
    async fn fetch(
        &self,
        prefix: &str,
        start: &[u8],
        limit: usize,
    ) -> Result<Vec<(String, V)>, Self::Error>;
}

/// What a listing asks for.
#[derive(Debug, Clone, Default)]
pub struct ListRequest<'a> {
    /// Only keys starting with this.
    pub prefix: &'a str,
    /// Group keys by the part of the key after `prefix` up to this.
    pub delimiter: Option<&'a str>,
    /// Only keys (and common prefixes) after this one.
    pub start_after: Option<&'a str>,
    /// At most this many keys plus common prefixes.
    pub max_keys: usize,
}

/// One page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page<V> {
    /// Keys with their values.
    pub contents: Vec<(String, V)>,
    /// Common prefixes, in order.
    pub common_prefixes: Vec<String>,
    /// Whether more follow.
    pub truncated: bool,
    /// The last key or common prefix of the page: where the next page starts after.
    pub last: Option<String>,
}

/// The smallest byte string after every string starting with `s`.
fn skip_past(s: &str) -> Vec<u8> {
    super::index::prefix_end(s.as_bytes())
}

fn just_after(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

/// Entries read at a time right after a common prefix.
const AFTER_PREFIX_BATCH: usize = 16;

/// Reads one page.
pub async fn list_page<V: Send, S: KeySource<V> + Sync>(
    source: &S,
    req: &ListRequest<'_>,
) -> Result<Page<V>, S::Error> {
    let mut page = Page {
        contents: Vec::new(),
        common_prefixes: Vec::new(),
        truncated: false,
        last: None,
    };
    // As on AWS, a page of no keys is not truncated.
    if req.max_keys == 0 {
        return Ok(page);
    }
    let mut cursor = req.start_after.map(just_after).unwrap_or_default();
    let delimiter = req.delimiter.filter(|d| !d.is_empty());
    // Past a common prefix the next key may well be in the next one: read a few entries, not a
    // page's worth, each time (a bucket of many folders is read one folder at a time).
    let mut past_prefix = false;
    'outer: loop {
        let room = req.max_keys - (page.contents.len() + page.common_prefixes.len());
        let most = if past_prefix {
            AFTER_PREFIX_BATCH
        } else {
            1000
        };
        let want = (room + 1).clamp(2, most);
        past_prefix = false;
        let batch = source.fetch(req.prefix, &cursor, want).await?;
        let full = batch.len() >= want;
        if batch.is_empty() {
            break;
        }
        for (key, value) in batch {
            let rest = key.get(req.prefix.len()..).unwrap_or("");
            let group = delimiter.and_then(|d| {
                rest.find(d)
                    .map(|i| key[..req.prefix.len() + i + d.len()].to_string())
            });
            if let Some(cp) = group {
                // The marker may itself be this common prefix (the last entry of a page).
                if req.start_after.is_some_and(|m| cp.as_str() <= m) {
                    cursor = skip_past(&cp);
                    past_prefix = true;
                    continue 'outer;
                }
                if page.contents.len() + page.common_prefixes.len() == req.max_keys {
                    page.truncated = true;
                    break 'outer;
                }
                cursor = skip_past(&cp);
                page.last = Some(cp.clone());
                page.common_prefixes.push(cp);
                // Everything under the prefix is skipped: read on from past it.
                past_prefix = true;
                continue 'outer;
            }
            if page.contents.len() + page.common_prefixes.len() == req.max_keys {
                page.truncated = true;
                break 'outer;
            }
            cursor = just_after(&key);
            page.last = Some(key.clone());
            page.contents.push((key, value));
        }
        if !full {
            break;
        }
    }
    Ok(page)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Mem {
        keys: BTreeMap<Vec<u8>, ()>,
        reads: AtomicUsize,
    }

    impl Mem {
        fn new(keys: &[&str]) -> Self {
            Self {
                keys: keys.iter().map(|k| (k.as_bytes().to_vec(), ())).collect(),
                reads: AtomicUsize::new(0),
            }
        }
    }

    #[async_trait::async_trait]
    impl KeySource<()> for Mem {
        type Error = ();
        async fn fetch(
            &self,
            prefix: &str,
            start: &[u8],
            limit: usize,
        ) -> Result<Vec<(String, ())>, ()> {
            self.reads.fetch_add(1, Ordering::Relaxed);
            Ok(self
                .keys
                .range(start.to_vec()..)
                .filter(|(k, _)| k.starts_with(prefix.as_bytes()))
                .take(limit)
                .map(|(k, _)| (String::from_utf8(k.clone()).unwrap(), ()))
                .collect())
        }
    }

    async fn list(
        keys: &[&str],
        prefix: &str,
        delimiter: Option<&str>,
        start_after: Option<&str>,
        max_keys: usize,
    ) -> (Vec<String>, Vec<String>, bool, Option<String>) {
        let mem = Mem::new(keys);
        let page = list_page(
            &mem,
            &ListRequest {
                prefix,
                delimiter,
                start_after,
                max_keys,
            },
        )
        .await
        .unwrap();
        (
            page.contents.into_iter().map(|(k, _)| k).collect(),
            page.common_prefixes,
            page.truncated,
            page.last,
        )
    }

    const KEYS: &[&str] = &[
        "a.txt",
        "photos/2006/feb/1.jpg",
        "photos/2006/feb/2.jpg",
        "photos/2006/jan/1.jpg",
        "photos/index.html",
        "videos/1.mp4",
        "z.txt",
    ];

    #[tokio::test]
    async fn listing_rows_follow_the_s3_documentation_examples() {
        // (prefix, delimiter, start_after, max_keys) → (keys, common prefixes, truncated)
        type Row = (
            &'static str,
            Option<&'static str>,
            Option<&'static str>,
            usize,
            &'static [&'static str],
            &'static [&'static str],
            bool,
        );
        let rows: &[Row] = &[
            ("", None, None, 1000, KEYS, &[], false),
            (
                "",
                Some("/"),
                None,
                1000,
                &["a.txt", "z.txt"],
                &["photos/", "videos/"],
                false,
            ),
            (
                "photos/2006/",
                Some("/"),
                None,
                1000,
                &[],
                &["photos/2006/feb/", "photos/2006/jan/"],
                false,
            ),
            (
                "photos/",
                Some("/"),
                None,
                1000,
                &["photos/index.html"],
                &["photos/2006/"],
                false,
            ),
            ("", Some("/"), None, 2, &["a.txt"], &["photos/"], true),
            (
                "",
                Some("/"),
                Some("photos/"),
                2,
                &["z.txt"],
                &["videos/"],
                false,
            ),
            (
                "",
                None,
                Some("photos/2006/jan/1.jpg"),
                2,
                &["photos/index.html", "videos/1.mp4"],
                &[],
                true,
            ),
            ("nothing/", Some("/"), None, 1000, &[], &[], false),
            // max-keys=0: no keys and, as on AWS, not truncated.
            ("", None, None, 0, &[], &[], false),
        ];
        for (prefix, delim, after, max, keys, cps, truncated) in rows {
            let got = list(KEYS, prefix, *delim, *after, *max).await;
            assert_eq!(
                (got.0, got.1, got.2),
                (
                    keys.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
                    cps.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
                    *truncated
                ),
                "prefix {prefix:?} delimiter {delim:?} after {after:?} max {max}"
            );
        }
    }

    #[tokio::test]
    async fn paging_with_the_last_entry_visits_every_key_once() {
        let mut all = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let (keys, cps, truncated, last) = list(KEYS, "", Some("/"), after.as_deref(), 1).await;
            all.extend(keys);
            all.extend(cps);
            if !truncated {
                break;
            }
            after = last;
        }
        assert_eq!(all, ["a.txt", "photos/", "videos/", "z.txt"]);
    }

    #[tokio::test]
    async fn a_common_prefix_costs_one_read_however_many_keys_it_holds() {
        let many: Vec<String> = (0..5000).map(|i| format!("logs/{i:05}")).collect();
        let mut keys: Vec<&str> = many.iter().map(String::as_str).collect();
        keys.push("readme");
        let mem = Mem::new(&keys);
        let page = list_page(
            &mem,
            &ListRequest {
                prefix: "",
                delimiter: Some("/"),
                start_after: None,
                max_keys: 1000,
            },
        )
        .await
        .unwrap();
        assert_eq!(page.common_prefixes, ["logs/"]);
        assert_eq!(page.contents.len(), 1);
        assert!(mem.reads.load(Ordering::Relaxed) <= 3);
    }
}
