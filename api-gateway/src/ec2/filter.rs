//! EC2 `Filter.N.Name` / `Filter.N.Value.M` filters: name validation per action and matching.
//!
//! Semantics, as the EC2 API reference documents them: the values of one filter are ORed, the
//! filters of a request are ANDed; in values `*` matches any run of characters (including none)
//! and `?` exactly one, and `\` makes the next character literal (`\*`, `\?`, `\\`); matching is
//! case-sensitive. A resource exposes, per filter name, zero or more values (an instance has one
//! `instance-type` but possibly several `tag-key`s); a filter matches when any of its patterns
//! matches any of the resource's values for that name.
//!
//! Matching never backtracks: a filter's plain values sit in a hash set and its wildcard values
//! in one automaton run bit-parallel, one pass over each resource value (see [`Matcher`]). What
//! that pass costs per character grows with the wildcard characters of the request, which
//! [`Params::filters`](super::params::Params::filters) bounds by [`wildcard_chars`].
//!
//! ```text
//! let matcher = Matcher::new(&request.filters);
//! let hits = instances.iter().filter(|i| matcher.matches(|name| instance_values(i, name)));
//! ```

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};

use super::error::Ec2Error;

/// One filter of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    /// The filter name, e.g. `instance-state-name` or `tag:Name`.
    pub name: String,
    /// The patterns; the filter matches when any of them does.
    pub values: Vec<String>,
}

impl Filter {
    /// A filter from a name and values (mostly for tests and handlers building internal filters).
    pub fn new<S: Into<String>>(
        name: impl Into<String>,
        values: impl IntoIterator<Item = S>,
    ) -> Self {
        Filter {
            name: name.into(),
            values: values.into_iter().map(Into::into).collect(),
        }
    }

    /// The tag key of a `tag:<key>` filter.
    pub fn tag_key(&self) -> Option<&str> {
        self.name.strip_prefix("tag:")
    }
}

/// Checks every filter name against `allowed`. When `taggable`, `tag:<key>` (with a non-empty
/// key), `tag-key` and `tag-value` are allowed as well. An unknown name gives
/// `InvalidParameterValue` "The filter 'foo' is invalid".
pub fn validate_names(
    filters: &[Filter],
    allowed: &[&str],
    taggable: bool,
) -> Result<(), Ec2Error> {
    for filter in filters {
        let name = filter.name.as_str();
        let tag_filter = taggable
            && (name == "tag-key"
                || name == "tag-value"
                || name.strip_prefix("tag:").is_some_and(|key| !key.is_empty()));
        if !tag_filter && !allowed.contains(&name) {
            return Err(Ec2Error::invalid_filter(name));
        }
    }
    Ok(())
}

/// The values of the tag filters (`tag:<key>`, `tag-key`, `tag-value`) for a resource whose tags
/// are `tags`; `None` when `name` is not a tag filter. Handlers call this first in their value
/// function and fall back to their own attributes.
pub fn tag_filter_values<'a, I>(name: &str, tags: I) -> Option<Vec<Cow<'a, str>>>
where
    I: IntoIterator<Item = (&'a str, &'a str)>,
{
    if let Some(key) = name.strip_prefix("tag:") {
        return Some(
            tags.into_iter()
                .filter(|(k, _)| *k == key)
                .map(|(_, v)| Cow::Borrowed(v))
                .collect(),
        );
    }
    match name {
        "tag-key" => Some(tags.into_iter().map(|(k, _)| Cow::Borrowed(k)).collect()),
        "tag-value" => Some(tags.into_iter().map(|(_, v)| Cow::Borrowed(v)).collect()),
        _ => None,
    }
}

// ----- A resource's values for a filter, as its response shows them -------------------------
// Each Describe action answers a filter from the fields its response writes, through these: an
// empty field is no value (it matches nothing, not even `*`), booleans and numbers are spelled as
// the XML spells them.

/// The value a response shows as `s`; none when `s` is empty.
pub fn shown(s: &str) -> Vec<Cow<'_, str>> {
    if s.is_empty() {
        Vec::new()
    } else {
        vec![Cow::Borrowed(s)]
    }
}

/// The value a response shows for an optional field; none when absent or empty.
pub fn shown_opt(s: Option<&str>) -> Vec<Cow<'_, str>> {
    shown(s.unwrap_or(""))
}

/// A computed value a response shows; none when empty.
pub fn shown_owned<'a>(s: String) -> Vec<Cow<'a, str>> {
    if s.is_empty() {
        Vec::new()
    } else {
        vec![Cow::Owned(s)]
    }
}

/// A boolean as the response shows it (`true` / `false`).
pub fn shown_bool<'a>(b: bool) -> Vec<Cow<'a, str>> {
    vec![Cow::Borrowed(super::xml::bool_text(b))]
}

/// A number as the response shows it.
pub fn shown_number<'a>(n: impl std::fmt::Display) -> Vec<Cow<'a, str>> {
    vec![Cow::Owned(n.to_string())]
}

/// The entries of a set the response shows (empty ones left out).
pub fn shown_all<'a>(items: impl IntoIterator<Item = &'a str>) -> Vec<Cow<'a, str>> {
    items
        .into_iter()
        .filter(|s| !s.is_empty())
        .map(Cow::Borrowed)
        .collect()
}

/// One piece of a compiled pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token {
    /// A literal character.
    Char(char),
    /// `?`: exactly one character.
    One,
    /// `*`: any run of characters.
    Any,
}

/// A compiled filter value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern(Compiled);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Compiled {
    /// No wildcard: plain string equality (the escapes already resolved).
    Exact(String),
    /// With wildcards (runs of `*` collapsed to one).
    Wild(Vec<Token>),
}

