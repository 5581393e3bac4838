//! Engine errors become gRPC statuses here and only here.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::error::{ErrorDomain, PanesError};

/// `INVALID_ARGUMENT` naming `field`, in the message (for clients that read only
/// that) and as a `BadRequest` field violation.
pub(crate) fn bad_request(field: &str, message: impl Into<String>) -> Status {
    let message = message.into();
    Status::with_error_details(
        Code::InvalidArgument,
        format!("{field}: {message}"),
        ErrorDetails::with_bad_request_violation(field, message),
    )
}

/// The gRPC status of an engine error; `field` names the request field a user error
/// most likely concerns when the error itself does not say.
///
/// A user's mistake is `INVALID_ARGUMENT` with a `BadRequest` detail naming the field;
/// a request over a limit `RESOURCE_EXHAUSTED`; a request that does not apply to the
/// view `FAILED_PRECONDITION`; a transient state (or a failing file system)
/// `UNAVAILABLE`; a bug `INTERNAL`.
pub(crate) fn status(e: PanesError, field: &str) -> Status {
    match e {
        PanesError::ResourceExhausted(m) => return Status::resource_exhausted(m),
        PanesError::FailedPrecondition(m) => return Status::failed_precondition(m),
        _ => {}
    }
    let field = match &e {
        PanesError::UnknownView { .. } => "view",
        PanesError::UnknownFeature { .. } => "features",
        PanesError::InexactRead { .. } => "at_ms",
        PanesError::Schema { column, .. } => column.as_str(),
        _ => field,
    }
    .to_string();
    match e.domain() {
        ErrorDomain::User => bad_request(&field, e.to_string()),
        ErrorDomain::External => Status::unavailable(e.to_string()),
        _ => Status::internal(e.to_string()),
    }
}

/// A stream error: tonic reports a message over the size limit as `OUT_OF_RANGE`;
/// the API promises `RESOURCE_EXHAUSTED`.
///
/// tonic's own codec raises these before any handler of ours runs, and gives no
/// signal but the text: `OUT_OF_RANGE` alone also comes from a truncated stream
/// (an unexpected EOF), which is not a limit. Panes' own limits never reach this
/// function; they are [`PanesError::ResourceExhausted`] and mapped by [`status`].
pub(crate) fn stream_error(s: Status) -> Status {
    if s.code() == Code::OutOfRange && s.message().contains("too large") {
        Status::resource_exhausted(s.message().to_string())
    } else {
        s
    }
}

/// Statuses tonic gives before any handler runs, as the API promises them: a request
/// over the decoding limit is `OUT_OF_RANGE` there, `RESOURCE_EXHAUSTED` here; a
/// request that is not valid protobuf for a service whose codec is not ours (Arrow
/// Flight's generated one) is `INTERNAL` there, `INVALID_ARGUMENT` here.
pub(super) fn promised_statuses<B>(mut response: http::Response<B>) -> http::Response<B> {
    let headers = response.headers_mut();
    let message = headers
        .get("grpc-message")
        .and_then(|m| m.to_str().ok())
        .unwrap_or("");
    let code = headers.get("grpc-status");
    let too_large = code.is_some_and(|s| s == "11")
        && (message.contains("too%20large") || message.contains("too large"));
    let undecodable = code.is_some_and(|s| s == "13")
        && (message.contains("failed%20to%20decode%20Protobuf")
            || message.contains("failed to decode Protobuf"));
    if too_large {
        headers.insert("grpc-status", http::HeaderValue::from_static("8"));
    } else if undecodable {
        headers.insert("grpc-status", http::HeaderValue::from_static("3"));
    }
    response
}
