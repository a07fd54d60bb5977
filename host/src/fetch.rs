//! Outgoing HTTP on behalf of users: base images today, webhooks, install mirrors next.
//! A URL in a template or a hook is chosen by whoever sent it, so every request the
//! server makes for them goes through one guarded client:
//!
//! - only `http` and `https`;
//! - no loopback, private, link-local, unique-local, shared (CGNAT), multicast or
//!   otherwise non-public address, checked on the literal host of every URL (every
//!   redirect included) and on every address a name resolves to, before connecting;
//!   the connection then goes to exactly the addresses that were checked, so a name
//!   that resolves differently a moment later gains nothing;
//! - an operator's allow list (`--fetch-allow`) of host names or address ranges that
//!   are reachable all the same (an internal mirror, a webhook receiver);
//! - a size limit, a deadline for the whole transfer, a limit on how long the peer may
//!   send nothing, and a stop (cancel, shutdown) that reaches the socket.
//!
//! Errors say "refused" (the policy said no, before any connection) or "failed" (the
//! transfer did not work) without telling a closed port from a filtered one.
//!
//! Never imports axum, redb or wasmtime.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often a transfer looks at its stop flag while it waits for the peer.
const STOP_POLL: Duration = Duration::from_millis(100);
/// Redirects followed at most, each checked like the first URL.
const MAX_REDIRECTS: usize = 5;

/// One entry of the operator's allow list.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Allowed {
    /// A host name (lower case): requests to it may reach whatever it resolves to.
    Host(String),
    /// An address range: `10.1.0.0/16`, `127.0.0.1` (a /32), `fd00::/8`.
    Net(IpAddr, u8),
}

/// What outgoing requests may reach and how much they may take.
#[derive(Debug, Clone)]
pub struct FetchPolicy {
    allowed: Vec<Allowed>,
    /// The largest body a fetch reads; more is refused.
    pub max_bytes: u64,
    /// The whole transfer, connection included.
    pub deadline: Duration,
    /// How long the peer may send nothing before the transfer fails.
    pub stall: Duration,
}

impl Default for FetchPolicy {
    fn default() -> FetchPolicy {
        FetchPolicy {
            allowed: Vec::new(),
            max_bytes: 64 << 30,
            deadline: Duration::from_secs(3600),
            stall: Duration::from_secs(60),
        }
    }
}

/// Why a fetch did not happen or did not finish.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    /// The policy refused the URL or an address it led to; trying again will not help.
    #[error("refused: {0}")]
    Refused(String),
    /// The transfer failed (no connection, an error status, a broken body); another try
    /// may work.
    #[error("failed: {0}")]
    Failed(String),
    /// The body is larger than the policy allows.
    #[error("refused: the body is larger than the {0} bytes this server fetches")]
    TooLarge(u64),
    /// The deadline passed or the peer stalled.
    #[error("failed: {0}")]
    TimedOut(String),
    /// The caller's stop flag was raised.
    #[error("stopped")]
    Stopped,
}

impl FetchError {
    /// Whether another attempt could succeed.
    pub fn is_passing(&self) -> bool {
        matches!(self, FetchError::Failed(_) | FetchError::TimedOut(_))
    }
}

impl FetchPolicy {
    /// Adds `--fetch-allow` entries: host names, addresses, or ranges in CIDR form.
    pub fn allow(mut self, entries: &[String]) -> Result<FetchPolicy, BadAllowEntry> {
        for entry in entries.iter().flat_map(|e| e.split(',')) {
            let entry = entry.trim();
            if entry.is_empty() {
                continue;
            }
            self.allowed.push(parse_allowed(entry)?);
        }
        Ok(self)
    }

    /// Whether the operator allowed this host name explicitly.
    fn host_allowed(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.allowed
            .iter()
            .any(|a| matches!(a, Allowed::Host(h) if *h == host))
    }

    /// Whether a request may reach this address: public, or inside an allowed range.
    pub fn address_allowed(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        is_public(ip)
            || self.allowed.iter().any(|a| match a {
                Allowed::Net(net, bits) => in_range(ip, *net, *bits),
                Allowed::Host(_) => false,
            })
    }

