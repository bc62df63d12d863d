//! The punch rendezvous (seed 002) over gRPC: the callee is told first, the
//! caller is answered only after the callee says its opening packets are
//! out, and every way it can go wrong has a clear status.

mod common;

use std::time::Duration;

use common::*;
use peermesh_proto::api::{
    network_map_update::Kind, ProbeOffer, PunchInstruction, PunchReadyRequest, RequestPunchRequest,
    UpdateEndpointsRequest,
};
use tonic::Code;

const A_OBSERVED: &str = "/ip4/127.0.0.1/udp/4000/quic-v1";
const B_PUBLISHED: &str = "/ip4/10.0.0.7/udp/5000/quic-v1";
const B_FRESH: &str = "/ip4/10.0.0.7/udp/5001/quic-v1";
const CIRCUIT: &str = "/ip4/192.0.2.9/udp/4001/quic-v1/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN/p2p-circuit";

async fn watch(node: &mut Node, m: &Member) -> MapWatch {
    MapWatch(
        node.watch_network_map(bearer(watch_request(), m.credential()))
            .await
            .expect("watch")
            .into_inner(),
    )
}

/// The next punch instruction on a watch stream (map updates are skipped).
async fn next_punch(stream: &mut MapWatch) -> PunchInstruction {
    loop {
        let u = tokio::time::timeout(Duration::from_secs(5), stream.message())
            .await
            .expect("an instruction within 5 s")
            .expect("stream ok")
            .expect("stream open");
        if let Some(Kind::Punch(p)) = u.kind {
            return p;
        }
    }
}

#[tokio::test]
async fn callee_opens_first_then_the_caller_gets_its_candidates() {
    let server = TestServer::start().await;
    let mut admin = server.admin().await;
    let mut node = server.node().await;
    create_group(&server, &mut admin, "lab").await;
    let token = create_token(&server, &mut admin, "lab", 0, 0).await.token;
    let a = join(&mut node, &token, "alpha").await;
    let b = join(&mut node, &token, "beta").await;
    node.update_endpoints(bearer(
        UpdateEndpointsRequest {
            addresses: vec![CIRCUIT.into(), B_PUBLISHED.into()],
        },
        b.credential(),
    ))
    .await
    .unwrap();
    let mut b_stream = watch(&mut node, &b).await;

    let caller = {
        let mut node = node.clone();
        let cred = a.credential().to_string();
        let peer = b.node_id().to_string();
        tokio::spawn(async move {
            node.request_punch(bearer(
                RequestPunchRequest {
                    peer_id: peer,
                    candidates: vec![A_OBSERVED.into(), CIRCUIT.into()],
                    probe: None,
                },
                &cred,
            ))
            .await
        })
    };
    let instruction = next_punch(&mut b_stream).await;
    assert_eq!(instruction.peer_id, a.node_id());
    assert_eq!(
        instruction.peer_candidates,
        vec![A_OBSERVED.to_string()],
        "relay circuits are no punch candidates"
    );
    // The caller is still waiting: it dials only once the callee is open.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!caller.is_finished(), "answered before the callee was open");

    // Only the callee may say it is ready.
    assert_status(
        node.punch_ready(bearer(
            PunchReadyRequest {
                punch_id: instruction.punch_id,
                candidates: vec![],
                probe: None,
            },
            a.credential(),
        ))
        .await,
        Code::NotFound,
        "not yours",
    );
    node.punch_ready(bearer(
        PunchReadyRequest {
            punch_id: instruction.punch_id,
            candidates: vec![B_FRESH.into()],
            probe: None,
        },
        b.credential(),
    ))
    .await
    .expect("ready");
    let answer = caller.await.unwrap().expect("punch answered").into_inner();
    assert_eq!(answer.punch_id, instruction.punch_id);
    assert_eq!(
        answer.peer_candidates,
        vec![B_FRESH.to_string(), B_PUBLISHED.to_string()],
        "fresh candidates first, then what the callee published"
    );
    // A punch is answered once.
    assert_status(
        node.punch_ready(bearer(
            PunchReadyRequest {
                punch_id: instruction.punch_id,
                candidates: vec![],
                probe: None,
            },
            b.credential(),
        ))
        .await,
        Code::NotFound,
        "expired",
    );
}

