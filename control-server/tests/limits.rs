//! What a client can make the server do is limited: per-source rate limits
//! answer RESOURCE_EXHAUSTED naming the limit, watch streams per node are
//! capped, tokens are single-use unless widened, groups have a size cap.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures::future::join_all;
use libp2p_identity::Keypair;
use peermesh_control_server::limits::Limits;
use peermesh_control_server::server::Options;
use peermesh_proto::api::{CreateTokenRequest, JoinRequest, UpdateEndpointsRequest};
use tonic::Code;

/// Two members of group "lab" (joined with a reusable token).
async fn two_members(server: &TestServer) -> (Node, Member, Member) {
    let mut admin = server.admin().await;
    create_group(server, &mut admin, "lab").await;
    let token = create_token(server, &mut admin, "lab", 0, 0).await.token;
    let mut node = server.node().await;
    let alpha = join(&mut node, &token, "alpha").await;
    let beta = join(&mut node, &token, "beta").await;
    (node, alpha, beta)
}

fn endpoints(credential: &str, port: u16) -> tonic::Request<UpdateEndpointsRequest> {
    bearer(
        UpdateEndpointsRequest {
            addresses: vec![format!("/ip4/192.0.2.1/udp/{port}/quic-v1")],
        },
        credential,
    )
}

#[tokio::test]
async fn a_flood_of_endpoint_updates_is_limited_and_other_nodes_are_served() {
    let server = TestServer::start().await;
    let (node, alpha, beta) = two_members(&server).await;

    // 1,000 UpdateEndpoints from one node, all at once.
    let started = Instant::now();
    let calls = (0..1000u16).map(|i| {
        let mut node = node.clone();
        let cred = alpha.credential().to_string();
        async move { node.update_endpoints(endpoints(&cred, 1000 + i)).await }
    });
    let results = join_all(calls).await;
    let elapsed = started.elapsed();
    let ok = results.iter().filter(|r| r.is_ok()).count();
    let limited: Vec<_> = results
        .iter()
        .filter_map(|r| r.as_ref().err())
        .filter(|s| s.code() == Code::ResourceExhausted)
        .collect();
    assert_eq!(ok + limited.len(), 1000, "nothing else failed");
    // The default: 2/s with bursts of 20.
    let allowed = 20 + 2 * elapsed.as_secs_f64().ceil() as usize;
    assert!(
        (20..=allowed).contains(&ok),
        "{ok} calls served in {elapsed:?}"
    );
    let message = limited[0].message();
    assert!(
        message.contains("UpdateEndpoints is limited to 2/s per node (bursts of 20)"),
        "{message}"
    );
    assert!(message.contains("retry in"), "{message}");

    // Another node is served at once.
    node.clone()
        .update_endpoints(endpoints(beta.credential(), 7))
        .await
        .expect("beta is not limited by alpha's flood");
}

