//! The control API: a small JSON request/response protocol over a Unix
//! socket (`--api SOCKET`), one request per connection, one JSON object per
//! line each way. Client (`ftvmm ctl`) and server share [`Request`] and
//! [`Response`].
//!
//! ```text
//! → {"command":"status"}
//! ← {"ok":true,"result":{"role":"primary","protected":true,...}}
//! → {"command":"protect","peer":"10.0.0.2:7000"}
//! ← {"ok":false,"error":"already protected by standby 10.0.0.3:7000"}
//! ```
//!
//! The socket is created with mode 0600: only its owner may control the VM.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

/// Largest request accepted, in bytes.
pub const MAX_REQUEST: usize = 64 * 1024;
/// How long a request may wait for the VMM's event loop.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// A control request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Role, protection, epoch, VM state.
    Status,
    /// Epoch metrics summary and the last epoch's figures.
    Stats,
    /// Pause the guest (no epochs are taken while paused).
    Pause,
    /// Resume a paused guest.
    Resume,
    /// Promote a standby by hand: take over from its last committed
    /// checkpoint now.
    Failover,
    /// Pair a running, unprotected VM with a new standby.
    Protect {
        /// The standby's HOST:PORT.
        peer: String,
    },
    /// Change the epoch length.
    SetIntervalMs {
        /// Milliseconds, 1 to 60000.
        ms: u64,
    },
}

/// The answer to a [`Request`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// Whether the request was carried out.
    pub ok: bool,
    /// Why not, when `ok` is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What the request returned.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub result: serde_json::Value,
}

impl Response {
    /// Success with `result`.
    pub fn ok(result: serde_json::Value) -> Self {
        Response {
            ok: true,
            error: None,
            result,
        }
    }

    /// Failure with a reason.
    pub fn error(reason: impl Into<String>) -> Self {
        Response {
            ok: false,
            error: Some(reason.into()),
            result: serde_json::Value::Null,
        }
    }
}

/// Errors of the control API.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The socket path is taken by something that is not a stale socket.
    #[error("cannot use '{path}' as the API socket: {reason}")]
    Path {
        /// The path.
        path: String,
        /// Why.
        reason: String,
    },
    /// Binding or setting up the socket failed.
    #[error("cannot listen on API socket '{path}': {source}")]
    Listen {
        /// The path.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The client could not reach the server.
    #[error("cannot connect to API socket '{path}': {source}")]
    Connect {
        /// The path.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The exchange failed.
    #[error("API request on '{path}' failed: {reason}")]
    Exchange {
        /// The path.
        path: String,
        /// Why.
        reason: String,
    },
}

/// What answers requests; swapped when the VMM changes role (a standby that
/// takes over starts answering as a running VM).
pub type Handler = Box<dyn Fn(Request) -> Response + Send + Sync>;

/// A running API server; removes its socket when dropped.
pub struct ApiServer {
    path: PathBuf,
    handler: Arc<RwLock<Handler>>,
    stop: Arc<AtomicBool>,
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServer")
            .field("path", &self.path)
            .finish()
    }
}

fn prepare_path(path: &Path) -> Result<(), ApiError> {
    let err = |reason: String| ApiError::Path {
        path: path.display().to_string(),
        reason,
    };
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(err(e.to_string())),
        Ok(m) => {
            use std::os::unix::fs::FileTypeExt;
            if !m.file_type().is_socket() {
                return Err(err("it exists and is not a socket".into()));
            }
            if UnixStream::connect(path).is_ok() {
                return Err(err("another process is listening on it".into()));
            }
            std::fs::remove_file(path)
                .map_err(|e| err(format!("cannot remove the stale socket: {e}")))
        }
    }
}

