use bytes::BytesMut;
use proptest::prelude::*;
use ring::{rand::SystemRandom, signature::Ed25519KeyPair};

use super::*;

fn keypair() -> Ed25519KeyPair {
    let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
    Ed25519KeyPair::from_pkcs8(doc.as_ref()).unwrap()
}

fn registration() -> Registration {
    Registration::new(
        ClusterId([3; 16]),
        &keypair(),
        vec![Ipv4Addr::new(198, 18, 0, 1)],
        "pvc-agent test".into(),
    )
}

fn member_info(master: &Ed25519KeyPair, i: u32) -> MemberInfo {
    let record = MembershipRecord {
        cluster: ClusterId::of(&PublicKey::of(master)),
        serial: i as u64,
        name: format!("{:a>63}", i),
        virtual_ip: Ipv4Addr::from(0xf000_0000 + i),
        host_key: PublicKey([i as u8; 32]),
        groups: vec!["g".repeat(63); 4],
        not_before: 0,
        not_after: u64::MAX,
    };
    MemberInfo {
        record: SignedRecord::sign(&record, master),
        addresses: vec![Ipv4Addr::new(198, 18, 0, 1); 16],
        observed: None,
        site: Default::default(),
    }
}

fn encode(msg: AgentMessage) -> BytesMut {
    let mut buf = BytesMut::new();
    AgentCodec::default().encode(msg, &mut buf).unwrap();
    buf
}

#[test]
fn frames_round_trip_even_when_split_anywhere() {
    let msg = AgentMessage::Register(registration());
    let wire = encode(msg.clone());
    for split in 0..wire.len() {
        let mut codec = BrokerCodec::default();
        let mut buf = BytesMut::from(&wire[..split]);
        assert_eq!(codec.decode(&mut buf).unwrap(), None, "split at {split}");
        buf.extend_from_slice(&wire[split..]);
        assert_eq!(codec.decode(&mut buf).unwrap(), Some(msg.clone()));
        assert!(buf.is_empty());
    }
}

#[test]
fn two_frames_in_one_read() {
    let mut wire = encode(AgentMessage::Ping { nonce: 1 });
    wire.extend_from_slice(&encode(AgentMessage::Ping { nonce: 2 }));
    let mut codec = BrokerCodec::default();
    assert_eq!(
        codec.decode(&mut wire).unwrap(),
        Some(AgentMessage::Ping { nonce: 1 })
    );
    assert_eq!(
        codec.decode(&mut wire).unwrap(),
        Some(AgentMessage::Ping { nonce: 2 })
    );
    assert_eq!(codec.decode(&mut wire).unwrap(), None);
}

#[test]
fn a_stranger_is_rejected_on_its_first_bytes() {
    let mut buf = BytesMut::from(&b"GE"[..]);
    let err = BrokerCodec::default().decode(&mut buf).unwrap_err();
    assert!(matches!(err, FrameError::BadMagic(_)), "{err}");
    assert_eq!(err.code(), ErrorCode::MalformedFrame);
}

#[test]
fn another_version_is_named_in_the_error() {
    let mut wire = encode(AgentMessage::Ping { nonce: 1 });
    wire[3] = 9;
    let err = BrokerCodec::default().decode(&mut wire).unwrap_err();
    assert!(err.to_string().contains("version 9"), "{err}");
    assert_eq!(err.code(), ErrorCode::UnsupportedVersion);
}

#[test]
fn an_oversized_frame_is_refused_from_its_header() {
    let mut buf = BytesMut::new();
    buf.extend_from_slice(&[b'P', b'V', b'C', VERSION]);
    buf.extend_from_slice(&((MAX_BODY as u32) + 1).to_be_bytes());
    let err = BrokerCodec::default().decode(&mut buf).unwrap_err();
    assert!(matches!(err, FrameError::TooLarge { .. }), "{err}");
    assert_eq!(err.code(), ErrorCode::FrameTooLarge);
}

