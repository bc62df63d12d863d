//! Bad input over gRPC against an in-process server: every refusal has the
//! right status code and a message a human can act on, and leaves the
//! server's state exactly as it was.

mod common;

use std::time::Duration;

use common::*;
use libp2p_identity::Keypair;
use peermesh_proto::api::{
    network_map_update::Kind, CreateGroupRequest, CreateTokenRequest, LeaveRequest, LinkReport,
    ListGroupsRequest, PathKind, RemoveNodeRequest, ReportLinksRequest, RevokeTokenRequest,
    UpdateEndpointsRequest,
};
use tonic::{Code, Request};

/// A server with group "lab", an unlimited token and two members, "alpha"
/// (with an endpoint and a link report) and "beta".
struct World {
    server: TestServer,
    admin: Admin,
    node: Node,
    token: String,
    alpha: Member,
    beta: Member,
}

const ALPHA_ADDR: &str = "/ip4/192.0.2.1/udp/4000/quic-v1";

async fn world() -> World {
    let server = TestServer::start().await;
    let mut admin = server.admin().await;
    let mut node = server.node().await;
    create_group(&server, &mut admin, "lab").await;
    let token = create_token(&server, &mut admin, "lab", 0, 0).await.token;
    let alpha = join(&mut node, &token, "alpha").await;
    let beta = join(&mut node, &token, "beta").await;
    assert_eq!(alpha.joined.name, "alpha");
    assert_eq!(beta.joined.name, "beta");
    node.update_endpoints(bearer(
        UpdateEndpointsRequest {
            addresses: vec![ALPHA_ADDR.into()],
        },
        alpha.credential(),
    ))
    .await
    .expect("update endpoints");
    node.report_links(bearer(
        ReportLinksRequest {
            links: vec![link(beta.node_id())],
        },
        alpha.credential(),
    ))
    .await
    .expect("report links");
    World {
        server,
        admin,
        node,
        token,
        alpha,
        beta,
    }
}

impl World {
    async fn state(&mut self) -> State {
        state(&self.server, &mut self.admin).await
    }
}

fn link(peer: &str) -> LinkReport {
    LinkReport {
        peer_id: peer.to_string(),
        path: PathKind::Direct as i32,
        rtt_ms: Some(3.5),
        loss: 0.0,
        bytes_in: 1,
        bytes_out: 2,
        ..Default::default()
    }
}

fn well_formed_secret(prefix: &str) -> String {
    format!("{prefix}{}", "0123456789abcdef".repeat(3))
}

#[tokio::test]
async fn the_world_works() {
    // The positive control for everything below: good calls succeed.
    let mut w = world().await;
    let st = w.state().await;
    assert_eq!(st.groups.len(), 1);
    assert_eq!(st.groups[0].node_count, 2);
    assert_eq!(st.tokens.len(), 1);
    assert_eq!(st.tokens[0].uses, 2);
    assert_eq!(st.nodes.len(), 2);
    assert_eq!(st.links.len(), 1);
    assert_eq!(st.links[0].to_name, "beta");

    let auth = w
        .node
        .authenticate(auth_request(&w.alpha.kp, &w.alpha.joined.server_id))
        .await
        .expect("authenticate")
        .into_inner();
    assert_eq!(auth.node_id, w.alpha.node_id());
    let session = auth.session.expect("session").credential;

    let mut stream = w
        .node
        .watch_network_map(bearer(watch_request(), &session))
        .await
        .expect("watch")
        .into_inner();
    let first = common::next_update(&mut stream)
        .await
        .expect("first")
        .expect("a message");
    let Some(Kind::Full(map)) = first.kind else {
        panic!("first message is not a full map: {first:?}");
    };
    assert_eq!(map.self_node.expect("self").addresses, [ALPHA_ADDR]);
    assert_eq!(map.peers.len(), 1);
    assert_eq!(map.peers[0].name, "beta");

    w.node
        .update_endpoints(bearer(
            UpdateEndpointsRequest {
                addresses: vec!["/ip4/192.0.2.2/tcp/7000".into()],
            },
            w.beta.credential(),
        ))
        .await
        .expect("beta endpoints");
    let update = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("an update in time")
        .expect("no error")
        .expect("a message");
    let update = unsigned(&update);
    assert!(update.version > first.version);
    match update.kind {
        Some(Kind::PeerUpsert(p)) => {
            assert_eq!(p.node_id, w.beta.node_id());
            assert_eq!(p.addresses, ["/ip4/192.0.2.2/tcp/7000"]);
        }
        other => panic!("expected beta's upsert, got {other:?}"),
    }
    let nodes = w.state().await.nodes;
    let alpha = nodes.iter().find(|n| n.name == "alpha").unwrap();
    assert!(alpha.online, "a watching node is online");
}

