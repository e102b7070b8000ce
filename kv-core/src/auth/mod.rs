//! Authentication and role-based access: users, roles, their key permissions and the switch
//! that turns checking on, with etcd's rules and error messages.
//!
//! This is the replicated state every member applies in the same order; it decides, from
//! that state alone, whether a caller may do something. Passwords arrive here already hashed
//! (hashing is slow and salted with randomness, so it happens before a request is proposed,
//! never during apply), and tokens are the server's business: a request reaches these checks
//! with the user name and the auth revision its token or certificate stood for.

pub mod permission;
pub mod requests;

use std::collections::{BTreeMap, BTreeSet, HashMap};

use prost::Message;

use crate::proto::authpb::{self, Permission, Role, UserAddOptions};
use permission::UserPermissions;

/// The user that must exist, holding the role of the same name, before auth can be enabled;
/// and the role that bypasses every permission check.
pub const ROOT: &str = "root";

/// Why an auth request or check failed. The `Display` texts are etcd's, which clients match
/// word for word.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Auth cannot be enabled without a `root` user.
    #[error("etcdserver: root user does not exist")]
    RootUserNotExist,
    /// Auth cannot be enabled while `root` lacks the `root` role.
    #[error("etcdserver: root user does not have root role")]
    RootRoleNotExist,
    /// A user of that name exists.
    #[error("etcdserver: user name already exists")]
    UserAlreadyExist,
    /// No user name: an empty one in a request, or no credentials while auth is on.
    #[error("etcdserver: user name is empty")]
    UserEmpty,
    /// No user of that name.
    #[error("etcdserver: user name not found")]
    UserNotFound,
    /// A role of that name exists.
    #[error("etcdserver: role name already exists")]
    RoleAlreadyExist,
    /// No role of that name.
    #[error("etcdserver: role name not found")]
    RoleNotFound,
    /// An empty role name.
    #[error("etcdserver: role name is empty")]
    RoleEmpty,
    /// Wrong user or password.
    #[error("etcdserver: authentication failed, invalid user ID or password")]
    AuthFailed,
    /// A grant without a permission.
    #[error("etcdserver: permission not given")]
    PermissionNotGiven,
    /// The caller may not do this.
    #[error("etcdserver: permission denied")]
    PermissionDenied,
    /// Revoking a role the user does not hold.
    #[error("etcdserver: role is not granted to the user")]
    RoleNotGranted,
    /// Revoking a permission the role does not have.
    #[error("etcdserver: permission is not granted to the role")]
    PermissionNotGranted,
    /// Authenticate while auth is off.
    #[error("etcdserver: authentication is not enabled")]
    AuthNotEnabled,
    /// A token that is unknown, expired or malformed.
    #[error("etcdserver: invalid auth token")]
    InvalidAuthToken,
    /// A change that would lock root out while auth is on, or an invalid permission range.
    #[error("etcdserver: invalid auth management")]
    InvalidAuthMgmt,
    /// The request's credentials predate a change to users, roles or permissions.
    #[error("etcdserver: revision of auth store is old")]
    AuthOldRevision,
    /// Authenticate with a password for a user created without one. etcd sends this one
    /// unmapped (code Unknown), hence the other prefix.
    #[error("auth: authentication failed, password was given for no password user")]
    NoPasswordUser,
}

const RECORD_ENABLED: &[u8] = b"enabled";
const RECORD_REVISION: &[u8] = b"revision";
const RECORD_USER: &[u8] = b"user/";
const RECORD_ROLE: &[u8] = b"role/";

fn record_name(kind: &[u8], name: &str) -> Vec<u8> {
    let mut out = kind.to_vec();
    out.extend_from_slice(name.as_bytes());
    out
}

/// Who makes a request, as its credentials said when the server checked them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Caller {
    /// The user; `None` without credentials.
    pub user: Option<String>,
    /// The auth revision the credentials were checked at.
    pub revision: u64,
}

