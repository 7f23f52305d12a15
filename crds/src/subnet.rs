//! A zone's IPv4 subnet and the addresses drawn from it: pure arithmetic shared by the gateway
//! (DescribeSubnets), the operator (private address allocation) and the node agent (bridge,
//! DHCP).
//!
//! As in an AWS VPC subnet, the first four addresses (network, router, DNS, reserved) and the
//! last (broadcast) are never given to instances.

use std::collections::HashSet;
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// The default VPC's block; each zone's default subnet is a /20 of it.
pub const DEFAULT_VPC_CIDR: &str = "172.31.0.0/16";

/// Addresses at the start of a subnet that instances never get.
const RESERVED_AT_START: u32 = 4;

/// An IPv4 subnet, e.g. `172.31.0.0/20`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Subnet {
    network: Ipv4Addr,
    prefix: u8,
}

/// Why a CIDR string is not a usable subnet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an IPv4 CIDR block with a prefix from /16 to /28 and no host bits")]
pub struct SubnetError(pub String);

impl Subnet {
    /// The subnet with `network` and `prefix`, when the prefix is /16 to /28 and no host bit is
    /// set.
    pub fn new(network: Ipv4Addr, prefix: u8) -> Option<Self> {
        if !(16..=28).contains(&prefix) {
            return None;
        }
        let s = Self { network, prefix };
        (u32::from(network) & !s.mask_bits() == 0).then_some(s)
    }

    fn mask_bits(self) -> u32 {
        u32::MAX << (32 - u32::from(self.prefix))
    }

    /// The network address.
    pub fn network(self) -> Ipv4Addr {
        self.network
    }

    /// The prefix length.
    pub fn prefix(self) -> u8 {
        self.prefix
    }

    /// The netmask, e.g. `255.255.240.0` for a /20.
    pub fn netmask(self) -> Ipv4Addr {
        Ipv4Addr::from(self.mask_bits())
    }

    /// The router address guests get from DHCP: the first host.
    pub fn gateway(self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }

    /// The broadcast address.
    pub fn broadcast(self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) | !self.mask_bits())
    }

    /// Whether `ip` is inside the subnet.
    pub fn contains(self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask_bits() == u32::from(self.network)
    }

    /// Whether instances may get `ip`: inside, and not one of the reserved addresses.
    pub fn is_assignable(self, ip: Ipv4Addr) -> bool {
        let n = u32::from(ip);
        self.contains(ip)
            && n >= u32::from(self.network) + RESERVED_AT_START
            && n < u32::from(self.broadcast())
    }

    /// How many addresses instances may get: all but the network's first four and its
    /// broadcast address, as EC2 reserves them.
    pub fn assignable(self) -> u64 {
        u64::from(u32::from(self.broadcast()))
            .saturating_sub(u64::from(u32::from(self.network)) + u64::from(RESERVED_AT_START))
    }

    /// The lowest assignable address not in `used`; `None` when the subnet is full.
    pub fn first_free(self, used: &HashSet<Ipv4Addr>) -> Option<Ipv4Addr> {
        let first = u32::from(self.network) + RESERVED_AT_START;
        (first..u32::from(self.broadcast()))
            .map(Ipv4Addr::from)
            .find(|ip| !used.contains(ip))
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl FromStr for Subnet {
    type Err = SubnetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || SubnetError(s.to_string());
        let (ip, prefix) = s.split_once('/').ok_or_else(bad)?;
        let ip: Ipv4Addr = ip.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        Self::new(ip, prefix).ok_or_else(bad)
    }
}

/// The index-th /20 of [`DEFAULT_VPC_CIDR`] (wrapping after 16).
pub fn default_subnet(index: usize) -> Subnet {
    let third = u8::try_from((index % 16) * 16).expect("at most 15 * 16 = 240");
    Subnet {
        network: Ipv4Addr::new(172, 31, third, 0),
        prefix: 20,
    }
}

/// Which default /20 a zone named `name` gets, from its name alone, so that adding or removing
/// other zones never moves it (its instances hold addresses in it): the letter an AWS-style
/// zone name ends with (`karri-1a` → 0, `karri-1b` → 1, …, wrapping after `p`), else a hash
/// of the name. Zones beyond 16 letters, or not named so, should set `spec.subnetCidr`.
pub fn default_subnet_index(name: &str) -> usize {
    match name.bytes().last() {
        Some(c @ b'a'..=b'z') => usize::from(c - b'a') % 16,
        _ => {
            // FNV-1a: stable across builds and platforms, unlike std's hasher.
            let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            });
            usize::try_from(hash % 16).unwrap_or(0)
        }
    }
}

/// The subnet of each zone, in name order: its `spec.subnetCidr` when set and valid, else the
/// default its name gives ([`default_subnet_index`]).
pub fn zone_subnets<'a>(
    zones: impl IntoIterator<Item = (&'a str, Option<&'a str>)>,
) -> Vec<(String, Subnet)> {
    let mut zones: Vec<_> = zones.into_iter().collect();
    zones.sort_by(|a, b| a.0.cmp(b.0));
    zones
        .into_iter()
        .map(|(name, cidr)| {
            let subnet = cidr
                .and_then(|c| c.parse().ok())
                .unwrap_or_else(|| default_subnet(default_subnet_index(name)));
            (name.to_string(), subnet)
        })
        .collect()
}

/// The MAC address of the interface holding `ip`: locally administered `02:00:` and the four
/// octets, so that addresses unique in a subnet give unique MACs.
pub fn mac_for(ip: Ipv4Addr) -> String {
    let [a, b, c, d] = ip.octets();
    format!("02:00:{a:02x}:{b:02x}:{c:02x}:{d:02x}")
}

