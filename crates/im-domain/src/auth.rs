//! Who is calling, and what they may do.

use serde::{Deserialize, Serialize};

use crate::common::{TenantId, UserId};
use crate::error::DomainError;

/// Roles carried in the caller's token. `admin` includes `member`, which includes `viewer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads everything in its tenant and the catalog.
    Viewer,
    /// Also writes everything inside its own tenant.
    Member,
    /// Also manages the global provider catalog.
    Admin,
}

impl Role {
    /// Parses a role name; unknown names are `None` (and ignored by callers).
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "viewer" => Some(Role::Viewer),
            "member" => Some(Role::Member),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Member => "member",
            Role::Admin => "admin",
        }
    }
}

/// The authenticated caller of an operation: every tenant-scoped read and write is confined
/// to `tenant_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub tenant_id: TenantId,
    pub user_id: UserId,
    pub roles: Vec<Role>,
}

impl Caller {
    pub fn new(tenant_id: TenantId, user_id: UserId, roles: Vec<Role>) -> Self {
        Self { tenant_id, user_id, roles }
    }

    /// The highest role the caller holds.
    pub fn highest_role(&self) -> Option<Role> {
        self.roles.iter().copied().max()
    }

    /// Succeeds when the caller holds `role` or a role that includes it.
    ///
    /// # Errors
    /// [`DomainError::Forbidden`] naming the role that is missing.
    pub fn require(&self, role: Role) -> Result<(), DomainError> {
        match self.highest_role() {
            Some(held) if held >= role => Ok(()),
            _ => Err(DomainError::Forbidden(format!("this operation needs the '{}' role", role.as_str()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(roles: &[Role]) -> Caller {
        Caller::new(TenantId::new("t").unwrap(), UserId::new("u").unwrap(), roles.to_vec())
    }

    #[test]
    fn roles_include_lower_roles() {
        assert!(caller(&[Role::Admin]).require(Role::Member).is_ok());
        assert!(caller(&[Role::Member]).require(Role::Viewer).is_ok());
        assert!(caller(&[Role::Member]).require(Role::Admin).is_err());
        assert!(caller(&[Role::Viewer]).require(Role::Member).is_err());
        assert!(caller(&[]).require(Role::Viewer).is_err());
    }
}

/// Why a caller could not be authenticated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no bearer token was given")]
    Missing,
    #[error("the token has expired")]
    Expired,
    #[error("the token is invalid: {0}")]
    Invalid(String),
    /// The identity provider (for example its key set) cannot be reached.
    #[error("the identity provider is unavailable: {0}")]
    Unavailable(String),
}

/// Turns a bearer token into a caller (User Management's tokens in production, locally
/// signed tokens in the embedded default).
#[cfg_attr(any(test, feature = "test-support"), mockall::automock)]
#[async_trait::async_trait]
pub trait Authenticator: Send + Sync {
    /// Verifies the token's signature and validity period and reads its claims.
    ///
    /// # Errors
    /// - MUST return [`AuthError::Expired`] for a token past its `exp`.
    /// - MUST return [`AuthError::Invalid`] for a bad signature, a wrong issuer or audience, or
    ///   claims without `sub` or `tenant_id`.
    /// - MUST return [`AuthError::Unavailable`] only when the verification keys cannot be had.
    async fn authenticate(&self, bearer_token: &str) -> Result<Caller, AuthError>;
}
