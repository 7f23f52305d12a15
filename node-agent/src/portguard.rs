//! Anti-spoofing on the guest bridge's ports.
//!
//! Every guest NIC's tap has a name fixed by its MAC ([`tap_for`]: `k` and the MAC's twelve hex
//! digits), which the domain XML asks libvirt for. An nftables table of the bridge family in the
//! bridge's network namespace ([`ruleset`]) holds the taps it guards and, for each, the MAC and
//! IPv4 address Karri gave that guest. A frame that enters the bridge from a guarded tap passes
//! only when it carries that MAC with that address, as IPv4 or as the sender of an ARP packet, or
//! with 0.0.0.0 while the guest asks DHCP for its address. Anything else from a guarded tap
//! (another guest's address or MAC, IPv6, VLAN tags) is dropped and counted.
//!
//! The metadata service tells callers apart by source address; with the guard, an address can
//! only come from the tap of the instance it belongs to, so a guest that takes another's address
//! or MAC is never answered as that instance. Frames from taps the table does not guard (another
//! agent's bridge in the same namespace) are left to that agent's table.
//!
//! A tap is guarded before its domain starts ([`PortGuard::bind`], from `Guests::prepare`), so no
//! frame of it ever passes unchecked. Every start defines the domain afresh (`plan`), so a
//! domain defined by an older agent (its tap named `vnetN`, unguarded) gets its guarded tap at
//! its next start; until then it runs unguarded. The bindings are rebuilt from the live instances at every
//! sweep ([`PortGuard::sync`]), which also restores them after an agent restart; bindings made
//! after the sweep read the store are kept ([`PortGuard::mark`]).
//!
//! The texts given to `nft -f -` are pure and table-tested here; the edge runs them with
//! [`crate::netns::command`].

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::AsyncWriteExt;

use crate::guestnet::{normalize_mac, GuestNetError};
use crate::netns;

/// The nft program (Debian package `nftables`).
pub const NFT: &str = "nft";
/// How long one `nft` run may take: the guard's lock is held meanwhile, so a hung `nft` must
/// not stop every launch on the node.
const NFT_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);
/// The first letter of every guarded tap's name.
pub const TAP_PREFIX: char = 'k';

/// Why the guard could not be set up or changed.
#[derive(Debug, thiserror::Error)]
pub enum PortGuardError {
    /// The MAC is not one a tap name can be made from.
    #[error(transparent)]
    Mac(#[from] GuestNetError),
    /// `nft` could not be started or fed.
    #[error("could not run nft: {0}")]
    Spawn(#[source] std::io::Error),
    /// `nft` did not finish in time (it was killed).
    #[error("nft did not finish within {0:?}")]
    Timeout(std::time::Duration),
    /// `nft` refused the change.
    #[error("nft refused to {what}: {stderr}")]
    Refused {
        /// What was asked, e.g. `guard tap k0200ac1f0007`.
        what: String,
        /// What nft said.
        stderr: String,
    },
}

/// The name of the tap of the guest NIC with `mac`: `k0200ac1f0007` for `02:00:ac:1f:00:07`
/// (13 characters, within Linux's 15).
pub fn tap_for(mac: &str) -> Result<String, GuestNetError> {
    let mac = normalize_mac(mac)?;
    Ok(format!("{TAP_PREFIX}{}", mac.replace(':', "")))
}

/// The nftables table guarding the ports of `bridge`: `karri_ports_<bridge>`, with every
/// character nft does not take in a name as `_`.
pub fn table_for(bridge: &str) -> String {
    let safe: String = bridge
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("karri_ports_{safe}")
}

/// One guarded guest port: its tap, and the MAC and address allowed through it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Binding {
    /// The tap's name ([`tap_for`]).
    pub tap: String,
    /// The guest's MAC, lower-case.
    pub mac: String,
    /// The guest's address.
    pub ip: Ipv4Addr,
}

impl Binding {
    /// The binding of the guest with `mac` and `ip`.
    pub fn new(mac: &str, ip: Ipv4Addr) -> Result<Self, GuestNetError> {
        Ok(Self {
            tap: tap_for(mac)?,
            mac: normalize_mac(mac)?,
            ip,
        })
    }

    /// The elements of the `ports` set: the address, and 0.0.0.0 for DHCP before it.
    fn port_elements(&self) -> [String; 2] {
        let Binding { tap, mac, ip } = self;
        [
            format!("\"{tap}\" . {mac} . {ip}"),
            format!("\"{tap}\" . {mac} . 0.0.0.0"),
        ]
    }

