//! `etcdserverpb.Auth`: the switch, Authenticate, users and roles.
//!
//! Changes go through the log with the caller, and apply checks that the caller holds the root
//! role (etcd checks there too). Passwords are hashed here, before proposing, so neither the
//! log nor the store ever holds one in plain text; the same admin check is made before
//! hashing, so that a refused caller costs no hash. Reads are served from this member's state
//! after a read barrier.

use std::sync::Arc;

use kv_core::auth::{AuthError, Caller};
use kv_core::proto::etcdserverpb::{self as pb, auth_server::Auth};
use kv_core::proto::kvserverpb::InternalAuthenticateRequest;
use tonic::{Request, Response, Status};

use crate::auth::Credentials;
use crate::auth::{hash_password, token_random_part, verify_password};
use crate::errors::auth_status;
use crate::node::Node;
use crate::propose_as;

/// Attempts of Authenticate when auth changes between the password check and the token's
/// apply (etcd retries the same way, without a bound).
const AUTHENTICATE_ATTEMPTS: usize = 5;

/// The Auth service.
pub struct AuthService {
    node: Arc<Node>,
}

impl AuthService {
    /// An Auth service over `node`.
    pub fn new(node: Arc<Node>) -> Self {
        Self { node }
    }

    /// The caller of `request`, after refusing it early unless it may manage auth.
    async fn admin<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        let caller = self.node.caller(&Credentials::of(request)).await?;
        self.node.check(|a| a.check_admin(&caller))?;
        Ok(caller)
    }

    /// The caller of a read, once this member has applied everything committed before it.
    async fn reader<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        let caller = self.node.caller(&Credentials::of(request)).await?;
        self.node.linearize().await?;
        Ok(caller)
    }

    fn header(&self) -> Option<pb::ResponseHeader> {
        self.node.header(self.node.store.revision())
    }
}

/// Hashes a password on the blocking pool (it takes tens of milliseconds of CPU).
async fn hashed(password: String) -> Result<String, Status> {
    tokio::task::spawn_blocking(move || hash_password(&password))
        .await
        .map_err(|_| Status::internal("etcdserver: password hashing failed"))?
        .map_err(|e| {
            tracing::error!(error = %e, "password hashing failed");
            Status::internal("etcdserver: password hashing failed")
        })
}

#[tonic::async_trait]
impl Auth for AuthService {
    async fn auth_enable(
        &self,
        request: Request<pb::AuthEnableRequest>,
    ) -> Result<Response<pb::AuthEnableResponse>, Status> {
        let caller = self.admin(&request).await?;
        let req = request.into_inner();
        Ok(Response::new(propose_as!(
            self.node, AuthEnable, req, &caller
        )?))
    }

    async fn auth_disable(
        &self,
        request: Request<pb::AuthDisableRequest>,
    ) -> Result<Response<pb::AuthDisableResponse>, Status> {
        let caller = self.admin(&request).await?;
        let req = request.into_inner();
        Ok(Response::new(propose_as!(
            self.node,
            AuthDisable,
            req,
            &caller
        )?))
    }

    async fn auth_status(
        &self,
        request: Request<pb::AuthStatusRequest>,
    ) -> Result<Response<pb::AuthStatusResponse>, Status> {
        let caller = self.reader(&request).await?;
        let (enabled, auth_revision) = self.node.store.auth(|a| {
            a.check_admin(&caller)
                .map(|()| (a.enabled(), a.revision()))
                .map_err(|e| auth_status(&e))
        })?;
        Ok(Response::new(pb::AuthStatusResponse {
            header: self.header(),
            enabled,
            auth_revision,
        }))
    }

