//! Every way an API request fails, with its status, code and wording written once here
//! (reference/conductor-api.md §6: Conductor's own where it had one, ours in the same
//! style where it had none). Handlers pick a variant and give it what the message needs.

use super::xml;
use crate::model::{QuotaExceeded, Status};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use std::time::Duration;

/// The records of the image API, as Conductor names them in codes and messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Image,
    Build,
    TargetImage,
    ProviderImage,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Image => "Image",
            Kind::Build => "Build",
            Kind::TargetImage => "TargetImage",
            Kind::ProviderImage => "ProviderImage",
        }
    }
}

/// An API failure. Each variant renders as `<error><code/><message/></error>` (or, for
/// [`ApiError::Validation`], Conductor's `<errors>` document) with its status.
#[derive(Debug)]
pub enum ApiError {
    /// 404 `<Kind>NotFound`: "Could not find Image ID".
    NotFound(Kind, String),
    /// 400 `<Kind>NotFound`: a request names a parent that is not there (a build's
    /// image, a target image's build, a push's target image).
    ParentNotFound(Kind, String),
    /// 404 `<Kind>StatusNotFound`: the status resource of a record that is not there.
    StatusNotFound(Kind, String),
    /// 404 `RecordNotFound` in Rails' words: "Couldn't find Provider with id=ID".
    RecordNotFound(&'static str, String),
    /// 404 `RecordNotFound`: no route for this method and path.
    NoRoute { method: String, path: String },
    /// 404 `TargetNotFound`: a build names a target no plugin serves.
    TargetNotFound(String),
    /// 404 `ProviderAccountNotFound`: no account has this label.
    AccountNotFound(String),
    /// 404 `TargetImageNotFound`: a push's image has no target image of the account's type.
    NoTargetImageFor(String),
    /// 404 `TargetImageNotBuilt`: a download of a target image that has no image yet.
    NotBuilt(String, Status),
    /// 404 `NotRecorded`: a target image's package manifest or boot console, which only
    /// builds that installed an OS or were checked have; `why` says when there is one.
    NotRecorded {
        id: String,
        what: &'static str,
        why: &'static str,
    },
    /// 404 `ImageNotFound`: an import's identifier is not on the provider, or (with the
    /// reason) the lookup failed in a way that is not the request's fault.
    NotOnProvider {
        identifier: String,
        failure: Option<String>,
    },
    /// 400 `InsufficientParametersSupplied`: a required part of the request is missing.
    Insufficient(String),
    /// 400 `ParameterDataIncorrect`: the request is wrong; the message says how.
    Incorrect(String),
    /// 400 `ParameterDataIncorrect`: "Environment NAME was not found."
    EnvironmentNotFound(String),
    /// 400 `ParameterDataIncorrect`: "Invalid Image Template: PROBLEM".
    InvalidTemplate(String),
    /// 400 `ParameterDataIncorrect`: a target with no account in the environment.
    TargetNotBuildable { target: String, valid: Vec<String> },
    /// 400 `ParameterDataIncorrect`: an account that is not in the environment.
    AccountNotInEnvironment { label: String, valid: Vec<String> },
    /// 400 `ParameterDataIncorrect`: a cancel of a job that has ended.
    NotCancellable(Kind, String, Status),
    /// 409 `ParameterDataIncorrect`: an import of what another environment imported.
    ImportedElsewhere(String),
    /// 409 `Error`: the record is still in use; the message says by what.
    InUse(String),
    /// 422 `<errors>`: one message per problem (providers, accounts, environments,
    /// users, quotas).
    Validation(Vec<String>),
    /// 403 `PermissionDenied`.
    Forbidden,
    /// 413 or 429 `QuotaExceeded`.
    Quota(QuotaExceeded),
    /// 413 `RequestTooLarge`: a body over the limit, in bytes.
    TooLarge(usize),
    /// 408 `RequestTimeout`: a body that did not arrive in time.
    TooSlow(Duration),
    /// 429 `TooManyLoginFailures`: whose failures, and when to try again.
    LoginsThrottled { whose: &'static str, seconds: u64 },
    /// 503 `ServerBusy`: too many password checks at once.
    Busy,
    /// 500 `InternalError`: the detail went to the log when it was made
    /// ([`ApiError::internal`]).
    Internal,
}

impl ApiError {
    /// A failure inside the server: the detail goes to the log, the user gets a sentence.
    pub fn internal(detail: impl std::fmt::Display) -> ApiError {
        tracing::error!("internal error: {detail}");
        ApiError::Internal
    }

    pub fn status(&self) -> StatusCode {
        use ApiError::*;
        match self {
            NotFound(..)
            | StatusNotFound(..)
            | RecordNotFound(..)
            | NoRoute { .. }
            | TargetNotFound(_)
            | AccountNotFound(_)
            | NoTargetImageFor(_)
            | NotBuilt(..)
            | NotRecorded { .. }
            | NotOnProvider { .. } => StatusCode::NOT_FOUND,
            ParentNotFound(..)
            | Insufficient(_)
            | Incorrect(_)
            | EnvironmentNotFound(_)
            | InvalidTemplate(_)
            | TargetNotBuildable { .. }
            | AccountNotInEnvironment { .. }
            | NotCancellable(..) => StatusCode::BAD_REQUEST,
            ImportedElsewhere(_) | InUse(_) => StatusCode::CONFLICT,
            Validation(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Forbidden => StatusCode::FORBIDDEN,
            // Jobs finish and make room again; what stays takes a delete or a new quota.
            Quota(exceeded) if exceeded.what == "queued jobs" => StatusCode::TOO_MANY_REQUESTS,
            Quota(_) | TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            TooSlow(_) => StatusCode::REQUEST_TIMEOUT,
            LoginsThrottled { .. } => StatusCode::TOO_MANY_REQUESTS,
            Busy => StatusCode::SERVICE_UNAVAILABLE,
            Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> String {
        use ApiError::*;
        match self {
            NotFound(kind, _) | ParentNotFound(kind, _) => format!("{}NotFound", kind.name()),
            StatusNotFound(kind, _) => format!("{}StatusNotFound", kind.name()),
            RecordNotFound(..) | NoRoute { .. } => "RecordNotFound".into(),
            TargetNotFound(_) => "TargetNotFound".into(),
            AccountNotFound(_) => "ProviderAccountNotFound".into(),
            NoTargetImageFor(_) => "TargetImageNotFound".into(),
            NotBuilt(..) => "TargetImageNotBuilt".into(),
            NotRecorded { .. } => "NotRecorded".into(),
            NotOnProvider { .. } => "ImageNotFound".into(),
            Insufficient(_) => "InsufficientParametersSupplied".into(),
            Incorrect(_)
            | EnvironmentNotFound(_)
            | InvalidTemplate(_)
            | TargetNotBuildable { .. }
            | AccountNotInEnvironment { .. }
            | NotCancellable(..)
            | ImportedElsewhere(_) => "ParameterDataIncorrect".into(),
            InUse(_) => "Error".into(),
            Validation(_) => "ValidationFailed".into(),
            Forbidden => "PermissionDenied".into(),
            Quota(_) => "QuotaExceeded".into(),
            TooLarge(_) => "RequestTooLarge".into(),
            TooSlow(_) => "RequestTimeout".into(),
            LoginsThrottled { .. } => "TooManyLoginFailures".into(),
            Busy => "ServerBusy".into(),
            Internal => "InternalError".into(),
        }
    }

    pub fn message(&self) -> String {
        use ApiError::*;
        match self {
            NotFound(kind, id) | ParentNotFound(kind, id) => {
                format!("Could not find {} {id}", kind.name())
            }
            StatusNotFound(kind, id) => format!("Could not find status for {} {id}", kind.name()),
            RecordNotFound(model, id) => format!("Couldn't find {model} with id={id}"),
            NoRoute { method, path } => format!("There is no {method} {path} in this API"),
            TargetNotFound(target) => format!("Could not find Target {target}"),
            AccountNotFound(label) => format!("Could not find Provider Account for name {label}"),
            NoTargetImageFor(label) => {
                format!("Could not find an appropriate target image for account {label}")
            }
            NotRecorded { id, what, why } => {
                format!("Target image {id} has no {what}: {why}")
            }
            NotBuilt(id, status) => {
                format!(
                    "TargetImage {id} has no image yet: it is {}",
                    status.as_str()
                )
            }
            NotOnProvider {
                identifier,
                failure: None,
            } => format!("Could not find Image {identifier} on Provider"),
            NotOnProvider {
                identifier,
                failure: Some(failure),
            } => format!(
                "Could not find Image {identifier} on Provider: the lookup failed: {failure}"
            ),
            Insufficient(message) | Incorrect(message) | InUse(message) => message.clone(),
            EnvironmentNotFound(name) => format!("Environment {name} was not found."),
            InvalidTemplate(problem) => format!("Invalid Image Template: {problem}"),
            TargetNotBuildable { target, valid } => format!(
                "Target {target} has no Provider Accounts in this Environment. Valid targets include {}.",
                valid.join(", ")
            ),
            AccountNotInEnvironment { label, valid } => format!(
                "Provider Account {label} is not in this Environment. Valid accounts include {}.",
                valid.join(", ")
            ),
            NotCancellable(kind, id, status) => format!(
                "{} {id} is {} and cannot be cancelled",
                kind.name(),
                status.as_str()
            ),
            ImportedElsewhere(identifier) => format!(
                "Image {identifier} on this Provider belongs to another environment and cannot be imported here"
            ),
            Validation(problems) => problems.join(", "),
            Forbidden => "Insufficient privileges to perform the requested action.".into(),
            Quota(QuotaExceeded {
                what,
                limit,
                wanted,
                ..
            }) => {
                if *what == "stored bytes" {
                    format!(
                        "The environment's images take {wanted} bytes, and its quota allows {limit}: delete images or ask an administrator to raise the quota"
                    )
                } else {
                    format!(
                        "The environment's quota allows {limit} {what}; this request would make {wanted}"
                    )
                }
            }
            TooLarge(limit) => {
                format!("The request body is larger than the {limit} bytes this server accepts")
            }
            TooSlow(after) => format!(
                "The request body did not arrive in full within {after:?}; send it without pauses"
            ),
            LoginsThrottled { whose, seconds } => {
                format!("Too many wrong passwords {whose}; try again in {seconds} s.")
            }
            Busy => {
                "The server is checking too many passwords at the moment; try again shortly.".into()
            }
            Internal => {
                "The server failed to handle the request; the server log has the details.".into()
            }
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status().as_u16(),
            self.code(),
            self.message()
        )
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        match e {
            crate::store::StoreError::Quota(exceeded) => ApiError::Quota(exceeded),
            e => ApiError::internal(e),
        }
    }
}

impl From<crate::jobs::PushPlanError> for ApiError {
    fn from(e: crate::jobs::PushPlanError) -> Self {
        use crate::jobs::PushPlanError::*;
        match e {
            NoAccount(label) => ApiError::AccountNotFound(label),
            NotInEnvironment { label, valid } => ApiError::AccountNotInEnvironment { label, valid },
            NoTargetImage(label) => ApiError::NoTargetImageFor(label),
            NoProvider(label) => ApiError::internal(format!("account {label} has no provider")),
            BootCheckFailed {
                target_image,
                result,
            } => {
                let (name, value) = crate::jobs::IGNORE_BOOT_CHECK;
                ApiError::Incorrect(format!(
                    "Target image {target_image}'s boot check {}: it is not pushed unless the \
                     push says <parameter name='{name}'>{value}</parameter>",
                    result.as_str()
                ))
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut doc = xml::Doc::new();
        if let ApiError::Validation(problems) = &self {
            doc.open("errors", &[]);
            for problem in problems {
                doc.open("error", &[])
                    .text("message", problem)
                    .close("error");
            }
            doc.close("errors");
        } else {
            doc.open("error", &[])
                .text("code", &self.code())
                .text("message", &self.message())
                .close("error");
        }
        (self.status(), super::xml_headers(), doc.finish()).into_response()
    }
}

pub type ApiResult<T = Response> = Result<T, ApiError>;

#[cfg(test)]
mod tests {
    use super::*;

    /// The catalogue's wording for what Conductor's clients match on.
    #[test]
    fn the_reference_words_are_kept() {
        let cases = [
            (
                ApiError::NotFound(Kind::Image, "7".into()),
                404,
                "ImageNotFound",
                "Could not find Image 7",
            ),
            (
                ApiError::TargetNotFound("ec3".into()),
                404,
                "TargetNotFound",
                "Could not find Target ec3",
            ),
            (
                ApiError::EnvironmentNotFound("x".into()),
                400,
                "ParameterDataIncorrect",
                "Environment x was not found.",
            ),
            (
                ApiError::TargetNotBuildable {
                    target: "ec2".into(),
                    valid: vec!["mock".into(), "testbed".into()],
                },
                400,
                "ParameterDataIncorrect",
                "Target ec2 has no Provider Accounts in this Environment. Valid targets include mock, testbed.",
            ),
            (
                ApiError::Forbidden,
                403,
                "PermissionDenied",
                "Insufficient privileges to perform the requested action.",
            ),
            (
                ApiError::RecordNotFound("Provider", "9".into()),
                404,
                "RecordNotFound",
                "Couldn't find Provider with id=9",
            ),
        ];
        for (error, status, code, message) in cases {
            assert_eq!(error.status().as_u16(), status, "{error}");
            assert_eq!(error.code(), code, "{error}");
            assert_eq!(error.message(), message, "{error}");
        }
    }
}
