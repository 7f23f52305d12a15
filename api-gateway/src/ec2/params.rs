//! The parameters of an EC2 Query request, decoded from `application/x-www-form-urlencoded` text
//! (the POST body and/or the GET query string), with typed accessors for EC2's flattened shapes:
//! lists `InstanceId.1`, `InstanceId.2` …, structures `TagSpecification.1.Tag.1.Key` …, filters,
//! tags, booleans and bounded integers.
//!
//! Rules:
//! - every key appears once: a key given twice (within one input, or in the query string and
//!   the body) is an `InvalidQueryParameter` error, since the signature covers both values but
//!   only one could be read;
//! - list and structure indexes are canonical decimal numbers from 1 (`.1`, `.2`, … `.10`), may
//!   be sparse, and are returned in numeric order; an all-digit index that is `0`, has a leading
//!   zero or does not fit a `u32` is an `InvalidQueryParameter` error;
//! - the text must be valid percent-encoding of UTF-8, else `MalformedQueryString`; in the body
//!   `+` is a space (form encoding), but in the query string a raw `+` is refused
//!   (`MalformedQueryString`), as SigV4 signs it as a literal plus: a space is `%20` there, a plus
//!   `%2B`;
//! - at most [`MAX_PARAMS`] parameters, names of at most [`MAX_KEY_LEN`] bytes, values of at most
//!   [`MAX_VALUE_LEN`] bytes (the caller bounds the body size as a whole);
//! - every accessor marks what it reads, so that the router can tell which parameters nobody
//!   looked at ([`Params::unused`]) and answer `UnknownParameter`.

use std::collections::BTreeMap;
use std::ops::{Bound, RangeInclusive};
use std::sync::atomic::{AtomicBool, Ordering};

use super::error::Ec2Error;
use super::filter::Filter;

/// Most filters one request may carry.
pub const MAX_FILTERS: usize = 50;
/// Most values one filter may carry.
pub const MAX_FILTER_VALUES: usize = 200;
/// Longest filter value, in characters (tag values are at most 256).
pub const MAX_FILTER_VALUE_CHARS: usize = 1024;
/// The most characters the wildcard values of a request's filters may have in all (values
/// without `*` or `?` do not count): matching a resource value costs, per character, one bit of
/// automaton state per wildcard character. Real filters use a few dozen.
pub const MAX_FILTER_WILDCARD_CHARS: usize = 16 * 1024;
/// The most parameters one request may carry.
pub const MAX_PARAMS: usize = 10_000;
/// The longest parameter name, in bytes.
pub const MAX_KEY_LEN: usize = 256;
/// The longest parameter value, in bytes after decoding (user data is limited further by the
/// router, to 16 KiB decoded).
pub const MAX_VALUE_LEN: usize = 128 * 1024;

#[derive(Debug)]
struct Entry {
    value: String,
    used: AtomicBool,
}

impl Entry {
    fn read(&self) -> &str {
        self.used.store(true, Ordering::Relaxed);
        &self.value
    }
}

/// The decoded parameters of one request.
#[derive(Debug, Default)]
pub struct Params {
    map: BTreeMap<String, Entry>,
}

impl Clone for Params {
    fn clone(&self) -> Self {
        Params {
            map: self
                .map
                .iter()
                .map(|(k, e)| {
                    (
                        k.clone(),
                        Entry {
                            value: e.value.clone(),
                            used: AtomicBool::new(e.used.load(Ordering::Relaxed)),
                        },
                    )
                })
                .collect(),
        }
    }
}

fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Where a form comes from, which decides what a raw `+` means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// The query string: SigV4 signs `+` as a literal plus, a form decoder reads a space, so a
    /// raw `+` is refused rather than read differently from how it was signed.
    Query,
    /// A form body (signed by its hash): `+` is a space.
    Body,
}

/// Decodes one form component: `%XX` is a byte, `+` a space in a body; the result must be UTF-8.
fn decode_component(raw: &[u8], source: Source) -> Result<String, Ec2Error> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while let Some(&b) = raw.get(i) {
        match b {
            b'+' if source == Source::Query => {
                return Err(Ec2Error::malformed_query_string(
                    "a raw '+' in the query string is ambiguous: encode a space as %20 and a plus as %2B",
                ))
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b'%' => {
                let hi = raw.get(i + 1).copied().and_then(hex_digit);
                let lo = raw.get(i + 2).copied().and_then(hex_digit);
                match (hi, lo) {
                    (Some(hi), Some(lo)) => out.push(hi << 4 | lo),
                    _ => {
                        return Err(Ec2Error::malformed_query_string(
                            "a '%' is not followed by two hexadecimal digits",
                        ))
                    }
                }
                i += 3;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out)
        .map_err(|_| Ec2Error::malformed_query_string("a parameter is not valid UTF-8"))
}

/// The first `max` characters of `s`, for error messages about overlong text.
fn shorten(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &s[..cut]),
        None => s.to_string(),
    }
}

