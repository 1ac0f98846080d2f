//! The queue between a worker's tokio thread and its nginx event loop.
//!
//! The tokio side pushes owned events; the first push into an empty queue owes nginx a
//! wake, which is paid (the eventfd written, which nginx watches as a read event) where a
//! piece of work ends: the notifications of one read, a batch of commands, a hook call, or
//! the runtime about to park. A wake owed for 1 ms, or 64 waiting events, is paid at the
//! next push whatever the thread is doing. A push from nginx's own thread writes the
//! eventfd at once. The nginx side clears the fd, then takes events in bounded batches.

use std::cell::Cell;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Log levels the tokio side may use; the worker maps them to nginx's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Alert,
    Error,
    Warn,
    Notice,
    Info,
    Debug,
}

#[derive(Debug)]
pub enum Event {
    Log {
        level: Level,
        msg: String,
    },
    Notification {
        channel: String,
        payload: String,
    },
    /// The connection is up and every live channel is LISTENed again.
    Connected {
        relistened: bool,
    },
    Disconnected,
    /// Where newly LISTENed stored channels stand: (channel, epoch, last offset). Sent
    /// before their [`Event::Listening`].
    Positions(Vec<(String, i64, i64)>),
    /// These channels are LISTENed (or will be on reconnect, while the database is down):
    /// a subscriber waiting for them can be told it is subscribed.
    Listening(Vec<String>),
    /// What an SQL hook call that wanted rows got back (nothing if it failed: that is
    /// logged).
    HookRows {
        id: u64,
        rows: Vec<crate::postgres::cells::Reply>,
    },
    /// The outcome of [`crate::postgres::Command::Publish`]es: committed, or why not.
    Published {
        ids: Vec<u64>,
        error: Option<String>,
        /// For stored messages, how many messages each one's channel keeps (else empty).
        stored: Vec<i64>,
    },
    /// A subscriber's history, one list per channel asked, or why there is none.
    History {
        id: u64,
        result: Result<Vec<Vec<crate::postgres::store::Stored>>, String>,
    },
}

/// Events queued on the side thread before it wakes nginx without waiting to park.
const PAY_AT: usize = 64;
/// How long a wake may stay owed before the next push pays it.
const PAY_AFTER: Duration = Duration::from_millis(1);

thread_local! {
    /// Set on the side thread: its pushes owe a wake instead of writing the eventfd.
    static DEFERRING: Cell<bool> = const { Cell::new(false) };
    /// Since when the side thread owes nginx a wake (one side thread per bridge).
    static OWED_SINCE: Cell<Option<Instant>> = const { Cell::new(None) };
}

pub struct Bridge {
    queue: Mutex<Vec<Event>>,
    fd: OwnedFd,
}

impl Bridge {
    pub fn new() -> io::Result<std::sync::Arc<Self>> {
        // SAFETY: eventfd returns a new descriptor or -1
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is ours
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(std::sync::Arc::new(Self { queue: Mutex::new(Vec::new()), fd }))
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    pub fn push(&self, ev: Event) {
        let len = {
            let mut q = self.queue.lock();
            q.push(ev);
            q.len()
        };
        if DEFERRING.with(Cell::get) {
            if len == 1 {
                OWED_SINCE.with(|t| {
                    if t.get().is_none() {
                        t.set(Some(Instant::now()));
                    }
                });
            }
            let late = OWED_SINCE.with(Cell::get).is_some_and(|t| t.elapsed() >= PAY_AFTER);
            if len >= PAY_AT || late {
                self.pay();
            }
        } else if len == 1 {
            self.wake();
        }
    }

    /// From now on, this thread's pushes owe their wake until [`Bridge::pay`] (or until
    /// [`PAY_AT`] events wait, or [`PAY_AFTER`] has passed); `false` writes at once again.
    pub fn defer_on_this_thread(on: bool) {
        DEFERRING.with(|d| d.set(on));
    }

    /// Wakes nginx if a push of this thread owes it: the side thread calls this where a
    /// piece of work ends, and before its runtime parks.
    pub fn pay(&self) {
        if OWED_SINCE.with(Cell::take).is_some() {
            self.wake();
        }
    }

    pub fn log(&self, level: Level, msg: String) {
        self.push(Event::Log { level, msg });
    }

    /// Makes the fd readable (also used by the worker to come back for a next batch).
    pub fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64; EAGAIN only when the counter is huge,
        // in which case the fd is readable anyway.
        unsafe { libc::write(self.raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Clears the fd; returns how many wakeups were pending. One read does it: an eventfd
    /// (not in semaphore mode) gives its whole count and resets it.
    pub fn drain_wakeups(&self) -> u64 {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a valid u64
        let n = unsafe { libc::read(self.raw_fd(), (&mut v as *mut u64).cast(), 8) };
        if n == 8 {
            v
        } else {
            0
        }
    }

    /// Moves at most `max` events into `out`; true when the queue is left empty.
    pub fn take(&self, out: &mut Vec<Event>, max: usize) -> bool {
        let mut q = self.queue.lock();
        if q.len() <= max {
            out.append(&mut q);
            true
        } else {
            out.extend(q.drain(..max));
            false
        }
    }
}
