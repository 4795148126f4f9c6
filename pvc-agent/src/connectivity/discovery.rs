//! What the agent learns about its network (paper §4.4's precondition):
//! whether a NAT translates it and whether that NAT keeps ports (from the
//! endpoints the brokers observe for its sessions, all from its PVC port),
//! and what reaches it unasked (brokers' probes: a TCP connection and a UDP
//! datagram to its PVC port). A UPnP gateway, when there is one, is asked
//! to forward the PVC port (`upnp`).

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use pvc_proto::{Inbound, Nat, SiteInfo};

/// What a broker's probe found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Probe {
    /// The broker's TCP connection to our PVC port reached us.
    pub tcp: bool,
    /// Its UDP datagram to our PVC port reached us.
    pub udp: bool,
}

/// The site this host sits in, from the brokers' observations of its
/// sessions (all from `port`), a probe's result if one finished, and the
/// UPnP forward if a gateway granted one.
pub fn classify(
    local: &[Ipv4Addr],
    port: u16,
    observed: &[SocketAddrV4],
    probe: Option<Probe>,
    upnp: Option<SocketAddrV4>,
) -> SiteInfo {
    let public = observed.first().map(|o| *o.ip());
    let nat = match public {
        None => Nat::Unknown,
        Some(ip) if local.contains(&ip) => Nat::None,
        // The same public port for every broker, and our own: a NAT that
        // keeps ports, whatever the destination.
        Some(_) if observed.iter().all(|o| o.port() == port) => Nat::Preserving,
        Some(_) => Nat::Random,
    };
    let inbound = match probe {
        None => Inbound::Unknown,
        Some(Probe { tcp: true, .. }) => Inbound::Open,
        Some(Probe { udp: true, .. }) => Inbound::SynFiltered,
        Some(_) => Inbound::Filtered,
    };
    SiteInfo {
        port,
        public,
        nat,
        inbound,
        upnp,
    }
}

/// The agent's running account of its site: probes asked and answered,
/// the brokers' observations, the UPnP forward.
pub struct Discovery {
    port: u16,
    local: Vec<Ipv4Addr>,
    /// The probe asked for.
    pending: Option<Pending>,
    probe: Option<Probe>,
    upnp: Option<SocketAddrV4>,
    observed: Vec<SocketAddrV4>,
    pub site: SiteInfo,
}

struct Pending {
    nonce: u64,
    /// Its datagram arrived.
    udp: bool,
    /// The broker could not connect, since then: its datagram, sent first,
    /// may still be on its way (a firewall that answers SYNs with a RST
    /// makes the connection fail at once).
    refused_at: Option<Instant>,
}

/// How long a refused probe waits for its datagram.
pub const DATAGRAM_GRACE: Duration = Duration::from_millis(500);

impl Discovery {
    pub fn new(port: u16, local: Vec<Ipv4Addr>) -> Self {
        Self {
            port,
            site: classify(&local, port, &[], None, None),
            local,
            pending: None,
            probe: None,
            upnp: None,
            observed: Vec::new(),
        }
    }

    /// A probe to ask a broker for: its nonce.
    pub fn start_probe(&mut self) -> u64 {
        // A probe's nonce only tells its datagram from a stray one.
        let nonce = u64::from_ne_bytes(crate::security::challenge::random().unwrap_or_default());
        self.pending = Some(Pending {
            nonce,
            udp: false,
            refused_at: None,
        });
        nonce
    }

    /// A datagram arrived on the PVC port: a probe's, maybe. The site, if
    /// this settles a probe and changes it.
    pub fn datagram(&mut self, bytes: &[u8]) -> Option<SiteInfo> {
        let p = self.pending.as_mut()?;
        if bytes.len() == pvc_proto::PROBE_MAGIC.len() + 8
            && bytes.starts_with(pvc_proto::PROBE_MAGIC)
            && bytes[pvc_proto::PROBE_MAGIC.len()..] == p.nonce.to_be_bytes()
        {
            p.udp = true;
            if p.refused_at.is_some() {
                return self.settle_probe(false);
            }
        }
        None
    }

    /// Whether a probe is waiting for its broker's answer.
    pub fn probing(&self) -> bool {
        self.pending
            .as_ref()
            .is_some_and(|p| p.refused_at.is_none())
    }

    /// A broker's answer to the probe: the site, if it changed.
    pub fn probe_result(&mut self, nonce: u64, tcp: bool, now: Instant) -> Option<SiteInfo> {
        let p = self.pending.as_mut()?;
        if p.nonce != nonce {
            return None;
        }
        if !tcp && !p.udp {
            p.refused_at = Some(now);
            return None;
        }
        self.settle_probe(tcp)
    }

    /// A refused probe whose datagram did not come within the grace: the
    /// site, if it changed.
    pub fn settle(&mut self, now: Instant) -> Option<SiteInfo> {
        let at = self.pending.as_ref()?.refused_at?;
        (now.saturating_duration_since(at) >= DATAGRAM_GRACE)
            .then(|| self.settle_probe(false))
            .flatten()
    }