#[tokio::test]
async fn bad_joins_are_refused_and_change_nothing() {
    let mut w = world().await;
    let before = w.state().await;
    let kp = Keypair::generate_ed25519();

    // A token this server never issued.
    let unknown = well_formed_secret("pmj_");
    assert_status(
        w.node.join(join_request(&kp, &unknown, "gamma")).await,
        Code::Unauthenticated,
        "unknown join token",
    );

    // Malformed tokens.
    for bad in ["", "not-a-token", "pmj_123", "pms_0123456789abcdef"] {
        assert_status(
            w.node.join(join_request(&kp, bad, "gamma")).await,
            Code::InvalidArgument,
            "malformed join token",
        );
    }
    assert_status(
        w.node
            .join(join_request(&kp, &"x".repeat(10_000), "gamma"))
            .await,
        Code::InvalidArgument,
        "token is 10000 bytes",
    );

    // Public keys that are not keys.
    let mut req = join_request(&kp, &w.token, "gamma");
    req.public_key = (0..32u32).map(|i| (i * 131 + 17) as u8).collect();
    assert_status(
        w.node.join(req).await,
        Code::InvalidArgument,
        "public_key is not a libp2p protobuf-encoded key",
    );
    let mut req = join_request(&kp, &w.token, "gamma");
    req.public_key = vec![0xee; 4096];
    assert_status(
        w.node.join(req).await,
        Code::InvalidArgument,
        "public_key is 4096 bytes",
    );

    // Names.
    assert_status(
        w.node
            .join(join_request(&kp, &w.token, &"n".repeat(300)))
            .await,
        Code::InvalidArgument,
        "name is 300 bytes; the limit is 63",
    );
    for bad in ["Gamma", "gam ma", "gamma!", "-gamma", "gamma.lab", "gämma"] {
        assert_status(
            w.node.join(join_request(&kp, &w.token, bad)).await,
            Code::InvalidArgument,
            "is not a DNS label",
        );
    }

    // Signatures.
    let mut req = join_request(&kp, &w.token, "gamma");
    req.signature[10] ^= 0x40;
    assert_status(
        w.node.join(req).await,
        Code::Unauthenticated,
        "signature does not verify",
    );
    let other = Keypair::generate_ed25519();
    let mut req = join_request(&other, &w.token, "gamma");
    req.public_key = kp.public().encode_protobuf();
    assert_status(
        w.node.join(req).await,
        Code::Unauthenticated,
        "signature does not verify",
    );
    let mut req = join_request(&kp, &w.token, "gamma");
    req.signature = vec![1; 4096];
    assert_status(
        w.node.join(req).await,
        Code::InvalidArgument,
        "signature is 4096 bytes",
    );

    // A timestamp an hour off.
    let hour = 3_600_000;
    for ts in [timestamp_ms() - hour, timestamp_ms() + hour] {
        assert_status(
            w.node
                .join(join_request_at(&kp, &w.token, "gamma", ts))
                .await,
            Code::Unauthenticated,
            "off the server's clock",
        );
    }

    // A replay of alpha's join.
    assert_status(
        w.node.join(w.alpha.request.clone()).await,
        Code::Unauthenticated,
        "stale signed timestamp",
    );

    assert_eq!(w.state().await, before);
}

#[tokio::test]
async fn expired_token_is_refused() {
    let mut w = world().await;
    let short = create_token(&w.server, &mut w.admin, "lab", 1, 0)
        .await
        .token;
    let before = w.state().await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let kp = Keypair::generate_ed25519();
    assert_status(
        w.node.join(join_request(&kp, &short, "gamma")).await,
        Code::Unauthenticated,
        "join token expired",
    );
    assert_eq!(w.state().await, before);
}