    fn tap_element(&self) -> String {
        format!("\"{}\"", self.tap)
    }
}

/// The script that creates `table` if missing and (re)writes its rules, keeping the sets'
/// elements: the guard of running guests holds while an agent restarts.
pub fn ruleset(table: &str) -> String {
    format!(
        "table bridge {table} {{\n\
         \tcounter {DROPPED} {{ }}\n\
         \tset taps {{ type ifname; }}\n\
         \tset ports {{ type ifname . ether_addr . ipv4_addr; }}\n\
         \tchain prerouting {{ type filter hook prerouting priority filter; policy accept; }}\n\
         }}\n\
         flush chain bridge {table} prerouting\n\
         table bridge {table} {{\n\
         \tchain prerouting {{\n\
         \t\tiifname != @taps accept\n\
         \t\tiifname . ether saddr . ip saddr @ports accept\n\
         \t\tiifname . ether saddr . arp saddr ip @ports iifname . arp saddr ether . arp saddr ip @ports accept\n\
         \t\tcounter name \"{DROPPED}\" drop\n\
         \t}}\n\
         }}\n"
    )
}

/// The table's named counter of the frames the guard dropped.
const DROPPED: &str = "dropped";

/// Frames and bytes the guard has dropped since its table was made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Dropped {
    /// Frames dropped.
    pub packets: u64,
    /// Their bytes.
    pub bytes: u64,
}

/// The counts in what `nft -j list counter …` prints; `None` when it holds no counter. Pure.
pub fn dropped_from_json(json: &str) -> Option<Dropped> {
    let value: serde_json::Value = serde_json::from_str(json).ok()?;
    let counter = value
        .get("nftables")?
        .as_array()?
        .iter()
        .find_map(|item| item.get("counter"))?;
    Some(Dropped {
        packets: counter.get("packets")?.as_u64()?,
        bytes: counter.get("bytes")?.as_u64()?,
    })
}

/// The script that guards `binding`'s tap (idempotent: `add` keeps an element that is there).
pub fn bind_script(table: &str, binding: &Binding) -> String {
    let [a, b] = binding.port_elements();
    format!(
        "add element bridge {table} ports {{ {a}, {b} }}\n\
         add element bridge {table} taps {{ {} }}\n",
        binding.tap_element()
    )
}

/// The script that forgets `binding`. Each element is added before it is deleted, so that the
/// script succeeds (in one transaction) whether or not it was there.
pub fn unbind_script(table: &str, binding: &Binding) -> String {
    let [a, b] = binding.port_elements();
    let tap = binding.tap_element();
    format!(
        "add element bridge {table} taps {{ {tap} }}\n\
         add element bridge {table} ports {{ {a}, {b} }}\n\
         delete element bridge {table} taps {{ {tap} }}\n\
         delete element bridge {table} ports {{ {a}, {b} }}\n"
    )
}

/// The script that makes the sets hold exactly `bindings`, in one transaction.
pub fn sync_script(table: &str, bindings: &[Binding]) -> String {
    let mut script = format!("flush set bridge {table} taps\nflush set bridge {table} ports\n");
    if !bindings.is_empty() {
        let taps: Vec<String> = bindings.iter().map(Binding::tap_element).collect();
        let ports: Vec<String> = bindings.iter().flat_map(Binding::port_elements).collect();
        script.push_str(&format!(
            "add element bridge {table} taps {{ {} }}\n\
             add element bridge {table} ports {{ {} }}\n",
            taps.join(", "),
            ports.join(", ")
        ));
    }
    script
}

/// A point in the guard's history, taken before the live instances are read for
/// [`PortGuard::sync`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Mark(u64);

/// The guard of one bridge's guest ports (see the module documentation).
#[derive(Debug)]
pub struct PortGuard {
    netns: Option<String>,
    table: String,
    /// Every change is numbered; [`PortGuard::sync`] keeps bindings made after its mark.
    clock: AtomicU64,
    /// Bindings made by [`PortGuard::bind`], with the number of that change. A mutex held across
    /// each nft run keeps the kernel's sets in the order of the changes.
    recent: tokio::sync::Mutex<BTreeMap<String, (Binding, u64)>>,
}

