//! [`Error`]: why a command or query failed, in the service's own terms. The admin API turns
//! it into a response in one place (`AppError: From<Error>`); the CLI prints it.

use aihub_store::StoreError;

/// One invalid field of a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: &str, message: impl Into<String>) -> FieldError {
        FieldError {
            field: field.to_owned(),
            message: message.into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Some fields are invalid (all of them named).
    #[error("invalid: {}", list(.0))]
    Invalid(Vec<FieldError>),
    /// Not allowed, with a stable code (`email_not_verified`, `key_limit_reached`, …) and a
    /// message for the client.
    #[error("forbidden: {1}")]
    Forbidden(&'static str, String),
    /// No such resource for this caller (also another developer's).
    #[error("not found")]
    NotFound,
    /// The resource's state refuses the command; the message is for the client.
    #[error("conflict: {0}")]
    Conflict(String),
    /// The store failed (its `Conflict` means a uniqueness constraint refused a write).
    #[error(transparent)]
    Store(StoreError),
}

fn list(fields: &[FieldError]) -> String {
    fields
        .iter()
        .map(|f| format!("{}: {}", f.field, f.message))
        .collect::<Vec<_>>()
        .join("; ")
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn invalid(field: &str, message: impl Into<String>) -> Error {
        Error::Invalid(vec![FieldError::new(field, message)])
    }

    /// `Ok` when no field is invalid, else one error naming them all.
    pub fn check(errors: Vec<FieldError>) -> Result<()> {
        if errors.is_empty() {
            Ok(())
        } else {
            Err(Error::Invalid(errors))
        }
    }
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Error {
        match e {
            StoreError::NotFound => Error::NotFound,
            e => Error::Store(e),
        }
    }
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Error {
        StoreError::from(e).into()
    }
}
