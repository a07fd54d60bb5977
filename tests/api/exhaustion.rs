//! Clients that try to wear the server out rather than break in: wrong passwords sent
//! as fast as the server hashes them, connections opened and left idle, request heads
//! and bodies trickled a byte at a time. Each must cost the server a bounded amount,
//! and the server must go on answering everyone else (docs/security.md).
//!
//! Nothing here times the server against a budget: the tests look for what a user would
//! see (a 429, a 503, a closed connection, `/healthz` answering) within deadlines far
//! longer than the limits they set by flag.

use crate::harness::{PASSWORD, Server};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// A request's `Authorization` header for these credentials.
fn basic(user: &str, password: &str) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

/// A GET of `/api/images` with this `Authorization` header: status, `Retry-After` and
/// body.
async fn get_images(server: &Server, authorization: &str) -> (u16, Option<u64>, String) {
    let response = server
        .request(reqwest::Method::GET, "/api/images")
        .header("Authorization", authorization)
        .header("Accept", "application/xml")
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .expect("an answer");
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    (status, retry_after, response.text().await.expect("body"))
}

/// The code and message of an `<error>` document.
fn error_of(body: &str) -> (String, String) {
    let doc = roxmltree::Document::parse(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    let text = |name: &str| {
        doc.descendants()
            .find(|n| n.has_tag_name(name))
            .and_then(|n| n.text())
            .unwrap_or_else(|| panic!("no <{name}> in {body}"))
            .to_owned()
    };
    (text("code"), text("message"))
}

/// The server's resident memory, from /proc.
fn resident_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse::<u64>().ok())
        .expect("VmRSS")
        * 1024
}

/// How many files (sockets included) the server has open.
fn open_files(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("/proc fd")
        .count()
}

/// Lets this test process open as many sockets as its hard limit allows: the idle
/// connections below are this process's descriptors too.
fn raise_own_open_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// A plain connection to the server.
fn connect(server: &Server) -> TcpStream {
    let stream = TcpStream::connect(server.address()).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("read timeout");
    stream
}

/// Whether the server has closed this connection (or reset it): a read sees the end,
/// or fails for another reason than the read timeout. Anything the server sent first
/// is appended to `received`.
fn server_closed(stream: &mut TcpStream, received: &mut Vec<u8>) -> bool {
    let mut buffer = [0u8; 4096];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => return true,
            Ok(n) => received.extend_from_slice(&buffer[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false;
            }
            Err(_) => return true,
        }
    }
}

/// Sends `step` every 200 ms until the server closes the connection; answers what it
/// sent before closing, or fails after `limit`.
fn trickle_until_closed(stream: &mut TcpStream, step: &[u8], limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    let mut received = Vec::new();
    loop {
        // A write to a connection the server closed fails: that is a close too.
        if stream.write_all(step).is_err() || server_closed(stream, &mut received) {
            return String::from_utf8_lossy(&received).into_owned();
        }
        assert!(
            Instant::now() < deadline,
            "the server still held the connection after {limit:?}; it sent {:?}",
            String::from_utf8_lossy(&received)
        );
    }
}

/// `GET /healthz` on a new connection: the answer's status line, or `None` when there
/// was none within `limit`.
fn healthz(server: &Server, limit: Duration) -> Option<String> {
    let mut stream = TcpStream::connect(server.address()).ok()?;
    stream.set_read_timeout(Some(limit)).ok()?;
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer.lines().next().map(str::to_owned)
}

#[tokio::test]
async fn wrong_passwords_make_their_address_wait_but_not_a_known_client() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start_with(dir.path(), &[]);
    let good = basic("admin", PASSWORD);
    assert_eq!(get_images(&server, &good).await.0, 200);

    // A guesser from the same address: a few wrong passwords are merely refused, then
    // the server stops checking them and says why and for how long.
    let mut throttled = None;
    for attempt in 0..20 {
        let (status, retry_after, body) =
            get_images(&server, &basic("admin", &format!("guess-{attempt}"))).await;
        match status {
            401 => continue,
            429 => {
                throttled = Some((retry_after, body));
                break;
            }
            other => panic!("a wrong password got {other}: {body}"),
        }
    }
    let (retry_after, body) = throttled.expect("no 429 after 20 wrong passwords");
    assert!(retry_after.is_some_and(|s| s >= 1), "{retry_after:?}");
    let (code, message) = error_of(&body);
    assert_eq!(code, "TooManyLoginFailures");
    assert!(message.contains("wrong passwords"), "{message}");
    // An unknown user from that address waits too: the address is the culprit.
    let (status, _, body) = get_images(&server, &basic("nobody", "x")).await;
    assert_eq!(status, 429, "{body}");
    assert!(error_of(&body).1.contains("address"), "{body}");

    // The administrator, logged in a moment ago, is answered as before...
    assert_eq!(get_images(&server, &good).await.0, 200);
    // ...and so is a header for the same credentials that the server has not seen
    // (spaces around the name), which must be checked again: the credentials proved
    // themselves before, so they do not wait for the guesser's failures.
    let fresh = basic(" admin ", PASSWORD);
    assert_eq!(get_images(&server, &fresh).await.0, 200);
}

