//! A small blocking HTTP client over wasi:http, for plugins that talk to a cloud.
//!
//! The host sends each request on a task of its own, so a plugin can keep several in
//! flight: [`start`] hands a request to the host and returns at once, [`Pending::wait`]
//! collects the answer. [`send`] does both. Bodies are sent with their length, never
//! chunked, because some cloud APIs (and their emulators) refuse chunked uploads.
//! [`start_streaming`] sends a body of known length piece by piece, for uploads too big to
//! hold in memory.
//!
//! Failures to reach the server at all (refused, reset, DNS, timeouts) are
//! [`Error::Unavailable`], which the host retries; a request the server's sandbox refuses
//! is [`Error::Failed`] (the host reports the refusal itself, by host name).

use crate::guest::types::Error;
use wasip2::http::outgoing_handler;
use wasip2::http::types::{
    ErrorCode, Fields, FutureIncomingResponse, IncomingBody, Method, OutgoingBody, OutgoingRequest,
    RequestOptions, Scheme,
};
use wasip2::io::streams::{OutputStream, StreamError};

/// How long to wait for a connection and for the first byte of an answer.
const CONNECT_TIMEOUT_NS: u64 = 15_000_000_000;
const FIRST_BYTE_TIMEOUT_NS: u64 = 600_000_000_000;
/// The largest answer read into memory; cloud APIs answer with small documents.
const MAX_RESPONSE: usize = 64 << 20;

/// A request to send.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    /// `http://` or `https://` URL with its path and query.
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn new(method: &str, url: impl Into<String>) -> Request {
        Request {
            method: method.to_owned(),
            url: url.into(),
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    pub fn header(mut self, name: &str, value: impl Into<String>) -> Request {
        self.headers.push((name.to_owned(), value.into()));
        self
    }

    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Request {
        self.body = body.into();
        self
    }
}

/// An answer, read whole.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
}

impl Response {
    /// The first value of a header, by case-insensitive name.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }

    /// The body as text, lossily.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// The parts of a URL wasi:http wants separately.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    pub https: bool,
    /// `host[:port]`.
    pub authority: String,
    /// The path and query, starting with `/`.
    pub path: String,
}

/// Splits an `http://` or `https://` URL; anything else is invalid input.
pub fn parse_url(url: &str) -> Result<Url, Error> {
    let (https, rest) = if let Some(rest) = url.strip_prefix("https://") {
        (true, rest)
    } else if let Some(rest) = url.strip_prefix("http://") {
        (false, rest)
    } else {
        return Err(Error::InvalidInput(format!(
            "{url} is not an http:// or https:// URL"
        )));
    };
    let (authority, path) = match rest.find('/') {
        Some(at) => (&rest[..at], &rest[at..]),
        None => (rest, "/"),
    };
    if authority.is_empty() || authority.contains(['?', '#', '@', ' ']) {
        return Err(Error::InvalidInput(format!("{url} names no usable host")));
    }
    Ok(Url {
        https,
        authority: authority.to_owned(),
        path: path.to_owned(),
    })
}

/// Sends `request` and waits for the whole answer.
pub fn send(request: &Request) -> Result<Response, Error> {
    start(request)?.wait()
}

/// A request the host is sending.
pub struct Pending {
    future: FutureIncomingResponse,
    /// Named in error messages.
    what: String,
    /// Why sending the body failed, if it did; reported only when there is no answer.
    body_error: Option<Error>,
}

/// Hands `request` to the host and returns without waiting for the answer.
///
/// A failure while the body is sent is not final: the server may have answered (and
/// closed) first, or the connection may have failed, which the answer's error code says
/// more precisely. [`Pending::wait`] decides.
pub fn start(request: &Request) -> Result<Pending, Error> {
    let (mut pending, body) = open(request, request.body.len() as u64)?;
    if let Err(e) = body.write(&request.body).and_then(|()| body.finish()) {
        pending.body_error = Some(e);
    }
    Ok(pending)
}

/// Starts a request whose body of `length` bytes the caller writes through the returned
/// [`BodyWriter`]; the answer is collected from the [`Pending`] after
/// [`BodyWriter::finish`]. Collect it even when writing failed: see [`start`].
pub fn start_streaming(request: &Request, length: u64) -> Result<(Pending, BodyWriter), Error> {
    open(request, length)
}

