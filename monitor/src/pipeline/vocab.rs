//! The words of the product contract, defined once: who an owner is
//! (`Origin`), which IP protocol (`Proto`), which way a flow goes
//! (`Direction`), and, re-exported from where they are made, the payload
//! class (`Payload`, from the parsers) and the hook (`Hook`).
//!
//! Owners, rules, the flow table, metrics and the log all use these types;
//! JSON, rules files and metric labels see the same lowercase words
//! (`as_str`), which never change.

use monitor_common::{PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

pub(crate) use inspect::Payload;

/// Implements Display, string comparisons and string serde for a word type
/// with `as_str` and `parse`.
macro_rules! word {
    ($type:ty, $what:literal) => {
        impl fmt::Display for $type {
            fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(&self.as_str())
            }
        }
        impl PartialEq<str> for $type {
            fn eq(&self, other: &str) -> bool {
                self.as_str() == other
            }
        }
        impl PartialEq<&str> for $type {
            fn eq(&self, other: &&str) -> bool {
                self.as_str() == *other
            }
        }
        impl Serialize for $type {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.as_str())
            }
        }
        impl<'de> Deserialize<'de> for $type {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = String::deserialize(d)?;
                <$type>::parse(&text).ok_or_else(|| {
                    serde::de::Error::custom(format!(
                        "unknown {} {text:?}: {}",
                        $what,
                        <$type>::EXPECTED
                    ))
                })
            }
        }
    };
}

/// The owner classes of the product contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Origin {
    App,
    Preinstalled,
    Platform,
    User,
    System,
    Unknown,
}

impl Origin {
    const EXPECTED: &'static str = "app, preinstalled, platform, user, system or unknown";

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Origin::App => "app",
            Origin::Preinstalled => "preinstalled",
            Origin::Platform => "platform",
            Origin::User => "user",
            Origin::System => "system",
            Origin::Unknown => "unknown",
        }
    }

    pub(crate) fn parse(text: &str) -> Option<Origin> {
        [
            Origin::App,
            Origin::Preinstalled,
            Origin::Platform,
            Origin::User,
            Origin::System,
            Origin::Unknown,
        ]
        .into_iter()
        .find(|o| o.as_str() == text)
    }

    /// Traffic from these origins was sent by the firmware, not by
    /// something the device's owner chose to install.
    pub(crate) fn is_firmware(self) -> bool {
        matches!(
            self,
            Origin::Preinstalled | Origin::Platform | Origin::System
        )
    }
}

word!(Origin, "origin");

/// IP protocols, named as in the flow table: tcp, udp, icmp, icmpv6, and
/// `ipN` for any other protocol number N.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
    Icmp,
    Icmpv6,
    Other(u8),
}

impl Proto {
    const EXPECTED: &'static str = "tcp, udp, icmp, icmpv6 or ipN (a protocol number)";

    pub(crate) fn from_number(number: u8) -> Proto {
        match number {
            PROTO_TCP => Proto::Tcp,
            PROTO_UDP => Proto::Udp,
            PROTO_ICMP => Proto::Icmp,
            PROTO_ICMPV6 => Proto::Icmpv6,
            other => Proto::Other(other),
        }
    }

    #[cfg(test)]
    pub(crate) fn number(self) -> u8 {
        match self {
            Proto::Tcp => PROTO_TCP,
            Proto::Udp => PROTO_UDP,
            Proto::Icmp => PROTO_ICMP,
            Proto::Icmpv6 => PROTO_ICMPV6,
            Proto::Other(n) => n,
        }
    }

    pub(crate) fn as_str(self) -> std::borrow::Cow<'static, str> {
        match self {
            Proto::Tcp => "tcp".into(),
            Proto::Udp => "udp".into(),
            Proto::Icmp => "icmp".into(),
            Proto::Icmpv6 => "icmpv6".into(),
            Proto::Other(n) => format!("ip{n}").into(),
        }
    }

    pub(crate) fn parse(text: &str) -> Option<Proto> {
        match text {
            "tcp" => Some(Proto::Tcp),
            "udp" => Some(Proto::Udp),
            "icmp" => Some(Proto::Icmp),
            "icmpv6" => Some(Proto::Icmpv6),
            _ => text
                .strip_prefix("ip")?
                .parse()
                .ok()
                .map(Proto::from_number),
        }
    }
}

word!(Proto, "protocol");

/// Which way a flow goes: `outbound`, or `inbound` for a local service's
/// replies (then the flow's `dst` is the client and `port` the service's
/// own local port).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Direction {
    #[default]
    Outbound,
    Inbound,
}

impl Direction {
    const EXPECTED: &'static str = "outbound or inbound";

    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }

    pub(crate) fn parse(text: &str) -> Option<Direction> {
        match text {
            "outbound" => Some(Direction::Outbound),
            "inbound" => Some(Direction::Inbound),
            _ => None,
        }
    }
}

word!(Direction, "direction");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_round_trip() {
        for n in 0..=255u8 {
            let p = Proto::from_number(n);
            assert_eq!(p.number(), n);
            assert_eq!(Proto::parse(&p.as_str()), Some(p));
        }
        assert_eq!(Proto::from_number(47).as_str(), "ip47");
        assert_eq!(serde_json::to_string(&Proto::Udp).unwrap(), "\"udp\"");
        assert_eq!(
            serde_json::from_str::<Origin>("\"preinstalled\"").unwrap(),
            Origin::Preinstalled
        );
        assert!(serde_json::from_str::<Origin>("\"vendor\"").is_err());
        assert!(Origin::System.is_firmware() && !Origin::User.is_firmware());
        assert_eq!(Direction::default(), "outbound");
    }
}