impl PortGuard {
    /// Creates (or re-creates the rules of) the table guarding `bridge` in `netns`.
    pub async fn install(netns: Option<&str>, bridge: &str) -> Result<Self, PortGuardError> {
        let guard = Self {
            netns: netns.map(str::to_owned),
            table: table_for(bridge),
            clock: AtomicU64::new(0),
            recent: tokio::sync::Mutex::new(BTreeMap::new()),
        };
        guard
            .nft(
                &ruleset(&guard.table),
                format!("set up table {}", guard.table),
            )
            .await?;
        tracing::info!(
            netns = netns.unwrap_or("-"),
            bridge,
            table = %guard.table,
            "guest ports are guarded against address and MAC spoofing"
        );
        Ok(guard)
    }

    /// The nftables table's name.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// Guards the tap of the guest with `mac`, letting through only `ip` (and DHCP). Returns the
    /// tap's name.
    pub async fn bind(&self, mac: &str, ip: Ipv4Addr) -> Result<String, PortGuardError> {
        let binding = Binding::new(mac, ip)?;
        let mut recent = self.recent.lock().await;
        let what = format!("guard tap {} for {ip}", binding.tap);
        self.nft(&bind_script(&self.table, &binding), what).await?;
        let at = self.clock.fetch_add(1, Ordering::SeqCst) + 1;
        let tap = binding.tap.clone();
        recent.insert(tap.clone(), (binding, at));
        Ok(tap)
    }

    /// Forgets the guest with `mac` and `ip` (its domain is gone).
    pub async fn unbind(&self, mac: &str, ip: Ipv4Addr) -> Result<(), PortGuardError> {
        let binding = Binding::new(mac, ip)?;
        let mut recent = self.recent.lock().await;
        let what = format!("forget tap {}", binding.tap);
        self.nft(&unbind_script(&self.table, &binding), what)
            .await?;
        recent.remove(&binding.tap);
        Ok(())
    }

    /// The mark to take before reading the live instances for [`PortGuard::sync`].
    pub fn mark(&self) -> Mark {
        Mark(self.clock.load(Ordering::SeqCst))
    }

    /// Makes the guard hold exactly the `live` guests' (address, MAC) bindings and those bound
    /// after `mark`, in one transaction.
    pub async fn sync(
        &self,
        mark: Mark,
        live: &[(Ipv4Addr, String)],
    ) -> Result<(), PortGuardError> {
        let mut recent = self.recent.lock().await;
        let mut wanted: BTreeMap<String, Binding> = BTreeMap::new();
        for (ip, mac) in live {
            let b = Binding::new(mac, *ip)?;
            wanted.insert(b.tap.clone(), b);
        }
        for (binding, at) in recent.values() {
            if *at > mark.0 {
                wanted.insert(binding.tap.clone(), binding.clone());
            }
        }
        let bindings: Vec<Binding> = wanted.into_values().collect();
        self.nft(
            &sync_script(&self.table, &bindings),
            format!("rewrite the {} guarded taps", bindings.len()),
        )
        .await?;
        recent.retain(|_, (_, at)| *at > mark.0);
        Ok(())
    }

    /// What the guard has dropped so far.
    pub async fn dropped(&self) -> Result<Dropped, PortGuardError> {
        let what = format!("read the counter of table {}", self.table);
        let listed = netns::command(self.netns.as_deref(), NFT)
            .args(["-j", "list", "counter", "bridge", &self.table, DROPPED])
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(NFT_DEADLINE, listed)
            .await
            .map_err(|_| PortGuardError::Timeout(NFT_DEADLINE))?
            .map_err(PortGuardError::Spawn)?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        match dropped_from_json(&stdout) {
            Some(d) if out.status.success() => Ok(d),
            _ => Err(PortGuardError::Refused {
                what,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            }),
        }
    }

    /// Runs `nft -f -` with `script` in the guard's namespace, at most [`NFT_DEADLINE`].
    async fn nft(&self, script: &str, what: String) -> Result<(), PortGuardError> {
        tokio::time::timeout(NFT_DEADLINE, self.nft_unbounded(script, what))
            .await
            .map_err(|_| PortGuardError::Timeout(NFT_DEADLINE))?
    }

