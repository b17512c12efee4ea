//! The control socket's server: a listening thread, one thread per client.
//!
//! Nothing a client does can hold the daemon up or make it grow without
//! bound: at most [`MAX_CLIENTS`] at once; a request line is bounded by
//! [`MAX_LINE`] (the rest of a longer one is read and dropped, and the line
//! refused when its newline comes); a client silent for [`IDLE_TIMEOUT`]
//! is closed, one that does not read its replies for [`WRITE_TIMEOUT`]
//! too. Commands run on the client's thread; the scrub runs on its own.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde::Serialize;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::protocol::{
    Mark, Ok, PowerCut, Refusal, Request, ScrubSummary, Status, MAX_LINE, MAX_RATE_MIB,
};
use super::CommandError;
use crate::blk::ratelimit::RateLimit;
use crate::blk::served::{self, Served};
use crate::error::Chain;
use crate::integrity::scrub::{Progress, Scrub, DEFAULT_RATE_MIB};

/// Clients served at once; more are told so and closed.
pub const MAX_CLIENTS: usize = 16;
/// A client that sends nothing for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// A client that does not take a reply within this is closed.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a client thread looks at the stop flag while it waits.
const POLL: Duration = Duration::from_millis(200);

/// The running control server. [`Server::stop`] (or dropping it) ends
/// every client and the scrub.
pub struct Server {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    served: Arc<Served>,
    /// Asks the daemon to stop: a power cut failed, nothing is served.
    stop_daemon: Box<dyn Fn() + Send + Sync>,
    stop: AtomicBool,
    wake: EventFd,
    scrub: Mutex<ScrubSlot>,
    clients: AtomicUsize,
    log: RateLimit,
}

/// The current or last scrub.
#[derive(Default)]
struct ScrubSlot {
    last_id: u64,
    scrub: Option<Scrub>,
}

impl Server {
    /// Serve `listener` (already bound, mode 0600) on a thread of its own,
    /// with commands on `served`. `stop_daemon` is called when a
    /// `power-cut` leaves nothing to serve, as SIGUSR2's does.
    pub fn start(
        listener: UnixListener,
        served: Arc<Served>,
        stop_daemon: impl Fn() + Send + Sync + 'static,
    ) -> io::Result<Self> {
        let shared = Arc::new(Shared {
            served,
            stop_daemon: Box::new(stop_daemon),
            stop: AtomicBool::new(false),
            wake: EventFd::new(EFD_NONBLOCK)?,
            scrub: Mutex::new(ScrubSlot::default()),
            clients: AtomicUsize::new(0),
            log: RateLimit::new(10, Duration::from_secs(10)),
        });
        let s = shared.clone();
        let thread = thread::Builder::new()
            .name("control".into())
            .spawn(move || accept_loop(&s, &listener))?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// Close every client, stop a running scrub, and wait for all of it.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Err(e) = self.shared.wake.write(1) {
            log::warn!("cannot wake the control thread: {e}");
        }
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                log::error!("the control thread panicked");
            }
        }
        // Dropped outside the lock: stopping joins the scrub thread.
        let scrub = self.shared.slot().scrub.take();
        drop(scrub);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.shutdown();
        }
    }
}

impl Shared {
    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    fn slot(&self) -> MutexGuard<'_, ScrubSlot> {
        self.scrub.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// One reply line (without the newline) for one request line.
    fn answer(&self, line: &[u8]) -> String {
        let req = match serde_json::from_slice::<Request>(line) {
            Result::Ok(r) => r,
            Err(e) => return self.refuse(&format!("bad request: {e}")),
        };
        match self.run(&req) {
            Result::Ok(reply) => reply,
            // The daemon logged why already, as it does for the signal.
            Err(e) if matches!(req, Request::SyncMode | Request::PowerCut) => {
                reply(&Refusal::new(&Chain(&e).to_string()))
            }
            Err(e) => self.refuse(&Chain(&e).to_string()),
        }
    }

    /// A refusal, logged (rate-limited: a client may loop on bad input).
    fn refuse(&self, why: &str) -> String {
        if let Some(dropped) = self.log.check() {
            if dropped > 0 {
                log::warn!("control socket: ({dropped} similar messages suppressed)");
            }
            log::warn!("control socket: {why}");
        }
        reply(&Refusal::new(why))
    }

    /// One command: each is a method returning its reply body.
    fn run(&self, req: &Request) -> Result<String, CommandError> {
        match req {
            Request::Status => body(&self.status()?),
            Request::Scrub { rate_mib } => body(&Scrubbed {
                scrub: Some(self.start_scrub(rate_mib.unwrap_or(DEFAULT_RATE_MIB))?),
            }),
            Request::ScrubStatus => body(&Scrubbed {
                scrub: self.slot().scrub.as_ref().map(Scrub::progress),
            }),
            Request::ScrubStop => body(&Scrubbed {
                scrub: Some(self.stop_scrub()?),
            }),
            Request::SyncMode => body(&self.sync_mode()?),
            Request::PowerCut => body(&Cut {
                power_cut: self.power_cut()?,
            }),
            Request::Mark { name } => body(&Marked {
                mark: Mark {
                    name: name.clone(),
                    position: self.served.mark(name)?,
                },
            }),
        }
    }

