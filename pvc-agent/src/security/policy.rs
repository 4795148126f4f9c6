//! Policy at two levels (paper §4.3): the local administrator's (which
//! members and ports this host accepts flows from and may open flows to) and
//! the cluster's global policy (signed by the master). A flow is allowed
//! when both allow it. The agent compiles the result, per member, into the
//! kernel's policy map, which connect4, tc egress and tc ingress consult.

use std::{collections::BTreeSet, net::Ipv4Addr};

use anyhow::Context as _;
use pvc_common::{POLICY_FULL_PREFIX, POLICY_INBOUND, POLICY_OUTBOUND};
use pvc_proto::{GlobalPolicy, PortRange, Selector};
use serde::Deserialize;

use super::membership::Member;

/// `[policy]` in the agent's configuration. A direction with no rule is not
/// restricted locally.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalPolicyConfig {
    /// Who may open flows to this host, on which of its ports.
    #[serde(default)]
    pub inbound: Vec<RuleConfig>,
    /// To whom, on which of their ports, this host may open flows.
    #[serde(default)]
    pub outbound: Vec<RuleConfig>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// "*", "group:NAME" or a member name.
    pub peers: Vec<String>,
    /// "22", "8000-8100" or "*".
    pub ports: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rule {
    pub peers: Vec<Selector>,
    pub ports: Vec<PortRange>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LocalPolicy {
    pub inbound: Vec<Rule>,
    pub outbound: Vec<Rule>,
}

impl LocalPolicyConfig {
    pub fn parse(&self) -> anyhow::Result<LocalPolicy> {
        let rules = |list: &[RuleConfig], what: &str| -> anyhow::Result<Vec<Rule>> {
            list.iter()
                .enumerate()
                .map(|(i, r)| {
                    let ctx = || format!("policy.{what}[{i}]");
                    let peers = r
                        .peers
                        .iter()
                        .map(|p| p.parse())
                        .collect::<Result<Vec<Selector>, _>>()
                        .map_err(anyhow::Error::msg)
                        .with_context(ctx)?;
                    let ports = r
                        .ports
                        .iter()
                        .map(|p| p.parse())
                        .collect::<Result<Vec<PortRange>, _>>()
                        .map_err(anyhow::Error::msg)
                        .with_context(ctx)?;
                    anyhow::ensure!(
                        !peers.is_empty() && !ports.is_empty(),
                        "{}: name at least one peer and one port",
                        ctx()
                    );
                    Ok(Rule { peers, ports })
                })
                .collect()
        };
        Ok(LocalPolicy {
            inbound: rules(&self.inbound, "inbound")?,
            outbound: rules(&self.outbound, "outbound")?,
        })
    }
}

/// This host, as policies see it.
pub struct Subject<'a> {
    pub name: &'a str,
    pub groups: &'a [String],
}

/// Sorted, disjoint, non-adjacent ranges.
fn normalize(mut r: Vec<PortRange>) -> Vec<PortRange> {
    r.sort();
    let mut out: Vec<PortRange> = Vec::new();
    for x in r {
        match out.last_mut() {
            Some(last) if x.first as u32 <= last.last as u32 + 1 => {
                last.last = last.last.max(x.last)
            }
            _ => out.push(x),
        }
    }
    out
}

fn intersect(a: &[PortRange], b: &[PortRange]) -> Vec<PortRange> {
    let mut out = Vec::new();
    for x in a {
        for y in b {
            let first = x.first.max(y.first);
            let last = x.last.min(y.last);
            if first <= last {
                out.push(PortRange { first, last });
            }
        }
    }
    normalize(out)
}

/// Ports `rules` allow with `peer`; `None` when the direction has no rule.
fn local_ports(rules: &[Rule], peer: &Member) -> Option<Vec<PortRange>> {
    if rules.is_empty() {
        return None;
    }
    Some(normalize(
        rules
            .iter()
            .filter(|r| r.peers.iter().any(|s| s.matches(&peer.name, &peer.groups)))
            .flat_map(|r| r.ports.iter().copied())
            .collect(),
    ))
}