#[tokio::test]
async fn bad_authentication_is_refused() {
    let mut w = world().await;
    let before = w.state().await;

    let stranger = Keypair::generate_ed25519();
    assert_status(
        w.node
            .authenticate(auth_request(&stranger, &w.alpha.joined.server_id))
            .await,
        Code::Unauthenticated,
        "not registered",
    );
    assert_status(
        w.node
            .authenticate(auth_request(&w.alpha.kp, "srv_another_server"))
            .await,
        Code::Unauthenticated,
        "signature does not verify",
    );
    let good = auth_request(&w.alpha.kp, &w.alpha.joined.server_id);
    w.node.authenticate(good.clone()).await.expect("first use");
    assert_status(
        w.node.authenticate(good).await,
        Code::Unauthenticated,
        "stale signed timestamp",
    );
    let mut req = auth_request(&w.alpha.kp, &w.alpha.joined.server_id);
    req.public_key = b"definitely not a key".to_vec();
    assert_status(
        w.node.authenticate(req).await,
        Code::InvalidArgument,
        "public_key",
    );

    // Authenticating stamps last-seen; nothing else moved.
    let mut after = w.state().await;
    for (a, b) in after.nodes.iter_mut().zip(&before.nodes) {
        assert!(a.last_seen_ms >= b.last_seen_ms);
        a.last_seen_ms = b.last_seen_ms;
    }
    assert_eq!(after, before);
}

#[tokio::test]
async fn admin_calls_need_the_admin_credential() {
    let mut w = world().await;
    let before = w.state().await;
    let wrong = [
        (None, "missing authorization metadata"),
        (
            Some(format!("Bearer {}", well_formed_secret("pma_"))),
            "wrong admin credential",
        ),
        (Some("Bearer garbage".to_string()), "wrong admin credential"),
        (
            Some(format!("Bearer {}", w.alpha.credential())),
            "wrong admin credential",
        ),
        (
            Some(format!("Basic {}", w.server.admin_credential)),
            "Bearer <credential>",
        ),
        (
            Some(w.server.admin_credential.clone()),
            "Bearer <credential>",
        ),
    ];
    for (value, needle) in &wrong {
        let req = |msg| match value {
            Some(v) => with_authorization(msg, v),
            None => Request::new(msg),
        };
        assert_status(
            w.admin
                .create_group(req(CreateGroupRequest {
                    name: "evil".into(),
                }))
                .await,
            Code::Unauthenticated,
            needle,
        );
        let req = |msg| match value {
            Some(v) => with_authorization(msg, v),
            None => Request::new(msg),
        };
        assert_status(
            w.admin.list_groups(req(ListGroupsRequest {})).await,
            Code::Unauthenticated,
            needle,
        );
        let req = |msg| match value {
            Some(v) => with_authorization(msg, v),
            None => Request::new(msg),
        };
        assert_status(
            w.admin
                .create_token(req(CreateTokenRequest {
                    group: "lab".into(),
                    ..Default::default()
                }))
                .await,
            Code::Unauthenticated,
            needle,
        );
        let req = |msg| match value {
            Some(v) => with_authorization(msg, v),
            None => Request::new(msg),
        };
        assert_status(
            w.admin
                .remove_node(req(RemoveNodeRequest {
                    node: "alpha".into(),
                    ..Default::default()
                }))
                .await,
            Code::Unauthenticated,
            needle,
        );
        let req = |msg| match value {
            Some(v) => with_authorization(msg, v),
            None => Request::new(msg),
        };
        assert_status(
            w.admin
                .revoke_token(req(RevokeTokenRequest {
                    token: w.token.clone(),
                    ..Default::default()
                }))
                .await,
            Code::Unauthenticated,
            needle,
        );
    }
    assert_eq!(w.state().await, before);
}