impl Caller {
    /// A caller known as `user` at auth revision `revision`.
    pub fn user(user: &str, revision: u64) -> Caller {
        Caller {
            user: Some(user.to_string()),
            revision,
        }
    }
}

/// Read or write, the two kinds of key access a request needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Reading keys (ranges, compares, watches, previous values).
    Read,
    /// Writing keys (puts, deletes, lease revocations).
    Write,
}

/// A user as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// The password hash (a PHC string); `None` for a user made with `no_password`, who can
    /// only be authenticated by a client certificate.
    pub password: Option<String>,
    /// The roles the user holds.
    pub roles: BTreeSet<String>,
}

/// Users, roles, permissions and the on/off switch, with the revision that counts changes.
#[derive(Debug, Clone)]
pub struct AuthState {
    enabled: bool,
    revision: u64,
    users: BTreeMap<String, User>,
    /// Each role's permissions, sorted by key then end, one per `(key, range_end)`.
    roles: BTreeMap<String, Vec<Permission>>,
    /// Each user's merged permissions, rebuilt after every change.
    merged: HashMap<String, UserPermissions>,
}

impl Default for AuthState {
    fn default() -> Self {
        AuthState {
            enabled: false,
            // etcd's store starts at revision 1, so a credential of revision 0 is "none".
            revision: 1,
            users: BTreeMap::new(),
            roles: BTreeMap::new(),
            merged: HashMap::new(),
        }
    }
}

impl AuthState {
    /// The state as stored: the switch, the revision, users and roles.
    pub fn from_parts(
        enabled: bool,
        revision: u64,
        users: BTreeMap<String, User>,
        roles: BTreeMap<String, Vec<Permission>>,
    ) -> Self {
        let mut state = AuthState {
            enabled,
            revision,
            users,
            roles,
            merged: HashMap::new(),
        };
        state.remerge();
        state
    }

    /// Whether permission checks are on.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The auth revision: how many changes the users, roles and permissions have seen, plus one.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// The user named `name`.
    pub fn user(&self, name: &str) -> Option<&User> {
        self.users.get(name)
    }

    /// Every user, by name.
    pub fn users(&self) -> &BTreeMap<String, User> {
        &self.users
    }

    /// Every role's permissions, by role name.
    pub fn roles(&self) -> &BTreeMap<String, Vec<Permission>> {
        &self.roles
    }

    /// Turns checking on; it needs a `root` user with the `root` role. Enabling twice is fine.
    pub fn enable(&mut self) -> Result<(), AuthError> {
        if self.enabled {
            return Ok(());
        }
        let root = self.users.get(ROOT).ok_or(AuthError::RootUserNotExist)?;
        if !root.roles.contains(ROOT) {
            return Err(AuthError::RootRoleNotExist);
        }
        self.enabled = true;
        Ok(())
    }

    /// Turns checking off. Credentials issued before stop counting (the revision moves on).
    pub fn disable(&mut self) {
        self.enabled = false;
        self.bump();
    }

    /// Adds a user with a password hash, or none (`no_password`).
    pub fn user_add(&mut self, name: &str, password: Option<String>) -> Result<(), AuthError> {
        if name.is_empty() {
            return Err(AuthError::UserEmpty);
        }
        if self.users.contains_key(name) {
            return Err(AuthError::UserAlreadyExist);
        }
        let user = User {
            password,
            roles: BTreeSet::new(),
        };
        self.users.insert(name.to_string(), user);
        self.bump();
        Ok(())
    }

    /// Deletes a user; `root` stays while auth is on.
    pub fn user_delete(&mut self, name: &str) -> Result<(), AuthError> {
        if self.enabled && name == ROOT {
            return Err(AuthError::InvalidAuthMgmt);
        }
        self.users.remove(name).ok_or(AuthError::UserNotFound)?;
        self.bump();
        Ok(())
    }

