//! The witness client: compare-and-swap of a VM's protection generation on
//! etcd v3, the only arbiter of role changes (docs/design.md, "Witness").
//!
//! It speaks etcd's JSON gateway (`POST /v3/kv/range`, `POST /v3/kv/txn`,
//! keys and values base64) over plain HTTP/1.1 on a [`TcpStream`], one
//! connection per request (`Connection: close`), synchronously. Every request
//! is bounded by the witness timeout as a whole: the endpoints are tried in
//! order, each given an equal share of what is left of the timeout (so a
//! black-holed first endpoint cannot starve the others), and the first one
//! that answers decides. Transport failures and HTTP 5xx move on to the next
//! endpoint; any other answer ends the request (a non-200 or malformed answer
//! is an error).
//!
//! The record of a VM lives under `ftvmm/vm/<vm-id>` as the JSON
//! `{"generation":g,"owner":"..."}`. [`Witness::advance`] moves it from `g` to
//! `g + 1` in one etcd transaction whose compare is the exact value bytes
//! read at `g` (or, for `g == 0`, that the key does not exist yet).

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// Where the records live: `ftvmm/vm/<vm-id>`.
pub const KEY_PREFIX: &str = "ftvmm/vm/";
/// Longest accepted VM id.
pub const MAX_VM_ID: usize = 128;
/// Largest answer read from the witness (a record is well under 1 KiB).
const MAX_ANSWER: usize = 1 << 20;
/// Longest piece of an error answer quoted in an error.
const MAX_QUOTE: usize = 200;

/// One VM's record on the witness: its protection generation and who owns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    /// The protection generation; 1 after the first pairing.
    pub generation: u64,
    /// Who holds this generation (a role's name for itself, unique per
    /// contender).
    pub owner: String,
}

/// The outcome of [`Witness::advance`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Advance {
    /// This caller now holds the record's generation (`from + 1`).
    Won(Record),
    /// Someone else holds the record; this is what is there now.
    Lost(Record),
}

/// Everything that can go wrong talking to the witness.
#[derive(Debug, thiserror::Error)]
pub enum WitnessError {
    #[error("bad --witness URL '{url}': {reason}")]
    BadUrl { url: String, reason: String },
    #[error("bad --vm-id '{id}': {reason}")]
    BadVmId { id: String, reason: String },
    #[error("bad witness timeout: it must be more than zero")]
    BadTimeout,
    #[error("witness {endpoint} unreachable: {reason}")]
    Unreachable { endpoint: String, reason: String },
    #[error("witness {endpoint} answered HTTP {status} to {op} on {key}: {body}")]
    Http {
        endpoint: String,
        status: u16,
        op: &'static str,
        key: String,
        body: String,
    },
    #[error("witness {endpoint} sent a malformed answer to {op} on {key}: {reason}")]
    Malformed {
        endpoint: String,
        op: &'static str,
        key: String,
        reason: String,
    },
    #[error("record under {key} is not an ftvmm record: {reason}")]
    NotRecord { key: String, reason: String },
    #[error("no record under {key} (expected one at generation {expected})")]
    Missing { key: String, expected: u64 },
    #[error("no witness answered {op} on {key} within {timeout_ms} ms: {}", join(.errors))]
    NoneAnswered {
        op: &'static str,
        key: String,
        timeout_ms: u128,
        errors: Vec<WitnessError>,
    },
}

fn join(errors: &[WitnessError]) -> String {
    let parts: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
    parts.join("; ")
}

/// One endpoint, parsed.
#[derive(Debug, Clone)]
struct Target {
    /// `http://host:port`, as shown in errors.
    url: String,
    /// Host without IPv6 brackets.
    host: String,
    port: u16,
}

impl Target {
    /// The `Host:` header value.
    fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// A gateway call: its path and its name in errors.
#[derive(Debug, Clone, Copy)]
struct Op {
    path: &'static str,
    name: &'static str,
}

const RANGE: Op = Op {
    path: "/v3/kv/range",
    name: "range",
};
const TXN: Op = Op {
    path: "/v3/kv/txn",
    name: "txn",
};

/// A client of the witness for one VM.
#[derive(Debug, Clone)]
pub struct Witness {
    endpoints: Vec<String>,
    targets: Vec<Target>,
    vm_id: String,
    key: String,
    timeout: Duration,
}

impl Witness {
    /// `urls`: comma-separated `http://host:port` endpoints; `vm_id`: non-empty,
    /// `[A-Za-z0-9._-]`, at most [`MAX_VM_ID`] bytes; `timeout`: the bound on
    /// each request, all endpoints together.
    pub fn new(urls: &str, vm_id: &str, timeout: Duration) -> Result<Witness, WitnessError> {
        let mut targets = Vec::new();
        for url in urls.split(',') {
            targets.push(parse_url(url.trim())?);
        }
        validate_vm_id(vm_id)?;
        if timeout.is_zero() {
            return Err(WitnessError::BadTimeout);
        }
        Ok(Witness {
            endpoints: targets.iter().map(|t| t.url.clone()).collect(),
            targets,
            vm_id: vm_id.to_string(),
            key: format!("{KEY_PREFIX}{vm_id}"),
            timeout,
        })
    }

    /// The endpoints, normalised to `http://host:port`, in the order tried.
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// The VM id.
    pub fn vm_id(&self) -> &str {
        &self.vm_id
    }

