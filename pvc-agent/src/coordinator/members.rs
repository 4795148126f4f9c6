//! Membership, as the core sees it: what the broker relays is believed only
//! if the master signed it (`Trust`); members come, go, lose their broker
//! session for a while, are revoked or expire.

use std::{collections::BTreeSet, net::Ipv4Addr, time::Instant};

use pvc_common::PEER_READY;
use pvc_proto::{MemberInfo, MembershipRecord, SignedPolicy, SignedRevocations};
use tracing::{error, info, warn};

use super::core::{Core, Effect, Established, Peer};
use crate::security::{challenge::Session, membership::Member};

/// What a broker's welcome brings.
pub struct Welcome<'a> {
    pub broker: String,
    /// Where the broker sees this agent's session come from.
    pub observed: std::net::SocketAddrV4,
    /// This host's own record, if it verified (`verify_own_record`).
    pub own: Option<MembershipRecord>,
    pub revocations: Option<&'a SignedRevocations>,
    pub policy: Option<&'a SignedPolicy>,
    pub members: &'a [MemberInfo],
}

impl Core {
    /// A broker session is up: this host's own record (checked by the
    /// caller), the master's current lists, and every member present at
    /// that broker. Members no broker lists any more start their grace
    /// period.
    pub fn welcome(&mut self, w: Welcome<'_>, now: Instant, unix_now: u64) -> Vec<Effect> {
        let mut out = Vec::new();
        if let Some(r) = w.revocations {
            out.extend(self.revocations(r));
        }
        if let Some(p) = w.policy {
            out.extend(self.global_policy(p));
        }
        if let Some(own) = w.own {
            self.own_record(own, &mut out);
        }
        self.brokers.insert(w.broker.clone(), w.observed);
        let present: BTreeSet<Ipv4Addr> = w
            .members
            .iter()
            .filter_map(|m| self.trust.member(m, unix_now).ok())
            .map(|m| m.virtual_ip)
            .collect();
        for (vip, peer) in self.peers.iter_mut() {
            if !present.contains(vip) {
                peer.present_on.remove(&w.broker);
                if peer.present_on.is_empty() {
                    peer.absent_since.get_or_insert(now);
                }
            }
        }
        for m in w.members {
            out.extend(self.joined(&w.broker, m, now, unix_now));
        }
        out
    }

    /// This host's own record, verified (`verify_own_record`).
    fn own_record(&mut self, r: MembershipRecord, out: &mut Vec<Effect>) {
        if self.own.as_ref().is_none_or(|o| o.serial != r.serial) {
            info!(serial = r.serial, groups = ?r.groups, not_after = r.not_after, "this host's membership record verified");
        }
        self.own = Some(Member::from_record(r, self.me.advertised.clone()));
        self.recompile_policy(out);
    }

    /// A broker session ended: the members only it listed start their
    /// grace period (they may be on their way to another broker).
    pub fn disconnected(&mut self, broker: &str, now: Instant) {
        self.brokers.remove(broker);
        for peer in self.peers.values_mut() {
            if peer.present_on.remove(broker) && peer.present_on.is_empty() {
                peer.absent_since.get_or_insert(now);
            }
        }
    }

    /// A member `broker` relays (at registration, or in a list).
    pub fn joined(
        &mut self,
        broker: &str,
        info: &MemberInfo,
        now: Instant,
        unix_now: u64,
    ) -> Vec<Effect> {
        let mut out = Vec::new();
        let member = match self.trust.member(info, unix_now) {
            Ok(m) => m,
            Err(e) => {
                warn!("ignoring a member the broker relayed: {e}");
                return out;
            }
        };
        let vip = member.virtual_ip;
        if vip == self.me.virtual_ip {
            return out;
        }
        let inherited = self.inherited.remove(&vip).map(|(_, path)| path);
        let changed = match self.peers.get_mut(&vip) {
            Some(p) => {
                p.absent_since = None;
                p.present_on.insert(broker.to_string());
                p.info = info.site;
                let record_changed = p.member.key != member.key || p.member.serial != member.serial;
                let addresses_changed = p.member.addresses != member.addresses;
                p.member = member.clone();
                if record_changed {
                    // Proven for another key: prove it again.
                    info!(name = member.name, %vip, "member's record changed; its path will be authenticated again");
                    p.session = None;
                    if let Some((id, _, _)) = p.exchange.take() {
                        self.exchanges.remove(&id);
                    }
                }
                // Its site may have changed: the path follows.
                self.choose_path(vip, &mut out);
                record_changed || addresses_changed
            }
            None => {
                let mut peer = Peer::new(member.clone(), None);
                peer.present_on.insert(broker.to_string());
                peer.info = info.site;
                // The previous agent of this instance authenticated this
                // member: its session (real address, tag key) is in the
                // pinned map, and the member still uses it.
                if let Some(path) = inherited.filter(|p| p.state == PEER_READY) {
                    let real = Ipv4Addr::from(path.real);
                    info!(name = member.name, %vip, %real, "took over the authenticated path of the previous agent");
                    peer.session = Some(Established {
                        session: Session {
                            peer: vip,
                            peer_real: real,
                            local_real: self.me.real_ip,
                            tag_key: path.tag_key,
                        },
                        since: now,
                        traversed: path.flags & pvc_common::PATH_SOCKET_TRAVERSAL != 0,
                    });
                    self.routed.insert(vip);
                    out.push(Effect::Route { vip, real });
                }
                let adopted = peer.session.is_some();
                self.peers.insert(vip, peer);
                self.choose_path(vip, &mut out);
                !adopted
            }
        };
        if changed {
            self.publish_member(vip, &mut out);
            self.recompile_policy(&mut out);
        }
        out
    }

