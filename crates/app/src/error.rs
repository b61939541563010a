//! Errors of the use cases: a closed set of kinds, each with a stable machine code that the
//! API shows as `{"code", "message"}`. Unexpected failures keep their cause for the log.

/// What went wrong in a use case.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The request is malformed or breaks a rule (what was wrong, where).
    #[error("{message}")]
    Invalid { code: &'static str, message: String },
    /// What the request names does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The request conflicts with the current state (a taken number, a card already lost,
    /// an idempotency key used with another body).
    #[error("{message}")]
    Conflict { code: &'static str, message: String },
    /// No valid login.
    #[error("{0}")]
    Unauthorized(String),
    /// Logged in, but the role does not allow this.
    #[error("{0}")]
    Forbidden(String),
    /// Too many failed attempts; try again later.
    #[error("{0}")]
    TooManyAttempts(String),
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

impl AppError {
    pub fn invalid(code: &'static str, message: impl Into<String>) -> AppError {
        AppError::Invalid {
            code,
            message: message.into(),
        }
    }

    pub fn conflict(code: &'static str, message: impl Into<String>) -> AppError {
        AppError::Conflict {
            code,
            message: message.into(),
        }
    }

    pub fn not_found(message: impl Into<String>) -> AppError {
        AppError::NotFound(message.into())
    }

    /// The stable machine code.
    pub fn code(&self) -> &'static str {
        match self {
            AppError::Invalid { code, .. } | AppError::Conflict { code, .. } => code,
            AppError::NotFound(_) => "not_found",
            AppError::Unauthorized(_) => "unauthorized",
            AppError::Forbidden(_) => "forbidden",
            AppError::TooManyAttempts(_) => "too_many_attempts",
            AppError::Unexpected(_) => "internal",
        }
    }
}

impl From<store::StoreError> for AppError {
    fn from(e: store::StoreError) -> AppError {
        match e {
            store::StoreError::Invalid(m) => AppError::invalid("invalid", m),
            store::StoreError::AccountNotFound(id) => {
                AppError::not_found(format!("account {id} does not exist"))
            }
            store::StoreError::AccountNameTaken(n) => AppError::conflict(
                "name_taken",
                format!("an account named {n:?} exists already"),
            ),
            store::StoreError::Unexpected(e) => AppError::Unexpected(e),
        }
    }
}

pub type AppResult<T> = Result<T, AppError>;