    async fn nft_unbounded(&self, script: &str, what: String) -> Result<(), PortGuardError> {
        let mut child = netns::command(self.netns.as_deref(), NFT)
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(PortGuardError::Spawn)?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(script.as_bytes())
                .await
                .map_err(PortGuardError::Spawn)?;
        }
        let out = child
            .wait_with_output()
            .await
            .map_err(PortGuardError::Spawn)?;
        if out.status.success() {
            Ok(())
        } else {
            Err(PortGuardError::Refused {
                what,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binding(last: u8) -> Binding {
        Binding::new(
            &format!("02:00:AC:1F:00:{last:02X}"),
            Ipv4Addr::new(172, 31, 0, last),
        )
        .expect("a valid MAC")
    }

    #[test]
    fn the_dropped_counter_is_read_from_nft_json() {
        let listed = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}}, {"counter": {"family": "bridge", "name": "dropped", "table": "karri_ports_br0", "handle": 2, "packets": 7, "bytes": 420}}]}"#;
        assert_eq!(
            dropped_from_json(listed),
            Some(Dropped {
                packets: 7,
                bytes: 420
            })
        );
        assert_eq!(
            dropped_from_json(r#"{"nftables": [{"metainfo": {}}]}"#),
            None
        );
        assert_eq!(dropped_from_json("Error: No such file or directory"), None);
    }

    #[test]
    fn taps_are_named_after_their_mac_within_the_interface_name_limit() {
        for (mac, tap) in [
            ("02:00:ac:1f:00:07", Some("k0200ac1f0007")),
            ("02:00:AC:1F:FF:FE", Some("k0200ac1ffffe")),
            ("02:00:ac:1f:00", None),
            ("02:00:ac:1f:00:0g", None),
        ] {
            let got = tap_for(mac).ok();
            assert_eq!(got.as_deref(), tap, "{mac}");
            if let Some(t) = got {
                assert!(t.len() <= 15, "{t} is too long for an interface name");
            }
        }
    }

    #[test]
    fn table_names_keep_only_letters_digits_and_underscores() {
        assert_eq!(table_for("karri0"), "karri_ports_karri0");
        assert_eq!(table_for("br-guest.1"), "karri_ports_br_guest_1");
    }

    #[test]
    fn the_ruleset_keeps_elements_and_drops_what_a_guarded_tap_may_not_send() {
        let script = ruleset("karri_ports_karri0");
        // Declared with `table … { set … }` (which keeps existing elements), never flushed.
        assert!(!script.contains("flush set"), "{script}");
        assert!(script.contains("flush chain bridge karri_ports_karri0 prerouting"));
        let rules: Vec<&str> = script
            .lines()
            .map(str::trim)
            .skip_while(|l| !l.starts_with("flush chain"))
            .filter(|l| l.contains("accept") || l.contains("drop"))
            .collect();
        assert_eq!(
            rules,
            [
                "iifname != @taps accept",
                "iifname . ether saddr . ip saddr @ports accept",
                "iifname . ether saddr . arp saddr ip @ports iifname . arp saddr ether . arp saddr ip @ports accept",
                "counter name \"dropped\" drop",
            ]
        );
    }

    #[test]
    fn a_binding_lets_through_its_address_and_dhcp_from_its_own_tap_and_mac() {
        let script = bind_script("t", &binding(7));
        assert_eq!(
            script,
            "add element bridge t ports { \"k0200ac1f0007\" . 02:00:ac:1f:00:07 . 172.31.0.7, \
             \"k0200ac1f0007\" . 02:00:ac:1f:00:07 . 0.0.0.0 }\n\
             add element bridge t taps { \"k0200ac1f0007\" }\n"
        );
    }

    #[test]
    fn unbinding_adds_before_it_deletes_so_that_a_missing_binding_is_no_error() {
        let script = unbind_script("t", &binding(7));
        let lines: Vec<&str> = script.lines().collect();
        assert_eq!(lines.len(), 4);
        assert!(lines[0].starts_with("add element bridge t taps"));
        assert!(lines[1].starts_with("add element bridge t ports"));
        assert!(lines[2].starts_with("delete element bridge t taps"));
        assert!(lines[3].starts_with("delete element bridge t ports"));
        assert_eq!(lines[1].replace("add", ""), lines[3].replace("delete", ""));
    }

    #[test]
    fn a_sync_rewrites_both_sets_in_one_script() {
        assert_eq!(
            sync_script("t", &[]),
            "flush set bridge t taps\nflush set bridge t ports\n"
        );
        let script = sync_script("t", &[binding(7), binding(9)]);
        assert!(script.starts_with("flush set bridge t taps\nflush set bridge t ports\n"));
        assert!(script.contains("taps { \"k0200ac1f0007\", \"k0200ac1f0009\" }"));
        assert_eq!(script.matches("0.0.0.0").count(), 2);
        assert!(script.contains("02:00:ac:1f:00:09 . 172.31.0.9"));
    }
}