    fn stop_scrub(&self) -> Result<Progress, CommandError> {
        match self.slot().scrub.as_mut() {
            Some(s) if s.running() => Ok(s.stop()),
            _ => Err(CommandError::Refused("no scrub is running".into())),
        }
    }

    fn sync_mode(&self) -> Result<SyncMode, CommandError> {
        let written = self.served.enter_sync_mode("control socket")?;
        Ok(SyncMode {
            sync_mode: self.served.engine().is_some_and(|e| e.sync_mode()),
            readonly: !written,
        })
    }

    fn power_cut(&self) -> Result<PowerCut, CommandError> {
        match self.served.power_cut("control socket") {
            served::PowerCut::Done(c) => Ok(PowerCut {
                number: c.number,
                seed: c.seed,
                data_unit: c.data_unit,
                data_kept: c.data.0 as u64,
                data_unsynced: c.data.1 as u64,
                meta_kept: c.meta.0 as u64,
                meta_unsynced: c.meta.1 as u64,
                destages: c.destages,
            }),
            served::PowerCut::Unsupported => Err(CommandError::Refused(
                "a power cut needs serve --volatile-cache".into(),
            )),
            served::PowerCut::Failed => {
                // As after SIGUSR2: nothing is left to serve.
                (self.stop_daemon)();
                Err(CommandError::Refused(
                    "the power cut failed; twinsum is stopping (its log says why)".into(),
                ))
            }
        }
    }

    fn start_scrub(&self, rate_mib: u64) -> Result<Progress, CommandError> {
        if rate_mib > MAX_RATE_MIB {
            return Err(CommandError::Refused(format!(
                "rate_mib {rate_mib} is past {MAX_RATE_MIB} (0 is unlimited)"
            )));
        }
        let mut slot = self.slot();
        if let Some(s) = slot.scrub.as_ref().filter(|s| s.running()) {
            return Err(CommandError::Refused(s.with_progress(|p| {
                format!(
                    "scrub #{} is running ({:.1}% done); `twinsum scrub --stop` ends it",
                    p.id,
                    p.percent()
                )
            })));
        }
        let engine = self.served.engine().ok_or(CommandError::NotServing)?;
        let id = slot.last_id + 1;
        let scrub = Scrub::start(engine, id, rate_mib)
            .map_err(|e| CommandError::Refused(format!("cannot start the scrub thread: {e}")))?;
        let p = scrub.progress();
        slot.last_id = id;
        // The previous (finished) scrub's thread has ended; dropping it
        // only joins it.
        slot.scrub = Some(scrub);
        Ok(p)
    }

    fn status(&self) -> Result<Status, CommandError> {
        let engine = self.served.engine().ok_or(CommandError::NotServing)?;
        let s = engine.stats();
        let scrub = self
            .slot()
            .scrub
            .as_ref()
            .map(|sc| sc.with_progress(|p| ScrubSummary::from(p)));
        Ok(Status {
            version: env!("CARGO_PKG_VERSION").into(),
            uptime_s: self.served.uptime().as_secs(),
            frontend_connected: self.served.frontend_connected(),
            queues: self.served.queues(),
            readonly: self.served.readonly(),
            sync_mode: engine.sync_mode(),
            clean: s.clean,
            block_size: engine.block_size(),
            blocks: engine.blocks(),
            reads: s.reads,
            writes: s.writes,
            flushes: s.flushes,
            mismatches: s.mismatches,
            mismatched_blocks: engine.recent_mismatches(),
            pending: s.pending,
            queued: s.queued,
            data_syncs: s.data_syncs,
            meta_syncs: s.meta_syncs,
            data_sync_ms: s.data_sync_us / 1000,
            meta_sync_ms: s.meta_sync_us / 1000,
            commit_rounds: s.rounds,
            power_cuts: self.served.power_cuts(),
            scrub,
        })
    }
}

#[derive(Serialize)]
struct Scrubbed {
    scrub: Option<Progress>,
}

#[derive(Serialize)]
struct SyncMode {
    sync_mode: bool,
    readonly: bool,
}

#[derive(Serialize)]
struct Cut {
    power_cut: PowerCut,
}

#[derive(Serialize)]
struct Marked {
    mark: Mark,
}

/// `{"ok": true, ...body}`.
fn body<T: Serialize>(v: &T) -> Result<String, CommandError> {
    Result::Ok(reply(&Ok::new(v)))
}