#[tokio::test]
async fn node_calls_need_a_session() {
    let mut w = world().await;
    let before = w.state().await;
    let wrong = [
        (None, "missing authorization metadata"),
        (
            Some("Bearer garbage".to_string()),
            "malformed session credential",
        ),
        (
            Some("Bearer pms_garbage".to_string()),
            "malformed session credential",
        ),
        (
            Some(format!("Bearer {}", well_formed_secret("pms_"))),
            "unknown or expired session",
        ),
        (
            Some(format!("Bearer {}", w.server.admin_credential)),
            "malformed session credential",
        ),
        (
            Some(format!("Bearer {}", w.token)),
            "malformed session credential",
        ),
        (
            Some(w.alpha.credential().to_string()),
            "Bearer <credential>",
        ),
    ];
    for (value, needle) in &wrong {
        let req = |msg| match value {
            Some(v) => with_authorization(msg, v),
            None => Request::new(msg),
        };
        assert_status(
            w.node
                .update_endpoints(req(UpdateEndpointsRequest {
                    addresses: vec!["/ip4/192.0.2.66/tcp/1".into()],
                }))
                .await,
            Code::Unauthenticated,
            needle,
        );
        let req = |msg| match value {
            Some(v) => with_authorization(msg, v),
            None => Request::new(msg),
        };
        assert_status(
            w.node
                .report_links(req(ReportLinksRequest {
                    links: vec![link(w.alpha.node_id())],
                }))
                .await,
            Code::Unauthenticated,
            needle,
        );
        let req = |msg| match value {
            Some(v) => with_authorization(msg, v),
            None => Request::new(msg),
        };
        assert_status(
            w.node.leave(req(LeaveRequest {})).await,
            Code::Unauthenticated,
            needle,
        );
        let req = |msg| match value {
            Some(v) => with_authorization(msg, v),
            None => Request::new(msg),
        };
        assert_status(
            w.node
                .watch_network_map(req(watch_request()))
                .await
                .map(|_| "a stream"),
            Code::Unauthenticated,
            needle,
        );
    }
    assert_eq!(w.state().await, before);
}

#[tokio::test]
async fn bad_endpoints_and_links_are_refused() {
    let mut w = world().await;
    let before = w.state().await;
    let cred = w.alpha.credential().to_string();

    let too_many: Vec<String> = (0..33)
        .map(|i| format!("/ip4/192.0.2.1/udp/{}/quic-v1", 5000 + i))
        .collect();
    assert_status(
        w.node
            .update_endpoints(bearer(
                UpdateEndpointsRequest {
                    addresses: too_many,
                },
                &cred,
            ))
            .await,
        Code::InvalidArgument,
        "33 addresses; the limit is 32",
    );
    for bad in [
        "192.0.2.1:4000",
        "localhost",
        "/ip4/999.0.0.1/tcp/1",
        "/tcp",
        "",
    ] {
        assert_status(
            w.node
                .update_endpoints(bearer(
                    UpdateEndpointsRequest {
                        addresses: vec![ALPHA_ADDR.into(), bad.into()],
                    },
                    &cred,
                ))
                .await,
            Code::InvalidArgument,
            "is not a multiaddr",
        );
    }
    assert_status(
        w.node
            .update_endpoints(bearer(
                UpdateEndpointsRequest {
                    addresses: vec![format!("/dns4/{}.example/tcp/1", "a".repeat(300))],
                },
                &cred,
            ))
            .await,
        Code::InvalidArgument,
        "the limit is 256",
    );

    let beta = w.beta.node_id().to_string();
    let bad_links: Vec<(LinkReport, &str)> = vec![
        (
            LinkReport {
                rtt_ms: Some(f64::NAN),
                ..link(&beta)
            },
            "rtt_ms NaN is not a duration",
        ),
        (
            LinkReport {
                rtt_ms: Some(-5.0),
                ..link(&beta)
            },
            "is not a duration",
        ),
        (
            LinkReport {
                loss: 1.01,
                ..link(&beta)
            },
            "is not within 0..1",
        ),
        (
            LinkReport {
                path: PathKind::Unspecified as i32,
                ..link(&beta)
            },
            "is not one of connecting, relay, direct, forwarded",
        ),
        (
            LinkReport {
                path: 42,
                ..link(&beta)
            },
            "path kind 42",
        ),
    ];
    for (l, needle) in bad_links {
        assert_status(
            w.node
                .report_links(bearer(
                    ReportLinksRequest {
                        links: vec![link(&beta), l],
                    },
                    &cred,
                ))
                .await,
            Code::InvalidArgument,
            needle,
        );
    }
    assert_status(
        w.node
            .report_links(bearer(
                ReportLinksRequest {
                    links: vec![link(&beta); 4097],
                },
                &cred,
            ))
            .await,
        Code::InvalidArgument,
        "4097 link reports; the limit is 4096",
    );

    assert_eq!(w.state().await, before);
}