    /// Replaces a user's password hash. A user made without a password stays without one.
    pub fn user_change_password(&mut self, name: &str, password: String) -> Result<(), AuthError> {
        let user = self.users.get_mut(name).ok_or(AuthError::UserNotFound)?;
        if user.password.is_some() {
            user.password = Some(password);
        }
        self.bump();
        Ok(())
    }

    /// Grants `role` to `user`. The `root` role need not exist as a role; granting a role
    /// twice changes nothing.
    pub fn user_grant_role(&mut self, user: &str, role: &str) -> Result<(), AuthError> {
        if !self.users.contains_key(user) {
            return Err(AuthError::UserNotFound);
        }
        if role != ROOT && !self.roles.contains_key(role) {
            return Err(AuthError::RoleNotFound);
        }
        let Some(u) = self.users.get_mut(user) else {
            return Err(AuthError::UserNotFound);
        };
        if u.roles.insert(role.to_string()) {
            self.bump();
        }
        Ok(())
    }

    /// Revokes `role` from `user`; root keeps the root role while auth is on.
    pub fn user_revoke_role(&mut self, user: &str, role: &str) -> Result<(), AuthError> {
        if self.enabled && user == ROOT && role == ROOT {
            return Err(AuthError::InvalidAuthMgmt);
        }
        let u = self.users.get_mut(user).ok_or(AuthError::UserNotFound)?;
        if !u.roles.remove(role) {
            return Err(AuthError::RoleNotGranted);
        }
        self.bump();
        Ok(())
    }

    /// Adds a role without permissions.
    pub fn role_add(&mut self, name: &str) -> Result<(), AuthError> {
        if name.is_empty() {
            return Err(AuthError::RoleEmpty);
        }
        if self.roles.contains_key(name) {
            return Err(AuthError::RoleAlreadyExist);
        }
        self.roles.insert(name.to_string(), Vec::new());
        self.bump();
        Ok(())
    }

    /// Deletes a role and takes it from every user holding it; the root role stays while auth
    /// is on.
    pub fn role_delete(&mut self, name: &str) -> Result<(), AuthError> {
        if self.enabled && name == ROOT {
            return Err(AuthError::InvalidAuthMgmt);
        }
        self.roles.remove(name).ok_or(AuthError::RoleNotFound)?;
        for user in self.users.values_mut() {
            user.roles.remove(name);
        }
        self.bump();
        Ok(())
    }

    /// Grants a permission to a role; a grant over the same `(key, range_end)` replaces the
    /// kind (read, write or both).
    pub fn role_grant_permission(
        &mut self,
        role: &str,
        perm: Option<Permission>,
    ) -> Result<(), AuthError> {
        let perm = perm.ok_or(AuthError::PermissionNotGiven)?;
        if !permission::is_valid_grant(&perm.key, &perm.range_end) {
            return Err(AuthError::InvalidAuthMgmt);
        }
        let perms = self.roles.get_mut(role).ok_or(AuthError::RoleNotFound)?;
        let at = perms.binary_search_by(|p| {
            (p.key.as_slice(), p.range_end.as_slice())
                .cmp(&(perm.key.as_slice(), perm.range_end.as_slice()))
        });
        match at {
            Ok(i) => perms[i].perm_type = perm.perm_type,
            Err(i) => perms.insert(i, perm),
        }
        self.bump();
        Ok(())
    }

    /// Revokes the permission over exactly `[key, range_end)` from a role.
    pub fn role_revoke_permission(
        &mut self,
        role: &str,
        key: &[u8],
        range_end: &[u8],
    ) -> Result<(), AuthError> {
        let perms = self.roles.get_mut(role).ok_or(AuthError::RoleNotFound)?;
        let at = perms
            .iter()
            .position(|p| p.key == key && p.range_end == range_end)
            .ok_or(AuthError::PermissionNotGranted)?;
        perms.remove(at);
        self.bump();
        Ok(())
    }

