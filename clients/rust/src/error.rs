//! The one error type of the crate: what the server refused (its `code` and `message`), what the
//! network did, and what the client gave up on.

/// Everything the client can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server refused the request: its HTTP status (0 for a WebSocket reply) and its JSON
    /// error `{"error": {"code", "message"}}`.
    #[error("{code} ({status}): {message}")]
    Api {
        /// The HTTP status (0 for a WebSocket reply).
        status: u16,
        /// The server's snake_case error code.
        code: String,
        /// The server's human-readable message.
        message: String,
    },
    /// 409 `idempotency_conflict`: the key was used within the window with other `data`;
    /// nothing was stored.
    #[error("idempotency_conflict: {message}")]
    IdempotencyConflict {
        /// The server's message.
        message: String,
    },
    /// Every attempt failed with an outcome-unknown answer (transport error, 502/503/504);
    /// `last` is the last one. A publish may still have been stored: retrying with the same
    /// idempotency key is safe.
    #[error("gave up after {attempts} attempts: {last}")]
    Exhausted {
        /// How many attempts were made.
        attempts: u32,
        /// The error of the last one.
        last: Box<Error>,
    },
    /// The connection failed or broke (connect refused, reset, timeout, TLS).
    #[error("transport: {0}")]
    Transport(String),
    /// The server answered something this client does not understand.
    #[error("unexpected answer: {0}")]
    Protocol(String),
    /// History cannot cover the gap after a position (paging with
    /// [`ApiClient::history_after`](crate::ApiClient::history_after)): the reason is one of the
    /// subscribe reasons (`epoch_changed`, `history_truncated`).
    #[error("{channel}: history cannot continue from the position ({reason})")]
    HistoryGap {
        /// The channel paged.
        channel: String,
        /// Why history cannot continue.
        reason: String,
        /// The channel's epoch now.
        epoch: String,
    },
    /// A URL or option given to the client is not usable.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The subscriber was closed.
    #[error("the subscriber is closed")]
    Closed,
}

impl Error {
    /// The server's error code (`invalid_channel`, `idempotency_conflict`…), when it sent one.
    pub fn code(&self) -> Option<&str> {
        match self {
            Error::Api { code, .. } => Some(code),
            Error::IdempotencyConflict { .. } => Some("idempotency_conflict"),
            Error::Exhausted { last, .. } => last.code(),
            _ => None,
        }
    }

    /// Whether the outcome is unknown and a retry (with the same idempotency key) may succeed.
    pub(crate) fn is_retryable(&self) -> bool {
        match self {
            Error::Transport(_) => true,
            Error::Api { status, .. } => matches!(status, 502..=504),
            _ => false,
        }
    }
}

/// The crate's result.
pub type Result<T, E = Error> = std::result::Result<T, E>;
