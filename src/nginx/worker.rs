//! Per-worker state and lifecycle.
//!
//! In `init_process` a worker gets its [`Worker`]: the channel hub, the side connection to
//! PostgreSQL (when configured) and the bridge whose eventfd is an nginx read event on a
//! private, idle connection. Being idle is what lets a graceful quit or reload reach us:
//! nginx then calls the read handler with `c->close` set, and every subscriber is told
//! and closed before the side connection stops.
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
    ngx_close_connection, ngx_connection_t, ngx_cycle_t, ngx_event_t, ngx_get_connection,
    ngx_handle_read_event, ngx_http_request_t, ngx_int_t, ngx_log_t, NGX_LOG_ALERT, NGX_LOG_DEBUG,
    NGX_LOG_ERR, NGX_LOG_INFO, NGX_LOG_NOTICE, NGX_LOG_WARN, NGX_PROCESS_SINGLE,
    NGX_PROCESS_WORKER,
};
use ngx::core::Status;
use ngx::http::HttpModuleMainConf;

use crate::hub::{Hub, ListenChange};
use crate::nginx::subscriber::{self, SubKey};
use crate::nginx::{publisher, HttpPgPushModule};
use crate::postgres::{Bridge, Command, Event, Level, SideConnection};

/// How long `exit_process` waits for the tokio side to close its connection.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);
/// Events handled per wakeup before yielding back to the event loop.
const BATCH: usize = 1024;
/// Notifications queued per subscriber before their connections are written.
const FLUSH_EVERY: usize = 64;

pub struct Worker {
    bridge: Arc<Bridge>,
    side: Option<SideConnection>,
    conn: *mut ngx_connection_t,
    pub log: *mut ngx_log_t,
    pub hub: Hub<SubKey>,
    /// Channels whose LISTEN is not confirmed yet, with the subscribers waiting for it.
    waiting: HashMap<String, Vec<SubKey>>,
    /// HTTP publishes waiting for PostgreSQL, by id: the request, its PostgreSQL
    /// channel and channel id.
    publishes: HashMap<u64, (*mut ngx_http_request_t, String, String)>,
    next_publish: u64,
    /// `push_stream_postgres_channel_prefix`, for events that come without a request.
    pub prefix: String,
    /// Subscribers with fresh output, flushed once per batch of messages.
    dirty: Vec<SubKey>,
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
            // SAFETY: ngx_cycle is set in every process that runs handlers
            let log = unsafe { (*nginx_sys::ngx_cycle).log };
            ngx::ngx_log_error!(NGX_LOG_ALERT, log, "pgpush: worker state re-entered, skipped");
            None
        }
    })
}

pub extern "C" fn init_process(cycle: *mut ngx_cycle_t) -> ngx_int_t {
    // SAFETY: nginx passes the current cycle
    let cycle = unsafe { &mut *cycle };
    match start(cycle) {
        Ok(()) => Status::NGX_OK.into(),
        Err(msg) => {
            ngx::ngx_log_error!(NGX_LOG_ALERT, cycle.log, "pgpush: {}", msg);
            Status::NGX_ERROR.into()
        }
    }
}

pub extern "C" fn exit_process(_cycle: *mut ngx_cycle_t) {
    stop();
}

fn start(cycle: &mut ngx_cycle_t) -> Result<(), String> {
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
        (*c.read).handler = Some(on_bridge);
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
            let side =
                SideConnection::start(conninfo.config().clone(), reconnect, bridge.clone(), worker)
                    .map_err(|e| format!("cannot start the postgres thread: {e}"))?;
            Some(side)
        }
    };

    let prefix = mcf.channel_prefix().to_string();
    WORKER.with(|w| {
        *w.borrow_mut() = Some(Worker {
            bridge,
            side,
            conn: c,
            log: cycle.log,
            hub: Hub::default(),
            waiting: HashMap::new(),
            publishes: HashMap::new(),
            next_publish: 1,
            prefix,
            dirty: Vec::new(),
        });
    });
    Ok(())
}

/// Stops the side thread (bounded) and closes the eventfd connection. Idempotent.
fn stop() {
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
    if !w.conn.is_null() {
        // SAFETY: our connection, closed once
        unsafe { ngx_close_connection(w.conn) };
        w.conn = ptr::null_mut();
    }
}

/// Graceful quit or reload: every subscriber and waiting publisher is answered and closed,
/// then the side connection stops.
fn shutdown() {
    let subs: Vec<SubKey> =
        with(|w| w.hub_keys().chain(w.waiting.values().flatten().copied()).collect())
            .unwrap_or_default();
    for key in subs {
        subscriber::going_away(key);
    }
    let pending: Vec<u64> = with(|w| w.publishes.keys().copied().collect()).unwrap_or_default();
    publisher::answer(&pending, Some("nginx is shutting down"));
    stop();
}