    /// Whether `caller` may manage auth (users, roles, the switch) and run admin-only
    /// maintenance: anyone while auth is off, a holder of the root role while it is on.
    pub fn check_admin(&self, caller: &Caller) -> Result<(), AuthError> {
        if !self.enabled {
            return Ok(());
        }
        let name = caller.user.as_deref().ok_or(AuthError::UserEmpty)?;
        let user = self.users.get(name).ok_or(AuthError::UserNotFound)?;
        if user.roles.contains(ROOT) {
            Ok(())
        } else {
            Err(AuthError::PermissionDenied)
        }
    }

    /// Whether `caller` may read `name`'s user record: an admin, or the user itself.
    pub fn check_user_get(&self, caller: &Caller, name: &str) -> Result<(), AuthError> {
        match self.check_admin(caller) {
            Err(AuthError::PermissionDenied) if caller.user.as_deref() == Some(name) => Ok(()),
            other => other,
        }
    }

    /// Whether `caller` may read role `role`: an admin, or a holder of that role.
    pub fn check_role_get(&self, caller: &Caller, role: &str) -> Result<(), AuthError> {
        match self.check_admin(caller) {
            Err(AuthError::PermissionDenied) if self.holds(caller, role) => Ok(()),
            other => other,
        }
    }

    /// Whether `caller` may have `access` to `key` (with `range_end` empty) or to the range
    /// `[key, range_end)`, with etcd's checks in etcd's order.
    pub fn check(
        &self,
        caller: &Caller,
        access: Access,
        key: &[u8],
        range_end: &[u8],
    ) -> Result<(), AuthError> {
        let Some(perms) = self.caller_permissions(caller)? else {
            return Ok(());
        };
        let set = match access {
            Access::Read => &perms.read,
            Access::Write => &perms.write,
        };
        if set.allows(key, range_end) {
            Ok(())
        } else {
            Err(AuthError::PermissionDenied)
        }
    }

    /// The caller's merged permissions, `None` when nothing needs checking (auth off, or a
    /// holder of the root role), or why the caller cannot be checked at all.
    pub fn caller_permissions(
        &self,
        caller: &Caller,
    ) -> Result<Option<&UserPermissions>, AuthError> {
        if !self.enabled {
            return Ok(None);
        }
        let name = caller.user.as_deref().ok_or(AuthError::UserEmpty)?;
        if caller.revision < self.revision {
            return Err(AuthError::AuthOldRevision);
        }
        let user = self.users.get(name).ok_or(AuthError::PermissionDenied)?;
        if user.roles.contains(ROOT) {
            return Ok(None);
        }
        Ok(Some(
            self.merged.get(name).ok_or(AuthError::PermissionDenied)?,
        ))
    }

    /// The stored form: `(name, value)` records for the switch, the revision, each user
    /// (`user/<name>`, an `authpb.User`) and each role (`role/<name>`, an `authpb.Role`).
    pub fn to_records(&self) -> BTreeMap<Vec<u8>, Vec<u8>> {
        let mut out = BTreeMap::new();
        out.insert(RECORD_ENABLED.to_vec(), vec![u8::from(self.enabled)]);
        out.insert(
            RECORD_REVISION.to_vec(),
            self.revision.to_be_bytes().to_vec(),
        );
        for (name, user) in &self.users {
            let stored = authpb::User {
                name: name.clone().into_bytes(),
                password: user.password.clone().unwrap_or_default().into_bytes(),
                roles: user.roles.iter().cloned().collect(),
                options: Some(UserAddOptions {
                    no_password: user.password.is_none(),
                }),
            };
            out.insert(record_name(RECORD_USER, name), stored.encode_to_vec());
        }
        for (name, perms) in &self.roles {
            let stored = Role {
                name: name.clone().into_bytes(),
                key_permission: perms.clone(),
            };
            out.insert(record_name(RECORD_ROLE, name), stored.encode_to_vec());
        }
        out
    }