#[tokio::test]
async fn joins_from_one_address_are_limited() {
    let server = TestServer::start().await;
    let mut node = server.node().await;
    // Refused joins count too: the limit comes before any work.
    let mut last = None;
    for i in 0..150 {
        let r = node
            .join(JoinRequest {
                token: "garbage".into(),
                name: format!("n{i}"),
                ..Default::default()
            })
            .await;
        match r {
            Err(s) if s.code() == Code::ResourceExhausted => {
                last = Some((i, s));
                break;
            }
            Err(_) => {}
            Ok(r) => panic!("a garbage join succeeded: {r:?}"),
        }
    }
    let (i, status) = last.expect("150 joins at once are limited");
    assert!((100..150).contains(&i), "limited after {i} joins");
    assert!(
        status
            .message()
            .contains("Join is limited to 10/s per client address"),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn watch_streams_per_node_are_capped() {
    let server = TestServer::start().await;
    let (node, alpha, beta) = two_members(&server).await;

    // A client opening 1,000 watch streams for one node gets four.
    let opens = (0..1000).map(|_| {
        let mut node = node.clone();
        let cred = alpha.credential().to_string();
        async move { node.watch_network_map(bearer(watch_request(), &cred)).await }
    });
    let results = join_all(opens).await;
    let mut open = Vec::new();
    let mut refused = Vec::new();
    for r in results {
        match r {
            Ok(s) => open.push(s.into_inner()),
            Err(s) => refused.push(s),
        }
    }
    assert_eq!(open.len(), 4, "the default cap");
    assert_eq!(refused.len(), 996);
    assert!(refused.iter().all(|s| s.code() == Code::ResourceExhausted));
    assert!(
        refused[0]
            .message()
            .contains("node already holds 4 watch streams, the limit per node"),
        "{}",
        refused[0].message()
    );
    // Another node watches as usual.
    let mut beta_watch = MapWatch(
        node.clone()
            .watch_network_map(bearer(watch_request(), beta.credential()))
            .await
            .expect("beta's watch")
            .into_inner(),
    );
    beta_watch
        .message()
        .await
        .expect("beta's map")
        .expect("a map");

    // Closing one makes room for one.
    drop(open.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = node
            .clone()
            .watch_network_map(bearer(watch_request(), alpha.credential()))
            .await;
        match r {
            Ok(_) => break,
            Err(s) if s.code() == Code::ResourceExhausted && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(s) => panic!("no room after a stream closed: {s:?}"),
        }
    }
}

#[tokio::test]
async fn tokens_are_single_use_unless_widened() {
    let server = TestServer::start().await;
    let mut admin = server.admin().await;
    create_group(&server, &mut admin, "lab").await;
    let create = |max_uses: u32, reusable: bool| {
        let mut admin = admin.clone();
        let req = server.as_admin(CreateTokenRequest {
            group: "lab".into(),
            max_uses,
            reusable,
            ..Default::default()
        });
        async move { admin.create_token(req).await }
    };
    let mut node = server.node().await;

    // The default: one node.
    let single = create(0, false).await.expect("token").into_inner();
    assert_eq!(single.info.as_ref().unwrap().max_uses, 1);
    join(&mut node, &single.token, "a").await;
    let kp = Keypair::generate_ed25519();
    assert_status(
        node.join(join_request(&kp, &single.token, "b")).await,
        Code::Unauthenticated,
        "used up (1 of 1 uses)",
    );

    // --uses 2: two nodes.
    let two = create(2, false).await.expect("token").into_inner().token;
    join(&mut node, &two, "c").await;
    join(&mut node, &two, "d").await;
    assert_status(
        node.join(join_request(&Keypair::generate_ed25519(), &two, "e"))
            .await,
        Code::Unauthenticated,
        "used up (2 of 2 uses)",
    );

    // --reusable: any number.
    let many = create(0, true).await.expect("token").into_inner();
    assert_eq!(many.info.as_ref().unwrap().max_uses, 0);
    for i in 0..5 {
        join(&mut node, &many.token, &format!("r{i}")).await;
    }
    // Not both.
    assert_status(create(3, true).await, Code::InvalidArgument, "not both");
}

#[tokio::test]
async fn a_group_holds_at_most_its_cap_of_nodes() {
    let server = TestServer::start_with(Options {
        limits: Limits {
            max_nodes_per_group: 3,
            ..Limits::default()
        },
        ..Options::default()
    })
    .await;
    let mut admin = server.admin().await;
    create_group(&server, &mut admin, "lab").await;
    let token = create_token(&server, &mut admin, "lab", 0, 0).await.token;
    let mut node = server.node().await;
    let first = join(&mut node, &token, "a").await;
    join(&mut node, &token, "b").await;
    join(&mut node, &token, "c").await;
    assert_status(
        node.join(join_request(&Keypair::generate_ed25519(), &token, "d"))
            .await,
        Code::FailedPrecondition,
        "group \"lab\" holds 3 nodes, the limit of this server",
    );
    // A member joining again is no new node.
    let again = join_request(&first.kp, &token, "a");
    node.join(again).await.expect("a rejoin within the cap");
}