extern "C" fn on_bridge(ev: *mut ngx_event_t) {
    // SAFETY: ev belongs to our eventfd connection
    let c = unsafe { (*ev).data.cast::<ngx_connection_t>() };
    // SAFETY: c is alive while its events fire
    if unsafe { (*c).close() } != 0 {
        shutdown();
        return;
    }
    let Some((events, drained)) = with(|w| {
        w.bridge.drain_wakeups();
        let mut events = Vec::new();
        let drained = w.bridge.take(&mut events, BATCH);
        (events, drained)
    }) else {
        return;
    };
    let mut since_flush = 0;
    for e in events {
        if matches!(e, Event::Notification { .. }) {
            since_flush += 1;
        }
        handle(e);
        // write out every few messages: frames coalesce per connection, yet no queue
        // holds a whole batch
        if since_flush == FLUSH_EVERY {
            settle();
            since_flush = 0;
        }
    }
    settle();
    if !drained {
        // come back for the rest after other connections had their turn
        with(|w| w.bridge.wake());
    }
}

fn handle(e: Event) {
    match e {
        Event::Log { level, msg } => {
            with(|w| log(w.log, level, &msg));
        }
        Event::Notification { channel, payload } => subscriber::deliver(&channel, &payload),
        Event::Listening(channels) => {
            let ready: Vec<SubKey> =
                with(|w| channels.iter().filter_map(|ch| w.waiting.remove(ch)).flatten().collect())
                    .unwrap_or_default();
            for key in ready {
                subscriber::listen_confirmed(key);
            }
        }
        Event::Published { ids, error } => publisher::answer(&ids, error.as_deref()),
        // what was published while the connection was down is gone: say so
        Event::Connected { relistened: true } => subscriber::gap(),
        Event::Connected { relistened: false } | Event::Disconnected => {}
    }
}

/// Flushes the subscribers that got output in this batch (and finalizes those that fail).
pub fn settle() {
    loop {
        let dirty = with(|w| std::mem::take(&mut w.dirty)).unwrap_or_default();
        if dirty.is_empty() {
            return;
        }
        for key in dirty {
            subscriber::flush_dirty(key);
        }
    }
}

impl Worker {
    fn hub_keys(&self) -> impl Iterator<Item = SubKey> + '_ {
        let mut keys: Vec<SubKey> =
            self.hub.channels().flat_map(|ch| self.hub.subscribers(ch).iter().copied()).collect();
        keys.sort_unstable();
        keys.dedup();
        keys.into_iter()
    }

    pub fn has_postgres(&self) -> bool {
        self.side.is_some()
    }

    /// Adds a subscriber to a channel; true if it must wait for a LISTEN to be confirmed.
    pub fn subscribe(&mut self, channel: &str, key: SubKey) -> bool {
        match self.hub.subscribe(channel, key) {
            ListenChange::Listen(ch) => match &self.side {
                Some(side) => {
                    side.send(Command::Listen(ch.clone()));
                    self.waiting.entry(ch).or_default().push(key);
                    true
                }
                None => false,
            },
            _ => match self.waiting.get_mut(channel) {
                Some(keys) => {
                    if !keys.contains(&key) {
                        keys.push(key);
                    }
                    true
                }
                None => false,
            },
        }
    }

    pub fn unsubscribe(&mut self, channel: &str, key: SubKey) {
        if let ListenChange::Unlisten(ch) = self.hub.unsubscribe(channel, key) {
            if let Some(side) = &self.side {
                side.send(Command::Unlisten(ch));
            }
        }
        if let Some(keys) = self.waiting.get_mut(channel) {
            keys.retain(|k| *k != key);
        }
    }

    /// Forgets a subscriber that is going away.
    pub fn forget(&mut self, key: SubKey) {
        self.dirty.retain(|k| *k != key);
    }

    pub fn mark_dirty(&mut self, keys: Vec<SubKey>) {
        if self.dirty.is_empty() {
            self.dirty = keys;
        } else {
            self.dirty.extend(keys);
        }
    }

    /// Queues a `pg_notify`; the answer comes back as [`Event::Published`].
    pub fn publish(
        &mut self,
        r: *mut ngx_http_request_t,
        channel: String,
        id: String,
        payload: String,
    ) -> u64 {
        let n = self.next_publish;
        self.next_publish += 1;
        if let Some(side) = &self.side {
            side.send(Command::Publish { id: n, channel: channel.clone(), payload });
        }
        self.publishes.insert(n, (r, channel, id));
        n
    }

    pub fn take_publish(&mut self, n: u64) -> Option<(*mut ngx_http_request_t, String, String)> {
        self.publishes.remove(&n)
    }
}

fn log(log: *mut ngx_log_t, level: Level, msg: &str) {
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