    /// The etcd key of this VM's record.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The bound on each request.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The VM's record, or `None` when there is none yet.
    pub fn read(&self) -> Result<Option<Record>, WitnessError> {
        match self.read_raw()? {
            None => Ok(None),
            Some(bytes) => self.decode_record(&bytes).map(Some),
        }
    }

    /// The only arbiter of role changes: compare-and-swap generation `from` →
    /// `from + 1` with `owner`, as one etcd transaction. `Won`: this caller
    /// holds generation `from + 1`. `Lost`: the record is not at `from` (someone
    /// else changed it, or — never expected — it is behind `from`); it carries
    /// what is there now, and the caller does not hold anything.
    ///
    /// `owner` must be unique among contenders: when an earlier attempt of
    /// this same call may have landed without its answer arriving (an endpoint
    /// that went silent after the request was sent), finding exactly
    /// `{from + 1, owner}` on the retry counts as won.
    pub fn advance(&self, from: u64, owner: &str) -> Result<Advance, WitnessError> {
        let compare = if from == 0 {
            json!({
                "key": b64_encode(self.key.as_bytes()),
                "target": "CREATE",
                "result": "EQUAL",
                "create_revision": "0",
            })
        } else {
            let Some(bytes) = self.read_raw()? else {
                return Err(WitnessError::Missing {
                    key: self.key.clone(),
                    expected: from,
                });
            };
            let current = self.decode_record(&bytes)?;
            if current.generation != from {
                return Ok(Advance::Lost(current));
            }
            json!({
                "key": b64_encode(self.key.as_bytes()),
                "target": "VALUE",
                "result": "EQUAL",
                "value": b64_encode(&bytes),
            })
        };
        let Some(generation) = from.checked_add(1) else {
            return Err(WitnessError::NotRecord {
                key: self.key.clone(),
                reason: format!("generation {from} cannot advance"),
            });
        };
        let new = Record {
            generation,
            owner: owner.to_string(),
        };
        let new_bytes = serde_json::to_vec(&new).unwrap_or_default();
        let body = json!({
            "compare": [compare],
            "success": [{"request_put": {
                "key": b64_encode(self.key.as_bytes()),
                "value": b64_encode(&new_bytes),
            }}],
            "failure": [{"request_range": {"key": b64_encode(self.key.as_bytes())}}],
        });
        let mut ambiguous = false;
        let (endpoint, answer) = self.call(TXN, &body, &mut ambiguous)?;
        let malformed = |reason: &str| WitnessError::Malformed {
            endpoint: endpoint.clone(),
            op: TXN.name,
            key: self.key.clone(),
            reason: reason.to_string(),
        };
        if answer.get("header").map(Value::is_object) != Some(true) {
            return Err(malformed("no header"));
        }
        let succeeded = match answer.get("succeeded") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(malformed("'succeeded' is not a boolean")),
        };
        if succeeded {
            return Ok(Advance::Won(new));
        }
        let range = answer
            .get("responses")
            .and_then(Value::as_array)
            .and_then(|r| r.first())
            .and_then(|r| r.get("response_range"))
            .ok_or_else(|| malformed("a failed txn without its range response"))?;
        let value = kv_value(range).map_err(|r| malformed(&r))?;
        let Some(bytes) = value else {
            return Err(WitnessError::Missing {
                key: self.key.clone(),
                expected: from,
            });
        };
        let current = self.decode_record(&bytes)?;
        if ambiguous && current == new {
            return Ok(Advance::Won(new));
        }
        Ok(Advance::Lost(current))
    }

    /// The raw value under the key, `None` when absent.
    fn read_raw(&self) -> Result<Option<Vec<u8>>, WitnessError> {
        let body = json!({"key": b64_encode(self.key.as_bytes())});
        let (endpoint, answer) = self.call(RANGE, &body, &mut false)?;
        if answer.get("header").map(Value::is_object) != Some(true) {
            return Err(WitnessError::Malformed {
                endpoint,
                op: RANGE.name,
                key: self.key.clone(),
                reason: "no header".into(),
            });
        }
        kv_value(&answer).map_err(|reason| WitnessError::Malformed {
            endpoint,
            op: RANGE.name,
            key: self.key.clone(),
            reason,
        })
    }

    fn decode_record(&self, bytes: &[u8]) -> Result<Record, WitnessError> {
        serde_json::from_slice::<Record>(bytes).map_err(|e| WitnessError::NotRecord {
            key: self.key.clone(),
            reason: format!("{e} (value {})", quote(bytes)),
        })
    }

