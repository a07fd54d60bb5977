//! What one call may reach over HTTP: the authorities granted from the host patterns a
//! plugin declares and its provider's settings, and the wasi:http hook that lets a
//! request through only to those (and records the ones it refused, for the message).

use super::State;
use wasmtime_wasi_http::{
    Error as HttpError, RequestOptions, WasiBody, WasiHttpCtxView, WasiHttpHooks, WasiHttpView,
};

/// The outbound HTTP policy of one call: the authorities (`host[:port]`) the plugin may
/// reach, and the ones it tried and was refused.
pub(super) struct Grants {
    pub(super) allowed: Vec<String>,
    pub(super) denied: Vec<String>,
}

impl WasiHttpHooks for Grants {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        fut: Box<dyn std::future::Future<Output = Result<(), HttpError>> + Send>,
    ) -> Box<
        dyn std::future::Future<
                Output = Result<
                    (
                        http::Response<WasiBody>,
                        Box<dyn std::future::Future<Output = Result<(), HttpError>> + Send>,
                    ),
                    HttpError,
                >,
            > + Send,
    > {
        let _ = fut;
        let authority = request
            .uri()
            .authority()
            .map(|a| a.as_str().to_ascii_lowercase())
            .unwrap_or_default();
        if !self.allowed.contains(&authority) {
            // Refused before any connection is made; the job reports it by name, since
            // the plugin itself only sees a failed request.
            tracing::warn!(%authority, "refused a plugin's request to a host it was not granted");
            if !self.denied.contains(&authority) {
                self.denied.push(authority);
            }
            return Box::new(async { Err(HttpError::HttpRequestDenied) });
        }
        Box::new(async move {
            use http_body_util::BodyExt;
            let (response, io) = wasmtime_wasi_http::default_send_request(request, options).await?;
            Ok((
                response.map(BodyExt::boxed_unsync),
                Box::new(io) as Box<dyn std::future::Future<Output = _> + Send>,
            ))
        })
    }
}

impl WasiHttpView for State {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.grants,
        }
    }
}

/// The authorities (`host[:port]`, lower case) a call may reach: what the plugin declares
/// in its info, narrowed by the provider's settings.
///
/// - A plain pattern (`*`, `*.amazonaws.com`, `127.0.0.1`) grants the authorities of the
///   provider's URL-valued settings that it covers: the provider chooses the endpoint,
///   the plugin bounds the choice.
/// - A pattern with placeholders (`ec2.{region}.amazonaws.com`) grants itself, with each
///   `{name}` filled in from the provider's setting of that name (`{a|b}`: the first of
///   the settings that is set). A value may hold only letters, digits and `-`, so a
///   setting can pick a region but never name another domain; a placeholder with no
///   value grants nothing.
pub fn grant(patterns: &[String], settings: &[(String, String)]) -> Vec<String> {
    let mut allowed: Vec<String> = provider_hosts(settings)
        .into_iter()
        .filter(|a| {
            patterns
                .iter()
                .filter(|p| !p.contains('{'))
                .any(|p| covers(p, a))
        })
        .collect();
    for expanded in patterns
        .iter()
        .filter(|p| p.contains('{'))
        .filter_map(|p| expand(p, settings))
    {
        if !allowed.contains(&expanded) {
            allowed.push(expanded);
        }
    }
    allowed
}

/// A host pattern with its `{setting}` placeholders filled in, if every one has a value
/// fit for a host name label.
fn expand(pattern: &str, settings: &[(String, String)]) -> Option<String> {
    let mut out = String::new();
    let mut rest = pattern;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let close = open + rest[open..].find('}')?;
        let value = rest[open + 1..close].split('|').find_map(|name| {
            settings
                .iter()
                .find(|(k, v)| k == name && !v.is_empty())
                .map(|(_, v)| v)
        })?;
        if !value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return None;
        }
        out.push_str(value);
        rest = &rest[close + 1..];
    }
    out.push_str(rest);
    Some(out.to_ascii_lowercase())
}

/// The authorities a provider's settings name: every setting whose value is an http or
/// https URL.
fn provider_hosts(settings: &[(String, String)]) -> Vec<String> {
    settings
        .iter()
        .filter_map(|(_, value)| {
            let rest = value
                .strip_prefix("http://")
                .or_else(|| value.strip_prefix("https://"))?;
            let authority = rest.split(['/', '?', '#']).next()?;
            (!authority.is_empty()).then(|| authority.to_ascii_lowercase())
        })
        .collect()
}

/// Whether a plugin's declared host pattern covers an authority: `*` covers any,
/// `*.example.com` a subdomain, `host` any port of that host, `host:port` exactly.
fn covers(pattern: &str, authority: &str) -> bool {
    let pattern = pattern.to_ascii_lowercase();
    let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
    if pattern == "*" || pattern == authority || pattern == host {
        return true;
    }
    pattern
        .strip_prefix("*.")
        .is_some_and(|suffix| host.ends_with(&format!(".{suffix}")))
}

#[cfg(test)]
mod grant_tests {
    use super::grant;

    fn strings(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    fn settings(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn url_settings_are_granted_only_where_a_declared_pattern_covers_them() {
        let patterns = strings(&["*.amazonaws.com", "127.0.0.1"]);
        let granted = grant(
            &patterns,
            &settings(&[
                ("endpoint", "http://127.0.0.1:5055/"),
                ("url", "https://evil.example.com/api"),
            ]),
        );
        assert_eq!(granted, strings(&["127.0.0.1:5055"]));
    }

    #[test]
    fn placeholders_are_filled_from_settings_and_cannot_name_another_domain() {
        let patterns = strings(&["ec2.{region|deltacloud_provider}.amazonaws.com"]);
        assert_eq!(
            grant(&patterns, &settings(&[("region", "eu-west-1")])),
            strings(&["ec2.eu-west-1.amazonaws.com"])
        );
        assert_eq!(
            grant(
                &patterns,
                &settings(&[("deltacloud_provider", "us-east-1")])
            ),
            strings(&["ec2.us-east-1.amazonaws.com"])
        );
        // A value that would smuggle in another host grants nothing.
        assert!(grant(&patterns, &settings(&[("region", "x.evil.com/")])).is_empty());
        assert!(grant(&patterns, &settings(&[("region", "a:1@evil")])).is_empty());
        // No value, no grant.
        assert!(grant(&patterns, &[]).is_empty());
    }
}