/// The EC2-style host name of `ip`: `ip-172-31-0-5`.
pub fn hostname_for(ip: Ipv4Addr) -> String {
    let [a, b, c, d] = ip.octets();
    format!("ip-{a}-{b}-{c}-{d}")
}

/// The private DNS name of `ip` in `region`: `ip-172-31-0-5.karri-1.compute.internal`.
pub fn private_dns_name(ip: Ipv4Addr, region: &str) -> String {
    format!("{}.{region}.compute.internal", hostname_for(ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_blocks_parse_only_when_well_formed() {
        let cases = [
            ("172.31.0.0/20", true),
            ("10.0.0.0/16", true),
            ("10.0.0.16/28", true),
            ("172.31.0.1/20", false),
            ("10.0.0.0/8", false),
            ("10.0.0.0/29", false),
            ("10.0.0.0", false),
            ("10.0.0/20", false),
            ("", false),
        ];
        for (text, ok) in cases {
            assert_eq!(text.parse::<Subnet>().is_ok(), ok, "{text}");
        }
        assert_eq!(
            "172.31.16.0/20"
                .parse::<Subnet>()
                .expect("valid")
                .to_string(),
            "172.31.16.0/20"
        );
    }

    #[test]
    fn a_subnet_offers_all_but_five_of_its_addresses_as_ec2_does() {
        for (cidr, assignable) in [
            ("172.31.0.0/20", 4091),
            ("10.0.0.16/28", 11),
            ("10.0.0.0/16", 65531),
        ] {
            let subnet: Subnet = cidr.parse().expect("valid");
            assert_eq!(subnet.assignable(), assignable, "{cidr}");
        }
    }

    #[test]
    fn a_subnet_knows_its_gateway_mask_and_broadcast() {
        let s: Subnet = "172.31.16.0/20".parse().expect("valid");
        assert_eq!(s.gateway(), Ipv4Addr::new(172, 31, 16, 1));
        assert_eq!(s.netmask(), Ipv4Addr::new(255, 255, 240, 0));
        assert_eq!(s.broadcast(), Ipv4Addr::new(172, 31, 31, 255));
        assert!(s.contains(Ipv4Addr::new(172, 31, 20, 9)));
        assert!(!s.contains(Ipv4Addr::new(172, 31, 32, 0)));
    }

    #[test]
    fn allocation_skips_reserved_and_used_addresses_and_ends_when_full() {
        let s: Subnet = "10.0.0.0/28".parse().expect("valid");
        let mut used = HashSet::new();
        assert_eq!(s.first_free(&used), Some(Ipv4Addr::new(10, 0, 0, 4)));
        used.insert(Ipv4Addr::new(10, 0, 0, 4));
        used.insert(Ipv4Addr::new(10, 0, 0, 6));
        assert_eq!(s.first_free(&used), Some(Ipv4Addr::new(10, 0, 0, 5)));
        for last in 4..15 {
            used.insert(Ipv4Addr::new(10, 0, 0, last));
        }
        assert_eq!(
            s.first_free(&used),
            None,
            "the broadcast address is never given"
        );
        assert!(!s.is_assignable(Ipv4Addr::new(10, 0, 0, 1)));
        assert!(!s.is_assignable(Ipv4Addr::new(10, 0, 0, 15)));
        assert!(s.is_assignable(Ipv4Addr::new(10, 0, 0, 14)));
    }

    #[test]
    fn a_zone_keeps_its_default_subnet_whatever_zones_are_added() {
        let before = zone_subnets([("karri-1b", None), ("karri-1c", None)]);
        let after = zone_subnets([
            ("karri-1a", None),
            ("karri-1a2", None),
            ("karri-1b", None),
            ("karri-1c", None),
        ]);
        for (zone, subnet) in &before {
            assert!(after.contains(&(zone.clone(), *subnet)), "{zone} moved");
        }
        assert_eq!(default_subnet_index("karri-1a"), 0);
        assert_eq!(default_subnet_index("karri-1p"), 15);
        assert_eq!(default_subnet_index("karri-1q"), 0);
        assert_eq!(
            default_subnet_index("zone-7"),
            default_subnet_index("zone-7"),
            "a name without a letter gets a stable slot"
        );
    }

    #[test]
    fn zones_get_their_own_subnet_or_the_default_their_name_gives() {
        let got = zone_subnets([
            ("karri-1b", None),
            ("karri-1a", None),
            ("karri-1c", Some("10.9.0.0/24")),
            ("karri-1d", Some("not a cidr")),
        ]);
        let got: Vec<(String, String)> = got.into_iter().map(|(z, s)| (z, s.to_string())).collect();
        assert_eq!(
            got,
            [
                ("karri-1a".to_string(), "172.31.0.0/20".to_string()),
                ("karri-1b".to_string(), "172.31.16.0/20".to_string()),
                ("karri-1c".to_string(), "10.9.0.0/24".to_string()),
                ("karri-1d".to_string(), "172.31.48.0/20".to_string()),
            ]
        );
    }

    #[test]
    fn mac_and_names_derive_from_the_address() {
        let ip = Ipv4Addr::new(172, 31, 0, 5);
        assert_eq!(mac_for(ip), "02:00:ac:1f:00:05");
        assert_eq!(hostname_for(ip), "ip-172-31-0-5");
        assert_eq!(
            private_dns_name(ip, "karri-1"),
            "ip-172-31-0-5.karri-1.compute.internal"
        );
    }
}