    /// Sends `body` to `op` on the endpoints in order; the first 200 answer's
    /// JSON and the endpoint that gave it. `ambiguous` is set when a request
    /// may have reached etcd without its answer reaching us.
    fn call(
        &self,
        op: Op,
        body: &Value,
        ambiguous: &mut bool,
    ) -> Result<(String, Value), WitnessError> {
        let start = Instant::now();
        let deadline = start + self.timeout;
        let body = body.to_string();
        let mut errors = Vec::new();
        let n = self.targets.len();
        for (i, target) in self.targets.iter().enumerate() {
            let now = Instant::now();
            let left = deadline.saturating_duration_since(now);
            if left.is_zero() {
                errors.push(WitnessError::Unreachable {
                    endpoint: target.url.clone(),
                    reason: "not tried: the timeout was spent".into(),
                });
                continue;
            }
            // An equal share of what is left, the last endpoint gets all of it.
            let share = left / u32::try_from(n - i).unwrap_or(u32::MAX);
            let mut sent = false;
            match exchange(target, op.path, body.as_bytes(), now + share, &mut sent) {
                Err(Failure::Transport(reason)) => {
                    *ambiguous |= sent;
                    errors.push(WitnessError::Unreachable {
                        endpoint: target.url.clone(),
                        reason,
                    });
                }
                Err(Failure::Malformed(reason)) => {
                    return Err(WitnessError::Malformed {
                        endpoint: target.url.clone(),
                        op: op.name,
                        key: self.key.clone(),
                        reason,
                    })
                }
                Ok((200, answer)) => {
                    let value: Value =
                        serde_json::from_slice(&answer).map_err(|e| WitnessError::Malformed {
                            endpoint: target.url.clone(),
                            op: op.name,
                            key: self.key.clone(),
                            reason: format!("not JSON: {e} ({})", quote(&answer)),
                        })?;
                    if !value.is_object() {
                        return Err(WitnessError::Malformed {
                            endpoint: target.url.clone(),
                            op: op.name,
                            key: self.key.clone(),
                            reason: format!("not a JSON object ({})", quote(&answer)),
                        });
                    }
                    return Ok((target.url.clone(), value));
                }
                Ok((status, answer)) => {
                    let err = WitnessError::Http {
                        endpoint: target.url.clone(),
                        status,
                        op: op.name,
                        key: self.key.clone(),
                        body: quote(&answer),
                    };
                    if status < 500 {
                        return Err(err);
                    }
                    // The server failed (no leader, request timed out):
                    // the request may have been applied; try the next one.
                    *ambiguous = true;
                    errors.push(err);
                }
            }
        }
        if errors.len() == 1 {
            if let Some(e) = errors.pop() {
                return Err(e);
            }
        }
        Err(WitnessError::NoneAnswered {
            op: op.name,
            key: self.key.clone(),
            timeout_ms: self.timeout.as_millis(),
            errors,
        })
    }
}

/// Why one endpoint gave no usable answer.
#[derive(Debug)]
enum Failure {
    /// Not reached, or no complete answer in time: try the next one.
    Transport(String),
    /// It answered, but not in HTTP.
    Malformed(String),
}

/// One HTTP request to one endpoint, all of it before `deadline`: the status
/// and the body of the answer. `sent` is set once any byte of the request
/// may have left.
fn exchange(
    target: &Target,
    path: &str,
    body: &[u8],
    deadline: Instant,
    sent: &mut bool,
) -> Result<(u16, Vec<u8>), Failure> {
    let left = || {
        let d = deadline.saturating_duration_since(Instant::now());
        if d.is_zero() {
            Err(Failure::Transport("no answer in time".into()))
        } else {
            Ok(d)
        }
    };
    let addrs = resolve(target, left()?)?;
    let mut stream = None;
    let mut last = String::from("no address");
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, left()?) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = io_reason(&e),
        }
    }
    let Some(mut stream) = stream else {
        return Err(Failure::Transport(last));
    };
    let _ = stream.set_nodelay(true);

    let mut request = format!(
        "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
         Accept: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        target.authority(),
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    stream
        .set_write_timeout(Some(left()?))
        .map_err(|e| Failure::Transport(io_reason(&e)))?;
    *sent = true;
    stream
        .write_all(&request)
        .map_err(|e| Failure::Transport(io_reason(&e)))?;

    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        stream
            .set_read_timeout(Some(left()?))
            .map_err(|e| Failure::Transport(io_reason(&e)))?;
        match stream.read(&mut chunk) {
            Ok(0) => {
                return match parse_http(&buf, true) {
                    Ok(Some(answer)) => Ok(answer),
                    Ok(None) | Err(_) if buf.is_empty() => Err(Failure::Transport(
                        "closed the connection without answering".into(),
                    )),
                    Ok(None) => Err(Failure::Transport("answer cut short".into())),
                    Err(reason) => Err(Failure::Malformed(reason)),
                }
            }
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if buf.len() > MAX_ANSWER {
                    return Err(Failure::Malformed(format!(
                        "answer longer than {MAX_ANSWER} bytes"
                    )));
                }
                match parse_http(&buf, false) {
                    Ok(Some(answer)) => return Ok(answer),
                    Ok(None) => {}
                    Err(reason) => return Err(Failure::Malformed(reason)),
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(Failure::Transport(io_reason(&e))),
        }
    }
}