#[test]
fn trailing_bytes_in_a_body_are_malformed() {
    let mut wire = encode(AgentMessage::Ping { nonce: 1 });
    wire.extend_from_slice(&[0]);
    let len = u32::from_be_bytes([wire[4], wire[5], wire[6], wire[7]]) + 1;
    wire[4..8].copy_from_slice(&len.to_be_bytes());
    let err = BrokerCodec::default().decode(&mut wire).unwrap_err();
    assert!(matches!(err, FrameError::Malformed(_)), "{err}");
}

#[test]
fn member_lists_are_chunked_to_fit_frames() {
    let master = keypair();
    let members: Vec<MemberInfo> = (0..700).map(|i| member_info(&master, i)).collect();
    let chunks = member_chunks(&members);
    assert!(chunks.len() > 1);
    assert_eq!(chunks.iter().map(Vec::len).sum::<usize>(), 700);
    for chunk in chunks {
        let mut buf = BytesMut::new();
        BrokerCodec::default()
            .encode(
                BrokerMessage::Members {
                    members: chunk,
                    more: true,
                },
                &mut buf,
            )
            .expect("a chunk fits in one frame");
    }
    assert_eq!(member_chunks(&[]), vec![Vec::<MemberInfo>::new()]);
}

#[test]
fn registrations_prove_the_host_key() {
    let now = unix_now();
    let r = registration();
    assert_eq!(r.validate(now), Ok(()));
    // Another key cannot claim this one's registration.
    let mut stolen = r.clone();
    stolen.host_key = PublicKey::of(&keypair());
    assert_eq!(stolen.validate(now), Err(InvalidRegistration::BadProof));
    // Nor can the addresses be changed in transit.
    let mut moved = r.clone();
    moved.addresses = vec![Ipv4Addr::new(198, 18, 9, 9)];
    assert_eq!(moved.validate(now), Err(InvalidRegistration::BadProof));
    // An old registration does not replay.
    assert!(matches!(
        r.validate(now + 3600),
        Err(InvalidRegistration::Clock(_))
    ));
    let key = keypair();
    let none = Registration::new(ClusterId([3; 16]), &key, vec![], String::new());
    assert_eq!(none.validate(now), Err(InvalidRegistration::NoAddress));
    let virt = Registration::new(
        ClusterId([3; 16]),
        &key,
        vec![Ipv4Addr::new(240, 0, 0, 9)],
        String::new(),
    );
    assert!(matches!(
        virt.validate(now),
        Err(InvalidRegistration::RealAddress(_))
    ));
    let many = Registration::new(
        ClusterId([3; 16]),
        &key,
        vec![Ipv4Addr::new(198, 18, 0, 1); 17],
        String::new(),
    );
    assert_eq!(
        many.validate(now),
        Err(InvalidRegistration::TooManyAddresses(17))
    );
    assert!(valid_name("a-1"));
    assert!(!valid_name(&"a".repeat(64)));
    assert!(!valid_name("Alpha"));
}

#[test]
fn handshake_payloads_round_trip_and_reject_trailing_bytes() {
    use crate::handshake::{Confirm, Handshake};
    let h = Handshake::Confirm(Confirm {
        id: [1; 16],
        signature: vec![2; 64],
    });
    let mut bytes = h.encode();
    assert_eq!(Handshake::decode(&bytes), Some(h));
    bytes.push(0);
    assert_eq!(Handshake::decode(&bytes), None);
    assert_eq!(Handshake::decode(&[0xff; 3]), None);
}

proptest! {
    /// Whatever arrives, decoding returns a message, an error or "need more",
    /// and never panics or consumes more than it was given.
    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut buf = BytesMut::from(&data[..]);
        let mut codec = BrokerCodec::default();
        while let Ok(Some(_)) = codec.decode(&mut buf) {}
        let mut buf = BytesMut::from(&data[..]);
        let mut codec = AgentCodec::default();
        while let Ok(Some(_)) = codec.decode(&mut buf) {}
    }

    /// Valid headers with arbitrary bodies: the body decoder sees garbage.
    #[test]
    fn arbitrary_bodies_never_panic(body in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&[b'P', b'V', b'C', VERSION]);
        buf.extend_from_slice(&(body.len() as u32).to_be_bytes());
        buf.extend_from_slice(&body);
        let _ = BrokerCodec::default().decode(&mut buf.clone());
        let _ = AgentCodec::default().decode(&mut buf);
    }
}