impl ApiServer {
    /// Listens on `path` (mode 0600) and answers with `handler`.
    pub fn start(path: &Path, handler: Handler) -> Result<ApiServer, ApiError> {
        prepare_path(path)?;
        let listen_err = |source| ApiError::Listen {
            path: path.display().to_string(),
            source,
        };
        let listener = UnixListener::bind(path).map_err(listen_err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(listen_err)?;
        listener.set_nonblocking(true).map_err(listen_err)?;
        let handler: Arc<RwLock<Handler>> = Arc::new(RwLock::new(handler));
        let stop = Arc::new(AtomicBool::new(false));
        {
            let (handler, stop) = (handler.clone(), stop.clone());
            std::thread::Builder::new()
                .name("api".into())
                .spawn(move || serve(listener, handler, stop))
                .map_err(listen_err)?;
        }
        Ok(ApiServer {
            path: path.to_path_buf(),
            handler,
            stop,
        })
    }

    /// Replaces the handler.
    pub fn set_handler(&self, handler: Handler) {
        *self.handler.write().unwrap_or_else(|e| e.into_inner()) = handler;
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve(listener: UnixListener, handler: Arc<RwLock<Handler>>, stop: Arc<AtomicBool>) {
    // Its connection threads inherit the filter.
    crate::seccomp::apply_or_exit(crate::seccomp::ThreadKind::Api);
    while !stop.load(Ordering::Acquire) {
        let mut p = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        if unsafe { libc::poll(&mut p, 1, 200) } <= 0 {
            continue;
        }
        let Ok((stream, _)) = listener.accept() else {
            continue;
        };
        let handler = handler.clone();
        // One thread per connection: a slow client cannot block others.
        let _ = std::thread::Builder::new()
            .name("api-conn".into())
            .spawn(move || {
                if let Err(e) = answer(stream, &handler) {
                    log::debug!("API connection: {e}");
                }
            });
    }
}

/// The user id of the process at the other end of `stream` (SO_PEERCRED).
fn peer_uid(stream: &UnixStream) -> std::io::Result<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes for the call; `len`
    // holds the size of `cred`, so the kernel writes within it; the fd is
    // the stream's own, open for the call.
    let r = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cred.uid)
}

/// Only root and the VMM's own user may use its API (the socket is 0600
/// too; this holds even where its mode was widened).
fn authorize(stream: &UnixStream) -> Result<(), String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    match peer_uid(stream) {
        Ok(uid) if uid == 0 || uid == me => Ok(()),
        Ok(uid) => Err(format!(
            "permission denied: uid {uid} is neither root nor the VMM's user (uid {me})"
        )),
        Err(e) => Err(format!("cannot read the client's credentials: {e}")),
    }
}

fn answer(stream: UnixStream, handler: &RwLock<Handler>) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    // The request is read (bounded, never parsed) before a refusal, so a
    // refused client that is still writing reads the refusal rather than a
    // broken pipe.
    let mut line = Vec::new();
    BufReader::new(&stream)
        .take(MAX_REQUEST as u64 + 1)
        .read_until(b'\n', &mut line)?;
    let response = if let Err(why) = authorize(&stream) {
        log::warn!("control API: refused a client: {why}");
        Response::error(why)
    } else if line.len() > MAX_REQUEST {
        Response::error(format!("request larger than {MAX_REQUEST} bytes"))
    } else {
        match serde_json::from_slice::<Request>(&line) {
            Ok(req) => (handler.read().unwrap_or_else(|e| e.into_inner()))(req),
            Err(e) => Response::error(format!("malformed request: {e}")),
        }
    };
    let mut out = serde_json::to_vec(&response).map_err(std::io::Error::other)?;
    out.push(b'\n');
    (&stream).write_all(&out)
}

/// Requests handed from the API threads to the VMM's event loop, which
/// waits on [`Mailbox::event_fd`] and answers each with [`Mailbox::next`].
pub struct Mailbox {
    rx: Mutex<Receiver<(Request, SyncSender<Response>)>>,
    evt: Arc<EventFd>,
}

impl std::fmt::Debug for Mailbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mailbox").finish_non_exhaustive()
    }
}

/// A mailbox and the handler that fills it.
pub fn mailbox() -> std::io::Result<(Mailbox, Handler)> {
    let (tx, rx) = mpsc::channel::<(Request, SyncSender<Response>)>();
    let evt = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
    let tx = Mutex::new(tx);
    let wake = evt.clone();
    let handler: Handler = Box::new(move |req| {
        let (reply_tx, reply_rx) = mpsc::sync_channel(1);
        if tx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send((req, reply_tx))
            .is_err()
        {
            return Response::error("the VMM is shutting down");
        }
        let _ = wake.write(1);
        reply_rx
            .recv_timeout(REPLY_TIMEOUT)
            .unwrap_or_else(|_| Response::error("the VMM did not answer in time"))
    });
    Ok((
        Mailbox {
            rx: Mutex::new(rx),
            evt,
        },
        handler,
    ))
}

impl Mailbox {
    /// Readable when a request waits.
    pub fn event_fd(&self) -> &EventFd {
        &self.evt
    }

    /// The next waiting request and where to send its answer.
    pub fn next(&self) -> Option<(Request, SyncSender<Response>)> {
        let _ = self.evt.read();
        let r = self
            .rx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .try_recv()
            .ok();
        if r.is_some() {
            // More may be queued: keep the eventfd readable.
            let _ = self.evt.write(1);
        }
        r
    }
}