/// The socket addresses of `target`; name lookups run on a helper thread so
/// that a hung resolver cannot hold the caller past its deadline.
fn resolve(target: &Target, within: Duration) -> Result<Vec<SocketAddr>, Failure> {
    if let Ok(ip) = target.host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, target.port)]);
    }
    let (tx, rx) = mpsc::channel();
    let name = (target.host.clone(), target.port);
    std::thread::Builder::new()
        .name("witness-dns".into())
        .spawn(move || {
            crate::seccomp::apply_or_exit(crate::seccomp::ThreadKind::Resolver);
            let _ = tx.send(name.to_socket_addrs().map(|a| a.collect::<Vec<_>>()));
        })
        .map_err(|e| Failure::Transport(format!("cannot resolve {}: {e}", target.host)))?;
    match rx.recv_timeout(within) {
        Ok(Ok(addrs)) if !addrs.is_empty() => Ok(addrs),
        Ok(Ok(_)) => Err(Failure::Transport(format!(
            "{} has no address",
            target.host
        ))),
        Ok(Err(e)) => Err(Failure::Transport(format!(
            "cannot resolve {}: {e}",
            target.host
        ))),
        Err(_) => Err(Failure::Transport(format!(
            "no address for {} in time",
            target.host
        ))),
    }
}

fn io_reason(e: &std::io::Error) -> String {
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => "no answer in time".into(),
        ErrorKind::ConnectionRefused => "connection refused".into(),
        _ => e.to_string(),
    }
}

/// Parses an HTTP/1.x answer in `buf`: `Ok(None)` while incomplete (and
/// `eof` is false), the status and the (de-chunked) body once complete.
fn parse_http(buf: &[u8], eof: bool) -> Result<Option<(u16, Vec<u8>)>, String> {
    let Some(head_len) = find(buf, b"\r\n\r\n") else {
        if eof && !buf.is_empty() {
            return Err("the answer ends inside its headers".into());
        }
        if buf.len() > 64 * 1024 {
            return Err("headers longer than 64 KiB".into());
        }
        return Ok(None);
    };
    let head =
        std::str::from_utf8(&buf[..head_len]).map_err(|_| "headers are not UTF-8".to_string())?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") {
        return Err(format!(
            "not an HTTP/1.x answer: {}",
            quote(status_line.as_bytes())
        ));
    }
    let status = parts
        .next()
        .filter(|s| s.len() == 3 && s.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|s| s.parse::<u16>().ok())
        .filter(|s| (100..=599).contains(s))
        .ok_or_else(|| format!("bad status line: {}", quote(status_line.as_bytes())))?;
    let mut content_length = None;
    let mut chunked = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(format!("bad header line: {}", quote(line.as_bytes())));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            let n = value
                .parse::<usize>()
                .map_err(|_| format!("bad Content-Length: {}", quote(value.as_bytes())))?;
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        }
    }
    let body = &buf[head_len + 4..];
    if chunked {
        return match dechunk(body)? {
            Some(b) => Ok(Some((status, b))),
            None if eof => Err("chunked body cut short".into()),
            None => Ok(None),
        };
    }
    match content_length {
        Some(n) if body.len() >= n => Ok(Some((status, body[..n].to_vec()))),
        Some(_) if eof => Err("body shorter than its Content-Length".into()),
        Some(_) => Ok(None),
        None if eof => Ok(Some((status, body.to_vec()))),
        None => Ok(None),
    }
}

/// Decodes a chunked body; `Ok(None)` while incomplete.
fn dechunk(mut rest: &[u8]) -> Result<Option<Vec<u8>>, String> {
    let mut out = Vec::new();
    loop {
        let Some(line_len) = find(rest, b"\r\n") else {
            return Ok(None);
        };
        let line = std::str::from_utf8(&rest[..line_len])
            .map_err(|_| "bad chunk size line".to_string())?;
        let size_text = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| format!("bad chunk size: {}", quote(line.as_bytes())))?;
        rest = &rest[line_len + 2..];
        if size == 0 {
            return Ok(Some(out));
        }
        let need = size
            .checked_add(2)
            .filter(|n| *n <= MAX_ANSWER)
            .ok_or_else(|| "chunk too large".to_string())?;
        if rest.len() < need {
            return Ok(None);
        }
        if &rest[size..need] != b"\r\n" {
            return Err("chunk not followed by CRLF".into());
        }
        out.extend_from_slice(&rest[..size]);
        rest = &rest[need..];
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The value of the first kv of a range response (`kvs` absent or empty:
/// `None`).
fn kv_value(range: &Value) -> Result<Option<Vec<u8>>, String> {
    let kvs = match range.get("kvs") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Array(kvs)) => kvs,
        Some(_) => return Err("'kvs' is not an array".into()),
    };
    let Some(kv) = kvs.first() else {
        return Ok(None);
    };
    match kv.get("value") {
        // proto3 JSON leaves an empty value out.
        None | Some(Value::Null) => Ok(Some(Vec::new())),
        Some(Value::String(s)) => b64_decode(s)
            .map(Some)
            .ok_or_else(|| "value is not base64".into()),
        Some(_) => Err("value is not a string".into()),
    }
}

/// At most [`MAX_QUOTE`] characters of `bytes`, lossily, for an error.
fn quote(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let text = text.trim();
    let mut out: String = text.chars().take(MAX_QUOTE).collect();
    if text.chars().count() > MAX_QUOTE {
        out.push('…');
    }
    out
}

