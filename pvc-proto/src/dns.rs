//! The virtual DNS's answers (paper §4.2: "a virtual DNS, configurable by
//! the PVC members"): `NAME.DOMAIN` is the virtual address of the member
//! the master admitted as NAME. The agent serves them from the records it
//! verified; this is the wire side, pure, so that it can be fuzzed.

use std::{collections::BTreeMap, net::Ipv4Addr};

use simple_dns::{
    CLASS, Name, OPCODE, Packet, PacketFlag, QTYPE, RCODE, ResourceRecord, TYPE, rdata::RData,
};

/// Answers are short-lived: a revoked member must disappear quickly from
/// caches too.
pub const TTL_SECS: u32 = 5;

/// The answer to one DNS message, or `None` when it deserves none (not a
/// query, or too short to carry an id to answer to).
///
/// `names` maps lowercase member names to virtual addresses; `domain` is
/// lowercase, without dots at either end. Names under the domain that no
/// member holds are NXDOMAIN; names outside it are REFUSED (this server is
/// no resolver).
pub fn answer(query: &[u8], domain: &str, names: &BTreeMap<String, Ipv4Addr>) -> Option<Vec<u8>> {
    let packet = match Packet::parse(query) {
        Ok(p) => p,
        Err(_) => return error_reply(query, RCODE::FormatError),
    };
    if packet.has_flags(PacketFlag::RESPONSE) {
        return None;
    }
    let mut reply = Packet::new_reply(packet.id());
    reply.set_flags(PacketFlag::AUTHORITATIVE_ANSWER);
    if packet.has_flags(PacketFlag::RECURSION_DESIRED) {
        reply.set_flags(PacketFlag::RECURSION_DESIRED);
    }
    if packet.opcode() != OPCODE::StandardQuery {
        *reply.rcode_mut() = RCODE::NotImplemented;
        return reply.build_bytes_vec().ok();
    }
    let [question] = packet.questions.as_slice() else {
        *reply.rcode_mut() = RCODE::FormatError;
        return reply.build_bytes_vec().ok();
    };
    reply.questions.push(question.clone());
    let asked = question.qname.to_string().to_ascii_lowercase();
    let asked = asked.trim_end_matches('.');
    let member = if asked == domain {
        // The domain itself exists, with no address.
        None
    } else if let Some(label) = asked
        .strip_suffix(domain)
        .and_then(|l| l.strip_suffix('.'))
        .filter(|l| !l.is_empty() && !l.contains('.'))
    {
        match names.get(label) {
            Some(vip) => Some(*vip),
            None => {
                *reply.rcode_mut() = RCODE::NameError;
                return reply.build_bytes_vec().ok();
            }
        }
    } else if asked.ends_with(&format!(".{domain}")) {
        // Deeper than a member's name: nothing there.
        *reply.rcode_mut() = RCODE::NameError;
        return reply.build_bytes_vec().ok();
    } else {
        *reply.rcode_mut() = RCODE::Refused;
        return reply.build_bytes_vec().ok();
    };
    let wants_a = matches!(question.qtype, QTYPE::TYPE(TYPE::A) | QTYPE::ANY);
    if let (Some(vip), true) = (member, wants_a) {
        reply.answers.push(ResourceRecord::new(
            question.qname.clone(),
            CLASS::IN,
            TTL_SECS,
            RData::A(vip.into()),
        ));
    }
    // Any other type of a member's name: no data (NOERROR, no answer).
    reply.build_bytes_vec().ok()
}

/// An error answer to a message that did not parse, if it has an id.
fn error_reply(query: &[u8], rcode: RCODE) -> Option<Vec<u8>> {
    let id = u16::from_be_bytes([*query.first()?, *query.get(1)?]);
    // Replies to replies would let two servers bounce garbage forever.
    if query.get(2).is_some_and(|flags| flags & 0x80 != 0) {
        return None;
    }
    let mut reply = Packet::new_reply(id);
    *reply.rcode_mut() = rcode;
    reply.build_bytes_vec().ok()
}

