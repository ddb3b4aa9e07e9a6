//! How a request the ring thread does not answer at once gets answered later: the [`Completer`]
//! each request is served with, the [`Sink`] its answer goes through back to the ring thread
//! (woken by an eventfd), and the [`Slow`] helper thread that runs flush, fsync and fallocate
//! off the ring thread. Shared by `queue` (which owns the ring) and `dispatch` (which serves
//! requests) so that neither imports the other's internals.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::ThreadId;

use fuser::Errno;
use parking_lot::Mutex;

use crate::mount::inodes::Done;

/// What a deferred request answers once it is done.
pub enum Outcome {
    Written(u32),
    Empty,
}

/// Deferred answers on their way back to the ring thread.
pub struct Sink {
    done: Mutex<Vec<(usize, Result<Outcome, Errno>)>>,
    eventfd: OwnedFd,
    owner: ThreadId,
}

impl Sink {
    /// Answers for the ring thread that calls this, woken through `eventfd`.
    pub fn new(eventfd: OwnedFd) -> Sink {
        Sink {
            done: Mutex::new(Vec::new()),
            eventfd,
            owner: std::thread::current().id(),
        }
    }

    /// The answers that arrived since the last call.
    pub fn take(&self) -> Vec<(usize, Result<Outcome, Errno>)> {
        std::mem::take(&mut *self.done.lock())
    }

    /// The eventfd the ring reads to learn that answers are waiting.
    pub fn eventfd(&self) -> i32 {
        self.eventfd.as_raw_fd()
    }

    fn push(&self, entry: usize, r: Result<Outcome, Errno>) {
        self.done.lock().push((entry, r));
        // On the ring thread itself the answer is picked up after the request returns.
        if std::thread::current().id() != self.owner {
            let one = 1u64.to_ne_bytes();
            // SAFETY: writes 8 bytes from a live buffer to our own eventfd.
            unsafe { libc::write(self.eventfd.as_raw_fd(), one.as_ptr().cast(), 8) };
        }
    }
}

/// Answers one entry's request, possibly from another thread.
pub struct Completer {
    entry: usize,
    sink: Arc<Sink>,
}

impl Completer {
    pub fn new(entry: usize, sink: Arc<Sink>) -> Completer {
        Completer { entry, sink }
    }

    pub fn written(self) -> Done<u32> {
        Box::new(move |r| self.sink.push(self.entry, r.map(Outcome::Written)))
    }

    pub fn empty(self) -> Done<()> {
        Box::new(move |r| self.sink.push(self.entry, r.map(|()| Outcome::Empty)))
    }
}

/// Runs slow requests off the ring thread, in order, on a helper thread started at the first one
/// (a host with many CPUs has many queues, most of which never see a flush).
pub struct Slow {
    qid: u16,
    jobs: Option<mpsc::Sender<Box<dyn FnOnce() + Send>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Slow {
    pub fn new(qid: u16) -> Slow {
        Slow {
            qid,
            jobs: None,
            thread: None,
        }
    }

    /// Run `job` on the helper thread (here, if that thread cannot start).
    pub fn run(&mut self, job: impl FnOnce() + Send + 'static) {
        if self.jobs.is_none() {
            let (tx, rx) = mpsc::channel::<Box<dyn FnOnce() + Send>>();
            let spawned = std::thread::Builder::new()
                .name(format!("qcowfs-ring{}-slow", self.qid))
                .spawn(move || rx.into_iter().for_each(|job| job()));
            match spawned {
                Ok(thread) => {
                    self.jobs = Some(tx);
                    self.thread = Some(thread);
                }
                Err(e) => log::warn!("io_uring queue {}: no helper thread ({e})", self.qid),
            }
        }
        let unsent = match &self.jobs {
            Some(tx) => tx.send(Box::new(job)).err().map(|mpsc::SendError(job)| job),
            None => Some(Box::new(job) as Box<dyn FnOnce() + Send>),
        };
        if let Some(job) = unsent {
            job();
        }
    }
}

impl Drop for Slow {
    /// The queue is done: let the helper finish what it was given (the session's final flush
    /// comes after).
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