    /// The state from records made by [`AuthState::to_records`]; none at all is the state of
    /// a new store. Fails on a record that does not decode.
    pub fn from_records<'a>(
        records: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
    ) -> Result<Self, String> {
        let mut enabled = false;
        let mut revision = AuthState::default().revision;
        let mut users = BTreeMap::new();
        let mut roles = BTreeMap::new();
        let text = |b: &[u8]| String::from_utf8(b.to_vec()).map_err(|e| e.to_string());
        for (name, value) in records {
            if name == RECORD_ENABLED {
                enabled = value == [1];
            } else if name == RECORD_REVISION {
                let bytes = value.try_into().map_err(|_| "bad auth revision")?;
                revision = u64::from_be_bytes(bytes);
            } else if name.starts_with(RECORD_USER) {
                let u = authpb::User::decode(value).map_err(|e| e.to_string())?;
                let no_password = u.options.is_some_and(|o| o.no_password);
                let user = User {
                    password: (!no_password).then(|| text(&u.password)).transpose()?,
                    roles: u.roles.into_iter().collect(),
                };
                users.insert(text(&u.name)?, user);
            } else if name.starts_with(RECORD_ROLE) {
                let r = Role::decode(value).map_err(|e| e.to_string())?;
                roles.insert(text(&r.name)?, r.key_permission);
            } else {
                return Err(format!("unknown auth record {:?}", text(name)));
            }
        }
        Ok(AuthState::from_parts(enabled, revision, users, roles))
    }

    fn holds(&self, caller: &Caller, role: &str) -> bool {
        let user = caller.user.as_deref().and_then(|name| self.users.get(name));
        user.is_some_and(|u| u.roles.contains(role))
    }

    /// Counts a change and rebuilds the merged permissions it may have changed.
    fn bump(&mut self) {
        self.revision += 1;
        self.remerge();
    }

    fn remerge(&mut self) {
        let roles = &self.roles;
        self.merged = self
            .users
            .iter()
            .map(|(name, user)| {
                let grants = user.roles.iter().filter_map(|r| roles.get(r)).flatten();
                (name.clone(), UserPermissions::merge(grants))
            })
            .collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::authpb::permission::Type as PermType;

    fn perm(t: PermType, key: &str, end: &str) -> Option<Permission> {
        Some(Permission {
            perm_type: t as i32,
            key: key.into(),
            range_end: end.into(),
        })
    }

    /// Auth on, with root and `alice`, who may read and write under `/app/`.
    fn enabled() -> AuthState {
        let mut a = AuthState::default();
        a.user_add(ROOT, Some("hash".into())).unwrap();
        a.user_grant_role(ROOT, ROOT).unwrap();
        a.user_add("alice", Some("hash".into())).unwrap();
        a.role_add("app").unwrap();
        a.role_grant_permission("app", perm(PermType::Readwrite, "/app/", "/app0"))
            .unwrap();
        a.user_grant_role("alice", "app").unwrap();
        a.enable().unwrap();
        a
    }

    #[test]
    fn enabling_needs_root_with_the_root_role() {
        let mut a = AuthState::default();
        assert_eq!(a.enable(), Err(AuthError::RootUserNotExist));
        a.user_add(ROOT, None).unwrap();
        assert_eq!(a.enable(), Err(AuthError::RootRoleNotExist));
        // The root role need not exist as a role to be granted.
        a.user_grant_role(ROOT, ROOT).unwrap();
        let revision = a.revision();
        a.enable().unwrap();
        a.enable().unwrap();
        assert!(a.enabled());
        assert_eq!(
            a.revision(),
            revision,
            "enabling is not a change of users or roles"
        );
        a.disable();
        assert!(!a.enabled());
        assert_eq!(a.revision(), revision + 1);
    }

    #[test]
    fn root_cannot_be_locked_out_while_auth_is_on() {
        let mut a = enabled();
        assert_eq!(a.user_delete(ROOT), Err(AuthError::InvalidAuthMgmt));
        assert_eq!(a.role_delete(ROOT), Err(AuthError::InvalidAuthMgmt));
        assert_eq!(
            a.user_revoke_role(ROOT, ROOT),
            Err(AuthError::InvalidAuthMgmt)
        );
        a.disable();
        a.user_revoke_role(ROOT, ROOT).unwrap();
        a.user_delete(ROOT).unwrap();
        assert_eq!(a.enable(), Err(AuthError::RootUserNotExist));
    }

    #[test]
    fn users_and_roles_refuse_what_etcd_refuses() {
        let mut a = AuthState::default();
        assert_eq!(a.user_add("", None), Err(AuthError::UserEmpty));
        a.user_add("bob", None).unwrap();
        assert_eq!(a.user_add("bob", None), Err(AuthError::UserAlreadyExist));
        assert_eq!(a.user_delete("carol"), Err(AuthError::UserNotFound));
        assert_eq!(a.role_add(""), Err(AuthError::RoleEmpty));
        assert_eq!(a.user_grant_role("bob", "r"), Err(AuthError::RoleNotFound));
        assert_eq!(
            a.user_grant_role("carol", "r"),
            Err(AuthError::UserNotFound)
        );
        a.role_add("r").unwrap();
        assert_eq!(a.role_add("r"), Err(AuthError::RoleAlreadyExist));
        assert_eq!(
            a.user_revoke_role("bob", "r"),
            Err(AuthError::RoleNotGranted)
        );
        assert_eq!(
            a.role_grant_permission("r", None),
            Err(AuthError::PermissionNotGiven)
        );
        assert_eq!(
            a.role_grant_permission("r", perm(PermType::Read, "/b", "/a")),
            Err(AuthError::InvalidAuthMgmt)
        );
        assert_eq!(
            a.role_grant_permission("nope", perm(PermType::Read, "/a", "")),
            Err(AuthError::RoleNotFound)
        );
        assert_eq!(
            a.role_revoke_permission("r", b"/a", b""),
            Err(AuthError::PermissionNotGranted)
        );
        // A user without a password keeps none when "changed".
        a.user_change_password("bob", "hash".into()).unwrap();
        assert_eq!(a.user("bob").unwrap().password, None);
    }

    #[test]
    fn a_grant_over_the_same_range_replaces_its_kind() {
        let mut a = AuthState::default();
        a.role_add("r").unwrap();
        a.role_grant_permission("r", perm(PermType::Read, "/a", "/b"))
            .unwrap();
        a.role_grant_permission("r", perm(PermType::Write, "/a", "/b"))
            .unwrap();
        a.role_grant_permission("r", perm(PermType::Read, "/0", ""))
            .unwrap();
        let perms = &a.roles()["r"];
        assert_eq!(perms.len(), 2);
        assert_eq!(perms[0].key, b"/0");
        assert_eq!(perms[1].perm_type(), PermType::Write);
        a.role_revoke_permission("r", b"/a", b"/b").unwrap();
        assert_eq!(a.roles()["r"].len(), 1);
    }

    #[test]
    fn checks_run_in_etcds_order() {
        let a = enabled();
        let rev = a.revision();
        let check = |c: &Caller, access, key: &str| a.check(c, access, key.as_bytes(), b"");
        assert_eq!(
            check(&Caller::default(), Access::Read, "/app/x"),
            Err(AuthError::UserEmpty)
        );
        assert_eq!(
            check(&Caller::user("alice", rev - 1), Access::Read, "/app/x"),
            Err(AuthError::AuthOldRevision)
        );
        assert_eq!(
            check(&Caller::user("mallory", rev), Access::Read, "/app/x"),
            Err(AuthError::PermissionDenied)
        );
        let alice = Caller::user("alice", rev);
        assert_eq!(check(&alice, Access::Write, "/app/x"), Ok(()));
        assert_eq!(
            check(&alice, Access::Read, "/other"),
            Err(AuthError::PermissionDenied)
        );
        assert_eq!(a.check(&alice, Access::Read, b"/app/", b"/app0"), Ok(()));
        assert_eq!(
            a.check(&alice, Access::Read, b"/app/", b"\0"),
            Err(AuthError::PermissionDenied)
        );
        let root = Caller::user(ROOT, rev);
        assert_eq!(a.check(&root, Access::Write, b"\0", b"\0"), Ok(()));
        // With auth off nothing is checked, credentials or not.
        let mut off = a.clone();
        off.disable();
        assert_eq!(
            off.check(&Caller::default(), Access::Write, b"/x", b""),
            Ok(())
        );
    }

    #[test]
    fn permission_changes_reach_the_users_holding_the_role() {
        let mut a = enabled();
        a.role_grant_permission("app", perm(PermType::Read, "/shared", ""))
            .unwrap();
        let alice = Caller::user("alice", a.revision());
        assert_eq!(a.check(&alice, Access::Read, b"/shared", b""), Ok(()));
        a.role_delete("app").unwrap();
        let alice = Caller::user("alice", a.revision());
        assert_eq!(
            a.check(&alice, Access::Read, b"/app/x", b""),
            Err(AuthError::PermissionDenied)
        );
        assert!(a.user("alice").unwrap().roles.is_empty());
    }

    #[test]
    fn admins_manage_and_users_see_only_themselves_and_their_roles() {
        let a = enabled();
        let rev = a.revision();
        let alice = Caller::user("alice", rev);
        assert_eq!(a.check_admin(&Caller::user(ROOT, rev)), Ok(()));
        assert_eq!(a.check_admin(&alice), Err(AuthError::PermissionDenied));
        assert_eq!(a.check_admin(&Caller::default()), Err(AuthError::UserEmpty));
        assert_eq!(
            a.check_admin(&Caller::user("mallory", rev)),
            Err(AuthError::UserNotFound)
        );
        assert_eq!(a.check_user_get(&alice, "alice"), Ok(()));
        assert_eq!(
            a.check_user_get(&alice, ROOT),
            Err(AuthError::PermissionDenied)
        );
        assert_eq!(a.check_role_get(&alice, "app"), Ok(()));
        assert_eq!(
            a.check_role_get(&alice, ROOT),
            Err(AuthError::PermissionDenied)
        );
    }

    #[test]
    fn every_change_counts_and_a_repeated_grant_does_not() {
        let mut a = AuthState::default();
        assert_eq!(a.revision(), 1);
        a.user_add("u", None).unwrap();
        a.role_add("r").unwrap();
        a.user_grant_role("u", "r").unwrap();
        assert_eq!(a.revision(), 4);
        a.user_grant_role("u", "r").unwrap();
        assert_eq!(a.revision(), 4);
        let rebuilt = AuthState::from_parts(
            a.enabled(),
            a.revision(),
            a.users().clone(),
            a.roles().clone(),
        );
        assert_eq!(rebuilt.revision(), 4);
        assert_eq!(rebuilt.merged, a.merged);
    }

    #[test]
    fn the_stored_form_gives_back_the_same_state() {
        let mut a = enabled();
        a.user_add("cert-only", None).unwrap();
        let back = AuthState::from_records(
            a.to_records()
                .iter()
                .map(|(k, v)| (k.as_slice(), v.as_slice())),
        )
        .unwrap();
        assert_eq!(back.to_records(), a.to_records());
        assert!(back.enabled());
        assert_eq!(back.revision(), a.revision());
        assert_eq!(back.user("cert-only").unwrap().password, None);
        assert_eq!(
            back.user("alice").unwrap().password.as_deref(),
            Some("hash")
        );
        let alice = Caller::user("alice", back.revision());
        back.check(&alice, Access::Write, b"/app/x", b"").unwrap();
        let fresh = AuthState::from_records([]).unwrap();
        assert_eq!(fresh.revision(), 1);
        assert!(AuthState::from_records([(b"bogus".as_slice(), b"".as_slice())]).is_err());
    }
}
