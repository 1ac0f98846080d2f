//! Per-worker state: the bridge from the PostgreSQL thread, the side connection, and the
//! publishes waiting for their commit.
//!
//! In `init_process` a worker gets its [`Worker`]: the side connection to PostgreSQL
//! (when configured) and the bridge whose eventfd is an nginx read event on a private,
//! idle connection. Being idle is what lets a graceful quit or reload reach us: nginx then
//! calls the read handler with `c->close` set. That handler is handed in by the module
//! (it lives above this layer and dispatches to the subscription lifecycle).
//!
//! Re-entrancy rule: the state lives in a `RefCell`, and nothing that can finalize a
//! request (and so run a cleanup handler that needs the state) is called while it is
//! borrowed. [`with`] borrows for the duration of a closure only.

use core::ptr;
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use nginx_sys::{
    ngx_close_connection, ngx_connection_t, ngx_cycle_t, ngx_event_handler_pt, ngx_event_t,
    ngx_get_connection, ngx_handle_read_event, ngx_int_t, ngx_log_t, ngx_msec_t, NGX_LOG_ALERT,
    NGX_LOG_DEBUG, NGX_LOG_ERR, NGX_LOG_INFO, NGX_LOG_NOTICE, NGX_LOG_WARN, NGX_PROCESS_SINGLE,
    NGX_PROCESS_WORKER,
};
use ngx::http::HttpModuleMainConf;

use crate::nginx::HttpPgPushModule;
use crate::postgres::cells::Reply;
use crate::postgres::store::{Since, Stored};
use crate::postgres::{Bridge, Command, Event, HookCall, Level, Parts, Publish, SideConnection};
use crate::protocol::{channels, payload};

/// How long `exit_process` waits for the tokio side to close its connection.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);

/// Called once with a publish's id and outcome: how many messages its channel keeps (0
/// unless stored), or why it was not committed.
pub type PublishDone = Box<dyn FnOnce(u64, Result<i64, &str>)>;

/// Called once with a subscriber's history: one list per channel asked, or why none.
pub type HistoryDone = Box<dyn FnOnce(Result<Vec<Vec<Stored>>, String>)>;

/// Called once with an SQL hook call's id and the first column of its result rows.
pub type HookReply = Box<dyn FnOnce(u64, Vec<Reply>)>;

pub struct Worker {
    bridge: Arc<Bridge>,
    side: Option<SideConnection>,
    /// The worker's socketless connection: the data of its own events.
    pub conn: *mut ngx_connection_t,
    /// Gives freed memory back to the system a moment after a burst of connections or
    /// hook calls (see [`Worker::after_burst`]).
    trim: Box<ngx_event_t>,
    pub log: *mut ngx_log_t,
    /// Publishes waiting for PostgreSQL, by id.
    publishes: HashMap<u64, PublishDone>,
    /// SQL hook calls whose rows go back to a client, by id.
    hooks: HashMap<u64, HookReply>,
    /// History reads waiting for PostgreSQL, by id.
    histories: HashMap<u64, HistoryDone>,
    next_publish: u64,
    /// `push_stream_postgres_channel_prefix`, for events that come without a request.
    pub prefix: String,
    /// Derived LISTEN names, with the channels that share each.
    derived: HashMap<String, Vec<String>>,
    /// Messages are stored: after a reconnect, channels catch up from the store.
    pub store: bool,
    /// What history keeps: `push_stream_max_messages_stored_per_channel` and
    /// `push_stream_message_ttl` in seconds.
    pub keep: (Option<i64>, i64),
}

thread_local! {
    // Only the worker's main thread ever touches this.
    static WORKER: RefCell<Option<Worker>> = const { RefCell::new(None) };
}

/// Runs `f` on the worker state; `None` outside a worker, or if the state is already
/// borrowed, which would be a re-entrancy bug: that is logged at alert level.
pub fn with<R>(f: impl FnOnce(&mut Worker) -> R) -> Option<R> {
    WORKER.with(|w| match w.try_borrow_mut() {
        Ok(mut w) => w.as_mut().map(f),
        Err(_) => {
            reentered();
            None
        }
    })
}

/// Logs a re-entered thread-local state (a bug) at alert level.
pub fn reentered() {
    // SAFETY: ngx_cycle is set in every process that runs handlers
    let log = unsafe { (*nginx_sys::ngx_cycle).log };
    ngx::ngx_log_error!(NGX_LOG_ALERT, log, "pgpush: worker state re-entered, skipped");
}