/// A member's name as DNS compares it; `None` if it cannot be one label.
pub fn label(name: &str) -> Option<String> {
    let l = name.to_ascii_lowercase();
    (Name::new(&l).is_ok() && !l.is_empty() && !l.contains('.') && l.len() <= 63).then_some(l)
}

#[cfg(test)]
mod tests {
    use super::*;
    use simple_dns::Question;

    fn names() -> BTreeMap<String, Ipv4Addr> {
        [("node1".to_string(), Ipv4Addr::new(240, 0, 0, 7))].into()
    }

    struct Reply {
        id: u16,
        rcode: RCODE,
        authoritative: bool,
        answers: Vec<(Ipv4Addr, u32)>,
    }

    fn ask(name: &str, qtype: TYPE) -> Reply {
        let mut q = Packet::new_query(0x1234);
        q.set_flags(PacketFlag::RECURSION_DESIRED);
        q.questions.push(Question::new(
            Name::new_unchecked(name),
            QTYPE::TYPE(qtype),
            simple_dns::QCLASS::CLASS(CLASS::IN),
            false,
        ));
        let bytes = q.build_bytes_vec().unwrap();
        let out = answer(&bytes, "pvc", &names()).expect("an answer");
        let p = Packet::parse(&out).unwrap();
        Reply {
            id: p.id(),
            rcode: p.rcode(),
            authoritative: p.has_flags(PacketFlag::AUTHORITATIVE_ANSWER),
            answers: p
                .answers
                .iter()
                .map(|r| match &r.rdata {
                    RData::A(a) => (Ipv4Addr::from(a.address), r.ttl),
                    other => panic!("{other:?}"),
                })
                .collect(),
        }
    }

    #[test]
    fn a_members_name_is_its_virtual_address_in_any_case() {
        for name in ["node1.pvc", "NODE1.Pvc."] {
            let r = ask(name, TYPE::A);
            assert_eq!(r.id, 0x1234);
            assert_eq!(r.rcode, RCODE::NoError);
            assert!(r.authoritative);
            assert_eq!(r.answers, vec![(Ipv4Addr::new(240, 0, 0, 7), TTL_SECS)]);
        }
    }

    #[test]
    fn other_types_unknown_names_and_other_domains() {
        let aaaa = ask("node1.pvc", TYPE::AAAA);
        assert_eq!(aaaa.rcode, RCODE::NoError);
        assert!(aaaa.answers.is_empty());
        assert_eq!(ask("nobody.pvc", TYPE::A).rcode, RCODE::NameError);
        assert_eq!(ask("x.node1.pvc", TYPE::A).rcode, RCODE::NameError);
        assert_eq!(ask("pvc", TYPE::A).rcode, RCODE::NoError);
        assert_eq!(ask("example.org", TYPE::A).rcode, RCODE::Refused);
        assert_eq!(ask("node1.pvcx", TYPE::A).rcode, RCODE::Refused);
    }

    #[test]
    fn garbage_gets_a_format_error_or_nothing() {
        let r = answer(&[0xab, 0xcd, 0x01, 0x00, 0xff], "pvc", &names()).unwrap();
        let p = Packet::parse(&r).unwrap();
        assert_eq!((p.id(), p.rcode()), (0xabcd, RCODE::FormatError));
        assert!(answer(&[0x01], "pvc", &names()).is_none());
        // A response is never answered.
        assert!(answer(&[0xab, 0xcd, 0x81, 0x00, 0xff], "pvc", &names()).is_none());
    }

    #[test]
    fn labels_are_lowercase_single_labels() {
        assert_eq!(label("Node1").as_deref(), Some("node1"));
        assert_eq!(label("a.b"), None);
        assert_eq!(label(""), None);
    }
}