/// Parses an index segment: `Some(Ok(n))` for a canonical index (EC2 takes `0` too, which
/// Apache Libcloud sends), `Some(Err)` for an all-digit segment that is not one (`01`,
/// overflow), `None` for anything else (not an index).
fn parse_index(segment: &str, key: impl Fn() -> String) -> Option<Result<u32, Ec2Error>> {
    if segment.is_empty() || !segment.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let bad = || {
        Ec2Error::invalid_query_parameter(format!(
            "The parameter {} has an invalid index: indexes are decimal numbers without leading zeros",
            shorten(&key(), 64)
        ))
    };
    if segment.len() > 1 && segment.starts_with('0') {
        return Some(Err(bad()));
    }
    Some(segment.parse::<u32>().map_err(|_| bad()))
}

impl Params {
    /// No parameters.
    pub fn new() -> Self {
        Self::default()
    }

    /// Decodes a form body (`a=1&b=2`, `+` a space).
    pub fn parse_form(input: &[u8]) -> Result<Self, Ec2Error> {
        let mut params = Params::new();
        params.extend_form(input, Source::Body)?;
        Ok(params)
    }

    /// Decodes the query string (if any) and the form body; a key may appear in only one of
    /// them, once.
    pub fn from_request(query: Option<&str>, body: &[u8]) -> Result<Self, Ec2Error> {
        let mut params = Params::new();
        if let Some(query) = query {
            params.extend_form(query.as_bytes(), Source::Query)?;
        }
        params.extend_form(body, Source::Body)?;
        Ok(params)
    }

    /// Decodes a form into these parameters; a key already present is an error. Empty pairs
    /// (`&&`) and pairs with an empty name are skipped.
    fn extend_form(&mut self, input: &[u8], source: Source) -> Result<(), Ec2Error> {
        let mut pairs = 0usize;
        for pair in input.split(|&b| b == b'&') {
            if pair.is_empty() {
                continue;
            }
            pairs += 1;
            if pairs > MAX_PARAMS {
                return Err(Self::too_many());
            }
            let (raw_key, raw_value) = match pair.iter().position(|&b| b == b'=') {
                Some(at) => (&pair[..at], &pair[at + 1..]),
                None => (pair, &pair[pair.len()..]),
            };
            // Encoded text is at most three bytes per decoded byte: refuse early what cannot fit.
            if raw_key.len() > MAX_KEY_LEN * 3 {
                return Err(Self::key_too_long(&String::from_utf8_lossy(raw_key)));
            }
            let key = decode_component(raw_key, source)?;
            if key.is_empty() {
                continue;
            }
            if self.map.contains_key(&key) {
                return Err(Ec2Error::invalid_query_parameter(format!(
                    "The parameter {} is given more than once.",
                    shorten(&key, 64)
                )));
            }
            if raw_value.len() > MAX_VALUE_LEN * 3 {
                return Err(Self::value_too_long(&key));
            }
            let value = decode_component(raw_value, source)?;
            self.insert(key, value)?;
        }
        Ok(())
    }

    /// Sets one parameter (replacing an earlier value), within the same bounds as decoding.
    pub fn insert(
        &mut self,
        key: impl Into<String>,
        value: impl Into<String>,
    ) -> Result<(), Ec2Error> {
        let key = key.into();
        let value = value.into();
        if key.len() > MAX_KEY_LEN {
            return Err(Self::key_too_long(&key));
        }
        if value.len() > MAX_VALUE_LEN {
            return Err(Self::value_too_long(&key));
        }
        if self.map.len() >= MAX_PARAMS && !self.map.contains_key(&key) {
            return Err(Self::too_many());
        }
        self.map.insert(
            key,
            Entry {
                value,
                used: AtomicBool::new(false),
            },
        );
        Ok(())
    }

    /// Parameters from pairs (tests, internal calls), within the same bounds as decoding.
    pub fn from_pairs<K, V>(pairs: impl IntoIterator<Item = (K, V)>) -> Result<Self, Ec2Error>
    where
        K: Into<String>,
        V: Into<String>,
    {
        let mut params = Params::new();
        for (k, v) in pairs {
            params.insert(k, v)?;
        }
        Ok(params)
    }

    fn too_many() -> Ec2Error {
        Ec2Error::invalid_query_parameter(format!(
            "The request has more than {MAX_PARAMS} parameters."
        ))
    }

    fn key_too_long(key: &str) -> Ec2Error {
        Ec2Error::invalid_query_parameter(format!(
            "The parameter name {} is longer than {MAX_KEY_LEN} bytes.",
            shorten(key, 64)
        ))
    }

