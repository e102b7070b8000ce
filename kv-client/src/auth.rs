//! Authentication and access control: users, roles, key permissions and the switch that
//! turns checking on, as etcd's Auth API has them. Most calls need the root role once
//! authentication is on; connect with [`crate::ClientOptions::with_user`] to make them.

use kv_core::proto::authpb::{Permission as ProtoPermission, UserAddOptions, permission::Type};
use kv_core::proto::etcdserverpb::{
    AuthDisableRequest, AuthEnableRequest, AuthRoleAddRequest, AuthRoleDeleteRequest,
    AuthRoleGetRequest, AuthRoleGrantPermissionRequest, AuthRoleListRequest,
    AuthRoleRevokePermissionRequest, AuthStatusRequest, AuthUserAddRequest,
    AuthUserChangePasswordRequest, AuthUserDeleteRequest, AuthUserGetRequest,
    AuthUserGrantRoleRequest, AuthUserListRequest, AuthUserRevokeRoleRequest,
};

use crate::client::{Client, Idempotence, api};
use crate::error::Result;
use crate::kv::prefix_end;

/// The user and role that must exist (the user holding the role) before authentication can
/// be turned on; holders of the role may do anything.
pub const ROOT: &str = "root";

/// Which access a permission grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Reading keys.
    Read,
    /// Writing keys.
    Write,
    /// Both.
    ReadWrite,
}

/// Access to a key, a range of keys, a prefix or every key from one on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPermission {
    /// What it allows.
    pub access: Access,
    /// The key, or the first key of the range.
    pub key: Vec<u8>,
    /// Empty for the key alone, `[0]` for every key from `key` on, else the end of the
    /// range (exclusive).
    pub range_end: Vec<u8>,
}

impl KeyPermission {
    /// `access` to `key` alone.
    pub fn key(access: Access, key: impl Into<Vec<u8>>) -> Self {
        Self {
            access,
            key: key.into(),
            range_end: Vec::new(),
        }
    }

    /// `access` to every key starting with `prefix`; an empty prefix means every key.
    pub fn prefix(access: Access, prefix: impl Into<Vec<u8>>) -> Self {
        let prefix = prefix.into();
        if prefix.is_empty() {
            // etcd's encoding of "all keys": from the smallest key on.
            return Self::from_key(access, [0u8]);
        }
        Self {
            access,
            range_end: prefix_end(&prefix),
            key: prefix,
        }
    }

    /// `access` to keys from `key` up to `end` (exclusive).
    pub fn range(access: Access, key: impl Into<Vec<u8>>, end: impl Into<Vec<u8>>) -> Self {
        Self {
            access,
            key: key.into(),
            range_end: end.into(),
        }
    }

    /// `access` to every key from `key` on.
    pub fn from_key(access: Access, key: impl Into<Vec<u8>>) -> Self {
        Self {
            access,
            key: key.into(),
            range_end: vec![0],
        }
    }

    fn to_proto(&self) -> ProtoPermission {
        let kind = match self.access {
            Access::Read => Type::Read,
            Access::Write => Type::Write,
            Access::ReadWrite => Type::Readwrite,
        };
        ProtoPermission {
            perm_type: kind as i32,
            key: self.key.clone(),
            range_end: self.range_end.clone(),
        }
    }

    fn from_proto(p: ProtoPermission) -> Self {
        let access = match p.perm_type() {
            Type::Read => Access::Read,
            Type::Write => Access::Write,
            Type::Readwrite => Access::ReadWrite,
        };
        Self {
            access,
            key: p.key,
            range_end: p.range_end,
        }
    }
}

/// Whether authentication is on, and how many changes users and roles have seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthStatus {
    /// Whether requests are checked.
    pub enabled: bool,
    /// The auth revision.
    pub revision: u64,
}

/// The authentication API of a [`Client`].
#[derive(Debug, Clone)]
pub struct Auth {
    client: Client,
}

/// Sends one Auth call through the client's failover and retries, returning the answer.
macro_rules! auth_call {
    ($self:ident, $idempotence:expr, $method:ident, $request:expr) => {{
        let request = $request;
        $self
            .client
            .call($idempotence, |channel| {
                let request = request.clone();
                async move { Ok(api::auth(channel).$method(request).await?.into_inner()) }
            })
            .await
    }};
}

impl Auth {
    pub(crate) fn new(client: Client) -> Self {
        Self { client }
    }

    /// Turns authentication on; needs a `root` user holding the `root` role (see
    /// [`Auth::enable_with_root`]).
    pub async fn enable(&self) -> Result<()> {
        auth_call!(self, Idempotence::Safe, auth_enable, AuthEnableRequest {})?;
        Ok(())
    }

    /// Creates the `root` role and grants it to the existing `root` user if needed, then
    /// turns authentication on, as `etcdctl auth enable` does.
    pub async fn enable_with_root(&self) -> Result<()> {
        match self.role_add(ROOT).await {
            Ok(()) => {}
            Err(crate::Error::Server { message, .. })
                if message == "etcdserver: role name already exists" => {}
            Err(e) => return Err(e),
        }
        self.user_grant_role(ROOT, ROOT).await?;
        self.enable().await
    }

    /// Turns authentication off.
    pub async fn disable(&self) -> Result<()> {
        auth_call!(self, Idempotence::Safe, auth_disable, AuthDisableRequest {})?;
        Ok(())
    }