fn open(request: &Request, length: u64) -> Result<(Pending, BodyWriter), Error> {
    let url = parse_url(&request.url)?;
    let what = format!("{} {}", request.method, request.url);
    let mut entries: Vec<(String, Vec<u8>)> = request
        .headers
        .iter()
        .map(|(n, v)| (n.to_ascii_lowercase(), v.clone().into_bytes()))
        .collect();
    if length > 0 || !matches!(request.method.as_str(), "GET" | "HEAD" | "DELETE") {
        entries.push(("content-length".into(), length.to_string().into_bytes()));
    }
    let fields = Fields::from_list(&entries)
        .map_err(|e| Error::InvalidInput(format!("{what}: a header is not allowed ({e:?})")))?;
    let outgoing = OutgoingRequest::new(fields);
    let method = match request.method.as_str() {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        "POST" => Method::Post,
        "PUT" => Method::Put,
        "DELETE" => Method::Delete,
        "PATCH" => Method::Patch,
        other => Method::Other(other.to_owned()),
    };
    let scheme = if url.https {
        Scheme::Https
    } else {
        Scheme::Http
    };
    outgoing
        .set_method(&method)
        .and(outgoing.set_scheme(Some(&scheme)))
        .and(outgoing.set_authority(Some(&url.authority)))
        .and(outgoing.set_path_with_query(Some(&url.path)))
        .map_err(|()| Error::InvalidInput(format!("{what}: not a request wasi:http can make")))?;
    let body = outgoing
        .body()
        .map_err(|()| Error::Failed(format!("{what}: no request body")))?;
    let options = RequestOptions::new();
    // Both setters only fail where the host does not support timeouts; the host's own
    // defaults then apply.
    let _ = options.set_connect_timeout(Some(CONNECT_TIMEOUT_NS));
    let _ = options.set_first_byte_timeout(Some(FIRST_BYTE_TIMEOUT_NS));
    let future =
        outgoing_handler::handle(outgoing, Some(options)).map_err(|code| failure(&what, &code))?;
    let stream = body
        .write()
        .map_err(|()| Error::Failed(format!("{what}: no request body stream")))?;
    Ok((
        Pending {
            future,
            what: what.clone(),
            body_error: None,
        },
        BodyWriter {
            stream: Some(stream),
            body: Some(body),
            what,
            length,
            written: std::cell::Cell::new(0),
        },
    ))
}

/// Writes a request's body.
pub struct BodyWriter {
    stream: Option<OutputStream>,
    body: Option<OutgoingBody>,
    what: String,
    /// The length the request declared, and how much of it was handed over.
    length: u64,
    written: std::cell::Cell<u64>,
}

impl BodyWriter {
    /// Writes all of `data`, waiting while the host's buffer is full.
    pub fn write(&self, mut data: &[u8]) -> Result<(), Error> {
        let Some(stream) = &self.stream else {
            return Err(Error::Failed(format!(
                "{}: body already finished",
                self.what
            )));
        };
        while !data.is_empty() {
            let permitted = stream.check_write().map_err(|e| self.stream_error(e))?;
            if permitted == 0 {
                stream.subscribe().block();
                continue;
            }
            let n = data.len().min(permitted as usize);
            stream.write(&data[..n]).map_err(|e| self.stream_error(e))?;
            self.written.set(self.written.get() + n as u64);
            data = &data[n..];
        }
        Ok(())
    }

    /// Flushes and closes the body; the request is then complete.
    pub fn finish(mut self) -> Result<(), Error> {
        if let Some(stream) = self.stream.take() {
            match stream.blocking_flush() {
                Ok(()) => {}
                // A server may answer, and the connection close, as the last bytes
                // arrive: once every byte was handed over, the body is whole and the
                // answer (collected from the `Pending`) says how the request went.
                Err(StreamError::Closed) if self.written.get() == self.length => {
                    drop(stream);
                    if let Some(body) = self.body.take() {
                        let _ = OutgoingBody::finish(body, None);
                    }
                    return Ok(());
                }
                Err(e) => return Err(self.stream_error(e)),
            }
        }
        if let Some(body) = self.body.take() {
            OutgoingBody::finish(body, None).map_err(|code| failure(&self.what, &code))?;
        }
        Ok(())
    }