#[tokio::test]
async fn refusals_are_clear() {
    let server = TestServer::start().await;
    let mut admin = server.admin().await;
    let mut node = server.node().await;
    create_group(&server, &mut admin, "lab").await;
    create_group(&server, &mut admin, "other").await;
    let token = create_token(&server, &mut admin, "lab", 0, 0).await.token;
    let other_token = create_token(&server, &mut admin, "other", 0, 0).await.token;
    let a = join(&mut node, &token, "alpha").await;
    let b = join(&mut node, &token, "beta").await;
    let stranger = join(&mut node, &other_token, "stranger").await;
    let _stranger_stream = watch(&mut node, &stranger).await;
    let ask = |peer: &str, candidates: Vec<String>| RequestPunchRequest {
        peer_id: peer.to_string(),
        candidates,
        probe: None,
    };

    assert_status(
        node.request_punch(bearer(ask(b.node_id(), vec![]), "pms_bogus"))
            .await,
        Code::Unauthenticated,
        "",
    );
    assert_status(
        node.request_punch(bearer(ask(a.node_id(), vec![]), a.credential()))
            .await,
        Code::InvalidArgument,
        "yourself",
    );
    assert_status(
        node.request_punch(bearer(ask("", vec![]), a.credential()))
            .await,
        Code::InvalidArgument,
        "peer_id",
    );
    assert_status(
        node.request_punch(bearer(
            ask(b.node_id(), vec!["not a multiaddr".into()]),
            a.credential(),
        ))
        .await,
        Code::InvalidArgument,
        "multiaddr",
    );
    assert_status(
        node.request_punch(bearer(ask(stranger.node_id(), vec![]), a.credential()))
            .await,
        Code::NotFound,
        "no node",
    );
    // beta has no watch stream: offline.
    assert_status(
        node.request_punch(bearer(ask(b.node_id(), vec![]), a.credential()))
            .await,
        Code::FailedPrecondition,
        "offline",
    );
    // beta watches but never answers: the caller is told to retry later.
    let mut b_stream = watch(&mut node, &b).await;
    let caller = {
        let mut node = node.clone();
        let cred = a.credential().to_string();
        let peer = b.node_id().to_string();
        tokio::spawn(async move { node.request_punch(bearer(ask(&peer, vec![]), &cred)).await })
    };
    let instruction = next_punch(&mut b_stream).await;
    assert_status(
        caller.await.unwrap(),
        Code::DeadlineExceeded,
        "did not answer",
    );
    assert_status(
        node.punch_ready(bearer(
            PunchReadyRequest {
                punch_id: instruction.punch_id,
                candidates: vec![],
                probe: None,
            },
            b.credential(),
        ))
        .await,
        Code::NotFound,
        "expired",
    );
}

/// A punch from probe sockets: both offers cross over with one secret, bad
/// offers are refused, and a callee may decline by answering without one.
#[tokio::test]
async fn probe_offers_cross_over_with_one_secret() {
    let server = TestServer::start().await;
    let mut admin = server.admin().await;
    let mut node = server.node().await;
    create_group(&server, &mut admin, "lab").await;
    let token = create_token(&server, &mut admin, "lab", 0, 0).await.token;
    let a = join(&mut node, &token, "alpha").await;
    let b = join(&mut node, &token, "beta").await;
    let mut b_stream = watch(&mut node, &b).await;
    let offer = |endpoint: &str, mapping: &str| ProbeOffer {
        endpoint: endpoint.into(),
        mapping: mapping.into(),
        port_stride: 0,
        fallback: false,
    };

    for (bad, why) in [
        (offer("not an endpoint", "random"), "not host:port"),
        (offer("127.0.0.1:4000", "sideways"), "unknown NAT mapping"),
    ] {
        assert_status(
            node.request_punch(bearer(
                RequestPunchRequest {
                    peer_id: b.node_id().to_string(),
                    candidates: vec![],
                    probe: Some(bad),
                },
                a.credential(),
            ))
            .await,
            Code::InvalidArgument,
            why,
        );
    }

    let caller = {
        let mut node = node.clone();
        let cred = a.credential().to_string();
        let peer = b.node_id().to_string();
        let probe = offer("127.0.0.1:4000", "random");
        tokio::spawn(async move {
            node.request_punch(bearer(
                RequestPunchRequest {
                    peer_id: peer,
                    candidates: vec![A_OBSERVED.into()],
                    probe: Some(probe),
                },
                &cred,
            ))
            .await
        })
    };
    let instruction = next_punch(&mut b_stream).await;
    assert_eq!(
        instruction.peer_probe,
        Some(offer("127.0.0.1:4000", "random"))
    );
    assert_ne!(instruction.probe_secret, 0, "a secret is drawn");
    node.punch_ready(bearer(
        PunchReadyRequest {
            punch_id: instruction.punch_id,
            candidates: vec![],
            probe: Some(offer("10.0.0.7:5000", "endpoint_independent")),
        },
        b.credential(),
    ))
    .await
    .expect("ready");
    let answer = caller.await.unwrap().expect("punch answered").into_inner();
    assert_eq!(
        answer.peer_probe,
        Some(offer("10.0.0.7:5000", "endpoint_independent"))
    );
    assert_eq!(answer.probe_secret, instruction.probe_secret);
}