    /// Checks what can be checked without the network: the scheme, and the host when it
    /// is an address or a name that always means this machine. Used when a request is
    /// made, so an obviously internal URL is refused at once, and on every redirect.
    pub fn check_url(&self, url: &reqwest::Url) -> Result<(), FetchError> {
        if !matches!(url.scheme(), "http" | "https") {
            return Err(FetchError::Refused(format!(
                "only http and https URLs are fetched, not {}",
                url.scheme()
            )));
        }
        let host = match url.host() {
            Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip),
            Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip),
            Some(url::Host::Domain(name)) => {
                let name = name.trim_end_matches('.').to_ascii_lowercase();
                if !self.host_allowed(&name)
                    && (name == "localhost" || name.ends_with(".localhost"))
                {
                    return Err(not_public(&name));
                }
                return Ok(());
            }
            None => return Err(FetchError::Refused("the URL names no host".into())),
        };
        if self.address_allowed(host) {
            Ok(())
        } else {
            Err(not_public(&host.to_string()))
        }
    }

    /// Parses and checks a URL a user gave.
    pub fn check(&self, url: &str) -> Result<reqwest::Url, FetchError> {
        let parsed = reqwest::Url::parse(url)
            .map_err(|e| FetchError::Refused(format!("{url} is not a URL: {e}")))?;
        self.check_url(&parsed)?;
        Ok(parsed)
    }

    /// A client that applies this policy to every connection and redirect. Build it on
    /// the runtime that will use it.
    pub fn client(self: &Arc<Self>) -> Result<reqwest::Client, FetchError> {
        let for_redirects = self.clone();
        reqwest::Client::builder()
            // Environment proxies would carry requests past every check here.
            .no_proxy()
            .dns_resolver(Arc::new(Resolver {
                policy: self.clone(),
            }))
            .redirect(reqwest::redirect::Policy::custom(move |attempt| {
                if attempt.previous().len() >= MAX_REDIRECTS {
                    return attempt.error(FetchError::Refused(format!(
                        "more than {MAX_REDIRECTS} redirects"
                    )));
                }
                match for_redirects.check_url(attempt.url()) {
                    Ok(()) => attempt.follow(),
                    Err(refused) => attempt.error(refused),
                }
            }))
            .connect_timeout(self.stall.min(self.deadline))
            .build()
            .map_err(|e| FetchError::Failed(format!("the HTTP client could not start: {e}")))
    }
}

fn not_public(host: &str) -> FetchError {
    FetchError::Refused(format!(
        "{host} is not a public address (an operator can allow it with --fetch-allow)"
    ))
}

/// A `--fetch-allow` entry that is neither a host name, an address nor a range.
#[derive(Debug, thiserror::Error)]
#[error("--fetch-allow {0}: expected a host name, an address or a range such as 10.0.0.0/8")]
pub struct BadAllowEntry(String);

fn parse_allowed(entry: &str) -> Result<Allowed, BadAllowEntry> {
    let bad = || BadAllowEntry(entry.to_owned());
    if let Some((net, bits)) = entry.split_once('/') {
        let net: IpAddr = net.parse().map_err(|_| bad())?;
        let bits: u8 = bits.parse().map_err(|_| bad())?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        if bits > max {
            return Err(bad());
        }
        return Ok(Allowed::Net(canonical(net), bits));
    }
    let literal = entry.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = literal.parse::<IpAddr>() {
        let ip = canonical(ip);
        let bits = if ip.is_ipv4() { 32 } else { 128 };
        return Ok(Allowed::Net(ip, bits));
    }
    let valid = entry
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
    if !valid {
        return Err(bad());
    }
    Ok(Allowed::Host(
        entry.trim_end_matches('.').to_ascii_lowercase(),
    ))
}

/// IPv4 addresses written as IPv6 (`::ffff:127.0.0.1`) are judged as the IPv4 address
/// they are.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

fn in_range(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(ip), IpAddr::V4(net)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(bits)).unwrap_or(0);
            u32::from(ip) & mask == u32::from(net) & mask
        }
        (IpAddr::V6(ip), IpAddr::V6(net)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(bits)).unwrap_or(0);
            u128::from(ip) & mask == u128::from(net) & mask
        }
        _ => false,
    }
}

