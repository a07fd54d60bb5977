//! Clients that try to wear the server out rather than break in: connections opened
//! and left idle, request heads and bodies trickled a byte at a time. Each must cost the
//! server a bounded amount, and the server must go on answering everyone else
//! (docs/security.md).
//!
//! Nothing here times the server against a budget: the tests look for what a user would
//! see (a closed connection, `/healthz` answering, a 408) within deadlines far longer
//! than the limits they set by flag.

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