    fn settle_probe(&mut self, tcp: bool) -> Option<SiteInfo> {
        let p = self.pending.take()?;
        self.probe = Some(Probe { tcp, udp: p.udp });
        self.reclassify()
    }

    /// Where the brokers see this host now: the site, if it changed.
    pub fn observed(&mut self, observed: Vec<SocketAddrV4>) -> Option<SiteInfo> {
        self.observed = observed;
        self.reclassify()
    }

    /// The UPnP forward granted (or gone): the site, if it changed.
    pub fn upnp(&mut self, external: Option<SocketAddrV4>) -> Option<SiteInfo> {
        self.upnp = external;
        self.reclassify()
    }

    fn reclassify(&mut self) -> Option<SiteInfo> {
        let site = classify(
            &self.local,
            self.port,
            &self.observed,
            self.probe,
            self.upnp,
        );
        (site != self.site).then(|| {
            self.site = site;
            site
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCAL: Ipv4Addr = Ipv4Addr::new(198, 18, 10, 2);
    const PUBLIC: Ipv4Addr = Ipv4Addr::new(198, 19, 23, 2);

    fn at(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(ip, port)
    }

    #[test]
    fn the_brokers_observations_tell_the_nat() {
        let no_probe = None;
        let nat =
            |observed: &[SocketAddrV4]| classify(&[LOCAL], 7101, observed, no_probe, None).nat;
        assert_eq!(nat(&[]), Nat::Unknown);
        assert_eq!(nat(&[at(LOCAL, 7101), at(LOCAL, 7101)]), Nat::None);
        assert_eq!(nat(&[at(PUBLIC, 7101), at(PUBLIC, 7101)]), Nat::Preserving);
        // Another port for each broker: a symmetric NAT.
        assert_eq!(nat(&[at(PUBLIC, 40312), at(PUBLIC, 51977)]), Nat::Random);
        // One broker, and the port changed: unpredictable too.
        assert_eq!(nat(&[at(PUBLIC, 40312)]), Nat::Random);
        assert_eq!(
            classify(&[LOCAL], 7101, &[at(PUBLIC, 7101)], no_probe, None).public,
            Some(PUBLIC)
        );
    }

    #[test]
    fn the_probes_tell_what_reaches_the_host() {
        let inbound = |tcp, udp| {
            classify(
                &[LOCAL],
                7101,
                &[at(LOCAL, 7101)],
                Some(Probe { tcp, udp }),
                None,
            )
            .inbound
        };
        assert_eq!(inbound(true, true), Inbound::Open);
        assert_eq!(inbound(false, true), Inbound::SynFiltered);
        assert_eq!(inbound(false, false), Inbound::Filtered);
        assert_eq!(
            classify(&[LOCAL], 7101, &[], None, None).inbound,
            Inbound::Unknown
        );
    }

    #[test]
    fn a_probe_is_answered_by_its_own_datagram_only() {
        let mut d = Discovery::new(7101, vec![LOCAL]);
        assert_eq!(
            d.observed(vec![at(LOCAL, 7101)]).map(|s| s.nat),
            Some(Nat::None)
        );
        let nonce = d.start_probe();
        let t = Instant::now();
        assert_eq!(d.datagram(b"PVCPROBE\0\0\0\0\0\0\0\0"), None);
        let mut ours = pvc_proto::PROBE_MAGIC.to_vec();
        ours.extend_from_slice(&nonce.to_be_bytes());
        assert_eq!(d.datagram(&ours), None);
        assert_eq!(d.probe_result(nonce.wrapping_add(1), false, t), None);
        let site = d.probe_result(nonce, false, t).unwrap();
        assert_eq!(site.inbound, Inbound::SynFiltered);
        // Refused before its datagram arrived (a RST is quicker than a
        // datagram is read): the datagram still counts.
        let nonce = d.start_probe();
        assert_eq!(d.probe_result(nonce, false, t), None);
        assert!(!d.probing(), "answered");
        let mut ours = pvc_proto::PROBE_MAGIC.to_vec();
        ours.extend_from_slice(&nonce.to_be_bytes());
        assert_eq!(d.datagram(&ours), None, "unchanged: still SYN-filtered");
        assert!(d.settle(t + DATAGRAM_GRACE).is_none());
        // No datagram within the grace: filtered.
        let nonce = d.start_probe();
        assert_eq!(d.probe_result(nonce, false, t), None);
        assert_eq!(d.settle(t), None, "within the grace");
        let site = d.settle(t + DATAGRAM_GRACE).unwrap();
        assert_eq!(site.inbound, Inbound::Filtered);
        let upnp = at(PUBLIC, 7101);
        assert_eq!(d.upnp(Some(upnp)).unwrap().upnp, Some(upnp));
        assert_eq!(d.upnp(Some(upnp)), None, "unchanged");
    }
}