/// Whether an address is on the public internet: everything a server could reach on
/// its own machine or network (loopback, private and shared ranges, link-local with the
/// clouds' metadata services, unique-local, multicast, reserved and documentation
/// ranges, IPv6 forms that embed such an IPv4 address) is not.
pub fn is_public(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(a == 0                                   // "this network"
        || a == 10                             // private
        || a == 127                            // loopback
        || (a == 100 && (64..128).contains(&b)) // shared address space (CGNAT)
        || (a == 169 && b == 254)              // link-local, cloud metadata
        || (a == 172 && (16..32).contains(&b)) // private
        || (a == 192 && b == 0 && c == 0)      // IETF protocol assignments
        || (a == 192 && b == 0 && c == 2)      // documentation
        || (a == 192 && b == 88 && c == 99)    // 6to4 relay anycast
        || (a == 192 && b == 168)              // private
        || (a == 198 && (18..20).contains(&b)) // benchmarking
        || (a == 198 && b == 51 && c == 100)   // documentation
        || (a == 203 && b == 0 && c == 113)    // documentation
        || a >= 224) // multicast, reserved, broadcast
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let segments = ip.segments();
    let embedded_v4 = |ip: Ipv6Addr| {
        let o = ip.octets();
        Ipv4Addr::new(o[12], o[13], o[14], o[15])
    };
    if ip.is_unspecified() || ip.is_loopback() {
        return false;
    }
    match segments[0] {
        // IPv4-compatible (deprecated) addresses embed an IPv4 address.
        0 if segments[1..6] == [0; 5] => is_public_v4(embedded_v4(ip)),
        // NAT64 embeds an IPv4 address in its last 32 bits.
        0x64 if segments[1] == 0xff9b => is_public_v4(embedded_v4(ip)),
        // 6to4 embeds one in bits 16–47.
        0x2002 => {
            let o = ip.octets();
            is_public_v4(Ipv4Addr::new(o[2], o[3], o[4], o[5]))
        }
        // Documentation.
        0x2001 if segments[1] == 0xdb8 => false,
        s if s & 0xfe00 == 0xfc00 => false, // unique-local
        s if s & 0xffc0 == 0xfe80 => false, // link-local
        s if s & 0xffc0 == 0xfec0 => false, // site-local (deprecated)
        s if s & 0xff00 == 0xff00 => false, // multicast
        s => s & 0xe000 == 0x2000,          // only global unicast is public
    }
}

/// Resolves names for the guarded client: every address a name resolves to must be
/// allowed, or the name is refused as a whole (a name that points partly inside is
/// not half-trusted).
struct Resolver {
    policy: Arc<FetchPolicy>,
}

impl reqwest::dns::Resolve for Resolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addresses: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await
                .map_err(|_| FetchError::Failed(format!("{host} could not be resolved")))?
                .collect();
            if addresses.is_empty() {
                return Err(FetchError::Failed(format!("{host} could not be resolved")).into());
            }
            if !policy.host_allowed(&host)
                && let Some(inside) = addresses.iter().find(|a| !policy.address_allowed(a.ip()))
            {
                return Err(FetchError::Refused(format!(
                    "{host} resolves to {}, which is not a public address (an operator can allow it with --fetch-allow)",
                    inside.ip()
                ))
                .into());
            }
            Ok(Box::new(addresses.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The policy's own refusal inside a client error, if that is what the error is.
fn refusal(error: &reqwest::Error) -> Option<FetchError> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if let Some(found) = e.downcast_ref::<FetchError>() {
            return Some(found.clone());
        }
        source = e.source();
    }
    None
}

/// What a user sees for a failed request: the policy's refusal as it is; otherwise one
/// sentence per kind of failure, the same whatever closed the connection, so the answer
/// does not map ports.
fn describe(error: &reqwest::Error, host: &str) -> FetchError {
    if let Some(refused) = refusal(error) {
        return refused;
    }
    if error.is_timeout() {
        FetchError::TimedOut(format!("{host} did not answer in time"))
    } else if error.is_connect() {
        FetchError::Failed(format!("no connection could be made to {host}"))
    } else if let Some(status) = error.status() {
        FetchError::Failed(format!("{host} answered {status}"))
    } else {
        FetchError::Failed(format!("the transfer from {host} broke off"))
    }
}

/// A stop flag the transfer looks at while it waits.
pub type ShouldStop<'a> = &'a (dyn Fn() -> bool + Sync);

/// Runs `future` until it resolves, the stop flag rises or `limit` passes.
async fn guarded<T>(
    future: impl std::future::Future<Output = T>,
    limit: Duration,
    should_stop: ShouldStop<'_>,
) -> Result<T, FetchError> {
    tokio::pin!(future);
    let until = tokio::time::Instant::now() + limit;
    loop {
        if should_stop() {
            return Err(FetchError::Stopped);
        }
        let now = tokio::time::Instant::now();
        if now >= until {
            return Err(FetchError::TimedOut("the peer sent nothing in time".into()));
        }
        let wait = STOP_POLL.min(until - now);
        if let Ok(value) = tokio::time::timeout(wait, &mut future).await {
            return Ok(value);
        }
    }
}