#[tokio::test]
async fn wrong_passwords_count_when_the_guesser_hangs_up_before_the_answer() {
    let dir = tempfile::tempdir().expect("tempdir");
    // One check at a time: a login waits for every check before it to be counted.
    let server = Server::start_with(dir.path(), &["--login-checks", "1"]);
    // Guesses whose clients hang up as soon as the request is sent: the request is in
    // the server's socket buffer, and its check runs without anyone to answer.
    let guess_line = |attempt: u32| {
        format!(
            "GET /api/images HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\n\r\n",
            basic("admin", &format!("guess-{attempt}"))
        )
    };
    // Each guess is sent alone and its client hangs up while its check runs (seen in
    // the metrics); the next is sent once it has been counted.
    let metrics_url = format!("{}/metrics", server.url);
    let metric = async |name: &str| -> f64 {
        let metrics = reqwest::get(&metrics_url)
            .await
            .expect("metrics")
            .text()
            .await
            .expect("body");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    };
    // Five: the failures an address has before it must wait (--login-failures).
    let mut hung_up = 0;
    for attempt in 0..5 {
        let mut stream = connect(&server);
        stream
            .write_all(guess_line(attempt).as_bytes())
            .expect("send the guess");
        let counted = f64::from(attempt + 1);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if metric("conductor_login_checks_running").await >= 1.0 {
                drop(stream);
                hung_up += 1;
                break;
            }
            // Over before it was seen: counted, but no hang-up was tested with it.
            if metric("conductor_login_failures_total").await >= counted {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "guess {attempt} was never checked"
            );
        }
        crate::harness::eventually(Duration::from_secs(60), async || {
            match metric("conductor_login_failures_total").await {
                n if n >= counted => Ok(()),
                n => Err(format!("guess {attempt} was not counted ({n} so far)")),
            }
        })
        .await;
    }
    assert!(
        hung_up >= 3,
        "only {hung_up} guesses were given up during their check"
    );
    // The right password, never seen before, from the guesser's address: the address
    // has failed five times, answers or not.
    let (status, retry_after, body) = get_images(&server, &basic("admin", PASSWORD)).await;
    assert_eq!(status, 429, "{body}");
    assert!(retry_after.is_some());
}

#[tokio::test]
async fn a_user_name_under_attack_from_many_addresses_waits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start_with(dir.path(), &[]);
    // Every address of 127.0.0.0/8 is this machine's: a guesser with many addresses,
    // each with failures to spare.
    let mut throttled = None;
    for attempt in 0..20u8 {
        let client = reqwest::Client::builder()
            .local_address(std::net::IpAddr::from([127, 0, 0, 10 + attempt]))
            .build()
            .expect("client");
        let response = client
            .get(format!("{}/api/images", server.url))
            .header("Authorization", basic("admin", &format!("guess-{attempt}")))
            .send()
            .await
            .expect("an answer");
        if response.status().as_u16() == 429 {
            throttled = Some(response.text().await.expect("body"));
            break;
        }
        assert_eq!(response.status().as_u16(), 401);
    }
    let body = throttled.expect("no 429 after 20 wrong passwords from 20 addresses");
    let (code, message) = error_of(&body);
    assert_eq!(code, "TooManyLoginFailures");
    assert!(message.contains("user name"), "{message}");
}