fn both(local: Option<Vec<PortRange>>, global: Option<Vec<PortRange>>) -> Vec<PortRange> {
    match (local, global) {
        (None, None) => vec![PortRange::ALL],
        (Some(l), None) => l,
        (None, Some(g)) => normalize(g),
        (Some(l), Some(g)) => intersect(&l, &normalize(g)),
    }
}

/// One allowed (direction, member, port prefix) of the kernel's policy map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PolicyEntry {
    pub direction: u8,
    pub peer: Ipv4Addr,
    pub port: u16,
    /// Prefix length over the whole (direction, member, port) key.
    pub prefix_len: u32,
}

/// The compiled policy: which directions are restricted, and what they allow.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Compiled {
    pub restrict_out: bool,
    pub restrict_in: bool,
    pub entries: BTreeSet<PolicyEntry>,
}

/// A port range as the fewest aligned blocks: (first port, bits fixed).
pub fn port_prefixes(r: PortRange) -> Vec<(u16, u32)> {
    let mut out = Vec::new();
    let mut start = r.first as u32;
    let end = r.last as u32;
    while start <= end {
        // The largest aligned block starting at `start` that fits.
        let mut size = if start == 0 {
            1 << 16
        } else {
            1 << start.trailing_zeros().min(16)
        };
        while start + size - 1 > end {
            size >>= 1;
        }
        out.push((start as u16, 16 - size.trailing_zeros()));
        start += size;
    }
    out
}

/// Compiles both policies for every known member.
pub fn compile(
    local: &LocalPolicy,
    global: &GlobalPolicy,
    me: &Subject<'_>,
    peers: &[Member],
) -> Compiled {
    let mut c = Compiled {
        restrict_out: !local.outbound.is_empty() || !global.rules.is_empty(),
        restrict_in: !local.inbound.is_empty() || !global.rules.is_empty(),
        entries: BTreeSet::new(),
    };
    for peer in peers {
        let them = (peer.name.as_str(), peer.groups.as_slice());
        let us = (me.name, me.groups);
        let out = both(local_ports(&local.outbound, peer), global.allowed(us, them));
        let inn = both(local_ports(&local.inbound, peer), global.allowed(them, us));
        for (direction, ranges, restricted) in [
            (POLICY_OUTBOUND, out, c.restrict_out),
            (POLICY_INBOUND, inn, c.restrict_in),
        ] {
            if !restricted {
                continue;
            }
            for r in ranges {
                for (port, bits) in port_prefixes(r) {
                    c.entries.insert(PolicyEntry {
                        direction,
                        peer: peer.virtual_ip,
                        port,
                        prefix_len: POLICY_FULL_PREFIX - 16 + bits,
                    });
                }
            }
        }
    }
    c
}

/// Whether the compiled policy allows a flow (what the kernel computes).
pub fn allows(c: &Compiled, direction: u8, peer: Ipv4Addr, port: u16) -> bool {
    let restricted = if direction == POLICY_INBOUND {
        c.restrict_in
    } else {
        c.restrict_out
    };
    if !restricted {
        return true;
    }
    c.entries.iter().any(|e| {
        let bits = e.prefix_len - (POLICY_FULL_PREFIX - 16);
        let mask = if bits == 0 {
            0
        } else {
            u16::MAX << (16 - bits)
        };
        e.direction == direction && e.peer == peer && (port & mask) == (e.port & mask)
    })
}

#[cfg(test)]
mod tests {
    use pvc_proto::{ClusterId, PolicyRule};

    use super::*;

    fn member(name: &str, last: u8, groups: &[&str]) -> Member {
        Member {
            name: name.into(),
            virtual_ip: Ipv4Addr::new(240, 0, 0, last),
            key: pvc_proto::PublicKey([last; 32]),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            serial: last as u64,
            not_after: u64::MAX,
            addresses: vec![],
        }
    }

