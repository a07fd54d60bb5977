//! Talking to AWS: where each service answers, SigV4 signing, the EC2 and STS query
//! protocol (form-encoded POST, XML answer) and what AWS's error answers mean for the
//! user and for retries.

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{
    PayloadChecksumKind, SignableBody, SignableRequest, SigningSettings, sign,
};
use aws_sigv4::sign::v4;
use conductor_plugin_sdk::guest::lookup;
use conductor_plugin_sdk::guest::types::{Account, Error, Provider};
use conductor_plugin_sdk::http::{self, Pending, Request, Response};
use std::time::SystemTime;

/// The EC2 query API version every call speaks.
const EC2_VERSION: &str = "2016-11-15";

/// One account on one provider: keys, region and the endpoints of the three services.
pub struct Aws {
    access_key: String,
    secret_key: String,
    pub account_number: String,
    pub region: String,
    ec2: String,
    pub ebs: String,
    sts: String,
}

impl Aws {
    /// Reads the provider's settings and the account's credentials.
    ///
    /// Endpoints: the provider's `endpoint` setting serves all three services (an
    /// emulator, another partition); otherwise the region's public endpoints.
    pub fn new(provider: &Provider, account: &Account) -> Result<Aws, Error> {
        let credential = |name: &str| {
            lookup(&account.credentials, name)
                .filter(|v| !v.is_empty())
                .map(str::to_owned)
        };
        let (Some(access_key), Some(secret_key)) = (credential("username"), credential("password"))
        else {
            return Err(Error::BadCredentials(format!(
                "account {} needs an access key and a secret access key",
                account.name
            )));
        };
        let region = lookup(&provider.settings, "region")
            .or_else(|| lookup(&provider.settings, "deltacloud_provider"))
            .filter(|r| !r.is_empty())
            .ok_or_else(|| {
                Error::InvalidInput(format!(
                    "provider {} has no region setting (e.g. us-east-1)",
                    provider.name
                ))
            })?
            .to_owned();
        if !region
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(Error::InvalidInput(format!(
                "provider {}'s region '{region}' is not a region name like us-east-1",
                provider.name
            )));
        }
        let endpoint = lookup(&provider.settings, "endpoint")
            .filter(|e| !e.is_empty())
            .map(|e| e.trim_end_matches('/').to_owned());
        if let Some(endpoint) = &endpoint {
            http::parse_url(endpoint)?;
        }
        let service = |name: &str| {
            endpoint
                .clone()
                .unwrap_or_else(|| format!("https://{name}.{region}.amazonaws.com"))
        };
        Ok(Aws {
            access_key,
            secret_key,
            account_number: credential("account_id").unwrap_or_default(),
            ec2: service("ec2"),
            ebs: service("ebs"),
            sts: service("sts"),
            region,
        })
    }

    /// Adds the SigV4 headers for `service` to `request`. `unsigned_body` leaves the
    /// payload out of the signature, as the EBS API allows for block uploads: hashing
    /// every block twice in the plugin would halve the upload rate.
    pub fn sign(
        &self,
        service: &str,
        request: &mut Request,
        unsigned_body: bool,
    ) -> Result<(), Error> {
        let identity = Credentials::new(
            &self.access_key,
            &self.secret_key,
            None,
            None,
            "conductor-account",
        )
        .into();
        let mut settings = SigningSettings::default();
        settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.region)
            .name(service)
            .time(SystemTime::now())
            .settings(settings)
            .build()
            .map_err(|e| Error::Failed(format!("preparing to sign a request: {e}")))?
            .into();
        let body = if unsigned_body {
            SignableBody::UnsignedPayload
        } else {
            SignableBody::Bytes(&request.body)
        };
        let signable = SignableRequest::new(
            &request.method,
            &request.url,
            request
                .headers
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_str())),
            body,
        )
        .map_err(|e| Error::Failed(format!("signing {}: {e}", request.url)))?;
        let (instructions, _) = sign(signable, &params)
            .map_err(|e| Error::Failed(format!("signing {}: {e}", request.url)))?
            .into_parts();
        let added: Vec<(String, String)> = instructions
            .headers()
            .map(|(n, v)| (n.to_owned(), v.to_owned()))
            .collect();
        request.headers.extend(added);
        Ok(())
    }

    /// An EC2 query call: `Action` with its parameters, answered in XML.
    pub fn ec2(&self, action: &str, params: &[(&str, &str)]) -> Result<Node, Error> {
        self.query("ec2", &self.ec2, action, EC2_VERSION, params)
    }

    /// An STS query call.
    pub fn sts(&self, action: &str) -> Result<Node, Error> {
        self.query("sts", &self.sts, action, "2011-06-15", &[])
    }

    fn query(
        &self,
        service: &str,
        endpoint: &str,
        action: &str,
        version: &str,
        params: &[(&str, &str)],
    ) -> Result<Node, Error> {
        let mut form = format!("Action={action}&Version={version}");
        for (name, value) in params {
            form.push('&');
            form.push_str(&encode(name));
            form.push('=');
            form.push_str(&encode(value));
        }
        let mut request = Request::new("POST", format!("{endpoint}/"))
            .header(
                "content-type",
                "application/x-www-form-urlencoded; charset=utf-8",
            )
            .body(form);
        self.sign(service, &mut request, false)?;
        let response = http::send(&request)?;
        let what = format!("{service} {action}");
        if !response.is_success() {
            return Err(aws_error(&what, &response));
        }
        Node::parse(&response.body)
            .map_err(|e| Error::Failed(format!("{what}: the answer is not XML: {e}")))
    }

    /// Starts a signed EBS call; the caller collects the answer.
    pub fn ebs_start(&self, mut request: Request, unsigned_body: bool) -> Result<Pending, Error> {
        self.sign("ebs", &mut request, unsigned_body)?;
        http::start(&request)
    }
}

