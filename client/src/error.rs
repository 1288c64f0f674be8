//! The client's one error enum. Invariant: a status the daemon sent is kept whole (code and
//! message), so callers can match on [`tonic::Code`] exactly as other-language clients do.

use tonic::Code;

/// Errors of the client library.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The daemon (or the transport under an open channel) answered with a gRPC status.
    #[error("{}: {}", code_name(.0.code()), .0.message())]
    Status(#[from] tonic::Status),
    /// Could not reach the daemon at `addr`.
    #[error("cannot connect to {addr}: {reason}")]
    Connect {
        /// The endpoint as given (`unix:/path` or the URL).
        addr: String,
        /// The transport's reason, with its causes joined.
        reason: String,
    },
    /// The endpoint string could not be parsed.
    #[error("invalid endpoint {endpoint:?}: {reason}")]
    InvalidEndpoint { endpoint: String, reason: String },
    /// The request was refused before sending (e.g. an empty batch).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The daemon broke the protocol contract (e.g. a flush stream ended without summary).
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl ClientError {
    /// The gRPC code this error stands for: the status's own code, `UNAVAILABLE` for
    /// connection failures, `INVALID_ARGUMENT` for requests refused locally, `INTERNAL` for
    /// protocol violations.
    pub fn code(&self) -> Code {
        match self {
            ClientError::Status(s) => s.code(),
            ClientError::Connect { .. } => Code::Unavailable,
            ClientError::InvalidEndpoint { .. } | ClientError::InvalidRequest(_) => {
                Code::InvalidArgument
            }
            ClientError::Protocol(_) => Code::Internal,
        }
    }

    /// The status, when the daemon sent one.
    pub fn status(&self) -> Option<&tonic::Status> {
        match self {
            ClientError::Status(s) => Some(s),
            _ => None,
        }
    }

    /// The human part of the error without the code prefix.
    pub fn message(&self) -> String {
        match self {
            ClientError::Status(s) => s.message().to_string(),
            other => other.to_string(),
        }
    }
}

/// The canonical upper-case name of a gRPC code (`INVALID_ARGUMENT`, ...).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Joins an error and its `source()` chain into one line.
pub(crate) fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_display_is_code_then_message() {
        let e = ClientError::from(tonic::Status::not_found("workqueue \"x\" does not exist"));
        assert_eq!(e.to_string(), "NOT_FOUND: workqueue \"x\" does not exist");
        assert_eq!(e.code(), Code::NotFound);
        let c = ClientError::Connect {
            addr: "unix:/nope".into(),
            reason: "No such file or directory".into(),
        };
        assert_eq!(c.code(), Code::Unavailable);
        assert!(c.to_string().contains("unix:/nope"));
    }
}