fn reply<T: Serialize>(v: &T) -> String {
    // Serializing plain structs of numbers and strings cannot fail; if it
    // ever did, the client still gets a line it can parse.
    serde_json::to_string(v)
        .unwrap_or_else(|e| format!(r#"{{"ok":false,"error":"cannot encode the reply: {e}"}}"#))
}

fn accept_loop(shared: &Arc<Shared>, listener: &UnixListener) {
    let mut clients: Vec<JoinHandle<()>> = Vec::new();
    loop {
        if !wait_readable(listener, shared) || shared.stopping() {
            break;
        }
        let stream = match listener.accept() {
            Result::Ok((s, _)) => s,
            Err(e) => {
                shared.refuse(&format!("accept failed: {e}"));
                continue;
            }
        };
        clients.retain(|c| !c.is_finished());
        if shared.clients.load(Ordering::Acquire) >= MAX_CLIENTS {
            let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
            let why = format!("too many control clients ({MAX_CLIENTS}); try again later");
            let _ = writeln!(&stream, "{}", shared.refuse(&why));
            continue;
        }
        shared.clients.fetch_add(1, Ordering::AcqRel);
        let s = shared.clone();
        match thread::Builder::new()
            .name("control-client".into())
            .spawn(move || {
                serve_client(&s, stream);
                s.clients.fetch_sub(1, Ordering::AcqRel);
            }) {
            Result::Ok(t) => clients.push(t),
            Err(e) => {
                shared.clients.fetch_sub(1, Ordering::AcqRel);
                log::warn!("control socket: cannot start a client thread: {e}");
            }
        }
    }
    for c in clients {
        let _ = c.join();
    }
}

/// Wait until `listener` has a client (`true`) or we are asked to stop.
fn wait_readable(listener: &UnixListener, shared: &Shared) -> bool {
    let mut fds = [
        libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: shared.wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        if shared.stopping() {
            return false;
        }
        // SAFETY: `fds` is a live array of two initialised pollfd structs and
        // its length is passed alongside.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            log::error!("control socket: poll failed: {e}; no more control clients");
            return false;
        }
        if fds[1].revents != 0 {
            return false;
        }
        if fds[0].revents != 0 {
            return true;
        }
    }
}

/// Read request lines and answer each, until the client goes, idles out,
/// stops reading, or the server stops.
fn serve_client(shared: &Shared, mut stream: UnixStream) {
    if stream.set_read_timeout(Some(POLL)).is_err()
        || stream.set_write_timeout(Some(WRITE_TIMEOUT)).is_err()
    {
        return;
    }
    let mut lines = Lines::default();
    let mut buf = [0u8; 4096];
    let mut heard = Instant::now();
    while !shared.stopping() {
        let n = match stream.read(&mut buf) {
            Result::Ok(0) => return,
            Result::Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                if heard.elapsed() > IDLE_TIMEOUT {
                    log::info!(
                        "control socket: closing a client silent for {} s",
                        IDLE_TIMEOUT.as_secs()
                    );
                    return;
                }
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        heard = Instant::now();
        for line in lines.feed(&buf[..n]) {
            let mut answer = match line {
                Line::Request(l) => shared.answer(&l),
                Line::TooLong => {
                    shared.refuse(&format!("request line longer than {MAX_LINE} bytes"))
                }
            };
            answer.push('\n');
            if stream.write_all(answer.as_bytes()).is_err() {
                return;
            }
        }
    }
}

/// A complete line of input.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    Request(Vec<u8>),
    /// Longer than [`MAX_LINE`]; its bytes were dropped as they came.
    TooLong,
}

/// Splits a byte stream into lines, holding at most [`MAX_LINE`] bytes.
#[derive(Debug, Default)]
struct Lines {
    partial: Vec<u8>,
    overlong: bool,
}

impl Lines {
    /// The lines `bytes` completes. Blank lines are skipped.
    fn feed(&mut self, mut bytes: &[u8]) -> Vec<Line> {
        let mut out = Vec::new();
        loop {
            let (piece, done) = match bytes.iter().position(|&b| b == b'\n') {
                Some(i) => (&bytes[..i], true),
                None => (bytes, false),
            };
            if !self.overlong {
                if self.partial.len() + piece.len() > MAX_LINE {
                    self.overlong = true;
                    self.partial = Vec::new();
                } else {
                    self.partial.extend_from_slice(piece);
                }
            }
            if !done {
                return out;
            }
            bytes = &bytes[piece.len() + 1..];
            if std::mem::take(&mut self.overlong) {
                out.push(Line::TooLong);
            } else if !self.partial.trim_ascii().is_empty() {
                out.push(Line::Request(std::mem::take(&mut self.partial)));
            }
            self.partial.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_split_bounded_and_blank_ones_skipped() {
        let mut l = Lines::default();
        assert_eq!(l.feed(b"{\"a\""), vec![]);
        assert_eq!(
            l.feed(b":1}\n\n  \n{}\n{"),
            vec![
                Line::Request(b"{\"a\":1}".to_vec()),
                Line::Request(b"{}".to_vec())
            ]
        );
        // A megabyte without a newline: never held, refused once it ends.
        let chunk = vec![b'x'; 4096];
        for _ in 0..256 {
            assert_eq!(l.feed(&chunk), vec![]);
            assert!(l.partial.capacity() <= MAX_LINE + chunk.len());
        }
        assert_eq!(
            l.feed(b"x\n{}\n"),
            vec![Line::TooLong, Line::Request(b"{}".to_vec())]
        );
        // Exactly MAX_LINE is still a line.
        let mut max = vec![b' '; MAX_LINE];
        max.push(b'\n');
        max[0] = b'1';
        assert_eq!(l.feed(&max).len(), 1);
    }
}
