//! The wire protocol's cases: parsing, encoding, and the documented tables.

use super::*;
use crate::product::{Action, Change, Product, ResetCause};

fn id(raw: i64) -> ProductId {
    ProductId::new(raw).unwrap()
}

#[test]
fn parses_subscribe_and_unsubscribe_with_deduplicated_ids() {
    assert_eq!(
        ClientCommand::parse(r#"{"command":"subscribe","productIDs":[0,1]}"#).unwrap(),
        ClientCommand::Subscribe(
            vec![id(0), id(1)],
            SubscriptionStart::Live,
            Versions::Latest,
            false
        ),
        "0 never exists but may be subscribed to"
    );
    assert_eq!(
        ClientCommand::parse(r#"{"command":"subscribe","productIDs":[3,1,3]}"#).unwrap(),
        ClientCommand::Subscribe(
            vec![id(3), id(1)],
            SubscriptionStart::Live,
            Versions::Latest,
            false
        )
    );
    assert_eq!(
        ClientCommand::parse(r#"{"productIDs":[],"command":"unsubscribe"}"#).unwrap(),
        ClientCommand::Unsubscribe(vec![])
    );
    assert_eq!(
        ClientCommand::parse(r#"{"command":"subscribe","productIDs":[1],"since":41}"#).unwrap(),
        ClientCommand::Subscribe(
            vec![id(1)],
            SubscriptionStart::Since(41),
            Versions::Latest,
            false
        )
    );
    assert_eq!(
        ClientCommand::parse(r#"{"command":"subscribe","productIDs":[1],"snapshot":true}"#)
            .unwrap(),
        ClientCommand::Subscribe(
            vec![id(1)],
            SubscriptionStart::Snapshot,
            Versions::Latest,
            false
        )
    );
    assert_eq!(
        ClientCommand::parse(r#"{"command":"subscribe","productIDs":[1],"delivery":"all"}"#)
            .unwrap(),
        ClientCommand::Subscribe(vec![id(1)], SubscriptionStart::Live, Versions::All, false)
    );
    let bad = ClientCommand::parse(r#"{"command":"subscribe","productIDs":[1],"delivery":"some"}"#)
        .unwrap_err();
    assert!(bad.message.contains("delivery"), "{bad}");
}

#[test]
fn parses_subscribe_all_and_presence() {
    let parse = |text: &str| ClientCommand::parse(text);
    assert_eq!(
        parse(r#"{"command":"subscribe","all":true}"#).unwrap(),
        ClientCommand::SubscribeAll(SubscriptionStart::Live, Versions::Latest)
    );
    assert_eq!(
        parse(r#"{"command":"subscribe","all":true,"since":7,"delivery":"all"}"#).unwrap(),
        ClientCommand::SubscribeAll(SubscriptionStart::Since(7), Versions::All)
    );
    assert_eq!(
        parse(r#"{"command":"subscribe","all":true,"snapshot":true}"#).unwrap(),
        ClientCommand::SubscribeAll(SubscriptionStart::Snapshot, Versions::Latest)
    );
    assert_eq!(
        parse(r#"{"command":"unsubscribe","all":true}"#).unwrap(),
        ClientCommand::UnsubscribeAll
    );
    assert_eq!(
        parse(r#"{"command":"subscribe","productIDs":[2],"all":false,"presence":true}"#).unwrap(),
        ClientCommand::Subscribe(vec![id(2)], SubscriptionStart::Live, Versions::Latest, true)
    );
    for (frame, says) in [
        (
            r#"{"command":"subscribe","all":1}"#,
            "`all` must be true or false",
        ),
        (
            r#"{"command":"subscribe","all":true,"productIDs":[1]}"#,
            "not both",
        ),
        (
            r#"{"command":"subscribe","all":true,"presence":true}"#,
            "by-id subscribe",
        ),
        (
            r#"{"command":"subscribe","productIDs":[1],"presence":"yes"}"#,
            "`presence` must be",
        ),
        (r#"{"command":"subscribe"}"#, "`\"all\":true`"),
    ] {
        let err = parse(frame).unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidCommand, "{frame}");
        assert!(err.message.contains(says), "{frame}: {}", err.message);
    }
}

#[test]
fn the_fast_path_agrees_with_the_general_parser() {
    let frames = [
        r#"{"command":"subscribe","productIDs":[0,1,2]}"#,
        r#"{"productIDs":[5,4,5,4],"command":"unsubscribe"}"#,
        r#"{"command":"subscribe","productIDs":[]}"#,
        r#"{"command":"subscribe","productIDs":[9007199254740991]}"#,
        r#"{"command":"subscribe","productIDs":[9007199254740992]}"#,
        r#"{"command":"subscribe","productIDs":[-1]}"#,
        r#"{"command":"subscribe","productIDs":[1.0]}"#,
        r#"{"command":"subscribe","productIDs":[18446744073709551616]}"#,
        r#"{"command":"subscribe","command":"unsubscribe","productIDs":[1]}"#,
        r#"{"command":"subscribe","productIDs":[1],"since":3}"#,
        r#"{"command":"subscribe","productIDs":[1],"extra":3}"#,
        r#"{"command":"Subscribe","productIDs":[1]}"#,
        r#"{"command":"subscribe","productIDs":"1"}"#,
    ];
    for frame in frames {
        assert_eq!(
            ClientCommand::parse(frame),
            ClientCommand::parse_general(frame),
            "{frame}"
        );
    }
    let many: Vec<String> = (0..1024).rev().map(|n| (n % 700).to_string()).collect();
    let frame = format!(
        r#"{{"command":"subscribe","productIDs":[{}]}}"#,
        many.join(",")
    );
    assert_eq!(
        ClientCommand::parse(&frame),
        ClientCommand::parse_general(&frame)
    );
}

#[test]
fn each_bad_frame_gets_its_own_code() {
    for (frame, code) in [
        ("{nope", ErrorCode::MalformedJson),
        ("[1]", ErrorCode::UnknownCommand),
        (r#"{"productIDs":[1]}"#, ErrorCode::UnknownCommand),
        (
            r#"{"command":"publish","productIDs":[1]}"#,
            ErrorCode::UnknownCommand,
        ),
        (
            r#"{"command":7,"productIDs":[1]}"#,
            ErrorCode::UnknownCommand,
        ),
        (r#"{"command":"subscribe"}"#, ErrorCode::InvalidCommand),
        (
            r#"{"command":"subscribe","productIDs":1}"#,
            ErrorCode::InvalidCommand,
        ),
        (
            r#"{"command":"subscribe","productIDs":[1],"x":1}"#,
            ErrorCode::InvalidCommand,
        ),
        (
            r#"{"command":"subscribe","productIDs":[1.5]}"#,
            ErrorCode::InvalidProductId,
        ),
        (
            r#"{"command":"subscribe","productIDs":["1"]}"#,
            ErrorCode::InvalidProductId,
        ),
        (
            r#"{"command":"subscribe","productIDs":[-1]}"#,
            ErrorCode::InvalidProductId,
        ),
        (
            r#"{"command":"subscribe","productIDs":[9223372036854775808]}"#,
            ErrorCode::InvalidProductId,
        ),
        (
            r#"{"command":"subscribe","productIDs":[1],"since":-1}"#,
            ErrorCode::InvalidCommand,
        ),
        (
            r#"{"command":"subscribe","productIDs":[1],"since":"5"}"#,
            ErrorCode::InvalidCommand,
        ),
        (
            r#"{"command":"subscribe","productIDs":[1],"snapshot":1}"#,
            ErrorCode::InvalidCommand,
        ),
        (
            r#"{"command":"subscribe","productIDs":[1],"since":1,"snapshot":true}"#,
            ErrorCode::InvalidCommand,
        ),
        (
            r#"{"command":"unsubscribe","productIDs":[1],"since":1}"#,
            ErrorCode::InvalidCommand,
        ),
    ] {
        assert_eq!(
            ClientCommand::parse(frame).unwrap_err().code,
            code,
            "{frame}"
        );
    }
}

#[test]
fn encodes_messages_in_the_documented_shape() {
    let change = Change {
        seq: 12,
        action: Action::Update,
        product: Product {
            product_id: id(1),
            manufacturer: "A".into(),
            price_per_unit: "1.00".into(),
            units_available: 2,
            product_name: "\"B\"".into(),
        },
    };
    assert_eq!(
        encode_change(&change),
        r#"{"type":"change","seq":12,"action":"UPDATE","product":{"productId":1,"manufacturer":"A","pricePerUnit":"1.00","unitsAvailable":2,"productName":"\"B\""}}"#
    );
    assert_eq!(
        encode_ack(&[id(1), id(2)], Some(12)),
        r#"{"type":"subscribed","productIDs":[1,2],"seq":12}"#
    );
    assert_eq!(
        encode_ack(&[id(2)], None),
        r#"{"type":"unsubscribed","productIDs":[2]}"#
    );
    assert_eq!(
        encode_snapshot(12, std::slice::from_ref(&change.product), &[id(5)]),
        r#"{"type":"snapshot","seq":12,"products":[{"productId":1,"manufacturer":"A","pricePerUnit":"1.00","unitsAvailable":2,"productName":"\"B\""}],"missing":[5]}"#
    );
    assert!(
        encode_reset(&[id(1)], 3, ResetCause::Pruned { pruned_through: 9 }).starts_with(
            r#"{"type":"reset","productIDs":[1],"since":3,"reason":"pruned","prunedThrough":9,"message":"#
        )
    );
    assert!(
        encode_reset(&[id(1)], 30, ResetCause::Rewound { latest: 9 }).starts_with(
            r#"{"type":"reset","productIDs":[1],"since":30,"reason":"rewound","latest":9,"message":"#
        )
    );
    let conflated = encode_conflated_change(&change);
    let mut plain: Value = serde_json::from_str(&encode_change(&change)).unwrap();
    plain["conflated"] = Value::Bool(true);
    assert_eq!(serde_json::from_str::<Value>(&conflated).unwrap(), plain);
    assert!(conflated.ends_with(r#","conflated":true}"#), "{conflated}");
    assert_eq!(
        encode_error(ErrorCode::BinaryFrame, "y"),
        r#"{"type":"error","error":"binary_frame","message":"y"}"#
    );
}

#[test]
fn encodes_whole_catalog_and_presence_messages() {
    let json = |text: String| serde_json::from_str::<serde_json::Value>(&text).unwrap();
    assert_eq!(
        json(encode_all_ack(Some(4))),
        serde_json::json!({"type":"subscribed","all":true,"seq":4})
    );
    assert_eq!(
        json(encode_all_ack(None)),
        serde_json::json!({"type":"unsubscribed","all":true})
    );
    assert_eq!(
        json(encode_all_snapshot_page(9, &[], true)),
        serde_json::json!({"type":"snapshot","all":true,"seq":9,"products":[],"more":true})
    );
    assert_eq!(
        json(encode_presence(id(3), 2)),
        serde_json::json!({"type":"presence","productId":3,"watchers":2})
    );
    let reset = json(encode_all_reset(
        5,
        ResetCause::Pruned { pruned_through: 8 },
    ));
    assert_eq!(reset["all"], true);
    assert!(reset.get("productIDs").is_none());
    let by_id = json(encode_reset(&[id(1)], 5, ResetCause::Rewound { latest: 2 }));
    assert!(by_id.get("all").is_none());
    assert_eq!(by_id["productIDs"], serde_json::json!([1]));
}

#[test]
fn the_protocol_document_lists_exactly_the_codes_of_the_tables() {
    let doc = include_str!("../../docs/protocol.md");
    let documented_close: Vec<u16> = doc
        .lines()
        .filter_map(|line| line.strip_prefix("| 10"))
        .filter_map(|rest| rest.get(..2).and_then(|tail| tail.parse::<u16>().ok()))
        .map(|tail| 1000 + tail)
        .collect();
    let ours: Vec<u16> = CloseCode::ALL.iter().map(|code| code.code()).collect();
    assert_eq!(documented_close, ours, "close codes in docs/protocol.md");

    let codes_line = doc
        .lines()
        .skip_while(|line| !line.starts_with("Codes:"))
        .take_while(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    let documented_errors: Vec<&str> = codes_line.split('`').skip(1).step_by(2).collect();
    let ours: Vec<&str> = ErrorCode::ALL.iter().map(|code| code.as_str()).collect();
    assert_eq!(documented_errors, ours, "error codes in docs/protocol.md");
}