/// Sends `req` to the server at `path` and returns its answer, waiting for
/// it as long as the server may take ([`REPLY_TIMEOUT`]) and a little more.
pub fn call(path: &Path, req: &Request) -> Result<Response, ApiError> {
    call_with_timeout(path, req, REPLY_TIMEOUT + Duration::from_secs(5))
}

/// [`call`], giving up on the answer after `timeout` (a client that polls
/// and would rather report a stuck VMM than wait with it).
pub fn call_with_timeout(
    path: &Path,
    req: &Request,
    timeout: Duration,
) -> Result<Response, ApiError> {
    let p = path.display().to_string();
    let stream = UnixStream::connect(path).map_err(|source| ApiError::Connect {
        path: p.clone(),
        source,
    })?;
    let ex = |reason: String| ApiError::Exchange {
        path: p.clone(),
        reason,
    };
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| ex(e.to_string()))?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(|e| ex(e.to_string()))?;
    let mut out = serde_json::to_vec(req).map_err(|e| ex(e.to_string()))?;
    out.push(b'\n');
    (&stream).write_all(&out).map_err(|e| ex(e.to_string()))?;
    let mut line = Vec::new();
    BufReader::new(&stream)
        .take(16 << 20)
        .read_until(b'\n', &mut line)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                ex(format!("no answer within {} ms", timeout.as_millis()))
            }
            _ => ex(e.to_string()),
        })?;
    serde_json::from_slice(&line).map_err(|e| ex(format!("malformed response: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_a_stable_json_form() {
        let r: Request =
            serde_json::from_str(r#"{"command":"protect","peer":"127.0.0.1:7000"}"#).unwrap();
        assert_eq!(
            r,
            Request::Protect {
                peer: "127.0.0.1:7000".into()
            }
        );
        let r: Request = serde_json::from_str(r#"{"command":"set-interval-ms","ms":10}"#).unwrap();
        assert_eq!(r, Request::SetIntervalMs { ms: 10 });
        assert!(serde_json::from_str::<Request>(r#"{"command":"fly"}"#).is_err());
        assert_eq!(
            serde_json::to_string(&Request::Status).unwrap(),
            r#"{"command":"status"}"#
        );
    }

    #[test]
    fn server_answers_and_rejects_garbage() {
        let dir = std::env::temp_dir().join(format!("ftvmm-api-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("api.sock");
        let server = ApiServer::start(
            &sock,
            Box::new(|r| match r {
                Request::Status => Response::ok(serde_json::json!({"role": "test"})),
                _ => Response::error("wrong state"),
            }),
        )
        .unwrap();
        let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            call(&sock, &Request::Status).unwrap().result["role"],
            "test"
        );
        assert!(!call(&sock, &Request::Pause).unwrap().ok);
        // Malformed JSON gets an error reply, and the server keeps serving.
        let s = UnixStream::connect(&sock).unwrap();
        (&s).write_all(b"{not json\n").unwrap();
        let mut reply = String::new();
        BufReader::new(&s).read_line(&mut reply).unwrap();
        let reply: Response = serde_json::from_str(&reply).unwrap();
        assert!(!reply.ok && reply.error.unwrap().contains("malformed"));
        assert!(call(&sock, &Request::Status).unwrap().ok);
        // A second server on the same live socket is refused.
        assert!(
            ApiServer::start(&sock, Box::new(|_| Response::ok(serde_json::Value::Null))).is_err()
        );
        drop(server);
        assert!(!sock.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_client_can_give_up_on_a_slow_server() {
        let dir = std::env::temp_dir().join(format!("ftvmm-api-slow-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("api.sock");
        let _server = ApiServer::start(
            &sock,
            Box::new(|_| {
                std::thread::sleep(Duration::from_millis(500));
                Response::ok(serde_json::Value::Null)
            }),
        )
        .unwrap();
        let e = call_with_timeout(&sock, &Request::Status, Duration::from_millis(50))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no answer within 50 ms"), "{e}");
        assert!(call(&sock, &Request::Status).unwrap().ok);
        drop(_server);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn mailbox_forwards_to_the_loop() {
        let (mb, handler) = mailbox().unwrap();
        let t = std::thread::spawn(move || handler(Request::Resume));
        let (req, reply) = loop {
            if let Some(x) = mb.next() {
                break x;
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        assert_eq!(req, Request::Resume);
        reply.send(Response::ok(serde_json::json!(1))).unwrap();
        assert_eq!(t.join().unwrap().result, serde_json::json!(1));
    }
}