#[tokio::test]
async fn oversized_messages_are_refused_and_the_server_goes_on() {
    let mut w = world().await;
    let before = w.state().await;
    let huge = "a".repeat(3 << 19); // 1.5 MiB

    let kp = Keypair::generate_ed25519();
    let r = w.node.join(join_request(&kp, &w.token, &huge)).await;
    let status = r.expect_err("a 1.5 MiB join is refused");
    assert!(
        matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted),
        "unexpected status {status:?}"
    );
    assert!(
        status.message().contains("too large"),
        "message {:?}",
        status.message()
    );

    let r = w
        .admin
        .create_group(w.server.as_admin(CreateGroupRequest { name: huge.clone() }))
        .await;
    let status = r.expect_err("a 1.5 MiB group name is refused");
    assert!(
        matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted),
        "unexpected status {status:?}"
    );

    let r = w
        .node
        .update_endpoints(bearer(
            UpdateEndpointsRequest {
                addresses: vec![huge; 2],
            },
            w.alpha.credential(),
        ))
        .await;
    let status = r.expect_err("3 MiB of addresses are refused");
    assert!(
        matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted),
        "unexpected status {status:?}"
    );

    // The same connections still work, and so do new ones.
    assert_eq!(w.state().await, before);
    w.node
        .authenticate(auth_request(&w.beta.kp, &w.beta.joined.server_id))
        .await
        .expect("node API still answers");
    let mut fresh = w.server.admin().await;
    fresh
        .list_groups(w.server.as_admin(ListGroupsRequest {}))
        .await
        .expect("a new connection is served");
}

#[tokio::test]
async fn bad_admin_input_is_refused_and_changes_nothing() {
    let mut w = world().await;
    let before = w.state().await;
    let s = &w.server;

    assert_status(
        w.admin
            .create_group(s.as_admin(CreateGroupRequest { name: "lab".into() }))
            .await,
        Code::AlreadyExists,
        "group \"lab\" already exists",
    );
    let long = "g".repeat(64);
    for bad in ["", "Lab", "lab one", "lab_1", "-lab", long.as_str()] {
        assert_status(
            w.admin
                .create_group(s.as_admin(CreateGroupRequest { name: bad.into() }))
                .await,
            Code::InvalidArgument,
            "group name",
        );
    }
    assert_status(
        w.admin
            .create_token(s.as_admin(CreateTokenRequest {
                group: "nope".into(),
                ..Default::default()
            }))
            .await,
        Code::NotFound,
        "no group named \"nope\"",
    );
    assert_status(
        w.admin
            .create_token(s.as_admin(CreateTokenRequest {
                group: "lab".into(),
                ttl_seconds: u64::MAX,
                ..Default::default()
            }))
            .await,
        Code::InvalidArgument,
        "longer than the limit",
    );
    for bad in ["garbage", "", "pmj_0123", "0123456789abcdeZ"] {
        assert_status(
            w.admin
                .revoke_token(s.as_admin(RevokeTokenRequest {
                    token: bad.into(),
                    ..Default::default()
                }))
                .await,
            Code::InvalidArgument,
            "expected a join token",
        );
    }
    assert_status(
        w.admin
            .revoke_token(s.as_admin(RevokeTokenRequest {
                token: "0123456789abcdef".into(),
                ..Default::default()
            }))
            .await,
        Code::NotFound,
        "no token with id 0123456789abcdef",
    );
    assert_status(
        w.admin
            .revoke_token(s.as_admin(RevokeTokenRequest {
                token: well_formed_secret("pmj_"),
                ..Default::default()
            }))
            .await,
        Code::NotFound,
        "no token with id",
    );
    for unknown in [
        "gamma",
        "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN",
    ] {
        assert_status(
            w.admin
                .remove_node(s.as_admin(RemoveNodeRequest {
                    node: unknown.into(),
                    ..Default::default()
                }))
                .await,
            Code::NotFound,
            "no node with id or name",
        );
    }
    assert_status(
        w.admin
            .remove_node(s.as_admin(RemoveNodeRequest {
                node: "alpha".into(),
                group: "other".into(),
            }))
            .await,
        Code::NotFound,
        "no node with id or name \"alpha\"",
    );
    assert_status(
        w.admin
            .remove_node(s.as_admin(RemoveNodeRequest {
                node: "n".repeat(1000),
                ..Default::default()
            }))
            .await,
        Code::InvalidArgument,
        "node is 1000 bytes",
    );

    assert_eq!(w.state().await, before);
}