impl Pattern {
    /// Compiles an EC2 filter value: `*` and `?` are wildcards, `\` makes the next character
    /// literal, a trailing lone `\` is a literal backslash.
    pub fn compile(value: &str) -> Pattern {
        let mut tokens = Vec::with_capacity(value.len());
        let mut wild = false;
        let mut chars = value.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => tokens.push(Token::Char(chars.next().unwrap_or('\\'))),
                '*' => {
                    wild = true;
                    if tokens.last() != Some(&Token::Any) {
                        tokens.push(Token::Any);
                    }
                }
                '?' => {
                    wild = true;
                    tokens.push(Token::One);
                }
                c => tokens.push(Token::Char(c)),
            }
        }
        if wild {
            Pattern(Compiled::Wild(tokens))
        } else {
            Pattern(Compiled::Exact(
                tokens
                    .into_iter()
                    .filter_map(|t| match t {
                        Token::Char(c) => Some(c),
                        _ => None,
                    })
                    .collect(),
            ))
        }
    }

    /// Whether the value has a wildcard (and so is matched by the automaton rather than by
    /// string equality).
    pub fn is_wild(&self) -> bool {
        matches!(self.0, Compiled::Wild(_))
    }

    /// The width of the compiled value: its characters, escapes resolved and each run of `*`
    /// counted once.
    pub fn width(&self) -> usize {
        match &self.0 {
            Compiled::Exact(s) => s.chars().count(),
            Compiled::Wild(tokens) => tokens.len(),
        }
    }

    /// Whether `text` matches (case-sensitively).
    pub fn matches(&self, text: &str) -> bool {
        match &self.0 {
            Compiled::Exact(s) => s == text,
            Compiled::Wild(tokens) => WildSet::new([tokens.as_slice()]).matches(text),
        }
    }
}

/// Whether `text` matches the EC2 filter value `pattern` (compiling it each time; use
/// [`Matcher`] for many resources).
pub fn wildcard_matches(pattern: &str, text: &str) -> bool {
    Pattern::compile(pattern).matches(text)
}

/// The characters of the wildcard values of `filters` in all (runs of `*` counted once, escapes
/// resolved): what matching a resource value costs per character, in bits of automaton state.
/// Values without a wildcard are looked up in a hash set and do not count.
pub fn wildcard_chars(filters: &[Filter]) -> usize {
    filters
        .iter()
        .flat_map(|f| f.values.iter())
        .map(|v| Pattern::compile(v))
        .filter(Pattern::is_wild)
        .map(|p| p.width())
        .sum()
}

/// Where a literal character of a [`WildSet`] stands: the states waiting for it.
#[derive(Debug, Clone)]
enum Waiting {
    /// A few states (fewer than the words of a mask): their indexes.
    Few(Vec<u32>),
    /// Many states: a mask over all of them.
    Many(Vec<u64>),
}

/// The wildcard values of one filter as one nondeterministic automaton, run bit-parallel
/// (shift-and with `*` loops): one pass over the text, `O(words)` per character where a word
/// holds 64 states, whatever the values are. No backtracking, so no input makes it slow.
///
/// A value of `n` tokens has the states `0..=n` (state `i`: the first `i` tokens are matched;
/// state `n` accepts), laid side by side. On a character, a state whose token is that character
/// or `?` moves one state on; a state whose token is `*` stays, and moving onto it also enters the
/// state after it (runs of `*` are collapsed, so one step of that closure is enough). An accepting
/// state has no token, so nothing ever shifts from one value into the next.
#[derive(Debug, Clone)]
struct WildSet {
    /// 64-bit words per state set.
    words: usize,
    /// The states active before any character: the first state of each value, closed over `*`.
    initial: Vec<u64>,
    /// States whose token is `?`.
    one: Vec<u64>,
    /// States whose token is `*`.
    any: Vec<u64>,
    /// Accepting states.
    accept: Vec<u64>,
    /// States on a trailing `*`: once one is active the value matches whatever follows.
    settled: Vec<u64>,
    /// States whose token is a given literal character.
    chars: HashMap<char, Waiting>,
}

impl WildSet {
    fn new<'t>(values: impl IntoIterator<Item = &'t [Token]>) -> WildSet {
        let values: Vec<&[Token]> = values.into_iter().collect();
        let states: usize = values.iter().map(|v| v.len() + 1).sum();
        let words = states.div_ceil(64).max(1);
        let mask = || vec![0u64; words];
        let (mut initial, mut one, mut any, mut accept, mut settled) =
            (mask(), mask(), mask(), mask(), mask());
        let mut positions: HashMap<char, Vec<u32>> = HashMap::new();
        let mut base = 0usize;
        for tokens in &values {
            set(&mut initial, base);
            for (i, token) in tokens.iter().enumerate() {
                let state = base + i;
                match token {
                    Token::One => set(&mut one, state),
                    Token::Any => {
                        set(&mut any, state);
                        if i + 1 == tokens.len() {
                            set(&mut settled, state);
                        }
                    }
                    // Fewer than 2^32 states: the parameters are bounded far below that.
                    Token::Char(c) => positions.entry(*c).or_default().push(state as u32),
                }
            }
            set(&mut accept, base + tokens.len());
            base += tokens.len() + 1;
        }
        close_over_any(&mut initial, &any);
        let chars = positions
            .into_iter()
            .map(|(c, states)| {
                let waiting = if states.len() < words {
                    Waiting::Few(states)
                } else {
                    let mut m = mask();
                    for s in states {
                        set(&mut m, s as usize);
                    }
                    Waiting::Many(m)
                };
                (c, waiting)
            })
            .collect();
        WildSet {
            words,
            initial,
            one,
            any,
            accept,
            settled,
            chars,
        }
    }

    /// Whether `text` matches any of the values.
    fn matches(&self, text: &str) -> bool {
        self.run(text).matched
    }

    /// One pass over `text`.
    fn run(&self, text: &str) -> Run {
        let mut active = self.initial.clone();
        let mut next = vec![0u64; self.words];
        let mut steps = 0;
        for c in text.chars() {
            if intersects(&active, &self.settled) {
                return Run {
                    matched: true,
                    steps,
                };
            }
            steps += 1;
            for ((n, a), one) in next.iter_mut().zip(&active).zip(&self.one) {
                *n = a & one;
            }
            match self.chars.get(&c) {
                Some(Waiting::Few(states)) => {
                    for &s in states {
                        if get(&active, s as usize) {
                            set(&mut next, s as usize);
                        }
                    }
                }
                Some(Waiting::Many(m)) => {
                    for ((n, a), m) in next.iter_mut().zip(&active).zip(m) {
                        *n |= a & m;
                    }
                }
                None => {}
            }
            shift_up(&mut next);
            for ((n, a), any) in next.iter_mut().zip(&active).zip(&self.any) {
                *n |= a & any;
            }
            close_over_any(&mut next, &self.any);
            std::mem::swap(&mut active, &mut next);
            if active.iter().all(|w| *w == 0) {
                return Run {
                    matched: false,
                    steps,
                };
            }
        }
        Run {
            matched: intersects(&active, &self.accept) || intersects(&active, &self.settled),
            steps,
        }
    }
}

