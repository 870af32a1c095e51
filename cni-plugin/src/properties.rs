//! Property tests of the parsers a runtime feeds: the network configuration on stdin and
//! the `CNI_*` variables with `CNI_ARGS`. Whatever the input, the answer is a value or a
//! CNI error with a spec code and a message, never a panic.

use std::collections::HashMap;
use std::ffi::OsString;

use proptest::prelude::*;
use serde_json::{Map, Value, json};

use crate::error::{CniError, Error};
use crate::{config, env};

/// Any JSON value, a few levels deep, with object keys drawn from `keys`: edge numbers and
/// strings that look like what the configuration's keys want among the leaves. (The fuzz
/// targets use it too.)
pub(crate) fn json_value_under(keys: BoxedStrategy<String>) -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        prop_oneof![
            Just(0u64),
            Just(u64::from(u32::MAX)),
            Just(u64::MAX),
            Just(1 << 53),
        ]
        .prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        ".{0,16}".prop_map(Value::from),
        prop_oneof![
            Just("1.1.0"),
            Just("0.3.0"),
            Just("0.4.0"),
            Just("fd00::1"),
            Just("10.1.2.3/24"),
            Just("10.1.2.3/33"),
            Just("fd00::1/129"),
            Just("02:00:00:00:00:01"),
            Just("ff:ff:ff:ff:ff:ff"),
            Just("host-local"),
            Just("TCP"),
            Just("http"),
            Just("../x"),
            Just(""),
        ]
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(keys.clone(), inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Any JSON value, a few levels deep, under the keys the parser looks at and others.
fn json_value() -> impl Strategy<Value = Value> {
    json_value_under(key().boxed())
}

/// The keys the parser looks at, and others.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        prop_oneof![
            Just("cniVersion"),
            Just("name"),
            Just("type"),
            Just("agentSocket"),
            Just("mtu"),
            Just("prevResult"),
            Just("ipam"),
            Just("runtimeConfig"),
            Just("ips"),
            Just("mac"),
            Just("bandwidth"),
            Just("ingressRate"),
            Just("args"),
            Just("cni"),
            Just("labels"),
            Just("key"),
            Just("value"),
            Just("namedPorts"),
            Just("port"),
            Just("protocol"),
            Just("disableCheck"),
            Just("disableGC"),
            Just("cni.dev/valid-attachments"),
            Just("cni.dev/attachments"),
            Just("containerID"),
            Just("ifname"),
        ]
        .prop_map(str::to_owned),
        "[a-zA-Z]{1,8}",
    ]
}

/// A configuration that is valid at the top, with arbitrary values under known keys.
fn near_valid_conf() -> impl Strategy<Value = Value> {
    prop::collection::btree_map(key(), json_value(), 0..6).prop_map(|extra| {
        let mut obj: Map<String, Value> = extra.into_iter().collect();
        obj.insert("cniVersion".into(), json!("1.1.0"));
        obj.insert("name".into(), json!("n"));
        Value::Object(obj)
    })
}

fn assert_cni_error(e: Error) {
    let e = CniError::from(e);
    assert!(
        matches!(e.code, 1..=7 | 11 | 50 | 51 | 100..),
        "code {} is not a spec code: {}",
        e.code,
        e.msg
    );
    assert!(!e.msg.is_empty());
}

proptest! {
    #[test]
    fn any_bytes_parse_or_fail_cleanly(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        if let Err(e) = config::parse(&bytes) {
            assert_cni_error(e.into());
        }
        let _ = config::version_hint(&bytes);
    }

    #[test]
    fn any_json_parses_or_fails_cleanly(v in json_value()) {
        if let Err(e) = config::parse(v.to_string().as_bytes()) {
            assert_cni_error(e.into());
        }
    }

    #[test]
    fn any_values_under_known_keys_parse_or_fail_cleanly(v in near_valid_conf()) {
        match config::parse(v.to_string().as_bytes()) {
            Ok(conf) => prop_assert_eq!(conf.raw.len(), v.as_object().map_or(0, Map::len)),
            Err(e) => assert_cni_error(e.into()),
        }
    }

    #[test]
    fn any_cni_args_parse_or_fail_cleanly(args in "[A-Za-z0-9_=;./ -]{0,64}") {
        match env::parse_args(&args) {
            Ok(_) => {}
            Err(e) => {
                prop_assert!(e.to_string().starts_with("CNI_ARGS"), "{}", e);
                assert_cni_error(e.into());
            }
        }
    }

    #[test]
    fn any_environment_parses_or_fails_cleanly(
        vars in prop::collection::hash_map(
            prop_oneof![
                Just("CNI_COMMAND".to_owned()), Just("CNI_CONTAINERID".to_owned()),
                Just("CNI_NETNS".to_owned()), Just("CNI_IFNAME".to_owned()),
                Just("CNI_ARGS".to_owned()), Just("CNI_PATH".to_owned()),
            ],
            prop_oneof![
                Just("ADD".to_owned()), Just("DEL".to_owned()), Just("CHECK".to_owned()),
                Just("GC".to_owned()), Just("STATUS".to_owned()), ".{0,20}",
            ],
            0..6,
        )
    ) {
        let map: HashMap<String, OsString> =
            vars.into_iter().map(|(k, v)| (k, OsString::from(v))).collect();
        if let Err(e) = env::parse(&|k| map.get(k).cloned()) {
            assert_cni_error(e.into());
        }
    }
}