fn parse_url(url: &str) -> Result<Target, WitnessError> {
    let bad = |reason: &str| WitnessError::BadUrl {
        url: url.to_string(),
        reason: reason.to_string(),
    };
    if url.is_empty() {
        return Err(bad("empty (expected http://host:port)"));
    }
    let rest = match url.split_once("://") {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
        Some((scheme, _)) if scheme.eq_ignore_ascii_case("https") => {
            return Err(bad("only http:// is supported (no TLS)"))
        }
        _ => return Err(bad("expected http://host:port")),
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains(['/', '?', '#', '@']) {
        return Err(bad("expected http://host:port with no path, query or user"));
    }
    let (host, port) = if let Some(inner) = rest.strip_prefix('[') {
        let (v6, after) = inner
            .split_once(']')
            .ok_or_else(|| bad("unclosed '[' in an IPv6 address"))?;
        v6.parse::<Ipv6Addr>()
            .map_err(|_| bad("bad IPv6 address"))?;
        let port = after
            .strip_prefix(':')
            .ok_or_else(|| bad("no port (expected http://host:port)"))?;
        (v6, port)
    } else {
        let (host, port) = rest
            .rsplit_once(':')
            .ok_or_else(|| bad("no port (expected http://host:port)"))?;
        if host.contains(':') {
            return Err(bad("an IPv6 address goes in brackets: http://[::1]:2379"));
        }
        (host, port)
    };
    if host.is_empty() {
        return Err(bad("no host"));
    }
    if !host.contains(':')
        && !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_')
    {
        return Err(bad("bad host name"));
    }
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| bad("bad port (expected 1-65535)"))?;
    let target = Target {
        url: String::new(),
        host: host.to_string(),
        port,
    };
    Ok(Target {
        url: format!("http://{}", target.authority()),
        ..target
    })
}