#[tokio::test]
async fn an_unknown_user_costs_what_a_known_one_does() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start_with(dir.path(), &["--login-failures", "0"]);
    let mut known = Vec::new();
    let mut unknown = Vec::new();
    for attempt in 0..7 {
        for (user, times) in [("admin", &mut known), ("nobody", &mut unknown)] {
            let started = Instant::now();
            let response = server
                .request(reqwest::Method::GET, "/api/images")
                .basic_auth(user, Some(format!("wrong-{attempt}")))
                .send()
                .await
                .expect("an answer");
            times.push(started.elapsed());
            // Refused the same way: nothing tells the two apart but time.
            assert_eq!(response.status().as_u16(), 401, "{user}");
            assert!(response.headers().contains_key("www-authenticate"));
            assert_eq!(response.text().await.expect("body"), "", "{user}");
        }
    }
    known.sort();
    unknown.sort();
    let (known, unknown) = (known[known.len() / 2], unknown[unknown.len() / 2]);
    // A password check costs tens of milliseconds and a lookup alone a fraction of
    // one: without the decoy check the ratio is 20 or more. The margin is for noise.
    assert!(
        known < unknown * 5,
        "a wrong password took {known:?} (median) for a known user, {unknown:?} for an unknown one"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_wrong_passwords_keeps_memory_bounded() {
    let dir = tempfile::tempdir().expect("tempdir");
    // The failure limits off and a short wait for a check: only the bound on checks
    // running at once (4, whatever the machine's cores) stands between 64 guessers and
    // the server's memory.
    let server = Server::start_with(
        dir.path(),
        &[
            "--login-failures",
            "0",
            "--login-checks",
            "4",
            "--login-check-wait",
            "200ms",
        ],
    );
    let pid = server.pid();
    let before = resident_bytes(pid);
    let url = format!("{}/api/images", server.url);
    let stop_at = Instant::now() + Duration::from_secs(5);
    let mut guessers = Vec::new();
    for guesser in 0..64 {
        let url = url.clone();
        guessers.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut busy = 0;
            let mut attempt = 0;
            while Instant::now() < stop_at {
                attempt += 1;
                let response = client
                    .get(&url)
                    .basic_auth("admin", Some(format!("guess-{guesser}-{attempt}")))
                    .timeout(Duration::from_secs(60))
                    .send()
                    .await
                    .expect("an answer");
                match response.status().as_u16() {
                    401 => {}
                    503 => {
                        assert!(response.headers().contains_key("retry-after"));
                        let body = response.text().await.expect("body");
                        assert_eq!(error_of(&body).0, "ServerBusy", "{body}");
                        busy += 1;
                    }
                    other => panic!("a wrong password got {other}"),
                }
            }
            busy
        }));
    }
    let mut peak = before;
    while guessers.iter().any(|g| !g.is_finished()) {
        peak = peak.max(resident_bytes(pid));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut busy = 0;
    for guesser in guessers {
        busy += guesser.await.expect("guesser");
    }
    // 64 checks at once take 64 times argon2's 19 MiB, over 1 GiB; 4 take 76 MiB. The
    // bound leaves room for the allocator, not for checks that each bring their own
    // memory (that grew the server by 800 MiB).
    assert!(
        peak < 512 << 20,
        "the server grew from {} MiB to {} MiB",
        before >> 20,
        peak >> 20
    );
    assert!(busy > 0, "64 guessers never found every check taken");
    // The administrator gets in once the flood is over.
    assert_eq!(server.get("/api/images").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guessers_that_hang_up_do_not_escape_the_bound_on_checks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start_with(
        dir.path(),
        &["--login-failures", "0", "--login-checks", "4"],
    );
    let pid = server.pid();
    let before = resident_bytes(pid);
    let url = format!("{}/api/images", server.url);
    let stop_at = Instant::now() + Duration::from_secs(5);
    // Each guess is given up after 50 ms, long before its check ends: a check that
    // stopped counting against the bound when its client left would pile up.
    let mut guessers = Vec::new();
    for guesser in 0..32 {
        let url = url.clone();
        guessers.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut attempt = 0;
            while Instant::now() < stop_at {
                attempt += 1;
                let _ = client
                    .get(&url)
                    .basic_auth("admin", Some(format!("guess-{guesser}-{attempt}")))
                    .timeout(Duration::from_millis(50))
                    .send()
                    .await;
            }
        }));
    }
    let mut peak = before;
    while guessers.iter().any(|g| !g.is_finished()) {
        peak = peak.max(resident_bytes(pid));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for guesser in guessers {
        guesser.await.expect("guesser");
    }
    assert!(
        peak < 512 << 20,
        "the server grew from {} MiB to {} MiB",
        before >> 20,
        peak >> 20
    );
    assert_eq!(server.get("/api/images").await.status, 200);
}