/// The callee declines an offer (answers without one): the caller learns it
/// must dial from its QUIC socket. An offer to a punch without one is refused.
#[tokio::test]
async fn a_probe_offer_may_be_declined_but_not_forced() {
    let server = TestServer::start().await;
    let mut admin = server.admin().await;
    let mut node = server.node().await;
    create_group(&server, &mut admin, "lab").await;
    let token = create_token(&server, &mut admin, "lab", 0, 0).await.token;
    let a = join(&mut node, &token, "alpha").await;
    let b = join(&mut node, &token, "beta").await;
    let mut b_stream = watch(&mut node, &b).await;
    let offer = ProbeOffer {
        endpoint: "127.0.0.1:4000".into(),
        mapping: "endpoint_independent".into(),
        port_stride: 0,
        fallback: false,
    };
    for caller_offers in [true, false] {
        let caller = {
            let mut node = node.clone();
            let cred = a.credential().to_string();
            let peer = b.node_id().to_string();
            let probe = caller_offers.then(|| offer.clone());
            tokio::spawn(async move {
                node.request_punch(bearer(
                    RequestPunchRequest {
                        peer_id: peer,
                        candidates: vec![A_OBSERVED.into()],
                        probe,
                    },
                    &cred,
                ))
                .await
            })
        };
        let instruction = next_punch(&mut b_stream).await;
        if caller_offers {
            node.punch_ready(bearer(
                PunchReadyRequest {
                    punch_id: instruction.punch_id,
                    candidates: vec![B_FRESH.into()],
                    probe: None,
                },
                b.credential(),
            ))
            .await
            .expect("declining is an answer");
            let answer = caller.await.unwrap().expect("answered").into_inner();
            assert_eq!(answer.peer_probe, None);
            assert_eq!(answer.peer_candidates[0], B_FRESH);
        } else {
            assert_eq!(instruction.peer_probe, None);
            assert_eq!(instruction.probe_secret, 0);
            assert_status(
                node.punch_ready(bearer(
                    PunchReadyRequest {
                        punch_id: instruction.punch_id,
                        candidates: vec![],
                        probe: Some(offer.clone()),
                    },
                    b.credential(),
                ))
                .await,
                Code::InvalidArgument,
                "no probe offer to answer",
            );
            caller.abort();
        }
    }
}

/// A member cannot turn its peer's punch on a third host: candidates and
/// probe endpoints on public addresses other than where the server sees
/// the caller are refused, and the callee is told nothing. And one attempt
/// per pair at a time.
#[tokio::test]
async fn punches_go_only_to_the_callers_own_addresses_one_at_a_time() {
    let server = TestServer::start().await;
    let mut admin = server.admin().await;
    let mut node = server.node().await;
    create_group(&server, &mut admin, "lab").await;
    let token = create_token(&server, &mut admin, "lab", 0, 0).await.token;
    let a = join(&mut node, &token, "alpha").await;
    let b = join(&mut node, &token, "beta").await;
    let mut b_stream = watch(&mut node, &b).await;
    const VICTIM: &str = "/ip4/203.0.113.66/udp/53/quic-v1";

    let r = node
        .request_punch(bearer(
            RequestPunchRequest {
                peer_id: b.node_id().to_string(),
                candidates: vec![VICTIM.into()],
                probe: None,
            },
            a.credential(),
        ))
        .await;
    assert_status(r, Code::PermissionDenied, "not this node's addresses");
    let r = node
        .request_punch(bearer(
            RequestPunchRequest {
                peer_id: b.node_id().to_string(),
                candidates: vec![],
                probe: Some(ProbeOffer {
                    endpoint: "203.0.113.66:53".into(),
                    mapping: "random".into(),
                    port_stride: 0,
                    fallback: false,
                }),
            },
            a.credential(),
        ))
        .await;
    assert_status(r, Code::PermissionDenied, "not this node's");
    // The callee heard of neither.
    let quiet = tokio::time::timeout(Duration::from_millis(500), async {
        loop {
            let u = b_stream.message().await.expect("ok").expect("open");
            if let Some(Kind::Punch(p)) = u.kind {
                return p;
            }
        }
    })
    .await;
    assert!(quiet.is_err(), "the callee was told: {quiet:?}");

    // A foreign address beside the caller's own is dropped, not passed on.
    let mut caller = node.clone();
    let (b_id, a_cred) = (b.node_id().to_string(), a.credential().to_string());
    let first = tokio::spawn(async move {
        caller
            .request_punch(bearer(
                RequestPunchRequest {
                    peer_id: b_id,
                    candidates: vec![A_OBSERVED.into(), VICTIM.into()],
                    probe: None,
                },
                &a_cred,
            ))
            .await
    });
    let instruction = next_punch(&mut b_stream).await;
    assert_eq!(instruction.peer_candidates, vec![A_OBSERVED.to_string()]);
    // While it waits for b, neither side may start another one.
    for (from, to) in [(&a, &b), (&b, &a)] {
        let r = node
            .request_punch(bearer(
                RequestPunchRequest {
                    peer_id: to.node_id().to_string(),
                    candidates: vec![],
                    probe: None,
                },
                from.credential(),
            ))
            .await;
        assert_status(r, Code::Unavailable, "under way");
    }
    node.punch_ready(bearer(
        PunchReadyRequest {
            punch_id: instruction.punch_id,
            candidates: vec![],
            probe: None,
        },
        b.credential(),
    ))
    .await
    .expect("ready");
    first.await.unwrap().expect("the first punch completes");
}
