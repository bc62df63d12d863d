//! A NAT's behaviour in RFC 4787 terms: how it maps an inside endpoint to
//! public ones, and which inbound packets a mapping lets in. One type for
//! what NAT discovery measures, what a punch plan reasons about and what the
//! control API carries (`NatReport.mapping` spells [`NatMapping::report_name`]).

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// How the NAT maps an inside endpoint to public ones (RFC 4787 §4.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum NatMapping {
    /// One public endpoint for every destination (cone NATs; or no NAT).
    EndpointIndependent,
    /// One per destination address.
    AddressDependent,
    /// One per destination endpoint, each `stride` ports after the last:
    /// predictable (seed 003).
    Sequential { stride: i32 },
    /// One per destination endpoint, ports with no pattern.
    Random,
}

impl NatMapping {
    /// The name the control API uses, and the stride (0 unless sequential).
    pub fn report_name(self) -> (&'static str, i32) {
        match self {
            Self::EndpointIndependent => ("endpoint_independent", 0),
            Self::AddressDependent => ("address_dependent", 0),
            Self::Sequential { stride } => ("sequential", stride),
            Self::Random => ("random", 0),
        }
    }

    /// From the control API's spelling; `None` when unknown or empty. A
    /// "sequential" mapping without a measured step is random for every
    /// purpose (nothing to predict).
    pub fn from_report(name: &str, stride: i32) -> Option<Self> {
        match name {
            "endpoint_independent" => Some(Self::EndpointIndependent),
            "address_dependent" => Some(Self::AddressDependent),
            "sequential" if stride != 0 => Some(Self::Sequential { stride }),
            "sequential" | "random" => Some(Self::Random),
            _ => None,
        }
    }

    /// Whether a new destination gets a new public port (symmetric NATs).
    pub fn is_endpoint_dependent(self) -> bool {
        matches!(self, Self::Sequential { .. } | Self::Random)
    }
}

/// Which inbound packets a mapping lets in (RFC 4787 §5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NatFiltering {
    EndpointIndependent,
    AddressDependent,
    AddressAndPortDependent,
}

impl NatFiltering {
    /// The name the control API uses.
    pub fn report_name(self) -> &'static str {
        match self {
            Self::EndpointIndependent => "endpoint_independent",
            Self::AddressDependent => "address_dependent",
            Self::AddressAndPortDependent => "address_and_port_dependent",
        }
    }

    pub fn from_report(name: &str) -> Option<Self> {
        match name {
            "endpoint_independent" => Some(Self::EndpointIndependent),
            "address_dependent" => Some(Self::AddressDependent),
            "address_and_port_dependent" => Some(Self::AddressAndPortDependent),
            _ => None,
        }
    }
}

/// What NAT behaviour discovery learned about the node's NAT.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NatBehavior {
    /// Whether any answer came back.
    pub udp: bool,
    /// The public endpoint towards the primary server address.
    pub public: Option<SocketAddr>,
    /// Whether the public endpoint is the local one (no NAT in the way).
    pub no_nat: bool,
    pub mapping: Option<NatMapping>,
    pub filtering: Option<NatFiltering>,
    /// Mapped ports in the order asked (primary, alt address, alt both,
    /// alt port), for the record.
    pub mapped_ports: Vec<u16>,
}

impl NatBehavior {
    /// Short words for `meshnode status`: "port-restricted cone",
    /// "symmetric (sequential, stride 1)", …
    pub fn describe(&self) -> String {
        if !self.udp {
            return "UDP blocked".into();
        }
        if self.no_nat {
            return "no NAT".into();
        }
        match self.mapping {
            Some(NatMapping::EndpointIndependent) => match self.filtering {
                Some(NatFiltering::EndpointIndependent) => "full cone".to_string(),
                Some(NatFiltering::AddressDependent) => "address-restricted cone".to_string(),
                Some(NatFiltering::AddressAndPortDependent) => "port-restricted cone".to_string(),
                None => "cone".to_string(),
            },
            Some(NatMapping::AddressDependent) => "address-dependent mapping".to_string(),
            Some(NatMapping::Sequential { stride }) => {
                format!("symmetric (sequential, stride {stride})")
            }
            Some(NatMapping::Random) => "symmetric (random)".to_string(),
            None => "unknown".to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_names_round_trip() {
        for m in [
            NatMapping::EndpointIndependent,
            NatMapping::AddressDependent,
            NatMapping::Sequential { stride: -2 },
            NatMapping::Random,
        ] {
            let (name, stride) = m.report_name();
            assert_eq!(NatMapping::from_report(name, stride), Some(m));
        }
        assert_eq!(
            NatMapping::from_report("sequential", 0),
            Some(NatMapping::Random)
        );
        assert_eq!(NatMapping::from_report("", 0), None);
        for f in [
            NatFiltering::EndpointIndependent,
            NatFiltering::AddressDependent,
            NatFiltering::AddressAndPortDependent,
        ] {
            assert_eq!(NatFiltering::from_report(f.report_name()), Some(f));
        }
    }

    #[test]
    fn json_shape_is_stable() {
        let m = NatMapping::Sequential { stride: 1 };
        assert_eq!(
            serde_json::to_string(&m).unwrap(),
            r#"{"kind":"sequential","stride":1}"#
        );
    }
}
