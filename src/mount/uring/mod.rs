//! FUSE over io_uring (Linux 6.14+): the kernel hands each request to a queue of the CPU its
//! caller runs on, through io_uring commands on `/dev/fuse`, and takes the answer on the same CPU,
//! without the cross-CPU wake-up of a `/dev/fuse` read. fuser still opens the session, answers
//! INIT (asking for io_uring there) and reads what never travels on the ring (forgets,
//! interrupts); requests are served by the same [`QcowFs`] methods on both transports.
//!
//! The order the kernel needs: rings exist before INIT is answered (once INIT asks for io_uring,
//! the kernel holds every request until each queue has registered an entry, so a ring that
//! cannot be made must be known before asking); entries register after INIT (before, the kernel
//! answers EAGAIN). A refused registration makes the kernel drop io_uring for the session and
//! serve it on `/dev/fuse`.

mod answer;
mod dispatch;
mod queue;
mod wire;

use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use super::fs::{QcowFs, MAX_IO};
use queue::Queue;

/// `--io-uring`: whether requests travel on io_uring queues or `/dev/fuse`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Mode {
    /// io_uring when the kernel offers it, else /dev/fuse
    #[default]
    Auto,
    /// io_uring or fail
    On,
    /// /dev/fuse only
    Off,
}

const ENABLE_PARAM: &str = "/sys/module/fuse/parameters/enable_uring";
const POSSIBLE_CPUS: &str = "/sys/devices/system/cpu/possible";

/// Whether this kernel would offer FUSE over io_uring to a new session; Err says why not and how
/// to change that.
pub fn kernel_offers() -> Result<(), String> {
    match std::fs::read_to_string(ENABLE_PARAM) {
        Ok(v) if v.trim() == "Y" || v.trim() == "1" => Ok(()),
        Ok(_) => Err(format!(
            "FUSE over io_uring is off in this kernel: as root, echo 1 > {ENABLE_PARAM}"
        )),
        Err(_) => Err(format!(
            "this kernel has no FUSE over io_uring ({ENABLE_PARAM} is missing: it needs Linux \
             6.14 or later built with CONFIG_FUSE_IO_URING)"
        )),
    }
}

/// How many CPUs a list such as "0-3,8,10-11" names.
fn count_cpus(list: &str) -> Option<usize> {
    let mut n = 0;
    for part in list.trim().split(',') {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a.parse::<usize>().ok()?, b.parse::<usize>().ok()?),
            None => {
                let a = part.parse::<usize>().ok()?;
                (a, a)
            }
        };
        n += b.checked_sub(a)? + 1;
    }
    (n > 0).then_some(n)
}

/// What a prepared queue thread is given once INIT has been answered.
struct Start {
    fd: OwnedFd,
    fs: Arc<QcowFs>,
}

/// One thread per possible CPU (the kernel's queue count), each with its ring made and pinned to
/// its CPU, waiting for the session.
pub struct Queues {
    starts: Vec<mpsc::Sender<Start>>,
    threads: Vec<JoinHandle<()>>,
    status: mpsc::Receiver<(u16, std::io::Result<()>)>,
    stop: Arc<AtomicBool>,
}

/// The queues, serving. `stop` ends them (after the session has ended).
pub struct Running {
    threads: Vec<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    pub queues: usize,
}