fn validate_vm_id(id: &str) -> Result<(), WitnessError> {
    let bad = |reason: &str| WitnessError::BadVmId {
        id: id.to_string(),
        reason: reason.to_string(),
    };
    if id.is_empty() {
        return Err(bad("empty"));
    }
    if id.len() > MAX_VM_ID {
        return Err(bad(&format!("longer than {MAX_VM_ID} characters")));
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
    {
        return Err(bad("only A-Z, a-z, 0-9, '.', '_' and '-' are allowed"));
    }
    Ok(())
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding (what etcd's gateway speaks).
fn b64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Decodes standard base64 (padding optional); `None` on anything else.
fn b64_decode(text: &str) -> Option<Vec<u8>> {
    let text = text.trim_end_matches('=');
    if text.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0u32;
    for c in text.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::{Arc, Barrier};

    const ETCD: &str = "/usr/bin/etcd";

    /// A throwaway single-member etcd on 127.0.0.1; killed and its data
    /// removed on drop (also when a test fails).
    struct Etcd {
        child: Child,
        dir: PathBuf,
        url: String,
    }

    impl Etcd {
        /// `None` (after printing SKIP) when there is no etcd binary.
        fn start(test: &str) -> Option<Etcd> {
            if !Path::new(ETCD).exists() {
                println!("SKIP {test}: no etcd binary (apt-get install etcd-server)");
                return None;
            }
            static SEQ: AtomicU32 = AtomicU32::new(0);
            let seq = SEQ.fetch_add(1, Ordering::Relaxed);
            let name = format!("ftvmm-{test}-{}-{seq}", std::process::id());
            let dir = std::env::temp_dir().join(&name);
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("etcd temp dir");
            let (client, peer) = {
                let a = TcpListener::bind("127.0.0.1:0").expect("free port");
                let b = TcpListener::bind("127.0.0.1:0").expect("free port");
                (
                    a.local_addr().expect("addr").port(),
                    b.local_addr().expect("addr").port(),
                )
            };
            let url = format!("http://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let log = std::fs::File::create(dir.join("etcd.log")).expect("etcd log");
            let child = Command::new(ETCD)
                .arg("--name")
                .arg(&name)
                .arg("--data-dir")
                .arg(dir.join("data"))
                .args(["--listen-client-urls", &url])
                .args(["--advertise-client-urls", &url])
                .args(["--listen-peer-urls", &peer_url])
                .args(["--initial-advertise-peer-urls", &peer_url])
                .arg("--initial-cluster")
                .arg(format!("{name}={peer_url}"))
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log"))
                .stderr(log)
                .spawn()
                .expect("spawn etcd");
            let mut etcd = Etcd { child, dir, url };
            etcd.wait_ready();
            Some(etcd)
        }

        /// Polls with reads until etcd answers; bounded.
        fn wait_ready(&mut self) {
            let probe =
                Witness::new(&self.url, "probe", Duration::from_millis(500)).expect("probe");
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if let Ok(Some(status)) = self.child.try_wait() {
                    panic!("etcd exited ({status}) before answering: {}", self.log());
                }
                match probe.read() {
                    Ok(_) => return,
                    Err(e) if Instant::now() >= deadline => {
                        panic!("etcd did not answer within 30 s: {e}\n{}", self.log())
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        }

        fn log(&self) -> String {
            std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default()
        }

        fn witness(&self, vm: &str) -> Witness {
            Witness::new(&self.url, vm, Duration::from_secs(5)).expect("witness")
        }
    }

    impl Drop for Etcd {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// A port on 127.0.0.1 where nothing listens (connection refused).
    fn dead_url() -> String {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        format!("http://{}", l.local_addr().expect("addr"))
    }

    /// A listener that never accepts: connects succeed (backlog), no answer.
    fn silent() -> (TcpListener, String) {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", l.local_addr().expect("addr"));
        (l, url)
    }

    fn rec(generation: u64, owner: &str) -> Record {
        Record {
            generation,
            owner: owner.into(),
        }
    }

    #[test]
    fn witness_base64_roundtrip() {
        let mut data = Vec::new();
        for len in 0..70u8 {
            let enc = b64_encode(&data);
            assert_eq!(enc.len() % 4, 0);
            assert_eq!(b64_decode(&enc).as_deref(), Some(&data[..]), "len {len}");
            data.push(len.wrapping_mul(37).wrapping_add(200));
        }
        assert_eq!(b64_encode(b"ftvmm/vm/x"), "ZnR2bW0vdm0veA==");
        assert_eq!(b64_decode("Zm9v").as_deref(), Some(&b"foo"[..]));
        assert_eq!(b64_decode("Zm9vYg").as_deref(), Some(&b"foob"[..]));
        assert!(b64_decode("Zm9v!").is_none());
        assert!(b64_decode("Z").is_none());
    }

    #[test]
    fn witness_url_and_id_validation() {
        let t = Duration::from_secs(1);
        let w = Witness::new(
            "http://10.0.0.3:2379, http://[::1]:2379/,http://etcd-1.local:1",
            "vm-1",
            t,
        )
        .expect("valid");
        assert_eq!(
            w.endpoints(),
            [
                "http://10.0.0.3:2379",
                "http://[::1]:2379",
                "http://etcd-1.local:1"
            ]
        );
        assert_eq!(w.key(), "ftvmm/vm/vm-1");
        for bad in [
            "",
            "x",
            "10.0.0.3:2379",
            "https://10.0.0.3:2379",
            "http://10.0.0.3",
            "http://10.0.0.3:0",
            "http://10.0.0.3:65536",
            "http://10.0.0.3:port",
            "http://:2379",
            "http://10.0.0.3:2379/v3",
            "http://user@10.0.0.3:2379",
            "http://::1:2379",
            "http://[::1:2379",
            "http://[zz]:2379",
            "http://bad host:2379",
            "http://10.0.0.3:2379,",
        ] {
            match Witness::new(bad, "vm", t) {
                Err(e @ WitnessError::BadUrl { .. }) => {
                    assert!(e.to_string().starts_with("bad --witness URL '"), "{e}")
                }
                other => panic!("{bad:?}: {other:?}"),
            }
        }
        let e = Witness::new("x", "vm", t).unwrap_err().to_string();
        assert_eq!(e, "bad --witness URL 'x': expected http://host:port");
        let long = "a".repeat(MAX_VM_ID + 1);
        for bad in ["", "a/b", "a b", "vm\u{e9}", &long] {
            assert!(
                matches!(
                    Witness::new("http://127.0.0.1:1", bad, t),
                    Err(WitnessError::BadVmId { .. })
                ),
                "{bad:?}"
            );
        }
        assert!(Witness::new("http://127.0.0.1:1", &"a".repeat(MAX_VM_ID), t).is_ok());
        assert!(Witness::new("http://127.0.0.1:1", "A.z_0-9", t).is_ok());
        assert!(matches!(
            Witness::new("http://127.0.0.1:1", "vm", Duration::ZERO),
            Err(WitnessError::BadTimeout)
        ));
    }

    #[test]
    fn witness_http_parsing_never_panics() {
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}";
        assert_eq!(parse_http(ok, false), Ok(Some((200, b"{}".to_vec()))));
        assert_eq!(parse_http(&ok[..ok.len() - 1], false), Ok(None));
        assert!(parse_http(&ok[..ok.len() - 1], true).is_err());
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n1;x\r\n \r\n0\r\n\r\n";
        assert_eq!(parse_http(chunked, false), Ok(Some((200, b"{} ".to_vec()))));
        assert_eq!(parse_http(&chunked[..60], false), Ok(None));
        let close = b"HTTP/1.0 500 Oops\r\n\r\nboom";
        assert_eq!(parse_http(close, false), Ok(None));
        assert_eq!(parse_http(close, true), Ok(Some((500, b"boom".to_vec()))));
        for bad in [
            &b"SSH-2.0\r\n\r\n"[..],
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nnocolon\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nab\r\n",
        ] {
            assert!(
                parse_http(bad, true).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        // Random bytes after a valid-looking prefix, and entirely random.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for i in 0..20_000 {
            let len = (i % 97) as usize;
            let mut buf: Vec<u8> = if i % 2 == 0 {
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n".to_vec()
            } else {
                Vec::new()
            };
            for _ in 0..len {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                buf.push(b"0123456789abcdef\r\n:; HTTP/1.Content-Length\xff"[(x % 43) as usize]);
            }
            let _ = parse_http(&buf, i % 3 == 0);
            let _ = kv_value(&serde_json::from_slice(&buf).unwrap_or(Value::Null));
            let _ = b64_decode(&String::from_utf8_lossy(&buf));
        }
        assert_eq!(
            kv_value(&json!({"kvs": [{"key": "eA=="}]})),
            Ok(Some(Vec::new()))
        );
        assert!(kv_value(&json!({"kvs": 3})).is_err());
        assert!(kv_value(&json!({"kvs": [{"value": "!!"}]})).is_err());
        assert_eq!(kv_value(&json!({"count": "0"})), Ok(None));
    }

    /// A server that answers every connection with `answer`.
    fn fake_server(answer: &'static [u8]) -> String {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", l.local_addr().expect("addr"));
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { return };
                let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
                let _ = s.read(&mut [0u8; 4096]);
                let _ = s.write_all(answer);
            }
        });
        url
    }

    #[test]
    fn witness_bad_answers_are_typed_errors() {
        let t = Duration::from_secs(2);
        let garbage = fake_server(b"SSH-2.0-OpenSSH\r\n\r\n");
        let e = Witness::new(&garbage, "x", t).unwrap().read().unwrap_err();
        assert!(matches!(e, WitnessError::Malformed { .. }), "{e}");
        let not_json = fake_server(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc");
        let e = Witness::new(&not_json, "x", t).unwrap().read().unwrap_err();
        assert!(matches!(e, WitnessError::Malformed { .. }), "{e}");
        let no_header = fake_server(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}");
        let e = Witness::new(&no_header, "x", t)
            .unwrap()
            .advance(0, "a")
            .unwrap_err();
        assert!(
            matches!(e, WitnessError::Malformed { op: "txn", .. }),
            "{e}"
        );
        let bad_request =
            fake_server(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 12\r\n\r\n{\"error\":1}\n");
        let e = Witness::new(&bad_request, "x", t)
            .unwrap()
            .advance(0, "a")
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "witness {bad_request} answered HTTP 400 to txn on ftvmm/vm/x: {{\"error\":1}}"
            )
        );
        // A 5xx moves on to the next endpoint.
        let failing = fake_server(b"HTTP/1.1 503 No\r\nContent-Length: 0\r\n\r\n");
        let ok = fake_server(b"HTTP/1.1 200 OK\r\nContent-Length: 14\r\n\r\n{\"header\":{}}\n");
        let w = Witness::new(&format!("{failing},{ok}"), "x", t).unwrap();
        assert_eq!(w.read().unwrap(), None);
    }

    #[test]
    fn witness_all_endpoints_dead_fails_within_timeout() {
        let (_l1, s1) = silent();
        let (_l2, s2) = silent();
        let dead = dead_url();
        let timeout = Duration::from_millis(600);
        let w = Witness::new(&format!("{dead},{s1},{s2}"), "x", timeout).unwrap();
        let start = Instant::now();
        let e = w.advance(0, "a").unwrap_err();
        let took = start.elapsed();
        assert!(
            took <= timeout + Duration::from_millis(250),
            "took {took:?}"
        );
        match &e {
            WitnessError::NoneAnswered { errors, .. } => {
                assert_eq!(errors.len(), 3, "{e}");
                assert!(errors[0].to_string().contains("connection refused"), "{e}");
            }
            _ => panic!("{e}"),
        }
        println!("{e}");
        // One endpoint: its own error.
        let w = Witness::new(&dead, "x", timeout).unwrap();
        let e = w.read().unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("witness {dead} unreachable: connection refused")
        );
        let w = Witness::new(&s1, "x", timeout).unwrap();
        let start = Instant::now();
        let e = w.read().unwrap_err();
        assert!(start.elapsed() <= timeout + Duration::from_millis(250));
        assert!(matches!(e, WitnessError::Unreachable { .. }), "{e}");
    }

    #[test]
    fn witness_generations_on_etcd() {
        let Some(etcd) = Etcd::start("witness_generations_on_etcd") else {
            return;
        };
        let w = etcd.witness("vm-a");
        assert_eq!(w.read().unwrap(), None);
        assert_eq!(
            w.advance(0, "primary").unwrap(),
            Advance::Won(rec(1, "primary"))
        );
        assert_eq!(w.read().unwrap(), Some(rec(1, "primary")));
        assert_eq!(
            w.advance(0, "standby").unwrap(),
            Advance::Lost(rec(1, "primary"))
        );
        assert_eq!(
            w.advance(1, "standby").unwrap(),
            Advance::Won(rec(2, "standby"))
        );
        assert_eq!(
            w.advance(1, "primary").unwrap(),
            Advance::Lost(rec(2, "standby"))
        );
        assert_eq!(
            w.advance(7, "primary").unwrap(),
            Advance::Lost(rec(2, "standby"))
        );
        assert_eq!(
            w.advance(2, "primary").unwrap(),
            Advance::Won(rec(3, "primary"))
        );
        assert_eq!(w.read().unwrap(), Some(rec(3, "primary")));
        // Other VMs are independent.
        let other = etcd.witness("vm-b");
        assert_eq!(other.read().unwrap(), None);
        assert!(matches!(
            other.advance(1, "x"),
            Err(WitnessError::Missing { expected: 1, .. })
        ));
        // Owners with characters JSON escapes.
        assert_eq!(
            other.advance(0, "a \"quoted\" \u{e9} owner").unwrap(),
            Advance::Won(rec(1, "a \"quoted\" \u{e9} owner"))
        );
        assert_eq!(other.advance(1, "b").unwrap(), Advance::Won(rec(2, "b")));
    }

    #[test]
    fn witness_race_has_one_winner() {
        let Some(etcd) = Etcd::start("witness_race_has_one_winner") else {
            return;
        };
        let w = etcd.witness("race");
        for from in 0..3u64 {
            let n = 8;
            let barrier = Arc::new(Barrier::new(n));
            let results: Vec<Advance> = (0..n)
                .map(|i| {
                    let w = w.clone();
                    let barrier = barrier.clone();
                    std::thread::spawn(move || {
                        barrier.wait();
                        w.advance(from, &format!("owner-{from}-{i}"))
                            .expect("advance")
                    })
                })
                .collect::<Vec<_>>()
                .into_iter()
                .map(|h| h.join().expect("thread"))
                .collect();
            let won: Vec<&Record> = results
                .iter()
                .filter_map(|r| match r {
                    Advance::Won(r) => Some(r),
                    Advance::Lost(_) => None,
                })
                .collect();
            assert_eq!(won.len(), 1, "from {from}: {results:?}");
            let winner = won[0].clone();
            assert_eq!(winner.generation, from + 1);
            for r in &results {
                if let Advance::Lost(lost) = r {
                    assert_eq!(lost, &winner);
                }
            }
            assert_eq!(w.read().unwrap(), Some(winner));
        }
    }

    #[test]
    fn witness_skips_dead_endpoints() {
        let Some(etcd) = Etcd::start("witness_skips_dead_endpoints") else {
            return;
        };
        let dead = dead_url();
        let (_l, quiet) = silent();
        let timeout = Duration::from_secs(2);
        let w = Witness::new(&format!("{dead},{}", etcd.url), "vm", timeout).unwrap();
        assert_eq!(w.advance(0, "p").unwrap(), Advance::Won(rec(1, "p")));
        // A first endpoint that accepts and never answers costs its share only.
        let w = Witness::new(&format!("{quiet},{dead},{}", etcd.url), "vm", timeout).unwrap();
        let start = Instant::now();
        assert_eq!(w.advance(1, "s").unwrap(), Advance::Won(rec(2, "s")));
        assert!(start.elapsed() < timeout, "took {:?}", start.elapsed());
        assert_eq!(w.read().unwrap(), Some(rec(2, "s")));
    }

    /// A proxy to `upstream` that forwards each request whole and then hangs
    /// up without passing the answer on: the request lands, the caller
    /// never learns it.
    fn answer_dropping_proxy(upstream: String) -> String {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", l.local_addr().expect("addr"));
        let upstream = upstream.trim_start_matches("http://").to_string();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { return };
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                // Headers, then Content-Length bytes of body.
                while let Ok(n @ 1..) = s.read(&mut buf) {
                    req.extend_from_slice(&buf[..n]);
                    let Some(h) = find(&req, b"\r\n\r\n") else {
                        continue;
                    };
                    let head = String::from_utf8_lossy(&req[..h]).to_ascii_lowercase();
                    let len = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse::<usize>().ok())
                        .unwrap_or(0);
                    if req.len() >= h + 4 + len {
                        break;
                    }
                }
                if let Ok(mut up) = TcpStream::connect(&upstream) {
                    let _ = up.write_all(&req);
                    let _ = up.read_to_end(&mut Vec::new());
                }
                // `s` drops here: no answer.
            }
        });
        url
    }

    #[test]
    fn witness_retry_after_a_lost_answer_still_wins() {
        let Some(etcd) = Etcd::start("witness_retry_after_a_lost_answer_still_wins") else {
            return;
        };
        let proxy = answer_dropping_proxy(etcd.url.clone());
        let w = Witness::new(
            &format!("{proxy},{}", etcd.url),
            "lossy",
            Duration::from_secs(5),
        )
        .unwrap();
        // The txn lands through the proxy; the retry on etcd itself finds
        // this caller's own record and counts it as won.
        assert_eq!(w.advance(0, "p").unwrap(), Advance::Won(rec(1, "p")));
        assert_eq!(w.advance(1, "s").unwrap(), Advance::Won(rec(2, "s")));
        assert_eq!(etcd.witness("lossy").read().unwrap(), Some(rec(2, "s")));
        // Someone else's record is still a loss.
        assert_eq!(w.advance(1, "p").unwrap(), Advance::Lost(rec(2, "s")));
    }

    #[test]
    fn witness_foreign_value_is_typed_error() {
        let Some(etcd) = Etcd::start("witness_foreign_value_is_typed_error") else {
            return;
        };
        let w = etcd.witness("foreign");
        for value in [
            &b"hello"[..],
            b"",
            b"{\"generation\":1}",
            b"{\"generation\":-1,\"owner\":\"x\"}",
            b"{\"generation\":1,\"owner\":\"x\",\"extra\":true}",
            b"\xff\xfe",
        ] {
            let put = json!({"key": b64_encode(w.key().as_bytes()), "value": b64_encode(value)});
            let put_op = Op {
                path: "/v3/kv/put",
                name: "put",
            };
            w.call(put_op, &put, &mut false).expect("put");
            let e = w.read().unwrap_err();
            assert!(matches!(e, WitnessError::NotRecord { .. }), "{e}");
            assert!(
                e.to_string()
                    .starts_with("record under ftvmm/vm/foreign is not an ftvmm record: "),
                "{e}"
            );
            let e = w.advance(1, "p").unwrap_err();
            assert!(matches!(e, WitnessError::NotRecord { .. }), "{e}");
            // advance(0) finds the key present and reports what is there.
            let e = w.advance(0, "p").unwrap_err();
            assert!(matches!(e, WitnessError::NotRecord { .. }), "{e}");
        }
    }
}