/// Starts the worker's state; `on_bridge` handles the eventfd's read events.
pub fn start(
    cycle: &mut ngx_cycle_t,
    on_bridge: ngx_event_handler_pt,
    destroyed: fn(&[u8]),
) -> Result<(), String> {
    // init_process also runs in the cache manager and loader: only workers relay.
    // SAFETY: ngx_process is set before init_process runs
    let process = unsafe { nginx_sys::ngx_process } as u32;
    if process != NGX_PROCESS_WORKER && process != NGX_PROCESS_SINGLE {
        return Ok(());
    }
    let Some(mcf) = HttpPgPushModule::main_conf(cycle) else {
        return Ok(());
    };
    if !mcf.has_push_locations && mcf.postgres.is_none() {
        return Ok(());
    }

    let bridge = Bridge::new().map_err(|e| format!("eventfd() failed: {e}"))?;

    // nginx gets its own descriptor: it closes it with the connection, while the tokio
    // side may still hold the bridge.
    // SAFETY: duplicating a valid fd
    let fd = unsafe { libc::fcntl(bridge.raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
    if fd < 0 {
        return Err(format!("fcntl(F_DUPFD_CLOEXEC) failed: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: a fresh fd and the cycle log
    let c = unsafe { ngx_get_connection(fd, cycle.log) };
    if c.is_null() {
        // SAFETY: fd is ours
        unsafe { libc::close(fd) };
        return Err("no free connection for the eventfd".into());
    }
    // SAFETY: c is a fresh connection from nginx's pool
    unsafe {
        let c = &mut *c;
        (*c.read).handler = on_bridge;
        (*c.read).log = cycle.log;
        c.log = cycle.log;
        // idle: on quit or reload nginx calls the read handler with c->close set
        c.set_idle(1);
        if ngx_handle_read_event(c.read, 0) != nginx_sys::NGX_OK as ngx_int_t {
            ngx_close_connection(c);
            return Err("cannot watch the eventfd".into());
        }
    }

    let side = match mcf.postgres.as_ref() {
        None => None,
        Some(conninfo) => {
            let reconnect = mcf.postgres_reconnect.unwrap_or_default();
            // SAFETY: ngx_worker is set before init_process
            let worker = unsafe { nginx_sys::ngx_worker };
            let timeout = Duration::from_millis(mcf.postgres_publish_timeout as u64);
            let config = conninfo.config().clone();
            let hooks = mcf.has_sql_hooks;
            let store = mcf.store_config();
            let side = SideConnection::start(
                config,
                reconnect,
                timeout,
                bridge.clone(),
                worker,
                Parts { hooks, store, peers: crate::nginx::node::peers(worker) },
            )
            .map_err(|e| format!("cannot start the postgres thread: {e}"))?;
            Some(side)
        }
    };

    let prefix = mcf.channel_prefix().to_string();
    let store = mcf.store && side.is_some();
    let keep = (
        crate::nginx::conf::MainConf::limit(mcf.max_messages_stored_per_channel).map(|n| n as i64),
        mcf.message_ttl.max(1),
    );
    crate::nginx::zone::start(mcf, cycle.log, c.cast(), Some(destroyed));
    WORKER.with(|w| {
        *w.borrow_mut() = Some(Worker {
            bridge,
            side,
            conn: c,
            trim: trim_event(c, cycle.log),
            log: cycle.log,
            publishes: HashMap::new(),
            hooks: HashMap::new(),
            histories: HashMap::new(),
            next_publish: 1,
            prefix,
            derived: HashMap::new(),
            store,
            keep,
        });
    });
    Ok(())
}

/// Stops the side thread (bounded) and closes the eventfd connection. Idempotent.
/// Whether this worker is shutting down, gracefully (quit, reload) or fast (TERM, INT).
pub fn exiting() -> bool {
    // SAFETY: nginx's globals, set by its signal handling in this process
    unsafe { nginx_sys::ngx_exiting != 0 || nginx_sys::ngx_terminate != 0 }
}

pub fn stop() {
    crate::nginx::zone::stop();
    let Some(mut w) = WORKER.with(|w| w.borrow_mut().take()) else {
        return;
    };
    if let Some(side) = w.side.take() {
        if !side.stop(SHUTDOWN_TIMEOUT) {
            ngx::ngx_log_error!(
                NGX_LOG_WARN,
                w.log,
                "pgpush: postgres thread did not stop within {}ms, leaving it",
                SHUTDOWN_TIMEOUT.as_millis()
            );
        }
    }
    // the thread may have left log lines behind
    let mut events = Vec::new();
    w.bridge.take(&mut events, usize::MAX);
    for e in events {
        if let Event::Log { level, msg } = e {
            log(w.log, level, &msg);
        }
    }
    if w.trim.timer_set() != 0 {
        // SAFETY: our own timer
        unsafe { nginx_sys::ngx_del_timer(&mut *w.trim) };
    }
    if !w.conn.is_null() {
        // SAFETY: our connection, closed once
        unsafe { ngx_close_connection(w.conn) };
        w.conn = ptr::null_mut();
    }
}

/// How long after the start of a burst the heap is trimmed.
const TRIM_DELAY: ngx_msec_t = 500;

fn trim_event(c: *mut ngx_connection_t, log: *mut ngx_log_t) -> Box<ngx_event_t> {
    // SAFETY: an all-zero event is nginx's own initial state
    let mut ev: Box<ngx_event_t> = Box::new(unsafe { core::mem::zeroed() });
    ev.handler = Some(on_trim);
    // nginx's debug log reads the fd of an event's connection
    ev.data = c.cast();
    ev.log = log;
    // a pending trim never holds up a graceful shutdown
    ev.set_cancelable(1);
    ev
}

/// Handshakes and hook calls allocate and free request pools and queued calls by the
/// thousand in a burst; glibc keeps the freed pages, between the long-lived subscribers,
/// unless asked. Once the burst is over they go back to the system.
extern "C" fn on_trim(_ev: *mut ngx_event_t) {
    // SAFETY: plain libc call; it only walks the allocator's own free lists
    unsafe { libc::malloc_trim(0) };
}

impl Worker {
    /// A connection or a hook call came and went: trim the heap in a moment (once per
    /// burst).
    pub fn after_burst(&mut self) {
        if self.trim.timer_set() == 0 {
            // SAFETY: our own boxed event, deleted in stop()
            unsafe { nginx_sys::ngx_add_timer(&mut *self.trim, TRIM_DELAY) };
        }
    }

    pub fn has_postgres(&self) -> bool {
        self.side.is_some()
    }

    /// Takes up to `max` events from the bridge; false if some are left for later.
    pub fn take_events(&mut self, out: &mut Vec<Event>, max: usize) -> bool {
        self.bridge.drain_wakeups();
        self.bridge.take(out, max)
    }

    /// Comes back to the bridge after other connections had their turn.
    pub fn wake(&self) {
        self.bridge.wake();
    }

    /// LISTEN; answered by [`Event::Listening`]. A channel too long for an identifier is
    /// LISTENed under its derived name, once for all the channels that share it.
    pub fn listen(&mut self, channel: String) {
        let name = channels::listen_name(&channel).into_owned();
        if name != channel {
            let sharing = self.derived.entry(name.clone()).or_default();
            sharing.push(channel);
            if sharing.len() > 1 {
                // already LISTENed: confirm at once, through the bridge, in order
                self.bridge.push(Event::Listening(vec![name]));
                return;
            }
        }
        if let Some(side) = &self.side {
            // publishers of this node wait for it (see the publisher)
            crate::nginx::zone::listen_started(name.as_bytes());
            side.send(Command::Listen(name));
        }
    }

    pub fn unlisten(&mut self, channel: String) {
        let name = channels::listen_name(&channel).into_owned();
        if name != channel {
            let Some(sharing) = self.derived.get_mut(&name) else { return };
            sharing.retain(|c| *c != channel);
            if !sharing.is_empty() {
                return;
            }
            self.derived.remove(&name);
        }
        if let Some(side) = &self.side {
            side.send(Command::Unlisten(name));
        }
    }

    /// The channels a LISTEN name stands for: itself, or those sharing a derived name.
    pub fn channels_of(&self, name: &str) -> Vec<String> {
        match self.derived.get(name) {
            Some(sharing) => sharing.clone(),
            None => vec![name.to_string()],
        }
    }

    /// The channel a notification is for: under a derived name, the one its payload
    /// names (every channel sharing the name when it names none).
    pub fn notified(&self, name: &str, payload: &str) -> Vec<String> {
        let Some(sharing) = self.derived.get(name) else {
            return vec![name.to_string()];
        };
        let named = payload::channel_name_of(payload).or_else(|| {
            payload::channel_of(payload).map(|id| channels::pg_channel(&self.prefix, &id))
        });
        match named {
            Some(channel) => sharing.iter().filter(|c| **c == channel).cloned().collect(),
            None => sharing.clone(),
        }
    }

    /// Queues a `pg_notify`; `done` is called from [`Worker::take_publish`]'s caller once
    /// PostgreSQL answers [`Event::Published`]. Without PostgreSQL (one worker), the
    /// message comes back through the bridge as if it had been notified.
    /// With `stored`, the message goes through the store (`channel` is then the whole
    /// PostgreSQL channel name: the store derives the LISTEN name itself).
    pub fn publish(
        &mut self,
        channel: String,
        payload: String,
        stored: bool,
        done: PublishDone,
    ) -> u64 {
        let n = self.next_publish;
        self.next_publish += 1;
        match &self.side {
            Some(side) => {
                let channel =
                    if stored { channel } else { channels::listen_name(&channel).into_owned() };
                side.send(Command::Publish(Publish { id: n, channel, payload, stored }))
            }
            None => {
                self.bridge.push(Event::Notification { channel, payload });
                let stored = Vec::new();
                self.bridge.push(Event::Published { ids: vec![n], error: None, stored });
            }
        }
        self.publishes.insert(n, done);
        n
    }

    /// Reads stored messages of these PostgreSQL channels; `done` gets them from the
    /// dispatcher. Without PostgreSQL there is no store, and no history.
    pub fn history(&mut self, channels: Vec<(String, Since)>, done: HistoryDone) -> u64 {
        let n = self.next_publish;
        self.next_publish += 1;
        match &self.side {
            Some(side) => side.send(Command::History { id: n, channels }),
            None => self.bridge.push(Event::History { id: n, result: Ok(Vec::new()) }),
        }
        self.histories.insert(n, done);
        n
    }

    /// A history answered here (from the recent-message cache), delivered like one from
    /// PostgreSQL: from the event loop, never from inside the caller.
    pub fn answered(&mut self, lists: Vec<Vec<Stored>>, done: HistoryDone) -> u64 {
        let n = self.next_publish;
        self.next_publish += 1;
        self.bridge.push(Event::History { id: n, result: Ok(lists) });
        self.histories.insert(n, done);
        n
    }

    pub fn take_history(&mut self, n: u64) -> Option<HistoryDone> {
        self.histories.remove(&n)
    }

    /// Queues an SQL hook call; `reply`, if any, gets the rows from the dispatcher.
    pub fn hook(
        &mut self,
        name: &'static str,
        sql: Arc<str>,
        params: Vec<Option<String>>,
        reply: Option<HookReply>,
    ) -> u64 {
        let id = self.next_publish;
        self.next_publish += 1;
        let rows = reply.is_some();
        self.after_burst();
        if let Some(side) = &self.side {
            side.hook(HookCall { id, name, sql, params, rows });
        }
        if let Some(reply) = reply {
            self.hooks.insert(id, reply);
        }
        id
    }

    /// Whoever waits for a hook call's rows (gone if its subscriber left).
    pub fn take_hook(&mut self, id: u64) -> Option<HookReply> {
        self.hooks.remove(&id)
    }

    /// The waiter of a publish, taken to be answered (or forgotten: the request is gone).
    pub fn take_publish(&mut self, n: u64) -> Option<PublishDone> {
        self.publishes.remove(&n)
    }

    /// Every publish still waiting (on shutdown).
    pub fn take_all_publishes(&mut self) -> Vec<(u64, PublishDone)> {
        let mut all: Vec<_> = self.publishes.drain().collect();
        all.sort_unstable_by_key(|(id, _)| *id);
        all
    }
}

pub fn log(log: *mut ngx_log_t, level: Level, msg: &str) {
    let level = match level {
        Level::Alert => NGX_LOG_ALERT,
        Level::Error => NGX_LOG_ERR,
        Level::Warn => NGX_LOG_WARN,
        Level::Notice => NGX_LOG_NOTICE,
        Level::Info => NGX_LOG_INFO,
        Level::Debug => NGX_LOG_DEBUG,
    };
    ngx::ngx_log_error!(level, log, "pgpush: {}", msg);
}
