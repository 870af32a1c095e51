//! JSON bodies in and out. Requests are read under the server's [`Limits`] (a size limit
//! per route and a read timeout) and every refusal is an [`ApiError`] that says what is
//! wrong: the unknown key, the missing field, the limit.

use axum::extract::{FromRequest, Request};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hypha_api::ApiError;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::Limits;

/// A JSON request or response body (`axum::Json` with the API's own refusals).
#[derive(Debug, Clone, Copy, Default)]
pub struct Json<T>(pub T);

/// An error answer: `status` with an [`ApiError`] body.
pub fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (
        status,
        axum::Json(ApiError {
            error: message.into(),
        }),
    )
        .into_response()
}

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

impl<T, S> FromRequest<S> for Json<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Response;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Response> {
        let limits = req
            .extensions()
            .get::<Limits>()
            .cloned()
            .unwrap_or_default();
        let what = format!("{} {}", req.method(), req.uri().path());
        let json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|mime| {
                let mime = mime.trim().to_ascii_lowercase();
                mime == "application/json"
                    || (mime.starts_with("application/") && mime.ends_with("+json"))
            });
        if !json {
            return Err(error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("{what} takes a JSON body: send it with Content-Type: application/json"),
            ));
        }
        let limit = limits.body_limit(req.uri().path());
        let too_large = || {
            error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the body of {what} is larger than the limit of {limit} bytes ({})",
                    human_size(limit)
                ),
            )
        };
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit as u64) {
            return Err(too_large());
        }
        let read = Limited::new(req.into_body(), limit).collect();
        let bytes = match tokio::time::timeout(limits.body_read_timeout, read).await {
            Err(_) => {
                return Err(error(
                    StatusCode::REQUEST_TIMEOUT,
                    format!(
                        "the body of {what} did not arrive within {:?}",
                        limits.body_read_timeout
                    ),
                ));
            }
            Ok(Err(e)) if e.is::<LengthLimitError>() => return Err(too_large()),
            Ok(Err(e)) => {
                return Err(error(
                    StatusCode::BAD_REQUEST,
                    format!("cannot read the body of {what}: {e}"),
                ));
            }
            Ok(Ok(collected)) => collected.to_bytes(),
        };
        let mut de = serde_json::Deserializer::from_slice(&bytes);
        let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let path = e.path().to_string();
            let at = if path == "." {
                String::new()
            } else {
                format!(" at {path}")
            };
            error(
                StatusCode::BAD_REQUEST,
                format!("invalid body of {what}{at}: {}", e.inner()),
            )
        })?;
        // Nothing but white space may follow the value.
        de.end().map_err(|e| {
            error(
                StatusCode::BAD_REQUEST,
                format!("invalid body of {what}: {e}"),
            )
        })?;
        Ok(Json(value))
    }
}

/// `65536` → `64 KiB`, `16777216` → `16 MiB`.
pub fn human_size(bytes: usize) -> String {
    match bytes {
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{} KiB", b >> 10),
        b => format!("{b} bytes"),
    }
}