    fn value_too_long(key: &str) -> Ec2Error {
        Ec2Error::invalid_parameter_value(format!(
            "Value for parameter {} is longer than {MAX_VALUE_LEN} bytes.",
            shorten(key, 64)
        ))
    }

    /// How many parameters there are.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Every parameter, sorted by name (does not mark them used).
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.map.iter().map(|(k, e)| (k.as_str(), e.value.as_str()))
    }

    /// Whether `key` is present (does not mark it used).
    pub fn contains(&self, key: &str) -> bool {
        self.map.contains_key(key)
    }

    /// Marks `key` as used without reading it (parameters handled outside the router, such as
    /// the signature's).
    pub fn mark_used(&self, key: &str) {
        if let Some(entry) = self.map.get(key) {
            entry.used.store(true, Ordering::Relaxed);
        }
    }

    /// The names no accessor has read, sorted.
    pub fn unused(&self) -> Vec<&str> {
        self.map
            .iter()
            .filter(|(_, e)| !e.used.load(Ordering::Relaxed))
            .map(|(k, _)| k.as_str())
            .collect()
    }

    /// The whole request as a scope (the accessors below are shortcuts for it).
    pub fn root(&self) -> Scope<'_> {
        Scope {
            params: self,
            prefix: String::new(),
        }
    }

    /// See [`Scope::get`].
    pub fn get(&self, name: &str) -> Option<&str> {
        self.root().get(name)
    }

    /// See [`Scope::required`].
    pub fn required(&self, name: &str) -> Result<&str, Ec2Error> {
        self.root().required(name)
    }

    /// See [`Scope::list`].
    pub fn list(&self, name: &str) -> Result<Vec<&str>, Ec2Error> {
        self.root().list(name)
    }

    /// See [`Scope::structs`].
    pub fn structs(&self, name: &str) -> Result<Vec<Scope<'_>>, Ec2Error> {
        self.root().structs(name)
    }

    /// See [`Scope::bool`].
    pub fn bool(&self, name: &str) -> Result<Option<bool>, Ec2Error> {
        self.root().bool(name)
    }

    /// See [`Scope::flag`].
    pub fn flag(&self, name: &str) -> Result<bool, Ec2Error> {
        self.root().flag(name)
    }

    /// See [`Scope::int`].
    pub fn int(&self, name: &str, range: RangeInclusive<u32>) -> Result<Option<u32>, Ec2Error> {
        self.root().int(name, range)
    }

    /// See [`Scope::filters`].
    pub fn filters(&self) -> Result<Vec<Filter>, Ec2Error> {
        self.root().filters()
    }

    /// See [`Scope::tags`].
    pub fn tags(&self, name: &str) -> Result<Vec<(String, Option<String>)>, Ec2Error> {
        self.root().tags(name)
    }
}

/// A view of the parameters under a prefix: the whole request ([`Params::root`]) or one entry of
/// a structure list (`TagSpecification.2.` …). Names given to its accessors are relative to the
/// prefix; error messages name the full parameter.
#[derive(Debug, Clone)]
pub struct Scope<'a> {
    params: &'a Params,
    prefix: String,
}

impl<'a> Scope<'a> {
    /// The prefix, ending with `.` (empty for the whole request).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The full name of parameter `name` of this scope.
    pub fn key(&self, name: &str) -> String {
        format!("{}{}", self.prefix, name)
    }