/// Streams the body at `url` into `sink` under the policy. `progress(done, total)`
/// follows the transfer. Returns the number of bytes read.
pub async fn fetch(
    policy: &Arc<FetchPolicy>,
    url: &str,
    sink: &mut dyn FnMut(&[u8]) -> std::io::Result<()>,
    progress: &mut dyn FnMut(u64, Option<u64>),
    should_stop: ShouldStop<'_>,
) -> Result<u64, FetchError> {
    let parsed = policy.check(url)?;
    let host = parsed.host_str().unwrap_or("the server").to_owned();
    let client = policy.client()?;
    let started = Instant::now();
    let left = || policy.deadline.saturating_sub(started.elapsed());
    let response = guarded(client.get(parsed).send(), left(), should_stop)
        .await?
        .and_then(|r| r.error_for_status())
        .map_err(|e| describe(&e, &host))?;
    let total = response.content_length();
    if total.is_some_and(|t| t > policy.max_bytes) {
        return Err(FetchError::TooLarge(policy.max_bytes));
    }
    let mut response = response;
    let mut done = 0u64;
    loop {
        let chunk = guarded(response.chunk(), policy.stall.min(left()), should_stop)
            .await?
            .map_err(|e| describe(&e, &host))?;
        let Some(chunk) = chunk else { break };
        done += chunk.len() as u64;
        if done > policy.max_bytes {
            return Err(FetchError::TooLarge(policy.max_bytes));
        }
        sink(&chunk).map_err(|e| FetchError::Failed(format!("storing what was fetched: {e}")))?;
        progress(done, total);
    }
    if total.is_some_and(|t| t != done) {
        return Err(FetchError::Failed(format!(
            "the transfer from {host} ended early"
        )));
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("an address")
    }

    #[test]
    fn internal_addresses_are_not_public() {
        for internal in [
            "127.0.0.1",
            "127.1.2.3",
            "0.0.0.0",
            "10.0.0.1",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "64:ff9b::a00:1",
            "2002:7f00:1::",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "ff02::1",
            "2001:db8::1",
        ] {
            assert!(!is_public(ip(internal)), "{internal} counted as public");
        }
        for public in [
            "8.8.8.8",
            "1.1.1.1",
            "172.32.0.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            assert!(is_public(ip(public)), "{public} counted as internal");
        }
    }

    #[test]
    fn urls_are_checked_on_their_literal_host() -> Result<(), BadAllowEntry> {
        let policy = FetchPolicy::default();
        for refused in [
            "http://127.0.0.1:8080/x",
            "http://localhost/x",
            "http://LOCALHOST./x",
            "http://a.localhost/x",
            "http://[::ffff:127.0.0.1]/x",
            "http://2130706433/x",
            "http://0x7f.1/x",
            "http://[::1]/x",
            "http://169.254.169.254/latest/meta-data",
            "ftp://example.com/x",
            "file:///etc/passwd",
        ] {
            assert!(
                matches!(policy.check(refused), Err(FetchError::Refused(_))),
                "{refused} was not refused"
            );
        }
        assert!(policy.check("https://example.com/disk.qcow2").is_ok());
        assert!(policy.check("http://8.8.8.8/disk.raw").is_ok());

        let allowed =
            FetchPolicy::default().allow(&["127.0.0.1,fd00::/8".into(), "localhost".into()])?;
        assert!(allowed.check("http://127.0.0.1:9/x").is_ok());
        assert!(allowed.check("http://[::ffff:127.0.0.1]/x").is_ok());
        assert!(allowed.check("http://[fd00::5]/x").is_ok());
        assert!(allowed.check("http://localhost/x").is_ok());
        assert!(allowed.check("http://127.0.0.2/x").is_err());
        assert!(
            FetchPolicy::default()
                .allow(&["10.0.0.0/33".into()])
                .is_err()
        );
        assert!(FetchPolicy::default().allow(&["a b".into()]).is_err());
        Ok(())
    }

    #[test]
    fn ranges_match_by_prefix() {
        assert!(in_range(ip("10.1.2.3"), ip("10.0.0.0"), 8));
        assert!(!in_range(ip("11.1.2.3"), ip("10.0.0.0"), 8));
        assert!(in_range(ip("1.2.3.4"), ip("0.0.0.0"), 0));
        assert!(in_range(ip("fd00::1"), ip("fd00::"), 8));
        assert!(!in_range(ip("fe00::1"), ip("fd00::"), 8));
        assert!(!in_range(ip("10.0.0.1"), ip("fd00::"), 8));
    }
}