    fn stream_error(&self, error: StreamError) -> Error {
        match error {
            // The connection went away under the upload; the answer (if any) says why.
            StreamError::Closed => Error::Unavailable(format!(
                "{}: the connection closed while the body was sent",
                self.what
            )),
            StreamError::LastOperationFailed(e) => Error::Unavailable(format!(
                "{}: sending the body failed: {}",
                self.what,
                e.to_debug_string()
            )),
        }
    }
}

impl Pending {
    /// Waits for the answer and reads its body.
    pub fn wait(self) -> Result<Response, Error> {
        self.future.subscribe().block();
        let response = match (self.future.get(), self.body_error) {
            (Some(Ok(Ok(response))), _) => response,
            (Some(Ok(Err(code))), _) => return Err(failure(&self.what, &code)),
            (_, Some(body_error)) => return Err(body_error),
            (Some(Err(())) | None, None) => {
                return Err(Error::Failed(format!("{}: the answer was lost", self.what)));
            }
        };
        let status = response.status();
        let headers = response.headers().entries();
        let body = response
            .consume()
            .map_err(|()| Error::Failed(format!("{}: no answer body", self.what)))?;
        let mut bytes = Vec::new();
        {
            let stream = body
                .stream()
                .map_err(|()| Error::Failed(format!("{}: no answer body", self.what)))?;
            loop {
                match stream.blocking_read(1 << 20) {
                    Ok(chunk) => {
                        bytes.extend_from_slice(&chunk);
                        if bytes.len() > MAX_RESPONSE {
                            return Err(Error::Failed(format!(
                                "{}: the answer is larger than {MAX_RESPONSE} bytes",
                                self.what
                            )));
                        }
                    }
                    Err(StreamError::Closed) => break,
                    Err(StreamError::LastOperationFailed(e)) => {
                        return Err(Error::Unavailable(format!(
                            "{}: reading the answer failed: {}",
                            self.what,
                            e.to_debug_string()
                        )));
                    }
                }
            }
        }
        drop(IncomingBody::finish(body));
        Ok(Response {
            status,
            headers,
            body: bytes,
        })
    }
}

/// What a wasi:http error code means for the user and for retries.
fn failure(what: &str, code: &ErrorCode) -> Error {
    match code {
        ErrorCode::HttpRequestDenied => Error::Failed(format!(
            "{what}: the server does not let this plugin reach that host"
        )),
        ErrorCode::DnsTimeout
        | ErrorCode::DnsError(_)
        | ErrorCode::DestinationNotFound
        | ErrorCode::DestinationUnavailable
        | ErrorCode::DestinationIpUnroutable
        | ErrorCode::ConnectionRefused
        | ErrorCode::ConnectionTerminated
        | ErrorCode::ConnectionTimeout
        | ErrorCode::ConnectionReadTimeout
        | ErrorCode::ConnectionWriteTimeout
        | ErrorCode::ConnectionLimitReached
        | ErrorCode::HttpResponseIncomplete
        | ErrorCode::HttpResponseTimeout => {
            Error::Unavailable(format!("{what}: {}", describe(code)))
        }
        other => Error::Failed(format!("{what}: {}", describe(other))),
    }
}

fn describe(code: &ErrorCode) -> String {
    match code {
        ErrorCode::ConnectionRefused => "connection refused".into(),
        ErrorCode::ConnectionTimeout => "connecting timed out".into(),
        ErrorCode::ConnectionTerminated => "the connection was closed".into(),
        ErrorCode::DnsError(_) | ErrorCode::DnsTimeout => "the host name did not resolve".into(),
        ErrorCode::HttpResponseTimeout => "no answer in time".into(),
        ErrorCode::TlsCertificateError => "the server's TLS certificate was not trusted".into(),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_what_wasi_http_wants() {
        let url = parse_url("http://127.0.0.1:5055/snapshots?x=1").expect("valid");
        assert_eq!(url.authority, "127.0.0.1:5055");
        assert_eq!(url.path, "/snapshots?x=1");
        assert!(!url.https);
        assert_eq!(
            parse_url("https://ec2.us-east-1.amazonaws.com")
                .expect("valid")
                .path,
            "/"
        );
        assert!(parse_url("ftp://example.com/").is_err());
        assert!(parse_url("http:///path").is_err());
    }
}