impl Queues {
    /// Make every queue's ring, or say why io_uring cannot be used here.
    pub fn prepare() -> Result<Queues, String> {
        kernel_offers()?;
        let cpus = std::fs::read_to_string(POSSIBLE_CPUS)
            .ok()
            .and_then(|l| count_cpus(&l))
            .ok_or_else(|| format!("cannot read the possible CPUs from {POSSIBLE_CPUS}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let (status_tx, status) = mpsc::channel();
        let mut queues = Queues {
            starts: Vec::new(),
            threads: Vec::new(),
            status,
            stop: stop.clone(),
        };
        for qid in 0..cpus as u16 {
            let (start_tx, start_rx) = mpsc::channel::<Start>();
            let status_tx = status_tx.clone();
            let stop = stop.clone();
            let thread = std::thread::Builder::new()
                .name(format!("qcowfs-ring{qid}"))
                .spawn(move || run_queue(qid, start_rx, status_tx, stop))
                .map_err(|e| format!("cannot start io_uring queue thread {qid}: {e}"))?;
            queues.starts.push(start_tx);
            queues.threads.push(thread);
        }
        queues.wait_all("cannot make an io_uring")?;
        Ok(queues)
    }

    /// INIT asked for io_uring and the kernel agreed: register every queue's entries on the
    /// session's `fd` and serve.
    pub fn start(mut self, fd: BorrowedFd<'_>, fs: &Arc<QcowFs>) -> Result<Running, String> {
        for tx in std::mem::take(&mut self.starts) {
            let fd = fd
                .try_clone_to_owned()
                .map_err(|e| format!("cannot duplicate /dev/fuse: {e}"))?;
            let _ = tx.send(Start { fd, fs: fs.clone() });
        }
        self.wait_all("io_uring registration refused")?;
        Ok(Running {
            queues: self.threads.len(),
            threads: std::mem::take(&mut self.threads),
            stop: self.stop.clone(),
        })
    }

    /// One status from every queue thread; the first failure, named.
    fn wait_all(&self, what: &str) -> Result<(), String> {
        let mut first = None;
        for _ in 0..self.threads.len() {
            match self.status.recv() {
                Ok((_, Ok(()))) => {}
                Ok((qid, Err(e))) => {
                    first.get_or_insert(format!("{what} (queue {qid}): {e}"));
                }
                Err(_) => {
                    first.get_or_insert(format!("{what}: a queue thread ended"));
                }
            }
        }
        first.map_or(Ok(()), Err)
    }
}

impl Drop for Queues {
    fn drop(&mut self) {
        // Not started (or failed): closing the channels ends the threads. Once started, the
        // threads belong to `Running`.
        self.starts.clear();
        if self.threads.is_empty() {
            return;
        }
        self.stop.store(true, Ordering::Release);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Running {
    /// End every queue and wait for it (each looks at the flag at least once a second).
    pub fn stop(self) {
        self.stop.store(true, Ordering::Release);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// A queue thread: pin, make the ring, report; wait for the session, register, report; serve.
fn run_queue(
    qid: u16,
    start: mpsc::Receiver<Start>,
    status: mpsc::Sender<(u16, std::io::Result<()>)>,
    stop: Arc<AtomicBool>,
) {
    pin_to_cpu(usize::from(qid));
    let ring = match queue::new_ring() {
        Ok(r) => r,
        Err(e) => {
            let _ = status.send((qid, Err(e)));
            return;
        }
    };
    let _ = status.send((qid, Ok(())));
    let Ok(Start { fd, fs }) = start.recv() else {
        return;
    };
    let queue = Queue::new(qid, ring, fd, fs, MAX_IO as usize, stop).and_then(|mut q| {
        q.register()?;
        Ok(q)
    });
    match queue {
        Ok(q) => {
            let _ = status.send((qid, Ok(())));
            q.serve();
        }
        Err(e) => {
            let _ = status.send((qid, Err(e)));
        }
    }
}

/// Run this thread on `cpu` only: its requests come from there. Best effort (an offline CPU
/// has no requests anyway).
fn pin_to_cpu(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; CPU_SET bounds-checks `cpu` against the set's size, and
    // sched_setaffinity only reads the set.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_cpu_lists() {
        assert_eq!(count_cpus("0-1\n"), Some(2));
        assert_eq!(count_cpus("0"), Some(1));
        assert_eq!(count_cpus("0-3,8,10-11"), Some(7));
        assert_eq!(count_cpus(""), None);
        assert_eq!(count_cpus("3-1"), None);
        assert_eq!(count_cpus("x"), None);
    }
}