/// What one pass of a [`WildSet`] found, and how many characters it stepped over (each step
/// costs a fixed number of word operations).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    matched: bool,
    steps: usize,
}

fn set(mask: &mut [u64], bit: usize) {
    if let Some(w) = mask.get_mut(bit / 64) {
        *w |= 1 << (bit % 64);
    }
}

fn get(mask: &[u64], bit: usize) -> bool {
    mask.get(bit / 64)
        .is_some_and(|w| w & (1 << (bit % 64)) != 0)
}

fn intersects(a: &[u64], b: &[u64]) -> bool {
    a.iter().zip(b).any(|(a, b)| a & b != 0)
}

/// Moves every state one on (bit `i` to bit `i + 1`).
fn shift_up(mask: &mut [u64]) {
    let mut carry = 0;
    for w in mask.iter_mut() {
        let out = *w >> 63;
        *w = (*w << 1) | carry;
        carry = out;
    }
}

/// Adds the state after each active `*` state (a `*` may match nothing).
fn close_over_any(active: &mut [u64], any: &[u64]) {
    let mut carry = 0;
    for (w, any) in active.iter_mut().zip(any) {
        let on_any = *w & any;
        *w |= (on_any << 1) | carry;
        carry = on_any >> 63;
    }
}

/// The values of one filter, compiled: the plain ones in a hash set, the wildcard ones in one
/// automaton.
#[derive(Debug, Clone)]
struct CompiledFilter {
    name: String,
    exact: HashSet<String>,
    wild: Option<WildSet>,
}

impl CompiledFilter {
    fn new(filter: &Filter) -> Self {
        let mut exact = HashSet::new();
        let mut wild = Vec::new();
        for value in &filter.values {
            match Pattern::compile(value).0 {
                Compiled::Exact(s) => {
                    exact.insert(s);
                }
                Compiled::Wild(tokens) => wild.push(tokens),
            }
        }
        CompiledFilter {
            name: filter.name.clone(),
            exact,
            wild: (!wild.is_empty()).then(|| WildSet::new(wild.iter().map(Vec::as_slice))),
        }
    }

    fn matches(&self, text: &str) -> bool {
        self.exact.contains(text) || self.wild.as_ref().is_some_and(|w| w.matches(text))
    }
}

/// The filters of a request, compiled once and applied to many resources. Matching a resource
/// value costs one pass over it per filter, in time proportional to the value's length times the
/// filter's wildcard characters / 64, whatever the patterns are (the request's parameters bound
/// those characters in all, see [`wildcard_chars`]).
#[derive(Debug, Clone)]
pub struct Matcher {
    filters: Vec<CompiledFilter>,
}

impl Matcher {
    /// Compiles `filters`.
    pub fn new(filters: &[Filter]) -> Self {
        Matcher {
            filters: filters.iter().map(CompiledFilter::new).collect(),
        }
    }

    /// Whether there are no filters (everything matches).
    pub fn is_empty(&self) -> bool {
        self.filters.is_empty()
    }

    /// Whether the resource matches every filter. `values_of(name)` returns the resource's values
    /// for a filter name (empty when it has none, which matches no pattern).
    pub fn matches<'r, F>(&self, mut values_of: F) -> bool
    where
        F: FnMut(&str) -> Vec<Cow<'r, str>>,
    {
        self.filters.iter().all(|filter| {
            values_of(&filter.name)
                .iter()
                .any(|v| filter.matches(v.as_ref()))
        })
    }

    /// Like [`Matcher::matches`], for a resource implementing [`Filterable`].
    pub fn matches_resource<R: Filterable + ?Sized>(&self, resource: &R) -> bool {
        self.matches(|name| resource.filter_values(name))
    }
}

/// A resource that can be filtered: its values for each filter name.
pub trait Filterable {
    /// The resource's values for filter `name` (empty when it has none).
    fn filter_values(&self, name: &str) -> Vec<Cow<'_, str>>;
}

/// Whether `values_of` satisfies all `filters` (compiling them; use [`Matcher`] for many
/// resources).
pub fn matches_all<'r, F>(filters: &[Filter], values_of: F) -> bool
where
    F: FnMut(&str) -> Vec<Cow<'r, str>>,
{
    Matcher::new(filters).matches(values_of)
}

// ----- Filter names each action accepts (from the EC2 API reference, 2016-11-15) -------------
// Tag filters (`tag:<key>`, `tag-key`, `tag-value`) are not listed; `validate_names` allows them
// for taggable resources.
//
// A name is listed only when the action's response shows the field it filters on (possibly as an
// empty set, such as an instance's `blockDeviceMapping`): the action answers it from the same
// source its response is written from, so that a value the response shows is a value the filter
// matches. EC2 names for fields Karri's responses do not show (dedicated hosts, capacity
// reservations, network interfaces, EBS details and the like) are refused as unknown names are,
// with `InvalidParameterValue` "The filter 'x' is invalid", rather than matching nothing. The
// tests of each action check every listed name against its response.

