//! The punch rendezvous (seed 002) over gRPC: the callee is told first, the
//! caller is answered only after the callee says its opening packets are
//! out, and every way it can go wrong has a clear status.

mod common;

use std::time::Duration;

use common::*;
use peermesh_proto::api::{
    network_map_update::Kind, NetworkMapUpdate, PunchInstruction, PunchReadyRequest,
    RequestPunchRequest, UpdateEndpointsRequest, WatchNetworkMapRequest,
};
use tonic::{Code, Streaming};

const A_OBSERVED: &str = "/ip4/198.51.100.1/udp/4000/quic-v1";
const B_PUBLISHED: &str = "/ip4/203.0.113.7/udp/5000/quic-v1";
const B_FRESH: &str = "/ip4/203.0.113.7/udp/5001/quic-v1";
const CIRCUIT: &str = "/ip4/192.0.2.9/udp/4001/quic-v1/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN/p2p-circuit";

async fn watch(node: &mut Node, m: &Member) -> Streaming<NetworkMapUpdate> {
    node.watch_network_map(bearer(WatchNetworkMapRequest {}, m.credential()))
        .await
        .expect("watch")
        .into_inner()
}

/// The next punch instruction on a watch stream (map updates are skipped).
async fn next_punch(stream: &mut Streaming<NetworkMapUpdate>) -> PunchInstruction {
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
            },
            b.credential(),
        ))
        .await,
        Code::NotFound,
        "expired",
    );
}
