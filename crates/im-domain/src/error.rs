//! Domain errors: one enum whose business variants every port and service speaks.
//!
//! Adapters translate infrastructure failures into these variants inside the adapter
//! (a unique-key violation becomes [`DomainError::Conflict`], a stale concurrency token
//! [`DomainError::PreconditionFailed`]); nothing from an SDK crosses a port.

use std::fmt;
use std::time::Duration;

/// What kind of problem a field has. Structural problems (the request does not have the
/// shape of the resource) and value problems (the shape is right, the value is not) are
/// told apart so the HTTP layer can answer 400 or 422.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ViolationKind {
    /// The field is not part of the resource.
    UnknownField,
    /// A required field is absent.
    Missing,
    /// The field has the wrong JSON type or cannot be parsed.
    WrongType,
    /// The value breaks a rule of the domain.
    Invalid,
}

impl ViolationKind {
    /// Stable machine-readable code used in problem details.
    pub fn code(self) -> &'static str {
        match self {
            ViolationKind::UnknownField => "unknown_field",
            ViolationKind::Missing => "required",
            ViolationKind::WrongType => "invalid_type",
            ViolationKind::Invalid => "invalid_value",
        }
    }

    /// Whether the violation is about the request's shape rather than its values.
    pub fn is_structural(self) -> bool {
        !matches!(self, ViolationKind::Invalid)
    }
}

/// One offending field, named by its JSON path in the request (`config.organization`,
/// `customDefinition.entities[0].list.path`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    pub field: String,
    pub kind: ViolationKind,
    pub message: String,
}

impl FieldViolation {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: field.into(), kind: ViolationKind::Invalid, message: message.into() }
    }

    pub fn new(field: impl Into<String>, kind: ViolationKind, message: impl Into<String>) -> Self {
        Self { field: field.into(), kind, message: message.into() }
    }

    /// The same violation under a parent path (`name` under `entities[2]`).
    pub fn nested_in(mut self, parent: &str) -> Self {
        if parent.is_empty() {
            return self;
        }
        self.field = if self.field.is_empty() {
            parent.to_owned()
        } else if self.field.starts_with('[') {
            format!("{parent}{}", self.field)
        } else {
            format!("{parent}.{}", self.field)
        };
        self
    }
}

impl fmt::Display for FieldViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Collects violations while a whole input is checked, so a caller learns every problem at once.
#[derive(Debug, Default)]
pub struct Violations(Vec<FieldViolation>);

impl Violations {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, violation: FieldViolation) {
        self.0.push(violation);
    }

    pub fn invalid(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldViolation::invalid(field, message));
    }

    /// Adds the violations of a nested value under `parent`.
    pub fn extend_nested(&mut self, parent: &str, nested: impl IntoIterator<Item = FieldViolation>) {
        self.0.extend(nested.into_iter().map(|v| v.nested_in(parent)));
    }

    /// Records the error of a validated constructor, if any, and returns its value.
    pub fn check<T>(&mut self, field: &str, result: Result<T, FieldViolation>) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(violation) => {
                self.0.push(violation.nested_in(field));
                None
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn into_vec(self) -> Vec<FieldViolation> {
        self.0
    }

    /// The violations as an error, whether or not any were recorded.
    pub fn into_error(self) -> DomainError {
        DomainError::Validation(self.0)
    }

    /// `Ok(value)` when nothing was recorded, otherwise [`DomainError::Validation`].
    pub fn finish<T>(self, value: impl FnOnce() -> T) -> Result<T, DomainError> {
        if self.0.is_empty() { Ok(value()) } else { Err(DomainError::Validation(self.0)) }
    }
}

impl FromIterator<FieldViolation> for Violations {
    fn from_iter<I: IntoIterator<Item = FieldViolation>>(iter: I) -> Self {
        Self(iter.into_iter().collect())
    }
}

/// The error of every domain operation and port.
#[derive(Debug, thiserror::Error)]
pub enum DomainError {
    /// The resource does not exist for this caller (another tenant's resource is also "not found").
    #[error("{resource} '{id}' was not found")]
    NotFound { resource: &'static str, id: String },
    /// The resource already exists, or the change clashes with the resource's current state.
    #[error("conflict: {0}")]
    Conflict(String),
    /// The caller's concurrency token (`If-Match`) is stale.
    #[error("the resource was modified since the given version")]
    PreconditionFailed,
    /// The input breaks the domain's rules; every offending field is listed.
    #[error("invalid input: {}", join(.0))]
    Validation(Vec<FieldViolation>),
    /// The caller is authenticated but lacks the role the operation needs.
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// The caller asked for a rate-limited operation too often; it may try again after
    /// `retry_after`.
    #[error("too many requests: {reason}")]
    TooManyRequests { reason: String, retry_after: Duration },
    /// A dependency is unavailable for now; the operation may be retried.
    #[error("service unavailable: {reason}")]
    Unavailable { reason: String, retry_after: Option<Duration> },
    /// Anything else: a bug or an unexpected infrastructure failure.
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

fn join(violations: &[FieldViolation]) -> String {
    violations.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

impl DomainError {
    pub fn not_found(resource: &'static str, id: impl fmt::Display) -> Self {
        DomainError::NotFound { resource, id: id.to_string() }
    }

    /// A single invalid field.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        DomainError::Validation(vec![FieldViolation::invalid(field, message)])
    }

    pub fn unavailable(reason: impl Into<String>) -> Self {
        DomainError::Unavailable { reason: reason.into(), retry_after: None }
    }
}

pub type DomainResult<T> = Result<T, DomainError>;