/// DescribeInstances (taggable).
pub const INSTANCE_FILTERS: &[&str] = &[
    "architecture",
    "availability-zone",
    "block-device-mapping.attach-time",
    "block-device-mapping.delete-on-termination",
    "block-device-mapping.device-name",
    "block-device-mapping.status",
    "block-device-mapping.volume-id",
    "client-token",
    "dns-name",
    "ebs-optimized",
    "group-id",
    "group-name",
    "hypervisor",
    "image-id",
    "instance-id",
    "instance-lifecycle",
    "instance-state-code",
    "instance-state-name",
    "instance-type",
    "instance.group-id",
    "instance.group-name",
    "ip-address",
    "kernel-id",
    "key-name",
    "launch-index",
    "launch-time",
    "metadata-options.http-endpoint",
    "metadata-options.http-put-response-hop-limit",
    "metadata-options.http-tokens",
    "metadata-options.instance-metadata-tags",
    "metadata-options.state",
    "monitoring-state",
    "network-interface.addresses.association.ip-owner-id",
    "network-interface.addresses.association.public-ip",
    "network-interface.addresses.primary",
    "network-interface.addresses.private-dns-name",
    "network-interface.addresses.private-ip-address",
    "network-interface.association.ip-owner-id",
    "network-interface.association.public-ip",
    "network-interface.attachment.attach-time",
    "network-interface.attachment.attachment-id",
    "network-interface.attachment.delete-on-termination",
    "network-interface.attachment.device-index",
    "network-interface.attachment.network-card-index",
    "network-interface.attachment.status",
    "network-interface.description",
    "network-interface.group-id",
    "network-interface.group-name",
    "network-interface.ipv6-addresses.ipv6-address",
    "network-interface.mac-address",
    "network-interface.network-interface-id",
    "network-interface.private-dns-name",
    "network-interface.source-dest-check",
    "network-interface.status",
    "network-interface.subnet-id",
    "network-interface.vpc-id",
    "owner-id",
    "placement-group-name",
    "platform",
    "platform-details",
    "private-dns-name",
    "private-ip-address",
    "product-code",
    "product-code.type",
    "ramdisk-id",
    "reason",
    "reservation-id",
    "root-device-name",
    "root-device-type",
    "source-dest-check",
    "state-reason-code",
    "state-reason-message",
    "subnet-id",
    "tenancy",
    "usage-operation",
    "virtualization-type",
    "vpc-id",
];

/// DescribeInstanceStatus (not taggable).
pub const INSTANCE_STATUS_FILTERS: &[&str] = &[
    "availability-zone",
    "event.code",
    "event.description",
    "event.instance-event-id",
    "event.not-after",
    "event.not-before",
    "event.not-before-deadline",
    "instance-state-code",
    "instance-state-name",
    "instance-status.reachability",
    "instance-status.status",
    "system-status.reachability",
    "system-status.status",
];

/// DescribeInstanceTypeOfferings filters.
pub const INSTANCE_TYPE_OFFERING_FILTERS: &[&str] = &["instance-type", "location"];

/// DescribeInstanceTypes (not taggable).
pub const INSTANCE_TYPE_FILTERS: &[&str] = &[
    "bare-metal",
    "current-generation",
    "free-tier-eligible",
    "hypervisor",
    "instance-storage-info.total-size-in-gb",
    "instance-storage-supported",
    "instance-type",
    "memory-info.size-in-mib",
    "network-info.ipv4-addresses-per-interface",
    "network-info.ipv6-supported",
    "network-info.maximum-network-interfaces",
    "network-info.network-performance",
    "processor-info.supported-architecture",
    "supported-boot-mode",
    "supported-root-device-type",
    "supported-usage-class",
    "supported-virtualization-type",
    "vcpu-info.default-cores",
    "vcpu-info.default-threads-per-core",
    "vcpu-info.default-vcpus",
];

/// DescribeAvailabilityZones (not taggable).
pub const AVAILABILITY_ZONE_FILTERS: &[&str] = &[
    "group-name",
    "message",
    "opt-in-status",
    "region-name",
    "state",
    "zone-id",
    "zone-name",
    "zone-type",
];

/// DescribeRegions (not taggable).
pub const REGION_FILTERS: &[&str] = &["endpoint", "opt-in-status", "region-name"];

/// DescribeKeyPairs (taggable).
pub const KEY_PAIR_FILTERS: &[&str] = &["fingerprint", "key-name", "key-pair-id"];

/// DescribeImages (taggable).
pub const IMAGE_FILTERS: &[&str] = &[
    "architecture",
    "block-device-mapping.delete-on-termination",
    "block-device-mapping.device-name",
    "block-device-mapping.encrypted",
    "block-device-mapping.snapshot-id",
    "block-device-mapping.volume-size",
    "block-device-mapping.volume-type",
    "boot-mode",
    "creation-date",
    "description",
    "hypervisor",
    "image-id",
    "image-type",
    "is-public",
    "kernel-id",
    "manifest-location",
    "name",
    "owner-alias",
    "owner-id",
    "platform",
    "platform-details",
    "ramdisk-id",
    "root-device-name",
    "root-device-type",
    "state",
    "state-reason-code",
    "state-reason-message",
    "usage-operation",
    "virtualization-type",
];

/// DescribeAddresses (taggable).
pub const ADDRESS_FILTERS: &[&str] = &[
    "allocation-id",
    "association-id",
    "domain",
    "instance-id",
    "network-border-group",
    "network-interface-id",
    "network-interface-owner-id",
    "private-ip-address",
    "public-ip",
];

/// DescribeTags (`tag:<key>` is allowed there too: validate with `taggable = true`).
pub const TAG_FILTERS: &[&str] = &["key", "resource-id", "resource-type", "value"];