    fn entry(&self, name: &str) -> Option<&'a Entry> {
        if self.prefix.is_empty() {
            self.params.map.get(name)
        } else {
            self.params.map.get(self.key(name).as_str())
        }
    }

    /// Whether `name` is present (does not mark it used).
    pub fn contains(&self, name: &str) -> bool {
        self.entry(name).is_some()
    }

    /// Whether `name` or anything under `name.` is present (does not mark anything used).
    pub fn contains_any(&self, name: &str) -> bool {
        let key = self.key(name);
        let under = format!("{key}.");
        self.params.map.contains_key(&key)
            || self
                .params
                .map
                .range::<str, _>((Bound::Included(under.as_str()), Bound::Unbounded))
                .next()
                .is_some_and(|(k, _)| k.starts_with(&under))
    }

    /// The value of `name`, if present (possibly empty).
    pub fn get(&self, name: &str) -> Option<&'a str> {
        self.entry(name).map(Entry::read)
    }

    /// The value of `name`; absent or empty gives `MissingParameter` ("The request must contain
    /// the parameter X").
    pub fn required(&self, name: &str) -> Result<&'a str, Ec2Error> {
        match self.get(name) {
            Some(value) if !value.is_empty() => Ok(value),
            _ => Err(Ec2Error::missing_parameter(&self.key(name))),
        }
    }

    /// The entries under `{name}.` in key order, without marking them.
    fn under(&self, name: &str) -> impl Iterator<Item = (&'a str, &'a Entry)> {
        let start = format!("{}{}.", self.prefix, name);
        let len = start.len();
        self.params
            .map
            .range::<str, _>((Bound::Included(start.as_str()), Bound::Unbounded))
            .take_while(move |(k, _)| k.starts_with(start.as_str()))
            .map(move |(k, e)| (&k[len..], e))
    }

    /// The list `name.1`, `name.2` … in index order (indexes may be sparse, and start at 0).
    /// A bare `name` counts as the first member, as EC2 takes it (`DescribeKeyPairs&KeyName=k`,
    /// what Apache Libcloud sends). `name.N.more` keys are not part of it (see
    /// [`Scope::structs`]).
    pub fn list(&self, name: &str) -> Result<Vec<&'a str>, Ec2Error> {
        let mut items: Vec<(u32, &'a str)> = self
            .entry(name)
            .map(|e| (0, e.read()))
            .into_iter()
            .collect();
        for (rest, entry) in self.under(name) {
            if rest.contains('.') {
                continue;
            }
            match parse_index(rest, || self.key(&format!("{name}.{rest}"))) {
                Some(Ok(n)) => items.push((n, entry.read())),
                Some(Err(err)) => return Err(err),
                None => {}
            }
        }
        items.sort_by_key(|(n, _)| *n);
        Ok(items.into_iter().map(|(_, v)| v).collect())
    }

    /// The structure list `name.1.…`, `name.2.…` … in index order: one scope per index, whose
    /// prefix is `name.N.`.
    pub fn structs(&self, name: &str) -> Result<Vec<Scope<'a>>, Ec2Error> {
        let mut indexes: Vec<(u32, &'a str)> = Vec::new();
        for (rest, _) in self.under(name) {
            let Some((segment, _)) = rest.split_once('.') else {
                continue;
            };
            match parse_index(segment, || self.key(&format!("{name}.{rest}"))) {
                Some(Ok(n)) => indexes.push((n, segment)),
                Some(Err(err)) => return Err(err),
                None => {}
            }
        }
        indexes.sort_by_key(|(n, _)| *n);
        indexes.dedup_by_key(|(n, _)| *n);
        Ok(indexes
            .into_iter()
            .map(|(_, segment)| Scope {
                params: self.params,
                prefix: format!("{}{}.{}.", self.prefix, name, segment),
            })
            .collect())
    }

    /// A boolean: `true` / `false` in any case; anything else is `InvalidParameterValue`.
    pub fn bool(&self, name: &str) -> Result<Option<bool>, Ec2Error> {
        let Some(value) = self.get(name) else {
            return Ok(None);
        };
        if value.eq_ignore_ascii_case("true") {
            Ok(Some(true))
        } else if value.eq_ignore_ascii_case("false") {
            Ok(Some(false))
        } else {
            Err(Ec2Error::invalid_value(
                &self.key(name),
                value,
                "Expected a boolean: true or false.",
            ))
        }
    }

    /// A boolean that defaults to `false` (`DryRun`, `Force` …).
    pub fn flag(&self, name: &str) -> Result<bool, Ec2Error> {
        Ok(self.bool(name)?.unwrap_or(false))
    }

    /// A decimal integer within `range`; anything else is `InvalidParameterValue`
    /// ("Value (0) for parameter MaxCount is invalid. Expected a positive integer.").
    pub fn int(&self, name: &str, range: RangeInclusive<u32>) -> Result<Option<u32>, Ec2Error> {
        let Some(value) = self.get(name) else {
            return Ok(None);
        };
        let parsed = value
            .parse::<i64>()
            .ok()
            .and_then(|n| u32::try_from(n).ok())
            .filter(|n| range.contains(n));
        match parsed {
            Some(n) => Ok(Some(n)),
            None => {
                let reason = if *range.start() == 1 && *range.end() >= i32::MAX as u32 {
                    "Expected a positive integer.".to_string()
                } else {
                    format!(
                        "Expected an integer between {} and {}.",
                        range.start(),
                        range.end()
                    )
                };
                Err(Ec2Error::invalid_value(
                    &self.key(name),
                    &shorten(value, 64),
                    &reason,
                ))
            }
        }
    }

    /// The filters `Filter.N.Name` / `Filter.N.Value.M`. A filter without a name or without any
    /// value is `MissingParameter`.
    ///
    /// Bounded, since every value is matched (with wildcards) against every record: at most
    /// [`MAX_FILTERS`] filters of [`MAX_FILTER_VALUES`] values of [`MAX_FILTER_VALUE_CHARS`]
    /// characters each, and at most [`MAX_FILTER_WILDCARD_CHARS`] characters of wildcard values
    /// in all.
    pub fn filters(&self) -> Result<Vec<Filter>, Ec2Error> {
        let filters = self.structs("Filter")?;
        if filters.len() > MAX_FILTERS {
            return Err(Ec2Error::invalid_parameter_value(format!(
                "A request may have at most {MAX_FILTERS} filters, not {}.",
                filters.len()
            )));
        }
        let filters = filters
            .into_iter()
            .map(|f| {
                let name = f.required("Name")?.to_string();
                let values: Vec<String> =
                    f.list("Value")?.into_iter().map(str::to_string).collect();
                if values.is_empty() {
                    return Err(Ec2Error::missing_parameter(&f.key("Value.1")));
                }
                if values.len() > MAX_FILTER_VALUES {
                    return Err(Ec2Error::invalid_parameter_value(format!(
                        "The filter '{name}' may have at most {MAX_FILTER_VALUES} values."
                    )));
                }
                if values
                    .iter()
                    .any(|v| v.chars().count() > MAX_FILTER_VALUE_CHARS)
                {
                    return Err(Ec2Error::invalid_parameter_value(format!(
                        "A value of the filter '{name}' is longer than {MAX_FILTER_VALUE_CHARS} characters."
                    )));
                }
                Ok(Filter { name, values })
            })
            .collect::<Result<Vec<Filter>, Ec2Error>>()?;
        let wildcard_chars = super::filter::wildcard_chars(&filters);
        if wildcard_chars > MAX_FILTER_WILDCARD_CHARS {
            return Err(Ec2Error::invalid_parameter_value(format!(
                "The filter values with wildcards may have at most {MAX_FILTER_WILDCARD_CHARS} characters in all, not {wildcard_chars}."
            )));
        }
        Ok(filters)
    }

    /// The tags `name.N.Key` / `name.N.Value` (usually `name` is `Tag`): key required, value
    /// optional (`None` when absent, `Some("")` when sent empty).
    pub fn tags(&self, name: &str) -> Result<Vec<(String, Option<String>)>, Ec2Error> {
        self.structs(name)?
            .into_iter()
            .map(|t| {
                let key = t.required("Key")?.to_string();
                Ok((key, t.get("Value").map(str::to_string)))
            })
            .collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn form(s: &str) -> Params {
        Params::parse_form(s.as_bytes()).unwrap()
    }

    #[test]
    fn a_form_decodes_plus_and_percent_escapes_into_utf8() {
        let p = form("Action=DescribeInstances&Tag.1.Value=a+b%20c%2Bd&Name=%C3%BCber&Empty=&Bare");
        assert_eq!(p.get("Action"), Some("DescribeInstances"));
        assert_eq!(p.get("Tag.1.Value"), Some("a b c+d"));
        assert_eq!(p.get("Name"), Some("über"));
        assert_eq!(p.get("Empty"), Some(""));
        assert_eq!(p.get("Bare"), Some(""));
        assert_eq!(p.get("Missing"), None);
        assert_eq!(p.len(), 5);
    }

    #[test]
    fn malformed_encodings_are_malformed_query_strings() {
        let rows = [
            "Action=%",
            "Action=%4",
            "Action=%zz",
            "A%=1",
            "Name=%C3%28",
            "Name=%FF",
            "%80=1",
        ];
        for row in rows {
            let err = Params::parse_form(row.as_bytes()).unwrap_err();
            assert_eq!(err.code, "MalformedQueryString", "{row}");
            assert_eq!(err.status, 400);
        }
        let err = Params::parse_form(b"Name=\xff").unwrap_err();
        assert_eq!(err.code, "MalformedQueryString");
    }

    #[test]
    fn a_repeated_key_is_refused_within_a_form_and_across_query_and_body() {
        let err = Params::parse_form(b"A=1&A=2").unwrap_err();
        assert_eq!(err.code, "InvalidQueryParameter");
        assert_eq!(err.status, 400);
        assert_eq!(err.message, "The parameter A is given more than once.");
        let err = Params::from_request(
            Some("Action=FromQuery&Version=2016-11-15"),
            b"Action=FromBody",
        )
        .unwrap_err();
        assert_eq!(err.message, "The parameter Action is given more than once.");
        // Encoded differently, still the same key.
        let err = Params::parse_form(b"A=1&%41=2").unwrap_err();
        assert_eq!(err.code, "InvalidQueryParameter");
        let p = Params::from_request(Some("Version=2016-11-15"), b"Action=FromBody").unwrap();
        assert_eq!(p.get("Action"), Some("FromBody"));
        assert_eq!(p.get("Version"), Some("2016-11-15"));
    }

    #[test]
    fn a_plus_is_a_space_in_the_body_but_refused_raw_in_the_query_string() {
        let p = Params::from_request(Some("Q=a%20b%2Bc"), b"B=a+b%2Bc").unwrap();
        assert_eq!(p.get("Q"), Some("a b+c"));
        assert_eq!(p.get("B"), Some("a b+c"));
        for query in ["Q=a+b", "Q+R=1"] {
            let err = Params::from_request(Some(query), b"").unwrap_err();
            assert_eq!(err.code, "MalformedQueryString", "{query}");
            assert_eq!(err.status, 400, "{query}");
            assert!(err.message.contains("%20"), "{}", err.message);
        }
    }

    #[test]
    fn empty_pairs_and_nameless_values_are_skipped() {
        let p = form("&&A=1&=orphan&&");
        assert_eq!(p.iter().collect::<Vec<_>>(), vec![("A", "1")]);
    }

    #[test]
    fn limits_are_enforced_without_panicking() {
        let many: String = (0..=MAX_PARAMS).map(|i| format!("K{i}=v&")).collect();
        assert_eq!(
            Params::parse_form(many.as_bytes()).unwrap_err().code,
            "InvalidQueryParameter"
        );
        let exactly: String = (0..MAX_PARAMS).map(|i| format!("K{i}=v&")).collect();
        assert_eq!(
            Params::parse_form(exactly.as_bytes()).unwrap().len(),
            MAX_PARAMS
        );

        let long_key = format!("{}=1", "k".repeat(MAX_KEY_LEN + 1));
        assert_eq!(
            Params::parse_form(long_key.as_bytes()).unwrap_err().code,
            "InvalidQueryParameter"
        );
        let huge_key = format!("{}=1", "k".repeat(MAX_KEY_LEN * 4));
        assert_eq!(
            Params::parse_form(huge_key.as_bytes()).unwrap_err().code,
            "InvalidQueryParameter"
        );

        let long_value = format!("UserData={}", "a".repeat(MAX_VALUE_LEN + 1));
        let err = Params::parse_form(long_value.as_bytes()).unwrap_err();
        assert_eq!(err.code, "InvalidParameterValue");
        assert!(err.message.contains("UserData"));
        let ok_value = format!("UserData={}", "a".repeat(MAX_VALUE_LEN));
        assert!(Params::parse_form(ok_value.as_bytes()).is_ok());
    }

    #[test]
    fn lists_are_ordered_by_number_and_may_be_sparse() {
        let p = form("InstanceId.10=j&InstanceId.2=b&InstanceId.1=a&InstanceId.7=g&InstanceIdX=no&InstanceId.3.Foo=no");
        assert_eq!(p.list("InstanceId").unwrap(), vec!["a", "b", "g", "j"]);
        assert_eq!(p.list("Nothing").unwrap(), Vec::<&str>::new());
        assert_eq!(p.unused(), vec!["InstanceId.3.Foo", "InstanceIdX"]);
    }

    #[test]
    fn index_zero_and_a_bare_name_are_list_members_as_ec2_takes_them() {
        let p = form("InstanceId.1=b&InstanceId.0=a&InstanceId.2=c");
        assert_eq!(p.list("InstanceId").unwrap(), vec!["a", "b", "c"]);
        let p = form("KeyName=k");
        assert_eq!(p.list("KeyName").unwrap(), vec!["k"]);
        assert!(p.unused().is_empty());
        let p = form("KeyName=k&KeyName.1=l");
        assert_eq!(p.list("KeyName").unwrap(), vec!["k", "l"]);
        let p = form("Tag.0.Key=a&Tag.0.Value=b&Tag.1.Key=c");
        let tags = p.structs("Tag").unwrap();
        assert_eq!(tags.len(), 2);
        assert_eq!(tags[0].get("Key"), Some("a"));
        let p = form("Filter.1.Name=n&Filter.1.Value=v");
        let filters = p.filters().unwrap();
        assert_eq!(filters.len(), 1);
        assert_eq!(filters[0].values, vec!["v".to_string()]);
    }

    #[test]
    fn bad_indexes_are_invalid_query_parameters() {
        let rows = [
            "InstanceId.00=a",
            "InstanceId.01=a",
            "InstanceId.4294967296=a",
            "InstanceId.99999999999999999999=a",
        ];
        for row in rows {
            let err = form(row).list("InstanceId").unwrap_err();
            assert_eq!(err.code, "InvalidQueryParameter", "{row}");
        }
        assert_eq!(
            form("InstanceId.4294967295=a").list("InstanceId").unwrap(),
            vec!["a"]
        );
        // A non-numeric segment is not a list entry (the router reports it as unknown).
        assert_eq!(
            form("InstanceId.x=a").list("InstanceId").unwrap(),
            Vec::<&str>::new()
        );
        let err = form("Filter.00.Name=a").filters().unwrap_err();
        assert_eq!(err.code, "InvalidQueryParameter");
    }

    #[test]
    fn structs_give_scopes_in_index_order() {
        let p = form(
            "TagSpecification.2.ResourceType=volume&TagSpecification.2.Tag.1.Key=b\
             &TagSpecification.1.ResourceType=instance&TagSpecification.1.Tag.1.Key=Name\
             &TagSpecification.1.Tag.1.Value=web&TagSpecification.1.Tag.10.Key=z&TagSpecification.1.Tag.2.Key=env",
        );
        let specs = p.structs("TagSpecification").unwrap();
        assert_eq!(specs.len(), 2);
        assert_eq!(specs[0].prefix(), "TagSpecification.1.");
        assert_eq!(specs[0].get("ResourceType"), Some("instance"));
        assert_eq!(
            specs[0].tags("Tag").unwrap(),
            vec![
                ("Name".to_string(), Some("web".to_string())),
                ("env".to_string(), None),
                ("z".to_string(), None)
            ]
        );
        assert_eq!(specs[1].get("ResourceType"), Some("volume"));
        assert_eq!(specs[1].tags("Tag").unwrap(), vec![("b".to_string(), None)]);
        assert!(p.unused().is_empty(), "{:?}", p.unused());
    }

    #[test]
    fn missing_and_empty_required_parameters_name_the_full_key() {
        let p = form("ImageId=&TagSpecification.1.Tag.1.Value=x");
        assert_eq!(
            p.required("ImageId").unwrap_err().message,
            "The request must contain the parameter ImageId"
        );
        assert_eq!(p.required("KeyName").unwrap_err().code, "MissingParameter");
        let spec = &p.structs("TagSpecification").unwrap()[0];
        let err = spec.tags("Tag").unwrap_err();
        assert_eq!(
            err.message,
            "The request must contain the parameter TagSpecification.1.Tag.1.Key"
        );
    }

    #[test]
    fn booleans_are_true_or_false_in_any_case() {
        let rows: &[(&str, Result<Option<bool>, &str>)] = &[
            ("DryRun=true", Ok(Some(true))),
            ("DryRun=TRUE", Ok(Some(true))),
            ("DryRun=False", Ok(Some(false))),
            ("Other=1", Ok(None)),
            ("DryRun=1", Err("Value (1) for parameter DryRun is invalid. Expected a boolean: true or false.")),
            ("DryRun=", Err("Value () for parameter DryRun is invalid. Expected a boolean: true or false.")),
            ("DryRun=yes", Err("Value (yes) for parameter DryRun is invalid. Expected a boolean: true or false.")),
        ];
        for (input, expected) in rows {
            let got = form(input).bool("DryRun").map_err(|e| e.message);
            assert_eq!(got, expected.map_err(str::to_string), "{input}");
        }
        assert!(!form("").flag("DryRun").unwrap());
    }

    #[test]
    fn integers_are_checked_against_their_range_with_aws_like_messages() {
        let positive = 1..=i32::MAX as u32;
        type Row = (
            &'static str,
            RangeInclusive<u32>,
            Result<Option<u32>, &'static str>,
        );
        let rows: &[Row] = &[
            ("MaxCount=1", positive.clone(), Ok(Some(1))),
            ("MaxCount=2147483647", positive.clone(), Ok(Some(2_147_483_647))),
            ("Other=1", positive.clone(), Ok(None)),
            ("MaxCount=0", positive.clone(), Err("Value (0) for parameter MaxCount is invalid. Expected a positive integer.")),
            ("MaxCount=-1", positive.clone(), Err("Value (-1) for parameter MaxCount is invalid. Expected a positive integer.")),
            ("MaxCount=abc", positive.clone(), Err("Value (abc) for parameter MaxCount is invalid. Expected a positive integer.")),
            ("MaxCount=2147483648", positive.clone(), Err("Value (2147483648) for parameter MaxCount is invalid. Expected a positive integer.")),
            ("MaxCount=99999999999999999999999", positive.clone(), Err("Value (99999999999999999999999) for parameter MaxCount is invalid. Expected a positive integer.")),
            ("MaxCount=1.5", positive, Err("Value (1.5) for parameter MaxCount is invalid. Expected a positive integer.")),
            ("MaxCount=4", 5..=1000, Err("Value (4) for parameter MaxCount is invalid. Expected an integer between 5 and 1000.")),
            ("MaxCount=1000", 5..=1000, Ok(Some(1000))),
        ];
        for (input, range, expected) in rows {
            let got = form(input)
                .int("MaxCount", range.clone())
                .map_err(|e| e.message);
            assert_eq!(got, expected.map_err(str::to_string), "{input}");
        }
    }

    #[test]
    fn filters_collect_names_and_values_in_order() {
        let p = form(
            "Filter.1.Name=instance-type&Filter.1.Value.1=m1.small&Filter.1.Value.2=m1.large\
             &Filter.2.Name=tag:Name&Filter.2.Value.1=web*",
        );
        assert_eq!(
            p.filters().unwrap(),
            vec![
                Filter::new("instance-type", ["m1.small", "m1.large"]),
                Filter::new("tag:Name", ["web*"]),
            ]
        );
        let err = form("Filter.1.Value.1=x").filters().unwrap_err();
        assert_eq!(
            err.message,
            "The request must contain the parameter Filter.1.Name"
        );
        let err = form("Filter.1.Name=x").filters().unwrap_err();
        assert_eq!(
            err.message,
            "The request must contain the parameter Filter.1.Value.1"
        );
    }

    #[test]
    fn accessors_mark_what_they_read_and_contains_does_not() {
        let p = form("A=1&B=2&C.1=x&D.1.E=y");
        assert!(p.contains("A"));
        assert!(p.root().contains_any("D"));
        assert!(!p.root().contains_any("Z"));
        p.get("A");
        p.list("C").unwrap();
        assert_eq!(p.unused(), vec!["B", "D.1.E"]);
        p.mark_used("B");
        assert_eq!(p.unused(), vec!["D.1.E"]);
        let copy = p.clone();
        assert_eq!(copy.unused(), vec!["D.1.E"]);
    }

    #[test]
    fn params_are_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Params>();
        check::<Scope<'static>>();
    }

    #[test]
    fn filters_are_bounded_in_count_values_and_length() {
        let long = "a".repeat(MAX_FILTER_VALUE_CHARS + 1);
        let too_long = Params::from_pairs([
            ("Filter.1.Name".to_string(), "tag:Name".to_string()),
            ("Filter.1.Value.1".to_string(), long),
        ])
        .unwrap();
        assert_eq!(
            too_long.filters().unwrap_err().code,
            "InvalidParameterValue"
        );
        let mut many = vec![("Filter.1.Name".to_string(), "tag:Name".to_string())];
        for i in 1..=MAX_FILTER_VALUES + 1 {
            many.push((format!("Filter.1.Value.{i}"), "x".to_string()));
        }
        let many = Params::from_pairs(many).unwrap();
        assert_eq!(many.filters().unwrap_err().code, "InvalidParameterValue");
        let ok = Params::from_pairs([
            ("Filter.1.Name".to_string(), "tag:Name".to_string()),
            (
                "Filter.1.Value.1".to_string(),
                "a".repeat(MAX_FILTER_VALUE_CHARS),
            ),
        ])
        .unwrap();
        assert_eq!(ok.filters().unwrap().len(), 1);
    }

    #[test]
    fn wildcard_values_are_bounded_in_all_and_plain_values_are_not() {
        // `*` and 1023 characters: 1024 characters of wildcard value each.
        let wild = format!("*{}", "a".repeat(MAX_FILTER_VALUE_CHARS - 1));
        let request = |filters: usize, values: usize, value: &str| {
            let mut pairs = Vec::new();
            for f in 1..=filters {
                pairs.push((format!("Filter.{f}.Name"), format!("tag:k{f}")));
                for v in 1..=values {
                    pairs.push((format!("Filter.{f}.Value.{v}"), value.to_string()));
                }
            }
            Params::from_pairs(pairs).unwrap().filters()
        };
        let at_the_limit = MAX_FILTER_WILDCARD_CHARS / MAX_FILTER_VALUE_CHARS;
        assert!(request(1, at_the_limit, &wild).is_ok());
        assert!(request(at_the_limit, 1, &wild).is_ok());
        let err = request(2, at_the_limit, &wild).unwrap_err();
        assert_eq!(err.code, "InvalidParameterValue");
        assert_eq!(
            err.message,
            "The filter values with wildcards may have at most 16384 characters in all, not 32768."
        );
        assert_eq!(
            request(MAX_FILTERS, MAX_FILTER_VALUES - 10, "a?")
                .unwrap_err()
                .code,
            "InvalidParameterValue"
        );
        // Plain values (escaped wildcards included) are looked up, not matched: no bound in all.
        let plain = format!("\\*{}", "a".repeat(MAX_FILTER_VALUE_CHARS - 2));
        assert!(request(4, MAX_FILTER_VALUES, &plain).is_ok());
        assert!(request(4, MAX_FILTER_VALUES, &"a".repeat(MAX_FILTER_VALUE_CHARS)).is_ok());
    }
}