    async fn authenticate(
        &self,
        request: Request<pb::AuthenticateRequest>,
    ) -> Result<Response<pb::AuthenticateResponse>, Status> {
        let req = request.into_inner();
        let mut last = Status::unavailable("etcdserver: request timed out");
        for _ in 0..AUTHENTICATE_ATTEMPTS {
            self.node.linearize().await?;
            let (hash, revision) = self
                .node
                .store
                .auth(|a| {
                    if !a.enabled() {
                        return Err(AuthError::AuthNotEnabled);
                    }
                    let user = a.user(&req.name).ok_or(AuthError::AuthFailed)?;
                    let hash = user.password.clone().ok_or(AuthError::NoPasswordUser)?;
                    Ok((hash, a.revision()))
                })
                .map_err(|e| auth_status(&e))?;
            let password = req.password.clone();
            let matches = tokio::task::spawn_blocking(move || verify_password(&password, &hash))
                .await
                .map_err(|_| Status::internal("etcdserver: password check failed"))?;
            if !matches {
                return Err(auth_status(&AuthError::AuthFailed));
            }
            let issue = InternalAuthenticateRequest {
                name: req.name.clone(),
                simple_token: token_random_part().map_err(|e| {
                    tracing::error!(error = %e, "no random token");
                    Status::internal("etcdserver: cannot make a token")
                })?,
            };
            let resp = propose_as!(self.node, Authenticate, issue)?;
            // The leader applied it; so must this member before the client uses the token
            // here, and before the revision below is compared.
            let index = crate::auth::token_index(&resp.token).unwrap_or(0);
            self.node
                .raft
                .wait_applied(index, crate::node::TOKEN_APPLY_WAIT)
                .await
                .map_err(|e| crate::errors::raft_status(&e))?;
            // A change between the check and the token (a new password, say) means the
            // password may no longer be the one checked: check again.
            if self.node.store.auth(|a| a.revision()) == revision {
                return Ok(Response::new(resp));
            }
            self.node.callers.tokens.forget(&resp.token);
            last = Status::unavailable("etcdserver: request timed out");
        }
        Err(last)
    }

    async fn user_add(
        &self,
        request: Request<pb::AuthUserAddRequest>,
    ) -> Result<Response<pb::AuthUserAddResponse>, Status> {
        let caller = self.admin(&request).await?;
        let mut req = request.into_inner();
        if req.name.is_empty() {
            return Err(auth_status(&AuthError::UserEmpty));
        }
        let no_password = req.options.is_some_and(|o| o.no_password);
        let password = std::mem::take(&mut req.password);
        req.hashed_password = if no_password {
            String::new()
        } else {
            hashed(password).await?
        };
        Ok(Response::new(propose_as!(
            self.node, UserAdd, req, &caller
        )?))
    }

    async fn user_get(
        &self,
        request: Request<pb::AuthUserGetRequest>,
    ) -> Result<Response<pb::AuthUserGetResponse>, Status> {
        let caller = self.reader(&request).await?;
        let req = request.into_inner();
        let roles = self.node.store.auth(|a| {
            a.check_user_get(&caller, &req.name)?;
            let user = a.user(&req.name).ok_or(AuthError::UserNotFound)?;
            Ok::<_, AuthError>(user.roles.iter().cloned().collect())
        });
        Ok(Response::new(pb::AuthUserGetResponse {
            header: self.header(),
            roles: roles.map_err(|e| auth_status(&e))?,
        }))
    }

    async fn user_list(
        &self,
        request: Request<pb::AuthUserListRequest>,
    ) -> Result<Response<pb::AuthUserListResponse>, Status> {
        let caller = self.reader(&request).await?;
        let users = self.node.store.auth(|a| {
            a.check_admin(&caller)?;
            Ok::<_, AuthError>(a.users().keys().cloned().collect())
        });
        Ok(Response::new(pb::AuthUserListResponse {
            header: self.header(),
            users: users.map_err(|e| auth_status(&e))?,
        }))
    }

    async fn user_delete(
        &self,
        request: Request<pb::AuthUserDeleteRequest>,
    ) -> Result<Response<pb::AuthUserDeleteResponse>, Status> {
        let caller = self.admin(&request).await?;
        let req = request.into_inner();
        Ok(Response::new(propose_as!(
            self.node, UserDelete, req, &caller
        )?))
    }