/// DescribeVpcs (taggable). `isDefault` is the spelling of `is-default` in the 2016-11-15
/// reference, which Ansible's `ec2_instance` sends.
pub const VPC_FILTERS: &[&str] = &[
    "cidr",
    "cidr-block-association.association-id",
    "cidr-block-association.cidr-block",
    "cidr-block-association.state",
    "dhcp-options-id",
    "is-default",
    "isDefault",
    "owner-id",
    "state",
    "vpc-id",
];

/// DescribeSubnets (taggable). `availabilityZone`, `availabilityZoneId`, `cidr`, `cidrBlock`
/// and `defaultForAz` are the other spellings EC2 documents for `availability-zone`,
/// `availability-zone-id`, `cidr-block` and `default-for-az`.
pub const SUBNET_FILTERS: &[&str] = &[
    "availability-zone",
    "availability-zone-id",
    "availabilityZone",
    "availabilityZoneId",
    "available-ip-address-count",
    "cidr",
    "cidr-block",
    "cidrBlock",
    "default-for-az",
    "defaultForAz",
    "map-public-ip-on-launch",
    "owner-id",
    "state",
    "subnet-id",
    "vpc-id",
];

/// Test support: checks that each filter name an action accepts is answered with exactly what the
/// action's response shows.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod answered {
    use std::borrow::Cow;

    use quick_xml::events::Event;
    use quick_xml::Reader;

    use super::{matches_all, Filter};

    /// Where an action's response shows what each filter name it accepts matches.
    pub(crate) struct Table<'a> {
        /// The names the action accepts (its list).
        pub accepted: &'a [&'a str],
        /// Whether the tag filters are accepted too (`tag-key` and `tag-value` then need rows).
        pub taggable: bool,
        /// The path below the root of the response of the element that holds one resource,
        /// such as `keySet/item`.
        pub item: &'a str,
        /// Each accepted name and the path below `item` (`keyName`) whose texts are its values.
        pub rows: &'a [(&'a str, &'a str)],
        /// The accepted names whose path shows nothing for any resource Karri has (a set that is
        /// always empty, such as an instance-store instance's `blockDeviceMapping`): nothing
        /// matches them, not even `*`.
        pub none: &'a [&'a str],
    }

    impl Table<'_> {
        /// The accepted names, the tag filters included when taggable.
        fn names(&self) -> Vec<&str> {
            let mut names: Vec<&str> = self.accepted.to_vec();
            if self.taggable {
                names.extend(["tag-key", "tag-value"]);
            }
            names
        }

        fn path(&self, row: &str) -> String {
            format!("{}/{row}", self.item)
        }
    }

    /// The non-empty texts of the elements at `path` below the root of `xml`.
    pub(crate) fn texts_at(xml: &str, path: &str) -> Vec<String> {
        let wanted: Vec<&str> = path.split('/').collect();
        let mut reader = Reader::from_str(xml);
        reader.config_mut().check_end_names = true;
        // The open elements, each with its text so far.
        let mut open: Vec<(String, String)> = Vec::new();
        let mut found = Vec::new();
        loop {
            match reader.read_event().unwrap() {
                Event::Start(e) => open.push((
                    String::from_utf8(e.name().as_ref().to_vec()).unwrap(),
                    String::new(),
                )),
                Event::End(_) => {
                    // The path below the root: every open element but the first.
                    let at: Vec<&str> = open.iter().skip(1).map(|(n, _)| n.as_str()).collect();
                    let here = at == wanted;
                    let (_, text) = open.pop().unwrap();
                    if here && !text.is_empty() {
                        found.push(text);
                    }
                }
                Event::Text(t) => {
                    if let Some((_, text)) = open.last_mut() {
                        text.push_str(&t.xml10_content().unwrap());
                    }
                }
                Event::GeneralRef(r) => {
                    let name = String::from_utf8(r.to_vec()).unwrap();
                    let c = match name.as_str() {
                        "amp" => "&",
                        "lt" => "<",
                        "gt" => ">",
                        "quot" => "\"",
                        "apos" => "'",
                        "#13" => "\r",
                        other => panic!("unexpected reference {other}"),
                    };
                    if let Some((_, text)) = open.last_mut() {
                        text.push_str(c);
                    }
                }
                Event::Eof => break,
                _ => {}
            }
        }
        assert!(open.is_empty(), "unclosed elements in {xml}");
        found
    }

    /// A filter value matching exactly `value` (its wildcards escaped).
    pub(crate) fn literal(value: &str) -> String {
        let mut out = String::with_capacity(value.len());
        for c in value.chars() {
            if matches!(c, '*' | '?' | '\\') {
                out.push('\\');
            }
            out.push(c);
        }
        out
    }

    /// Checks that every name `table` accepts has a row, and that its values on a resource
    /// (`values_of`) are exactly the texts the response `xml` written for that resource shows at
    /// the row's path. Holds for any resource, however sparse.
    pub(crate) fn check_values<'r>(
        table: &Table<'_>,
        xml: &str,
        values_of: impl Fn(&str) -> Vec<Cow<'r, str>>,
    ) {
        let names = table.names();
        for name in &names {
            let rows = table.rows.iter().filter(|(n, _)| n == name).count();
            assert_eq!(
                rows, 1,
                "the filter {name:?} is accepted: it needs one row saying where the response shows its values"
            );
        }
        for (name, row) in table.rows {
            assert!(
                names.contains(name),
                "the row {name:?} is not an accepted filter"
            );
            let path = table.path(row);
            let mut shown = texts_at(xml, &path);
            shown.sort();
            let mut values: Vec<String> =
                values_of(name).into_iter().map(Cow::into_owned).collect();
            values.sort();
            assert_eq!(
                values, shown,
                "the filter {name:?} sees other values than the response shows at {path}"
            );
        }
    }

    /// [`check_values`] on a resource with every field filled in, and then: each value the
    /// response shows matches and a value it does not show does not; a name whose path shows
    /// nothing is one the table says is never shown, and matches nothing, not even `*`; each
    /// `tag:<key>` of a taggable resource matches.
    pub(crate) fn check<'r>(
        table: &Table<'_>,
        xml: &str,
        values_of: impl Fn(&str) -> Vec<Cow<'r, str>>,
    ) {
        check_values(table, xml, &values_of);
        let names = table.names();
        for name in table.none {
            assert!(names.contains(name), "{name:?} is not accepted");
        }
        for (name, row) in table.rows {
            let path = table.path(row);
            let shown = texts_at(xml, &path);
            let matches =
                |value: &str| matches_all(&[Filter::new(*name, [literal(value)])], &values_of);
            if shown.is_empty() {
                assert!(
                    table.none.contains(name),
                    "the response shows nothing at {path} for {name:?}: fill the sample in, or list the name as never shown"
                );
                assert!(
                    !matches_all(&[Filter::new(*name, ["*"])], &values_of),
                    "{name}=* matches a value the response does not show"
                );
                continue;
            }
            assert!(
                !table.none.contains(name),
                "{name:?} is listed as never shown, yet the response shows {shown:?} at {path}"
            );
            for value in &shown {
                assert!(
                    matches(value),
                    "{name}={value} (shown at {path}) does not match"
                );
                let other = format!("{value}-other");
                assert!(!shown.contains(&other));
                assert!(!matches(&other), "{name}={other} (not shown) matches");
            }
        }
        if table.taggable {
            let path_of = |name: &str| {
                let row = table.rows.iter().find(|(n, _)| *n == name).map(|(_, p)| *p);
                table.path(row.unwrap_or("-"))
            };
            let values = texts_at(xml, &path_of("tag-value"));
            for key in texts_at(xml, &path_of("tag-key")) {
                let name = format!("tag:{key}");
                let got = values_of(&name);
                assert!(
                    !got.is_empty() && got.iter().all(|v| values.iter().any(|s| s == v.as_ref())),
                    "{name} sees {got:?}, the response shows the values {values:?}"
                );
                assert!(matches_all(
                    &[Filter::new(name.as_str(), ["*"])],
                    &values_of
                ));
            }
            assert!(!matches_all(
                &[Filter::new("tag:not-a-key-shown", ["*"])],
                &values_of
            ));
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_escapes_and_case_follow_the_ec2_rules() {
        let rows: &[(&str, &str, bool)] = &[
            ("m1.small", "m1.small", true),
            ("m1.small", "m1.smal", false),
            ("m1.small", "M1.SMALL", false),
            ("*", "", true),
            ("*", "anything", true),
            ("m1.*", "m1.large", true),
            ("m1.*", "m3.large", false),
            ("*.large", "m1.large", true),
            ("*web*", "my-web-server", true),
            ("*web*", "my-db-server", false),
            ("?", "a", true),
            ("?", "", false),
            ("?", "ab", false),
            ("t2.??cro", "t2.micro", true),
            ("a*b*c", "aXXbYYc", true),
            ("a*b*c", "aXXbYY", false),
            ("a**b", "ab", true),
            ("*a", "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbba", true),
            (
                "*a*a*a*a*a*b",
                "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
                false,
            ),
            (r"\*amazon\?\\", r"*amazon?\", true),
            (r"\*amazon\?\\", r"Xamazon?\", false),
            (r"\*", "*", true),
            (r"\*", "x", false),
            (r"50\%", "50%", true),
            ("trailing\\", "trailing\\", true),
            ("ünï*", "ünïcödé", true),
            ("?ö", "éö", true),
            ("", "", true),
            ("", "x", false),
        ];
        for (pattern, text, expected) in rows {
            assert_eq!(
                wildcard_matches(pattern, text),
                *expected,
                "pattern {pattern:?} text {text:?}"
            );
        }
    }

    /// What a value matches, by dynamic programming over (tokens, characters): slow, and
    /// plainly right.
    fn reference(pattern: &str, text: &str) -> bool {
        let tokens = match Pattern::compile(pattern).0 {
            Compiled::Exact(s) => return s == text,
            Compiled::Wild(tokens) => tokens,
        };
        let text: Vec<char> = text.chars().collect();
        // row[j]: the tokens so far match text[..j].
        let mut row: Vec<bool> = (0..=text.len()).map(|j| j == 0).collect();
        for token in &tokens {
            let mut next = vec![false; text.len() + 1];
            for j in 0..=text.len() {
                next[j] = match token {
                    Token::Any => row[j] || (j > 0 && next[j - 1]),
                    Token::One => j > 0 && row[j - 1],
                    Token::Char(c) => j > 0 && row[j - 1] && text[j - 1] == *c,
                };
            }
            row = next;
        }
        row[text.len()]
    }

    fn tokens(value: &str) -> Vec<Token> {
        match Pattern::compile(value).0 {
            Compiled::Wild(tokens) => tokens,
            Compiled::Exact(s) => s.chars().map(Token::Char).collect(),
        }
    }

    /// A small deterministic generator (no seed from the clock: a failure replays).
    struct Lcg(u64);

    impl Lcg {
        fn below(&mut self, n: usize) -> usize {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((self.0 >> 33) % n as u64) as usize
        }

        fn string(&mut self, alphabet: &[char], max: usize) -> String {
            let len = self.below(max + 1);
            (0..len)
                .map(|_| alphabet[self.below(alphabet.len())])
                .collect()
        }
    }

    #[test]
    fn a_filter_matches_exactly_when_one_of_its_values_does() {
        let pattern_chars = ['a', 'b', 'é', '*', '?', '\\'];
        let text_chars = ['a', 'b', 'é', '*', '?', '\\'];
        let mut rng = Lcg(7);
        for case in 0..4000 {
            let values: Vec<String> = (0..1 + rng.below(4))
                .map(|_| rng.string(&pattern_chars, 7))
                .collect();
            let filter = CompiledFilter::new(&Filter::new("tag:Name", values.clone()));
            for _ in 0..5 {
                let text = rng.string(&text_chars, 9);
                let expected = values.iter().any(|v| reference(v, &text));
                assert_eq!(
                    filter.matches(&text),
                    expected,
                    "case {case}: values {values:?} text {text:?}"
                );
                for v in &values {
                    assert_eq!(
                        wildcard_matches(v, &text),
                        reference(v, &text),
                        "{v:?} {text:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_pathological_value_set_is_matched_in_one_pass_over_the_text() {
        // 200 values of 1023 characters, `*a*a…*a` and a digit, against 1024-character values:
        // a backtracking matcher tries every split (about a million steps per value and text).
        let values: Vec<String> = (0..200)
            .map(|i| format!("{}{}", "*a".repeat(511), i % 10))
            .collect();
        let filter = CompiledFilter::new(&Filter::new("tag:Name", values));
        let Some(wild) = &filter.wild else {
            panic!("the values have wildcards");
        };
        // One bit of state per token and value end, 64 to a word.
        assert_eq!(wild.words, 200 * 1024 / 64);
        let miss = "a".repeat(1024);
        let hit = format!("{}7", "a".repeat(1023));
        let too_few = format!("a7{}", "b".repeat(1022));
        for (text, matched) in [(&miss, false), (&hit, true), (&too_few, false)] {
            let run = wild.run(text);
            assert_eq!(run.matched, matched, "{}…", &text[..8]);
            // Each character is stepped over once at most: the work is steps × words.
            assert!(run.steps <= text.chars().count(), "{run:?}");
        }
        assert!(filter.matches(&hit) && !filter.matches(&miss));
    }

    #[test]
    fn a_pass_ends_as_soon_as_the_answer_is_known() {
        let rows = [
            // No value can match any more after the first character.
            ("web-?*", "db-1", false, 1),
            // A trailing `*` is reached: whatever follows matches.
            ("web-?*", "web-1 and a long tail", true, 5),
            ("*", "anything", true, 0),
            ("a?c", "abc", true, 3),
        ];
        for (value, text, matched, steps) in rows {
            let set = WildSet::new([tokens(value).as_slice()]);
            assert_eq!(set.run(text), Run { matched, steps }, "{value:?} {text:?}");
        }
    }

    #[test]
    fn plain_values_are_looked_up_and_only_wildcard_values_count() {
        let values = ["i-1", r"web\*", "db-*", "??"];
        let filter = CompiledFilter::new(&Filter::new("tag:Name", values));
        let mut exact: Vec<&str> = filter.exact.iter().map(String::as_str).collect();
        exact.sort_unstable();
        assert_eq!(exact, ["i-1", "web*"]);
        assert!(filter.matches("web*") && !filter.matches("web1"));
        assert!(filter.matches("db-1") && filter.matches("ab") && !filter.matches("abc"));
        assert_eq!(
            wildcard_chars(&[
                Filter::new("a", values),
                Filter::new("b", ["x**y", r"\?", "*"])
            ]),
            4 + 2 + 3 + 1
        );
    }

    fn instance(name: &str) -> Vec<Cow<'static, str>> {
        match name {
            "instance-type" => vec!["m1.small".into()],
            "instance-state-name" => vec!["running".into()],
            "tag-key" => vec!["Name".into(), "env".into()],
            "tag:Name" => vec!["web-1".into()],
            "tag:env" => vec!["prod".into()],
            _ => vec![],
        }
    }

    #[test]
    fn values_are_ored_and_filters_are_anded() {
        let rows: Vec<(Vec<Filter>, bool)> = vec![
            (vec![], true),
            (vec![Filter::new("instance-type", ["m1.small"])], true),
            (
                vec![Filter::new("instance-type", ["m1.large", "m1.small"])],
                true,
            ),
            (
                vec![Filter::new("instance-type", ["m1.large", "t2.micro"])],
                false,
            ),
            (
                vec![
                    Filter::new("instance-type", ["m1.small"]),
                    Filter::new("instance-state-name", ["running"]),
                ],
                true,
            ),
            (
                vec![
                    Filter::new("instance-type", ["m1.small"]),
                    Filter::new("instance-state-name", ["stopped"]),
                ],
                false,
            ),
            (vec![Filter::new("tag-key", ["env"])], true),
            (vec![Filter::new("tag:Name", ["web-*"])], true),
            (vec![Filter::new("tag:Name", ["db-*"])], false),
            (vec![Filter::new("tag:missing", ["*"])], false),
            (
                vec![Filter::new("instance-type", Vec::<String>::new())],
                false,
            ),
            (vec![Filter::new("unknown-attribute", ["*"])], false),
        ];
        for (filters, expected) in rows {
            assert_eq!(matches_all(&filters, instance), expected, "{filters:?}");
        }
    }

    #[test]
    fn tag_filter_values_come_from_the_tags() {
        let tags = [("Name", "web"), ("env", "prod"), ("Name2", "x")];
        let get = |name: &str| tag_filter_values(name, tags.iter().map(|(k, v)| (*k, *v)));
        assert_eq!(get("tag:Name"), Some(vec![Cow::Borrowed("web")]));
        assert_eq!(get("tag:nope"), Some(vec![]));
        assert_eq!(get("tag-key").map(|v| v.len()), Some(3));
        assert_eq!(
            get("tag-value"),
            Some(vec![
                Cow::Borrowed("web"),
                Cow::Borrowed("prod"),
                Cow::Borrowed("x")
            ])
        );
        assert_eq!(get("instance-id"), None);
    }

    struct Key {
        name: String,
        tags: Vec<(String, String)>,
    }

    impl Filterable for Key {
        fn filter_values(&self, name: &str) -> Vec<Cow<'_, str>> {
            if let Some(v) = tag_filter_values(
                name,
                self.tags.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            ) {
                return v;
            }
            match name {
                "key-name" => vec![Cow::Borrowed(self.name.as_str())],
                _ => vec![],
            }
        }
    }

    #[test]
    fn a_filterable_resource_is_matched_through_its_trait() {
        let key = Key {
            name: "deploy-key".into(),
            tags: vec![("team".into(), "ops".into())],
        };
        let m = Matcher::new(&[
            Filter::new("key-name", ["deploy-*"]),
            Filter::new("tag:team", ["ops"]),
        ]);
        assert!(m.matches_resource(&key));
        let m = Matcher::new(&[
            Filter::new("key-name", ["deploy-*"]),
            Filter::new("tag:team", ["dev"]),
        ]);
        assert!(!m.matches_resource(&key));
    }

    #[test]
    fn unknown_filter_names_are_invalid_and_tag_filters_need_a_taggable_resource() {
        let rows: &[(&str, &[&str], bool, Option<&str>)] = &[
            ("instance-type", INSTANCE_FILTERS, true, None),
            ("tag:Name", INSTANCE_FILTERS, true, None),
            ("tag-key", INSTANCE_FILTERS, true, None),
            ("tag-value", KEY_PAIR_FILTERS, true, None),
            (
                "tag:",
                INSTANCE_FILTERS,
                true,
                Some("The filter 'tag:' is invalid"),
            ),
            (
                "foo",
                INSTANCE_FILTERS,
                true,
                Some("The filter 'foo' is invalid"),
            ),
            (
                "Instance-Type",
                INSTANCE_FILTERS,
                true,
                Some("The filter 'Instance-Type' is invalid"),
            ),
            (
                "tag:Name",
                REGION_FILTERS,
                false,
                Some("The filter 'tag:Name' is invalid"),
            ),
            ("region-name", REGION_FILTERS, false, None),
            ("zone-name", AVAILABILITY_ZONE_FILTERS, false, None),
            ("resource-type", TAG_FILTERS, true, None),
            ("bare-metal", INSTANCE_TYPE_FILTERS, false, None),
            ("boot-mode", IMAGE_FILTERS, true, None),
            ("map-public-ip-on-launch", SUBNET_FILTERS, true, None),
            ("cidrBlock", SUBNET_FILTERS, true, None),
            ("cidr-block-association.state", VPC_FILTERS, true, None),
            (
                "system-status.reachability",
                INSTANCE_STATUS_FILTERS,
                false,
                None,
            ),
            // EC2 names for fields the responses do not show are refused, not left unmatched.
            (
                "host-id",
                INSTANCE_FILTERS,
                true,
                Some("The filter 'host-id' is invalid"),
            ),
            // Shown in the instance's `networkInterfaceSet`.
            ("network-interface.subnet-id", INSTANCE_FILTERS, true, None),
            (
                "network-interface.bogus",
                INSTANCE_FILTERS,
                true,
                Some("The filter 'network-interface.bogus' is invalid"),
            ),
            (
                "operator.managed",
                INSTANCE_STATUS_FILTERS,
                false,
                Some("The filter 'operator.managed' is invalid"),
            ),
            (
                "ebs-info.nvme-support",
                INSTANCE_TYPE_FILTERS,
                false,
                Some("The filter 'ebs-info.nvme-support' is invalid"),
            ),
            (
                "group-long-name",
                AVAILABILITY_ZONE_FILTERS,
                false,
                Some("The filter 'group-long-name' is invalid"),
            ),
            (
                "product-code",
                IMAGE_FILTERS,
                true,
                Some("The filter 'product-code' is invalid"),
            ),
            (
                "ipv6-cidr-block-association.state",
                VPC_FILTERS,
                true,
                Some("The filter 'ipv6-cidr-block-association.state' is invalid"),
            ),
            (
                "ipv6-native",
                SUBNET_FILTERS,
                true,
                Some("The filter 'ipv6-native' is invalid"),
            ),
        ];
        for (name, allowed, taggable, expected) in rows {
            let got = validate_names(&[Filter::new(*name, ["x"])], allowed, *taggable);
            match expected {
                None => assert!(got.is_ok(), "{name}: {got:?}"),
                Some(message) => {
                    let err = got.unwrap_err();
                    assert_eq!(err.code, "InvalidParameterValue");
                    assert_eq!(err.message, *message);
                }
            }
        }
    }

    #[test]
    fn response_texts_are_read_by_path_and_values_are_matched_literally() {
        let xml = "<?xml version=\"1.0\"?><R><requestId>r</requestId><set><item><k>a&amp;b</k>\
                   <s><item>x</item><item>y</item></s></item><item><k></k><s/></item></set></R>";
        let rows: &[(&str, &[&str])] = &[
            ("set/item/k", &["a&b"]),
            ("set/item/s/item", &["x", "y"]),
            ("set/item", &[]),
            ("requestId", &["r"]),
            ("k", &[]),
        ];
        for (path, texts) in rows {
            assert_eq!(answered::texts_at(xml, path), *texts, "{path}");
        }
        for value in ["web-*1", "a?b", r"c\d", "plain"] {
            let literal = answered::literal(value);
            assert!(wildcard_matches(&literal, value), "{literal}");
            assert!(
                !wildcard_matches(&literal, &format!("{value}x")),
                "{literal}"
            );
        }
    }

    #[test]
    fn the_filter_name_lists_are_sorted_and_free_of_tag_filters() {
        for list in [
            INSTANCE_FILTERS,
            INSTANCE_STATUS_FILTERS,
            INSTANCE_TYPE_FILTERS,
            AVAILABILITY_ZONE_FILTERS,
            REGION_FILTERS,
            KEY_PAIR_FILTERS,
            IMAGE_FILTERS,
            TAG_FILTERS,
            VPC_FILTERS,
            SUBNET_FILTERS,
        ] {
            assert!(list.windows(2).all(|w| w[0] < w[1]), "{list:?}");
            assert!(!list
                .iter()
                .any(|n| n.starts_with("tag:") || *n == "tag-key"));
        }
    }
}
