//! What each KV and lease request needs of its caller, as release-3.5 of etcd checks it:
//! READ for ranges, compares and previous values, WRITE for puts and deletes, WRITE on every
//! key of a lease a put attaches to or a revoke deletes, both branches of a txn whatever its
//! compares decide, nested txns included.

use super::{AuthError, AuthState, Caller, permission::UserPermissions};
use crate::proto::etcdserverpb::{
    DeleteRangeRequest, PutRequest, RangeRequest, TxnRequest, request_op::Request,
};

/// The keys attached to a lease (empty for an unknown lease), for the checks of puts that
/// attach keys to it.
pub type LeaseKeys<'a> = &'a dyn Fn(i64) -> Vec<Vec<u8>>;

fn need(allowed: bool) -> Result<(), AuthError> {
    if allowed {
        Ok(())
    } else {
        Err(AuthError::PermissionDenied)
    }
}

fn range(p: &UserPermissions, req: &RangeRequest) -> Result<(), AuthError> {
    need(p.read.allows(&req.key, &req.range_end))
}

fn put(p: &UserPermissions, req: &PutRequest, lease_keys: LeaseKeys<'_>) -> Result<(), AuthError> {
    need(p.write.allows(&req.key, &[]))?;
    if req.prev_kv {
        need(p.read.allows(&req.key, &[]))?;
    }
    if req.lease != 0 {
        // Attaching to a lease lets its revoke delete the key, and the lease's other keys
        // with it: the caller must be able to write all of them.
        for key in lease_keys(req.lease) {
            need(p.write.allows(&key, &[]))?;
        }
    }
    Ok(())
}

fn delete(p: &UserPermissions, req: &DeleteRangeRequest) -> Result<(), AuthError> {
    need(p.write.allows(&req.key, &req.range_end))?;
    if req.prev_kv {
        need(p.read.allows(&req.key, &req.range_end))?;
    }
    Ok(())
}

fn txn(p: &UserPermissions, req: &TxnRequest, lease_keys: LeaseKeys<'_>) -> Result<(), AuthError> {
    for c in &req.compare {
        need(p.read.allows(&c.key, &c.range_end))?;
    }
    for op in req.success.iter().chain(&req.failure) {
        match &op.request {
            Some(Request::RequestRange(r)) => range(p, r)?,
            Some(Request::RequestPut(r)) => put(p, r, lease_keys)?,
            Some(Request::RequestDeleteRange(r)) => delete(p, r)?,
            Some(Request::RequestTxn(r)) => txn(p, r, lease_keys)?,
            None => {}
        }
    }
    Ok(())
}

impl AuthState {
    /// Whether `caller` may run the Range `req`.
    pub fn check_range(&self, caller: &Caller, req: &RangeRequest) -> Result<(), AuthError> {
        match self.caller_permissions(caller)? {
            Some(p) => range(p, req),
            None => Ok(()),
        }
    }

    /// Whether `caller` may run the Put `req`.
    pub fn check_put(
        &self,
        caller: &Caller,
        req: &PutRequest,
        lease_keys: LeaseKeys<'_>,
    ) -> Result<(), AuthError> {
        match self.caller_permissions(caller)? {
            Some(p) => put(p, req, lease_keys),
            None => Ok(()),
        }
    }

    /// Whether `caller` may run the DeleteRange `req`.
    pub fn check_delete(&self, caller: &Caller, req: &DeleteRangeRequest) -> Result<(), AuthError> {
        match self.caller_permissions(caller)? {
            Some(p) => delete(p, req),
            None => Ok(()),
        }
    }

    /// Whether `caller` may run the Txn `req`: every compare and every op of both branches.
    pub fn check_txn(
        &self,
        caller: &Caller,
        req: &TxnRequest,
        lease_keys: LeaseKeys<'_>,
    ) -> Result<(), AuthError> {
        match self.caller_permissions(caller)? {
            Some(p) => txn(p, req, lease_keys),
            None => Ok(()),
        }
    }

    /// Whether `caller` may have `access` to every key of lease `lease` (revoke and
    /// keep-alive need WRITE, a time-to-live listing the keys needs READ). The keys are looked
    /// up only when there is something to check: keep-alives are a hot path, and most callers
    /// (auth off, admins) need no list.
    pub fn check_lease_keys(
        &self,
        caller: &Caller,
        access: super::Access,
        lease_keys: LeaseKeys<'_>,
        lease: i64,
    ) -> Result<(), AuthError> {
        let Some(p) = self.caller_permissions(caller)? else {
            return Ok(());
        };
        let set = match access {
            super::Access::Read => &p.read,
            super::Access::Write => &p.write,
        };
        lease_keys(lease)
            .iter()
            .try_for_each(|k| need(set.allows(k, &[])))
    }