#[test]
fn healthz_answers_while_many_idle_connections_are_open() {
    raise_own_open_file_limit();
    let dir = tempfile::tempdir().expect("tempdir");
    // Started with room for 256 open files, as a default soft limit may give: the
    // server must raise it, or 600 idle clients take every descriptor it has.
    let server = Server::start_with_open_files(dir.path(), &[], 256);
    let idle: Vec<TcpStream> = (0..600).map(|_| connect(&server)).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while open_files(server.pid()) < idle.len() {
        assert!(
            Instant::now() < deadline,
            "the server holds {} files with {} clients connected",
            open_files(server.pid()),
            idle.len()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let answer = healthz(&server, Duration::from_secs(30));
    assert_eq!(answer.as_deref(), Some("HTTP/1.1 200 OK"));
    drop(idle);
}

#[test]
fn connections_past_the_cap_wait_outside_the_server() {
    raise_own_open_file_limit();
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start_with(
        dir.path(),
        &["--max-connections", "50", "--header-timeout", "2s"],
    );
    let baseline = open_files(server.pid());
    let idle: Vec<TcpStream> = (0..200).map(|_| connect(&server)).collect();
    // However long they stay, the server holds at most 50 of them (a few more files
    // come and go with the server's own work).
    for _ in 0..20 {
        let open = open_files(server.pid());
        assert!(
            open <= baseline + 50 + 10,
            "{open} files open with a cap of 50 connections (baseline {baseline})"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Idle connections are closed after the header timeout, so those waiting get in
    // turn, a health check among them.
    let answer = healthz(&server, Duration::from_secs(60));
    assert_eq!(answer.as_deref(), Some("HTTP/1.1 200 OK"));
    drop(idle);
}

#[test]
fn a_request_head_sent_a_byte_at_a_time_is_cut_off_at_the_header_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start_with(dir.path(), &["--header-timeout", "1s"]);
    let mut stream = connect(&server);
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .expect("write");
    // A byte every 200 ms keeps the connection busy but never ends the head.
    let sent = trickle_until_closed(&mut stream, b"a", Duration::from_secs(30));
    assert!(!sent.contains("200 OK"), "{sent}");
}

#[test]
fn a_kept_alive_connection_is_closed_after_the_keep_alive_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start_with(
        dir.path(),
        &["--keep-alive-timeout", "1s", "--header-timeout", "120s"],
    );
    let mut stream = connect(&server);
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write");
    // The answer, then nothing: the connection is idle from here.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut received = Vec::new();
    while !String::from_utf8_lossy(&received).ends_with("ok\n") {
        assert!(!server_closed(&mut stream, &mut received), "closed early");
        assert!(Instant::now() < deadline, "no answer");
    }
    // Well before the header timeout (120 s), the server lets the connection go.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !server_closed(&mut stream, &mut received) {
        assert!(
            Instant::now() < deadline,
            "an idle kept-alive connection was held for 60 s"
        );
    }
}

#[test]
fn a_request_head_larger_than_the_read_buffer_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start_with(dir.path(), &[]);
    let mut stream = connect(&server);
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
        .expect("write");
    // 64 KiB of one header, never finished: a client that holds this much of the
    // server's memory per connection, many times over, is refused at once.
    let mut received = Vec::new();
    for _ in 0..16 {
        if stream.write_all(&[b'a'; 4096]).is_err() || server_closed(&mut stream, &mut received) {
            break;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !server_closed(&mut stream, &mut received) {
        assert!(
            Instant::now() < deadline,
            "the server held 64 KiB of an unfinished request head"
        );
    }
    let sent = String::from_utf8_lossy(&received);
    assert!(
        sent.starts_with("HTTP/1.1 431"),
        "the server answered {sent:?}"
    );
}

#[test]
fn a_body_sent_a_byte_at_a_time_is_refused_with_408() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start_with(dir.path(), &["--body-timeout", "1s"]);
    let mut stream = connect(&server);
    let head = format!(
        "POST /api/images HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\n\
         Content-Type: application/xml\r\nContent-Length: 1000\r\n\r\n<image>",
        basic("admin", PASSWORD)
    );
    stream.write_all(head.as_bytes()).expect("write");
    let sent = trickle_until_closed(&mut stream, b" ", Duration::from_secs(60));
    assert!(
        sent.starts_with("HTTP/1.1 408"),
        "the server answered {sent:?}"
    );
    let body = sent.split("\r\n\r\n").nth(1).expect("a body");
    let (code, message) = error_of(body);
    assert_eq!(code, "RequestTimeout");
    assert!(message.contains("1s"), "{message}");
}