    async fn user_change_password(
        &self,
        request: Request<pb::AuthUserChangePasswordRequest>,
    ) -> Result<Response<pb::AuthUserChangePasswordResponse>, Status> {
        let caller = self.admin(&request).await?;
        let mut req = request.into_inner();
        let password = std::mem::take(&mut req.password);
        req.hashed_password = hashed(password).await?;
        Ok(Response::new(propose_as!(
            self.node,
            UserChangePassword,
            req,
            &caller
        )?))
    }

    async fn user_grant_role(
        &self,
        request: Request<pb::AuthUserGrantRoleRequest>,
    ) -> Result<Response<pb::AuthUserGrantRoleResponse>, Status> {
        let caller = self.admin(&request).await?;
        let req = request.into_inner();
        Ok(Response::new(propose_as!(
            self.node,
            UserGrantRole,
            req,
            &caller
        )?))
    }

    async fn user_revoke_role(
        &self,
        request: Request<pb::AuthUserRevokeRoleRequest>,
    ) -> Result<Response<pb::AuthUserRevokeRoleResponse>, Status> {
        let caller = self.admin(&request).await?;
        let req = request.into_inner();
        Ok(Response::new(propose_as!(
            self.node,
            UserRevokeRole,
            req,
            &caller
        )?))
    }

    async fn role_add(
        &self,
        request: Request<pb::AuthRoleAddRequest>,
    ) -> Result<Response<pb::AuthRoleAddResponse>, Status> {
        let caller = self.admin(&request).await?;
        let req = request.into_inner();
        Ok(Response::new(propose_as!(
            self.node, RoleAdd, req, &caller
        )?))
    }

    async fn role_get(
        &self,
        request: Request<pb::AuthRoleGetRequest>,
    ) -> Result<Response<pb::AuthRoleGetResponse>, Status> {
        let caller = self.reader(&request).await?;
        let req = request.into_inner();
        let perm = self.node.store.auth(|a| {
            a.check_role_get(&caller, &req.role)?;
            let perms = a.roles().get(&req.role).ok_or(AuthError::RoleNotFound)?;
            Ok::<_, AuthError>(perms.clone())
        });
        Ok(Response::new(pb::AuthRoleGetResponse {
            header: self.header(),
            perm: perm.map_err(|e| auth_status(&e))?,
        }))
    }

    async fn role_list(
        &self,
        request: Request<pb::AuthRoleListRequest>,
    ) -> Result<Response<pb::AuthRoleListResponse>, Status> {
        let caller = self.reader(&request).await?;
        let roles = self.node.store.auth(|a| {
            a.check_admin(&caller)?;
            Ok::<_, AuthError>(a.roles().keys().cloned().collect())
        });
        Ok(Response::new(pb::AuthRoleListResponse {
            header: self.header(),
            roles: roles.map_err(|e| auth_status(&e))?,
        }))
    }

    async fn role_delete(
        &self,
        request: Request<pb::AuthRoleDeleteRequest>,
    ) -> Result<Response<pb::AuthRoleDeleteResponse>, Status> {
        let caller = self.admin(&request).await?;
        let req = request.into_inner();
        Ok(Response::new(propose_as!(
            self.node, RoleDelete, req, &caller
        )?))
    }

    async fn role_grant_permission(
        &self,
        request: Request<pb::AuthRoleGrantPermissionRequest>,
    ) -> Result<Response<pb::AuthRoleGrantPermissionResponse>, Status> {
        let caller = self.admin(&request).await?;
        let req = request.into_inner();
        Ok(Response::new(propose_as!(
            self.node,
            RoleGrantPermission,
            req,
            &caller
        )?))
    }

    async fn role_revoke_permission(
        &self,
        request: Request<pb::AuthRoleRevokePermissionRequest>,
    ) -> Result<Response<pb::AuthRoleRevokePermissionResponse>, Status> {
        let caller = self.admin(&request).await?;
        let req = request.into_inner();
        Ok(Response::new(propose_as!(
            self.node,
            RoleRevokePermission,
            req,
            &caller
        )?))
    }
}