    /// Whether `caller` is someone: with auth on, requests without credentials are refused
    /// even where no key is involved (lease grants, status, member lists).
    pub fn check_authenticated(&self, caller: &Caller) -> Result<(), AuthError> {
        if self.enabled && caller.user.is_none() {
            return Err(AuthError::UserEmpty);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::ROOT;
    use crate::proto::authpb::{Permission, permission::Type as PermType};
    use crate::proto::etcdserverpb::{Compare, RequestOp};

    /// Auth on; `alice` reads and writes `/app/`, reads `/ro`.
    fn state() -> AuthState {
        let mut a = AuthState::default();
        a.user_add(ROOT, Some("h".into())).unwrap();
        a.user_grant_role(ROOT, ROOT).unwrap();
        a.user_add("alice", Some("h".into())).unwrap();
        a.role_add("app").unwrap();
        let grant = |t: PermType, key: &str, end: &str| {
            Some(Permission {
                perm_type: t as i32,
                key: key.into(),
                range_end: end.into(),
            })
        };
        a.role_grant_permission("app", grant(PermType::Readwrite, "/app/", "/app0"))
            .unwrap();
        a.role_grant_permission("app", grant(PermType::Read, "/ro", ""))
            .unwrap();
        a.user_grant_role("alice", "app").unwrap();
        a.enable().unwrap();
        a
    }

    fn op(r: Request) -> RequestOp {
        RequestOp { request: Some(r) }
    }

    fn put_req(key: &str) -> PutRequest {
        PutRequest {
            key: key.into(),
            ..Default::default()
        }
    }

    #[test]
    fn puts_need_write_and_previous_values_need_read() {
        let a = state();
        let alice = Caller::user("alice", a.revision());
        let none: LeaseKeys<'_> = &|_| Vec::new();
        a.check_put(&alice, &put_req("/app/x"), none).unwrap();
        assert_eq!(
            a.check_put(&alice, &put_req("/ro"), none),
            Err(AuthError::PermissionDenied)
        );
        let lease_with_secret: LeaseKeys<'_> = &|_| vec![b"/secret".to_vec()];
        let mut attach = put_req("/app/x");
        attach.lease = 7;
        assert_eq!(
            a.check_put(&alice, &attach, lease_with_secret),
            Err(AuthError::PermissionDenied),
            "a put may not attach to a lease whose other keys the caller cannot write"
        );
        a.check_put(&alice, &attach, none).unwrap();
        let root = Caller::user(ROOT, a.revision());
        a.check_put(&root, &put_req("/anything"), lease_with_secret)
            .unwrap();
    }

    #[test]
    fn a_txn_needs_every_branch_and_nested_txn_whatever_the_compares_say() {
        let a = state();
        let alice = Caller::user("alice", a.revision());
        let none: LeaseKeys<'_> = &|_| Vec::new();
        let fine = TxnRequest {
            compare: vec![Compare {
                key: b"/ro".to_vec(),
                ..Default::default()
            }],
            success: vec![op(Request::RequestPut(put_req("/app/a")))],
            failure: vec![op(Request::RequestRange(RangeRequest {
                key: b"/app/".to_vec(),
                range_end: b"/app0".to_vec(),
                ..Default::default()
            }))],
        };
        a.check_txn(&alice, &fine, none).unwrap();
        let mut bad_failure = fine.clone();
        bad_failure
            .failure
            .push(op(Request::RequestPut(put_req("/secret"))));
        assert_eq!(
            a.check_txn(&alice, &bad_failure, none),
            Err(AuthError::PermissionDenied)
        );
        let nested = TxnRequest {
            success: vec![op(Request::RequestTxn(bad_failure))],
            ..Default::default()
        };
        assert_eq!(
            a.check_txn(&alice, &nested, none),
            Err(AuthError::PermissionDenied)
        );
        let mut bad_compare = fine;
        bad_compare.compare[0].key = b"/secret".to_vec();
        assert_eq!(
            a.check_txn(&alice, &bad_compare, none),
            Err(AuthError::PermissionDenied)
        );
    }

    #[test]
    fn callers_without_credentials_or_with_stale_ones_are_refused_first() {
        let mut a = state();
        let get = RangeRequest {
            key: b"/app/x".to_vec(),
            ..Default::default()
        };
        assert_eq!(
            a.check_range(&Caller::default(), &get),
            Err(AuthError::UserEmpty)
        );
        assert_eq!(
            a.check_authenticated(&Caller::default()),
            Err(AuthError::UserEmpty)
        );
        let stale = Caller::user("alice", a.revision());
        a.role_add("other").unwrap();
        assert_eq!(a.check_range(&stale, &get), Err(AuthError::AuthOldRevision));
        a.disable();
        a.check_range(&Caller::default(), &get).unwrap();
        a.check_authenticated(&Caller::default()).unwrap();
    }
}