    /// A member's session with `broker` ended. `clean`: it said it leaves,
    /// and is forgotten at once; otherwise (a crash, a cut from that broker
    /// but not from us) it stays while another broker lists it, and its
    /// flows keep working for the grace period if none does.
    pub fn left(&mut self, broker: &str, vip: Ipv4Addr, clean: bool, now: Instant) -> Vec<Effect> {
        let mut out = Vec::new();
        if clean {
            if self.peers.contains_key(&vip) {
                info!(%vip, "member left");
                self.forget(vip, false, &mut out);
            }
        } else if let Some(p) = self.peers.get_mut(&vip) {
            if p.last_via.as_deref() == Some(broker) {
                p.last_via = None;
            }
            if p.present_on.remove(broker) && p.present_on.is_empty() {
                info!(%vip, "member lost its broker sessions; keeping its path for {:?}", self.limits.absence_grace);
                p.absent_since.get_or_insert(now);
            }
        }
        out
    }

    /// Names for the virtual DNS: every member whose record verified, and
    /// this host once admitted.
    pub fn member_names(&self) -> std::collections::BTreeMap<String, Ipv4Addr> {
        self.peers
            .values()
            .map(|p| &p.member)
            .chain(self.own.as_ref())
            .filter_map(|m| Some((pvc_proto::dns::label(&m.name)?, m.virtual_ip)))
            .collect()
    }

    /// Whether this host is still a member (`STANDING_*`), by what the
    /// master signed: its own record's expiry and the revocation list.
    pub fn standing(&self, unix_now: u64) -> u8 {
        match &self.own {
            Some(o) if self.trust.is_revoked(o.serial) => pvc_common::STANDING_REVOKED,
            Some(o) if o.not_after <= unix_now => pvc_common::STANDING_EXPIRED,
            _ => pvc_common::STANDING_MEMBER,
        }
    }

    /// A newer revocation list: revoked members are forgotten and their
    /// established flows cut.
    pub fn revocations(&mut self, signed: &SignedRevocations) -> Vec<Effect> {
        let mut out = Vec::new();
        match self.trust.update_revocations(signed) {
            Ok(true) => {
                let list = &self.trust.revocations;
                info!(
                    version = list.version,
                    revoked = list.serials.len(),
                    "revocation list updated"
                );
                if self
                    .own
                    .as_ref()
                    .is_some_and(|o| self.trust.is_revoked(o.serial))
                {
                    error!(
                        "the master revoked this host's own membership: no member will accept it any more"
                    );
                }
                let revoked: Vec<(Ipv4Addr, String)> = self
                    .peers
                    .values()
                    .filter(|p| self.trust.is_revoked(p.member.serial))
                    .map(|p| (p.member.virtual_ip, p.member.name.clone()))
                    .collect();
                for (vip, name) in revoked {
                    warn!(name, %vip, "member revoked by the master: refusing its flows and cutting established ones");
                    self.forget(vip, true, &mut out);
                }
            }
            Ok(false) => {}
            Err(e) => warn!("ignoring a revocation list the broker relayed: {e}"),
        }
        out
    }

    /// A newer global policy.
    pub fn global_policy(&mut self, signed: &SignedPolicy) -> Vec<Effect> {
        let mut out = Vec::new();
        match self.trust.update_policy(signed) {
            Ok(true) => {
                info!(
                    version = self.trust.policy.version,
                    rules = self.trust.policy.rules.len(),
                    "global policy updated"
                );
                self.recompile_policy(&mut out);
            }
            Ok(false) => {}
            Err(e) => warn!("ignoring a global policy the broker relayed: {e}"),
        }
        out
    }
}
