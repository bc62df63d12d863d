//! Between the shared types (`peermesh-base`) and their protobuf form, in
//! one place.

use peermesh_base::{NatBehavior, NatFiltering, NatMapping, PathKind};

use crate::api;

impl From<&NatBehavior> for api::NatReport {
    fn from(n: &NatBehavior) -> Self {
        let (mapping, stride) = n.mapping.map_or(("", 0), NatMapping::report_name);
        api::NatReport {
            udp: n.udp,
            public_endpoint: n.public.map(|p| p.to_string()).unwrap_or_default(),
            no_nat: n.no_nat,
            mapping: mapping.into(),
            port_stride: stride,
            filtering: n.filtering.map_or("", NatFiltering::report_name).into(),
            measured_ms: 0,
        }
    }
}

/// A link's state as the control API spells it: its active path's kind, or
/// connecting.
pub fn path_kind(path: Option<PathKind>) -> api::PathKind {
    match path {
        None => api::PathKind::Connecting,
        Some(PathKind::Relay) => api::PathKind::Relay,
        Some(PathKind::Direct) => api::PathKind::Direct,
        Some(PathKind::Forwarded) => api::PathKind::Forwarded,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nat_reports_carry_the_report_names() {
        let n = NatBehavior {
            udp: true,
            public: Some("203.0.113.1:4000".parse().unwrap()),
            no_nat: false,
            mapping: Some(NatMapping::Sequential { stride: 2 }),
            filtering: Some(NatFiltering::AddressAndPortDependent),
            mapped_ports: vec![4000, 4002],
        };
        let r = api::NatReport::from(&n);
        assert_eq!(
            (r.mapping.as_str(), r.port_stride, r.filtering.as_str()),
            ("sequential", 2, "address_and_port_dependent")
        );
        assert_eq!(r.public_endpoint, "203.0.113.1:4000");
        assert_eq!(path_kind(None), api::PathKind::Connecting);
        assert_eq!(path_kind(Some(PathKind::Direct)), api::PathKind::Direct);
    }
}