/// Opens a watch for `member`, reads the full map, does `act`, and expects
/// the stream to end with PERMISSION_DENIED mentioning `needle` within 2 s.
async fn watch_then(w: &mut World, member_index: usize, act: Action, needle: &str) {
    let member = if member_index == 0 { &w.alpha } else { &w.beta };
    let cred = member.credential().to_string();
    let node_id = member.node_id().to_string();
    let mut stream = w
        .node
        .watch_network_map(bearer(watch_request(), &cred))
        .await
        .expect("watch")
        .into_inner();
    let first = common::next_update(&mut stream)
        .await
        .expect("first")
        .expect("a message");
    assert!(matches!(first.kind, Some(Kind::Full(_))), "{first:?}");

    match act {
        Action::Remove => {
            let r = w
                .admin
                .remove_node(w.server.as_admin(RemoveNodeRequest {
                    node: node_id.clone(),
                    ..Default::default()
                }))
                .await
                .expect("remove")
                .into_inner();
            assert_eq!(r.node_id, node_id);
        }
        Action::Revoke => {
            let r = w
                .admin
                .revoke_token(w.server.as_admin(RevokeTokenRequest {
                    token: w.token.clone(),
                    ..Default::default()
                }))
                .await
                .expect("revoke")
                .into_inner();
            assert!(r.revoked_nodes.contains(&node_id));
        }
        Action::Leave => {
            w.node
                .leave(bearer(LeaveRequest {}, &cred))
                .await
                .expect("leave");
        }
    }

    let status = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            match stream.message().await {
                // Other members' changes may come first.
                Ok(Some(update)) => match unsigned(&update).kind {
                    Some(Kind::PeerRemoved(id)) if id == node_id => {
                        panic!("own removal sent as a delta")
                    }
                    _ => continue,
                },
                Ok(None) => panic!("stream ended without a status"),
                Err(status) => break status,
            }
        }
    })
    .await
    .expect("PERMISSION_DENIED within 2 s");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains(needle),
        "message {:?} does not mention {needle:?}",
        status.message()
    );

    // The session is gone too.
    let r = w
        .node
        .update_endpoints(bearer(UpdateEndpointsRequest::default(), &cred))
        .await;
    assert!(
        matches!(
            r.as_ref().map_err(|s| s.code()),
            Err(Code::Unauthenticated | Code::PermissionDenied)
        ),
        "{r:?}"
    );
}

enum Action {
    Remove,
    Revoke,
    Leave,
}

#[tokio::test]
async fn removed_node_watch_gets_permission_denied() {
    let mut w = world().await;
    watch_then(&mut w, 0, Action::Remove, "removed by an administrator").await;
    // The other member is untouched.
    let st = w.state().await;
    assert_eq!(st.nodes.len(), 1);
    assert_eq!(st.nodes[0].name, "beta");
}

#[tokio::test]
async fn revoked_node_watch_gets_permission_denied() {
    let mut w = world().await;
    watch_then(&mut w, 1, Action::Revoke, "revoked by an administrator").await;
}

#[tokio::test]
async fn leaving_node_watch_gets_permission_denied() {
    let mut w = world().await;
    watch_then(&mut w, 1, Action::Leave, "left its group").await;
    let st = w.state().await;
    assert_eq!(st.nodes.len(), 1);
    assert_eq!(st.nodes[0].name, "alpha");
}
