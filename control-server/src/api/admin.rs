//! Admin: what operators call, with the credential from `<data>/admin.token`.

use std::sync::Arc;

use peermesh_proto::api::{
    admin_server::Admin, CreateGroupRequest, CreateTokenRequest, CreateTokenResponse, GroupInfo,
    LinkTableRequest, LinkTableResponse, ListGroupsRequest, ListGroupsResponse, ListNodesRequest,
    ListNodesResponse, ListRelaysRequest, ListRelaysResponse, ListTokensRequest,
    ListTokensResponse, RemoveNodeRequest, RemoveNodeResponse, RevokeTokenRequest,
    RevokeTokenResponse, RotateServerKeyRequest, RotateServerKeyResponse,
};
use peermesh_proto::token::JoinToken;
use tonic::{Request, Response, Status};

use crate::registry::Registry;
use crate::relays::RelayDirectory;
use crate::tls::KeyStore;
use crate::{secrets, tokens};

pub struct AdminApi {
    registry: Arc<Registry>,
    relays: Arc<RelayDirectory>,
    keys: Arc<KeyStore>,
    credential_digest: [u8; 32],
}

impl AdminApi {
    pub fn new(
        registry: Arc<Registry>,
        relays: Arc<RelayDirectory>,
        keys: Arc<KeyStore>,
        admin_credential: &str,
    ) -> Self {
        Self {
            registry,
            relays,
            keys,
            credential_digest: secrets::digest(admin_credential),
        }
    }

    fn check<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let given = super::bearer(req.metadata())?;
        if secrets::digest_eq(&secrets::digest(given), &self.credential_digest) {
            Ok(())
        } else {
            Err(Status::unauthenticated("wrong admin credential"))
        }
    }
}

#[tonic::async_trait]
impl Admin for AdminApi {
    async fn create_group(
        &self,
        req: Request<CreateGroupRequest>,
    ) -> Result<Response<GroupInfo>, Status> {
        self.check(&req)?;
        Ok(Response::new(
            self.registry.create_group(&req.get_ref().name).await?,
        ))
    }

    async fn list_groups(
        &self,
        req: Request<ListGroupsRequest>,
    ) -> Result<Response<ListGroupsResponse>, Status> {
        self.check(&req)?;
        Ok(Response::new(ListGroupsResponse {
            groups: self.registry.list_groups()?,
        }))
    }

    async fn create_token(
        &self,
        req: Request<CreateTokenRequest>,
    ) -> Result<Response<CreateTokenResponse>, Status> {
        self.check(&req)?;
        let r = req.get_ref();
        let (secret, info) = self
            .registry
            .create_token_with(&r.group, r.ttl_seconds, r.max_uses, r.reusable, r.relay)
            .await?;
        // The token carries the server key's fingerprint: the URL and the
        // token are all a node needs to reach this server, and only it.
        let token = JoinToken {
            secret,
            pin: Some(self.keys.pin()),
        };
        Ok(Response::new(CreateTokenResponse {
            token: token.to_string(),
            info: Some(info),
        }))
    }

    async fn list_tokens(
        &self,
        req: Request<ListTokensRequest>,
    ) -> Result<Response<ListTokensResponse>, Status> {
        self.check(&req)?;
        Ok(Response::new(ListTokensResponse {
            tokens: self.registry.list_tokens(&req.get_ref().group)?,
        }))
    }

    async fn revoke_token(
        &self,
        req: Request<RevokeTokenRequest>,
    ) -> Result<Response<RevokeTokenResponse>, Status> {
        self.check(&req)?;
        let r = req.get_ref();
        // A node token is the registry's to revoke (with its nodes), a relay
        // token the relay directory's (with its relays).
        let token = tokens::find(self.registry.store(), &r.token)?;
        let (info, revoked_nodes) = if token.relay {
            self.relays.revoke_relay_token(token, r.keep_nodes).await?
        } else {
            self.registry.revoke_node_token(token, r.keep_nodes).await?
        };
        Ok(Response::new(RevokeTokenResponse {
            info: Some(info),
            revoked_nodes,
        }))
    }

    async fn list_nodes(
        &self,
        req: Request<ListNodesRequest>,
    ) -> Result<Response<ListNodesResponse>, Status> {
        self.check(&req)?;
        Ok(Response::new(ListNodesResponse {
            nodes: self.registry.list_nodes(&req.get_ref().group)?,
        }))
    }

    async fn remove_node(
        &self,
        req: Request<RemoveNodeRequest>,
    ) -> Result<Response<RemoveNodeResponse>, Status> {
        self.check(&req)?;
        let r = req.get_ref();
        Ok(Response::new(RemoveNodeResponse {
            node_id: self.registry.remove_node(&r.node, &r.group).await?,
        }))
    }

    async fn link_table(
        &self,
        req: Request<LinkTableRequest>,
    ) -> Result<Response<LinkTableResponse>, Status> {
        self.check(&req)?;
        Ok(Response::new(LinkTableResponse {
            links: self.registry.link_table(&req.get_ref().group)?,
        }))
    }

    async fn rotate_server_key(
        &self,
        req: Request<RotateServerKeyRequest>,
    ) -> Result<Response<RotateServerKeyResponse>, Status> {
        self.check(&req)?;
        let (old, new) = self
            .keys
            .rotate()
            .await
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        Ok(Response::new(RotateServerKeyResponse {
            old_pin: old.to_string(),
            new_pin: new.to_string(),
        }))
    }

    async fn list_relays(
        &self,
        req: Request<ListRelaysRequest>,
    ) -> Result<Response<ListRelaysResponse>, Status> {
        self.check(&req)?;
        Ok(Response::new(ListRelaysResponse {
            relays: self.relays.list_relays()?,
        }))
    }
}
