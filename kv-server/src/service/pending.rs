//! Services whose issue has not landed yet (Auth). Every call
//! answers `Unimplemented` naming what is missing, so a client gets a clear, immediate error
//! instead of a hang or a wrong answer.

use std::pin::Pin;

use futures::Stream;
use kv_core::proto::etcdserverpb::{self as pb, auth_server::Auth};
use tonic::{Request, Response, Status};

/// A boxed server stream.
pub type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The `Unimplemented` status for a service that arrives later.
pub fn not_yet(service: &str) -> Status {
    Status::unimplemented(format!(
        "kv-server: the {service} service is not implemented in this version"
    ))
}

/// Services not implemented yet; one value serves all of them.
#[derive(Debug, Clone, Copy, Default)]
pub struct Pending;

/// Implements a service trait for [`Pending`]: every listed unary call (and any streaming
/// call written out in the braces) answers [`not_yet`].
macro_rules! pending_impl {
    ($trait:ident, $service:literal, { $($extra:tt)* } $($name:ident($req:ty) -> $resp:ty;)*) => {
        #[tonic::async_trait]
        impl $trait for Pending {
            $($extra)*
            $(
                async fn $name(&self, _: Request<$req>) -> Result<Response<$resp>, Status> {
                    Err(not_yet($service))
                }
            )*
        }
    };
}

pending_impl!(Auth, "Auth", {}
    auth_enable(pb::AuthEnableRequest) -> pb::AuthEnableResponse;
    auth_disable(pb::AuthDisableRequest) -> pb::AuthDisableResponse;
    auth_status(pb::AuthStatusRequest) -> pb::AuthStatusResponse;
    authenticate(pb::AuthenticateRequest) -> pb::AuthenticateResponse;
    user_add(pb::AuthUserAddRequest) -> pb::AuthUserAddResponse;
    user_get(pb::AuthUserGetRequest) -> pb::AuthUserGetResponse;
    user_list(pb::AuthUserListRequest) -> pb::AuthUserListResponse;
    user_delete(pb::AuthUserDeleteRequest) -> pb::AuthUserDeleteResponse;
    user_change_password(pb::AuthUserChangePasswordRequest) -> pb::AuthUserChangePasswordResponse;
    user_grant_role(pb::AuthUserGrantRoleRequest) -> pb::AuthUserGrantRoleResponse;
    user_revoke_role(pb::AuthUserRevokeRoleRequest) -> pb::AuthUserRevokeRoleResponse;
    role_add(pb::AuthRoleAddRequest) -> pb::AuthRoleAddResponse;
    role_get(pb::AuthRoleGetRequest) -> pb::AuthRoleGetResponse;
    role_list(pb::AuthRoleListRequest) -> pb::AuthRoleListResponse;
    role_delete(pb::AuthRoleDeleteRequest) -> pb::AuthRoleDeleteResponse;
    role_grant_permission(pb::AuthRoleGrantPermissionRequest) -> pb::AuthRoleGrantPermissionResponse;
    role_revoke_permission(pb::AuthRoleRevokePermissionRequest) -> pb::AuthRoleRevokePermissionResponse;
);
