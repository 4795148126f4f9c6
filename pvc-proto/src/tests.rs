use bytes::BytesMut;
use proptest::prelude::*;

use super::*;

fn member(name: &str, last: u8) -> Member {
    Member {
        name: name.into(),
        virtual_ip: Ipv4Addr::new(240, 0, 0, last),
        addresses: vec![Ipv4Addr::new(198, 18, 0, last)],
    }
}

fn registration() -> Registration {
    Registration {
        cluster: "lab".into(),
        member: member("alpha", 1),
        software: "pvc-agent test".into(),
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
    buf.extend_from_slice(b"PVC\x01");
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
    let members: Vec<Member> = (0..1200)
        .map(|i| Member {
            name: format!("{:a>63}", i),
            virtual_ip: Ipv4Addr::new(240, 1, (i / 256) as u8, (i % 256) as u8),
            addresses: vec![Ipv4Addr::new(198, 18, 0, 1); 16],
        })
        .collect();
    let chunks = member_chunks(&members);
    assert_eq!(chunks.iter().map(Vec::len).sum::<usize>(), 1200);
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
    assert_eq!(member_chunks(&[]), vec![Vec::<Member>::new()]);
}

#[test]
fn registration_rules() {
    assert!(registration().validate().is_ok());
    let mut r = registration();
    r.member.name = "Alpha".into();
    assert!(matches!(
        r.validate(),
        Err(InvalidRegistration::Name { .. })
    ));
    let mut r = registration();
    r.cluster = "-lab".into();
    assert!(matches!(
        r.validate(),
        Err(InvalidRegistration::Name { .. })
    ));
    let mut r = registration();
    r.member.virtual_ip = Ipv4Addr::new(10, 0, 0, 1);
    assert!(matches!(
        r.validate(),
        Err(InvalidRegistration::VirtualAddress(_))
    ));
    let mut r = registration();
    r.member.virtual_ip = Ipv4Addr::new(240, 0, 0, 0);
    assert!(matches!(
        r.validate(),
        Err(InvalidRegistration::VirtualAddress(_))
    ));
    let mut r = registration();
    r.member.addresses = vec![];
    assert_eq!(r.validate(), Err(InvalidRegistration::NoAddress));
    let mut r = registration();
    r.member.addresses = vec![Ipv4Addr::new(240, 0, 0, 9)];
    assert!(matches!(
        r.validate(),
        Err(InvalidRegistration::RealAddress(_))
    ));
    let mut r = registration();
    r.member.addresses = vec![Ipv4Addr::new(198, 18, 0, 1); 17];
    assert_eq!(r.validate(), Err(InvalidRegistration::TooManyAddresses(17)));
    assert!(valid_name("a-1"));
    assert!(!valid_name(&"a".repeat(64)));
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
        buf.extend_from_slice(b"PVC\x01");
        buf.extend_from_slice(&(body.len() as u32).to_be_bytes());
        buf.extend_from_slice(&body);
        let _ = BrokerCodec::default().decode(&mut buf.clone());
        let _ = AgentCodec::default().decode(&mut buf);
    }
}