/// Percent-encoding of a query value: everything but RFC 3986's unreserved characters.
pub fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// What an AWS error answer means: the code and message AWS gave, sorted into the
/// plugin interface's kinds so the server retries only what is worth retrying.
pub fn aws_error(what: &str, response: &Response) -> Error {
    let (code, message) = error_parts(response);
    let said = match (code.is_empty(), message.is_empty()) {
        (false, false) => format!("{code}: {message}"),
        (false, true) => code.clone(),
        (true, false) => message.clone(),
        (true, true) => format!("HTTP {}", response.status),
    };
    let text = format!("{what} failed: {said}");
    const CREDENTIALS: &[&str] = &[
        "AuthFailure",
        "SignatureDoesNotMatch",
        "InvalidClientTokenId",
        "InvalidAccessKeyId",
        "UnrecognizedClientException",
        "AccessDeniedException",
        "UnauthorizedOperation",
        "AccessDenied",
        "ExpiredToken",
    ];
    const PASSING: &[&str] = &[
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "InternalError",
        "InternalServerException",
        "RequestThrottledException",
    ];
    if CREDENTIALS.contains(&code.as_str()) || response.status == 401 {
        Error::BadCredentials(text)
    } else if PASSING.contains(&code.as_str()) || response.status >= 500 || response.status == 429 {
        Error::Unavailable(text)
    } else if code.contains("NotFound") || response.status == 404 {
        Error::NotFound(text)
    } else {
        Error::Failed(text)
    }
}

/// The code and message of an AWS error answer in any of its dialects: EC2's
/// `<Response><Errors><Error>`, STS's `<ErrorResponse><Error>`, and the JSON of the EBS
/// API (`x-amzn-ErrorType` with a `message`).
fn error_parts(response: &Response) -> (String, String) {
    if let Ok(doc) = Node::parse(&response.body)
        && let Some(error) = doc.find("Error")
    {
        return (error.text_of("Code"), error.text_of("Message"));
    }
    if let Ok(json) = serde_json::from_slice::<serde_json::Value>(&response.body) {
        let message = ["message", "Message"]
            .iter()
            .find_map(|k| json.get(k).and_then(|m| m.as_str()))
            .unwrap_or_default()
            .to_owned();
        let code = response
            .header("x-amzn-errortype")
            .map(|t| t.split(':').next().unwrap_or_default().to_owned())
            .or_else(|| {
                json.get("__type")
                    .and_then(|t| t.as_str())
                    .map(|t| t.rsplit('#').next().unwrap_or(t).to_owned())
            })
            .unwrap_or_default();
        return (code, message);
    }
    let text = response.text();
    (String::new(), text.chars().take(300).collect())
}

/// An XML element, as much of one as the EC2 answers need: name, text and children.
#[derive(Debug, Default, Clone)]
pub struct Node {
    pub name: String,
    pub text: String,
    pub children: Vec<Node>,
}

impl Node {
    /// Parses a whole document into its root element.
    pub fn parse(xml: &[u8]) -> Result<Node, String> {
        use quick_xml::Reader;
        use quick_xml::events::Event;
        let mut reader = Reader::from_reader(xml);
        let mut stack: Vec<Node> = vec![Node::default()];
        loop {
            match reader.read_event().map_err(|e| e.to_string())? {
                Event::Start(start) => stack.push(Node {
                    name: local(start.local_name().as_ref()),
                    ..Node::default()
                }),
                Event::Empty(start) => {
                    let node = Node {
                        name: local(start.local_name().as_ref()),
                        ..Node::default()
                    };
                    if let Some(parent) = stack.last_mut() {
                        parent.children.push(node);
                    }
                }
                Event::Text(text) => {
                    if let Some(node) = stack.last_mut() {
                        let decoded = text.decode().map_err(|e| e.to_string())?;
                        let unescaped =
                            quick_xml::escape::unescape(&decoded).map_err(|e| e.to_string())?;
                        node.text.push_str(&unescaped);
                    }
                }
                Event::CData(data) => {
                    if let Some(node) = stack.last_mut() {
                        node.text.push_str(&String::from_utf8_lossy(&data));
                    }
                }
                Event::End(_) => {
                    let node = stack.pop().ok_or("unbalanced XML")?;
                    stack
                        .last_mut()
                        .ok_or("unbalanced XML")?
                        .children
                        .push(node);
                }
                Event::Eof => break,
                _ => {}
            }
        }
        let mut document = stack.pop().ok_or("empty XML")?;
        if !stack.is_empty() {
            return Err("the XML ends inside an element".into());
        }
        document
            .children
            .pop()
            .ok_or_else(|| "no root element".into())
    }

    /// The first element named `name` at any depth below this one (or this one).
    pub fn find(&self, name: &str) -> Option<&Node> {
        if self.name == name {
            return Some(self);
        }
        self.children.iter().find_map(|c| c.find(name))
    }

    /// The trimmed text of the first descendant named `name`, or empty.
    pub fn text_of(&self, name: &str) -> String {
        self.find(name)
            .map(|n| n.text.trim().to_owned())
            .unwrap_or_default()
    }

    /// The `<item>` children of the first descendant named `set`.
    pub fn items(&self, set: &str) -> Vec<&Node> {
        self.find(set)
            .map(|s| s.children.iter().filter(|c| c.name == "item").collect())
            .unwrap_or_default()
    }
}

fn local(name: &[u8]) -> String {
    String::from_utf8_lossy(name).into_owned()
}