    /// Whether authentication is on, and the auth revision.
    pub async fn status(&self) -> Result<AuthStatus> {
        let r = auth_call!(self, Idempotence::Safe, auth_status, AuthStatusRequest {})?;
        Ok(AuthStatus {
            enabled: r.enabled,
            revision: r.auth_revision,
        })
    }

    /// Adds a user with a password.
    pub async fn user_add(&self, name: &str, password: &str) -> Result<()> {
        let request = AuthUserAddRequest {
            name: name.to_string(),
            password: password.to_string(),
            options: Some(UserAddOptions { no_password: false }),
            hashed_password: String::new(),
        };
        auth_call!(self, Idempotence::Unsafe, user_add, request)?;
        Ok(())
    }

    /// Adds a user without a password, who can only be known by a client certificate.
    pub async fn user_add_without_password(&self, name: &str) -> Result<()> {
        let request = AuthUserAddRequest {
            name: name.to_string(),
            options: Some(UserAddOptions { no_password: true }),
            ..Default::default()
        };
        auth_call!(self, Idempotence::Unsafe, user_add, request)?;
        Ok(())
    }

    /// Deletes a user; its tokens stop working.
    pub async fn user_delete(&self, name: &str) -> Result<()> {
        let request = AuthUserDeleteRequest {
            name: name.to_string(),
        };
        auth_call!(self, Idempotence::Unsafe, user_delete, request)?;
        Ok(())
    }

    /// The roles of a user.
    pub async fn user_get(&self, name: &str) -> Result<Vec<String>> {
        let request = AuthUserGetRequest {
            name: name.to_string(),
        };
        Ok(auth_call!(self, Idempotence::Safe, user_get, request)?.roles)
    }

    /// Every user name, sorted.
    pub async fn user_list(&self) -> Result<Vec<String>> {
        Ok(auth_call!(self, Idempotence::Safe, user_list, AuthUserListRequest {})?.users)
    }

    /// Sets a user's password; its tokens stop working.
    pub async fn user_change_password(&self, name: &str, password: &str) -> Result<()> {
        let request = AuthUserChangePasswordRequest {
            name: name.to_string(),
            password: password.to_string(),
            hashed_password: String::new(),
        };
        auth_call!(self, Idempotence::Safe, user_change_password, request)?;
        Ok(())
    }

    /// Grants a role to a user (granting it again changes nothing).
    pub async fn user_grant_role(&self, user: &str, role: &str) -> Result<()> {
        let request = AuthUserGrantRoleRequest {
            user: user.to_string(),
            role: role.to_string(),
        };
        auth_call!(self, Idempotence::Safe, user_grant_role, request)?;
        Ok(())
    }

    /// Takes a role from a user.
    pub async fn user_revoke_role(&self, user: &str, role: &str) -> Result<()> {
        let request = AuthUserRevokeRoleRequest {
            name: user.to_string(),
            role: role.to_string(),
        };
        auth_call!(self, Idempotence::Unsafe, user_revoke_role, request)?;
        Ok(())
    }

    /// Adds a role without permissions.
    pub async fn role_add(&self, name: &str) -> Result<()> {
        let request = AuthRoleAddRequest {
            name: name.to_string(),
        };
        auth_call!(self, Idempotence::Unsafe, role_add, request)?;
        Ok(())
    }

    /// Deletes a role, taking it from every user holding it.
    pub async fn role_delete(&self, name: &str) -> Result<()> {
        let request = AuthRoleDeleteRequest {
            role: name.to_string(),
        };
        auth_call!(self, Idempotence::Unsafe, role_delete, request)?;
        Ok(())
    }

    /// The permissions of a role, sorted by key.
    pub async fn role_get(&self, name: &str) -> Result<Vec<KeyPermission>> {
        let request = AuthRoleGetRequest {
            role: name.to_string(),
        };
        let answer = auth_call!(self, Idempotence::Safe, role_get, request)?;
        Ok(answer
            .perm
            .into_iter()
            .map(KeyPermission::from_proto)
            .collect())
    }

    /// Every role name, sorted.
    pub async fn role_list(&self) -> Result<Vec<String>> {
        Ok(auth_call!(self, Idempotence::Safe, role_list, AuthRoleListRequest {})?.roles)
    }

    /// Grants a permission to a role; a grant over the same key and end replaces the access.
    pub async fn role_grant_permission(
        &self,
        role: &str,
        permission: &KeyPermission,
    ) -> Result<()> {
        let request = AuthRoleGrantPermissionRequest {
            name: role.to_string(),
            perm: Some(permission.to_proto()),
        };
        auth_call!(self, Idempotence::Safe, role_grant_permission, request)?;
        Ok(())
    }

    /// Revokes the permission over exactly `key` and `range_end` (as granted) from a role.
    pub async fn role_revoke_permission(
        &self,
        role: &str,
        key: &[u8],
        range_end: &[u8],
    ) -> Result<()> {
        let request = AuthRoleRevokePermissionRequest {
            role: role.to_string(),
            key: key.to_vec(),
            range_end: range_end.to_vec(),
        };
        auth_call!(self, Idempotence::Unsafe, role_revoke_permission, request)?;
        Ok(())
    }
}