    fn pr(s: &str) -> PortRange {
        s.parse().unwrap()
    }

    #[test]
    fn port_ranges_become_exact_prefixes() {
        for (first, last) in [
            (0u16, 65535u16),
            (22, 22),
            (8000, 8100),
            (1, 65535),
            (1023, 1025),
            (0, 0),
            (65535, 65535),
        ] {
            let blocks = port_prefixes(PortRange { first, last });
            let covered: u32 = blocks.iter().map(|(_, bits)| 1u32 << (16 - bits)).sum();
            assert_eq!(covered, last as u32 - first as u32 + 1, "{first}-{last}");
            for (start, bits) in &blocks {
                let size = 1u32 << (16 - bits);
                assert_eq!(*start as u32 % size, 0, "aligned");
                assert!(*start >= first && *start as u32 + size - 1 <= last as u32);
            }
        }
        assert_eq!(port_prefixes(pr("*")), vec![(0, 0)]);
        assert_eq!(port_prefixes(pr("22")), vec![(22, 16)]);
    }

    #[test]
    fn local_and_global_policies_must_both_allow() {
        let me = Subject {
            name: "a",
            groups: &["web".to_string()],
        };
        let admin = member("admin", 2, &["ops"]);
        let db = member("db", 3, &["storage"]);
        let local = LocalPolicyConfig {
            inbound: vec![RuleConfig {
                peers: vec!["group:ops".into()],
                ports: vec!["22".into(), "8000-8100".into()],
            }],
            outbound: vec![],
        }
        .parse()
        .unwrap();
        let global = GlobalPolicy {
            cluster: ClusterId::default(),
            version: 1,
            issued_at: 0,
            rules: vec![
                PolicyRule {
                    from: vec![Selector::Any],
                    to: vec![Selector::Any],
                    ports: vec![pr("8000-8050")],
                },
                PolicyRule {
                    from: vec![Selector::Group("ops".into())],
                    to: vec![Selector::Any],
                    ports: vec![pr("22")],
                },
            ],
        };
        let c = compile(&local, &global, &me, &[admin.clone(), db.clone()]);
        assert!(c.restrict_in && c.restrict_out);
        let (a, d) = (admin.virtual_ip, db.virtual_ip);
        // Inbound from admin: local allows 22 and 8000-8100, global 22 and 8000-8050.
        assert!(allows(&c, POLICY_INBOUND, a, 22));
        assert!(allows(&c, POLICY_INBOUND, a, 8050));
        assert!(!allows(&c, POLICY_INBOUND, a, 8051));
        // Inbound from db: local does not list it.
        assert!(!allows(&c, POLICY_INBOUND, d, 8000));
        // Outbound: no local rule; global allows 8000-8050 to anyone, 22 only for ops.
        assert!(allows(&c, POLICY_OUTBOUND, d, 8000));
        assert!(!allows(&c, POLICY_OUTBOUND, d, 22));

        // Without any policy nothing is restricted and nothing is compiled.
        let open = compile(
            &LocalPolicy::default(),
            &GlobalPolicy::default(),
            &me,
            &[db],
        );
        assert_eq!(open, Compiled::default());
        assert!(allows(&open, POLICY_INBOUND, d, 1));
    }

    #[test]
    fn bad_rules_are_named() {
        let bad = LocalPolicyConfig {
            inbound: vec![RuleConfig {
                peers: vec!["Nope Nope".into()],
                ports: vec!["22".into()],
            }],
            outbound: vec![],
        };
        let e = format!("{:#}", bad.parse().unwrap_err());
        assert!(e.contains("policy.inbound[0]"), "{e}");
        let bad = LocalPolicyConfig {
            outbound: vec![RuleConfig {
                peers: vec!["*".into()],
                ports: vec!["70000".into()],
            }],
            inbound: vec![],
        };
        assert!(format!("{:#}", bad.parse().unwrap_err()).contains("70000"));
    }
}
