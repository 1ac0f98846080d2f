//! The PostgreSQL side connection of one worker, on its own tokio thread.
//!
//! Nothing here touches nginx. The worker sends [`Command`]s over a channel; this thread
//! answers with [`Event`]s pushed onto the [`Bridge`], whose eventfd wakes the worker's
//! event loop. Log lines travel the same way, since logging is an nginx API too.

pub mod bridge;
pub mod cells;
pub mod hooks;
pub mod node;
pub mod store;

use std::collections::BTreeSet;
use std::future::poll_fn;
use std::io;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_postgres::{AsyncMessage, NoTls};

pub use self::bridge::{Bridge, Event, Level};
pub use self::hooks::HookCall;
use crate::config::conninfo;
use crate::config::values::Reconnect;
use crate::protocol::channels::quote_ident;

/// What the worker asks of its side connection.
#[derive(Debug)]
pub enum Command {
    /// LISTEN on a PostgreSQL channel (reference counting is the worker's job).
    Listen(String),
    Unlisten(String),
    /// `pg_notify(channel, payload)`, or through the store; answered by an
    /// [`Event::Published`] carrying its id.
    Publish(Publish),
    /// A subscriber's history, one channel after the other; answered by [`Event::History`].
    History {
        id: u64,
        channels: Vec<(String, store::Since)>,
    },
    Stop,
    /// A follower's request, read by the node's leader (`push_stream_postgres_node_listener`).
    Peer(usize, node::ToLeader),
    /// The node's leader (re)started: a follower sends it every channel it wants.
    Resync,
    /// The leader LISTENs these channels of a follower: its positions are read now.
    Acked(Vec<String>),
}

/// One message to publish.
#[derive(Debug)]
pub struct Publish {
    pub id: u64,
    /// The PostgreSQL channel (its LISTEN name, unless stored: the store derives it).
    pub channel: String,
    /// The NOTIFY payload ([`crate::protocol::payload`]).
    pub payload: String,
    /// Through the store (`push_stream_store_messages on`).
    pub stored: bool,
}

/// One statement for a whole batch of publishes.
const PUBLISH_SQL: &str = "SELECT pg_notify(c, p) FROM unnest($1::text[], $2::text[]) AS t(c, p)";

/// How often an idle connection proves it is alive; TCP keepalives cover the kernel side.
const LIVENESS_INTERVAL: Duration = Duration::from_secs(30);
const LIVENESS_TIMEOUT: Duration = Duration::from_secs(10);

/// What a worker's side thread serves besides LISTEN and publish.
pub struct Parts {
    /// A second connection for the SQL hooks.
    pub hooks: bool,
    /// The message store, when some location stores messages.
    pub store: Option<store::StoreConfig>,
    /// The node's other workers (`push_stream_postgres_node_listener`).
    pub peers: node::Peers,
}

/// The worker's handle on its side thread.
pub struct SideConnection {
    tx: mpsc::UnboundedSender<Command>,
    /// The SQL hooks' connection, when some location has SQL hooks.
    hooks: Option<mpsc::UnboundedSender<HookCall>>,
    thread: Option<thread::JoinHandle<()>>,
    done: Arc<(Mutex<bool>, Condvar)>,
}

impl SideConnection {
    /// Starts the thread with every signal blocked, so that a signal sent to the worker is
    /// always handled by nginx's own thread.
    /// `timeout` bounds how long a publish waits for a connection to PostgreSQL.
    pub fn start(
        config: tokio_postgres::Config,
        reconnect: Reconnect,
        timeout: Duration,
        bridge: Arc<Bridge>,
        worker: usize,
        parts: Parts,
    ) -> io::Result<Self> {
        let Parts { hooks: with_hooks, store, peers } = parts;
        let (tx, rx) = mpsc::unbounded_channel();
        let commands = tx.downgrade();
        let (hooks, hooks_rx) = if with_hooks {
            let (t, r) = mpsc::unbounded_channel();
            (Some(t), Some(r))
        } else {
            (None, None)
        };
        let done = Arc::new((Mutex::new(false), Condvar::new()));
        let done2 = done.clone();

        let thread = with_signals_blocked(|| {
            thread::Builder::new().name(format!("pgpush-pg-{worker}")).spawn(move || {
                let payer = bridge.clone();
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .on_thread_park(move || payer.pay())
                    .build();
                match rt {
                    Ok(rt) => rt.block_on(async {
                        Bridge::defer_on_this_thread(true);
                        let hooks = hooks_rx.map(|r| {
                            tokio::spawn(hooks::run(config.clone(), reconnect, r, bridge.clone()))
                        });
                        let node = node::Node::start(peers, commands, bridge.clone());
                        run(config, reconnect, timeout, store, rx, bridge.clone(), node).await;
                        // the hooks finish what is queued (unsubscribes at shutdown)
                        if let Some(h) = hooks {
                            let _ = h.await;
                        }
                    }),
                    Err(e) => bridge.log(Level::Alert, format!("tokio runtime failed: {e}")),
                }
                // what the runtime pushed last has not been paid by a park
                Bridge::defer_on_this_thread(false);
                bridge.pay();
                let (lock, cv) = &*done2;
                *lock.lock() = true;
                cv.notify_all();
            })
        })?;

        Ok(Self { tx, hooks, thread: Some(thread), done })
    }

    pub fn send(&self, cmd: Command) {
        // The thread only goes away on Stop or a runtime failure that is already logged.
        let _ = self.tx.send(cmd);
    }

    /// Queues an SQL hook call.
    pub fn hook(&self, call: HookCall) {
        if let Some(h) = &self.hooks {
            let _ = h.send(call);
        }
    }

    /// Asks the thread to close the connection and waits at most `timeout` for it.
    /// Returns false if the thread was left behind (it dies with the process).
    pub fn stop(mut self, timeout: Duration) -> bool {
        self.send(Command::Stop);
        self.hooks = None;
        let (lock, cv) = &*self.done;
        let mut finished = lock.lock();
        if !*finished {
            cv.wait_for(&mut finished, timeout);
        }
        if *finished {
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
            true
        } else {
            false
        }
    }
}

fn with_signals_blocked<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: plain sigset manipulation on this thread; the old mask is restored.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old);
        let r = f();
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        r
    }
}

/// Exponential backoff with jitter between `min` and `max`.
pub struct Backoff {
    next: Duration,
    policy: Reconnect,
    seed: u64,
}

impl Backoff {
    pub fn new(policy: Reconnect, seed: u64) -> Self {
        Self { next: policy.min, policy, seed: seed | 1 }
    }

    pub fn reset(&mut self) {
        self.next = self.policy.min;
    }

    /// The next delay: somewhere in [next/2, next], then next doubles up to max.
    pub fn step(&mut self) -> Duration {
        // xorshift: jitter only needs to keep workers from reconnecting in lockstep
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let base = self.next;
        let half = base / 2;
        let jitter = half.mul_f64((self.seed % 1000) as f64 / 1000.0);
        self.next = (self.next * 2).min(self.policy.max);
        (half + jitter).max(self.policy.min.min(base))
    }
}

enum Outcome {
    Stop,
    Lost(String),
}

/// What the worker asked for, kept across connections.
#[derive(Default)]
struct Wanted {
    /// Every channel with subscribers in the worker: LISTENed on each (re)connect.
    channels: BTreeSet<String>,
    /// LISTENs received during a connection attempt, acknowledged once it is decided.
    unacked: Vec<String>,
    /// Publishes waiting for a connection.
    held: Waiting<Publish>,
    /// Subscribers' histories waiting for a connection.
    histories: Waiting<History>,
    /// How long a publish waits for a connection.
    publish_timeout: Duration,
}

/// Work waiting for a connection, oldest first, each until its deadline (deadlines grow
/// with arrival).
struct Waiting<T>(Vec<(T, Instant)>);

impl<T> Default for Waiting<T> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<T> Waiting<T> {
    fn push(&mut self, item: T, wait: Duration) {
        self.0.push((item, Instant::now() + wait));
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.0.first().map(|w| w.1)
    }

    /// What waited past its deadline: a prefix.
    fn expired(&mut self, now: Instant) -> Vec<T> {
        let n = self.0.iter().take_while(|w| w.1 <= now).count();
        self.0.drain(..n).map(|w| w.0).collect()
    }

    fn take(&mut self) -> Vec<T> {
        self.0.drain(..).map(|w| w.0).collect()
    }
}

/// A subscriber's history to read: its id, and where each channel resumes.
type History = (u64, Vec<(String, store::Since)>);

impl Wanted {
    /// Applies a command while there is no connection; true on Stop. While `attempting`,
    /// LISTEN acknowledgements wait for the attempt's outcome.
    fn apply_while_down(
        &mut self,
        cmd: Option<Command>,
        attempting: bool,
        bridge: &Bridge,
        node: &mut node::Node,
    ) -> bool {
        let mut replies = node::Replies::default();
        match cmd {
            None | Some(Command::Stop) => return true,
            Some(Command::Listen(ch)) => {
                node.listen(&ch, &mut self.channels, &mut replies);
                if !node.listens() {
                    // the leader acknowledges it
                } else if attempting {
                    self.unacked.push(ch);
                } else {
                    // LISTENed on reconnect; nothing can be delivered before that anyway
                    bridge.push(Event::Listening(vec![ch]));
                }
            }
            Some(Command::Unlisten(ch)) => {
                node.unlisten(&ch, &mut self.channels, &mut replies);
            }
            Some(Command::Peer(w, msg)) => {
                // LISTENed on reconnect: acknowledged at once, as the worker's own
                let (mut listen, mut unlisten) = (Vec::new(), Vec::new());
                node.peer(w, msg, &mut self.channels, &mut listen, &mut unlisten, &mut replies);
            }
            Some(Command::Resync) => node.resync(&self.channels, &mut replies),
            Some(Command::Acked(names)) => bridge.push(Event::Listening(names)),
            Some(Command::Publish(publish)) => self.hold(publish),
            Some(Command::History { id, channels }) => self.hold_history((id, channels)),
        }
        node.reply_while_down(replies);
        false
    }

    /// Keeps a publish for the next connection, until its deadline.
    fn hold(&mut self, publish: Publish) {
        self.held.push(publish, self.publish_timeout);
    }

    /// Keeps a history to read on the next connection, until its deadline (as a publish).
    fn hold_history(&mut self, h: History) {
        self.histories.push(h, self.publish_timeout);
    }

    /// A connection attempt failed: LISTENs that waited for it are answered (they are
    /// made on reconnect). Publishes keep waiting until their deadline.
    fn fail_attempt(&mut self, bridge: &Bridge) {
        if !self.unacked.is_empty() {
            bridge.push(Event::Listening(std::mem::take(&mut self.unacked)));
        }
    }

    /// When the oldest held publish or history gives up.
    fn next_deadline(&self) -> Option<Instant> {
        let h = self.histories.next_deadline();
        self.held.next_deadline().into_iter().chain(h).min()
    }

    /// Fails the publishes and histories that waited past their deadline.
    fn expire(&mut self, bridge: &Bridge) {
        let now = Instant::now();
        let ids: Vec<u64> = self.held.expired(now).into_iter().map(|p| p.id).collect();
        if !ids.is_empty() {
            bridge.push(Event::Published { ids, error: Some(DOWN.into()), stored: Vec::new() });
        }
        for (id, _) in self.histories.expired(now) {
            bridge.push(Event::History { id, result: Err(DOWN.into()) });
        }
    }

    /// The held publishes and histories, for a fresh connection.
    fn take_held(&mut self) -> (Vec<Publish>, Vec<History>) {
        (self.held.take(), self.histories.take())
    }
}

/// Sleeps until `deadline`, or forever without one.
async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

pub const DOWN: &str = "the connection to PostgreSQL is down";

async fn run(
    config: tokio_postgres::Config,
    reconnect: Reconnect,
    publish_timeout: Duration,
    store: Option<store::StoreConfig>,
    mut rx: mpsc::UnboundedReceiver<Command>,
    bridge: Arc<Bridge>,
    mut node: node::Node,
) {
    let target = conninfo::describe(&config);
    let seed = u64::from(std::process::id()) ^ now_nanos();
    let mut backoff = Backoff::new(reconnect, seed);
    let mut wanted = Wanted { publish_timeout, ..Wanted::default() };
    let mut ever_connected = false;
    let mut failures: u32 = 0;

    loop {
        let connect = config.connect(NoTls);
        tokio::pin!(connect);
        let connected = loop {
            tokio::select! {
                r = &mut connect => break r,
                cmd = rx.recv() => if wanted.apply_while_down(cmd, true, &bridge, &mut node) { return },
                _ = until(wanted.next_deadline()) => wanted.expire(&bridge),
            }
        };

        let (client, mut connection) = match connected {
            Ok(c) => c,
            Err(e) => {
                wanted.fail_attempt(&bridge);
                failures += 1;
                let delay = backoff.step();
                if failures == 1 {
                    bridge.log(
                        Level::Error,
                        format!(
                            "connect() to postgres {target} failed: {}; retrying every {}ms..{}ms",
                            chain(&e),
                            reconnect.min.as_millis(),
                            reconnect.max.as_millis()
                        ),
                    );
                } else {
                    bridge
                        .log(Level::Debug, format!("connect() to {target} failed: {}", chain(&e)));
                }
                if sleep_or_stop(delay, &mut rx, &mut wanted, &bridge, &mut node).await {
                    return;
                }
                continue;
            }
        };

        // Notifications only surface when the connection is polled directly. Those that
        // come before nginx is told of the reconnect wait for it, so that a channel's
        // catch-up (or gap message) comes before anything sent after the outage.
        let b = bridge.clone();
        let router = node.router();
        let (open, mut opened) = tokio::sync::oneshot::channel::<()>();
        let mut driver = tokio::spawn(async move {
            let mut early = Some(Vec::new());
            // the node's leader hands the other workers their notifications
            let route = |e: Event| match (&router, e) {
                (Some(r), Event::Notification { channel, payload }) => {
                    if r.route(&channel, &payload) {
                        b.push(Event::Notification { channel, payload });
                    }
                }
                (_, e) => b.push(e),
            };
            loop {
                // once a read's notifications are all pushed, nginx hears of them
                let next = poll_fn(|cx| {
                    let r = connection.poll_message(cx);
                    if r.is_pending() {
                        b.pay();
                    }
                    r
                });
                let next = tokio::select! {
                    biased;
                    _ = &mut opened, if early.is_some() => {
                        early.take().into_iter().flatten().for_each(route);
                        continue;
                    }
                    next = next => next,
                };
                match next {
                    Some(Ok(AsyncMessage::Notification(n))) => {
                        let e = Event::Notification {
                            channel: n.channel().to_string(),
                            payload: n.payload().to_string(),
                        };
                        match early.as_mut() {
                            Some(held) => held.push(e),
                            None => route(e),
                        }
                    }
                    Some(Ok(AsyncMessage::Notice(n))) => {
                        b.log(Level::Info, format!("postgres notice: {}", n.message()))
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return chain(&e),
                    None => return String::from("connection closed"),
                }
            }
        });

        // a follower's channels are its leader's to LISTEN
        let relisten = if node.listens() {
            listen_sql("LISTEN", wanted.channels.iter())
        } else {
            String::new()
        };
        let setup = async {
            // a notification is not durable (PostgreSQL's queue does not survive a
            // restart), so its commit need not wait for the WAL flush (DESIGN.md)
            client.batch_execute("SET synchronous_commit TO off").await?;
            let stmt = client.prepare(PUBLISH_SQL).await?;
            let stored = match &store {
                Some(cfg) => Some(store::Statements::prepare(&client, cfg).await?),
                None => None,
            };
            if !relisten.is_empty() {
                client.batch_execute(&relisten).await?;
            }
            Ok::<_, tokio_postgres::Error>((stmt, stored))
        };
        let (publish, stored) = match setup.await {
            Ok(stmts) => stmts,
            Err(e) => {
                driver.abort();
                wanted.fail_attempt(&bridge);
                bridge.log(
                    Level::Error,
                    format!("LISTEN on postgres {target} failed: {}", chain(&e)),
                );
                if sleep_or_stop(backoff.step(), &mut rx, &mut wanted, &bridge, &mut node).await {
                    return;
                }
                continue;
            }
        };

        if failures > 0 || ever_connected {
            bridge.log(
                Level::Notice,
                format!(
                    "reconnected to postgres {target}, listening on {} channel(s)",
                    wanted.channels.len()
                ),
            );
        } else {
            bridge.log(Level::Notice, format!("connected to postgres {target}"));
        }
        if node.listens() {
            bridge.push(Event::Connected { relistened: ever_connected });
        }
        // every follower catches up: what it was acknowledged while this connection was
        // down (or before a new leader listened) is LISTENed only now
        node.tell_followers(&node::ToFollower::Relistened);
        let _ = open.send(());
        if !wanted.unacked.is_empty() {
            bridge.push(Event::Listening(std::mem::take(&mut wanted.unacked)));
        }
        ever_connected = true;
        backoff.reset();

        let (held, histories) = wanted.take_held();
        let session = Session {
            client: &client,
            publish: &publish,
            store: store.as_ref().zip(stored.as_ref()),
            bridge: &bridge,
        };
        let outcome = match session.finish(held, histories, &mut wanted).await {
            Err(why) => Outcome::Lost(why),
            Ok(()) => session.serve(&mut driver, &mut rx, &mut wanted, &mut node).await,
        };
        driver.abort();
        drop(client);
        match outcome {
            Outcome::Stop => return,
            Outcome::Lost(why) => {
                bridge.log(
                    Level::Error,
                    format!("connection to postgres {target} lost: {why}; reconnecting"),
                );
                if node.listens() {
                    bridge.push(Event::Disconnected);
                }
                node.tell_followers(&node::ToFollower::Down);
                // the outage is logged: further failed attempts go to the debug log
                failures = 1;
                if sleep_or_stop(backoff.step(), &mut rx, &mut wanted, &bridge, &mut node).await {
                    return;
                }
            }
        }
    }
}

/// A connection lost in the middle of a batch of publishes: those it did not send yet.
struct Lost {
    why: String,
    unsent: Vec<Publish>,
}

/// A live connection.
struct Session<'a> {
    client: &'a tokio_postgres::Client,
    publish: &'a tokio_postgres::Statement,
    /// The store's configuration and statements, when some location stores messages.
    store: Option<(&'a store::StoreConfig, &'a store::Statements)>,
    bridge: &'a Bridge,
}

impl Session<'_> {
    /// Runs commands until the connection is lost or the worker stops.
    async fn serve(
        &self,
        driver: &mut tokio::task::JoinHandle<String>,
        rx: &mut mpsc::UnboundedReceiver<Command>,
        wanted: &mut Wanted,
        node: &mut node::Node,
    ) -> Outcome {
        let mut tick = tokio::time::interval(LIVENESS_INTERVAL);
        tick.tick().await;
        let every = self.store.map_or(Duration::from_secs(3600), |(cfg, _)| cfg.clean_every);
        let mut clean = tokio::time::interval(every);
        clean.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                why = &mut *driver => {
                    return Outcome::Lost(why.unwrap_or_else(|e| e.to_string()));
                }
                cmd = rx.recv() => {
                    let Some(cmd) = cmd else { return Outcome::Stop };
                    // whatever else is queued goes in the same round trips
                    let mut batch = vec![cmd];
                    while let Ok(c) = rx.try_recv() {
                        batch.push(c);
                    }
                    let done = self.run_batch(batch, wanted, node).await;
                    self.bridge.pay();
                    match done {
                        Ok(true) => return Outcome::Stop,
                        Ok(false) => {}
                        Err(why) => return Outcome::Lost(why),
                    }
                }
                _ = clean.tick(), if self.store.is_some() => {
                    if let Some((cfg, stmts)) = self.store {
                        match stmts.clean(self.client, cfg).await {
                            Ok(Some(n)) if n > 0 => self.bridge.log(
                                Level::Debug,
                                format!("store: the cleaner deleted {n} message(s)"),
                            ),
                            Ok(_) => {}
                            Err(e) if e.is_closed() => return Outcome::Lost(chain(&e)),
                            Err(e) => self.bridge.log(
                                Level::Error,
                                format!("store: cleaning failed: {}", store_error(&e)),
                            ),
                        }
                    }
                }
                _ = tick.tick() => {
                    let alive = self.client.simple_query("");
                    match tokio::time::timeout(LIVENESS_TIMEOUT, alive).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return Outcome::Lost(chain(&e)),
                        Err(_) => return Outcome::Lost(String::from("liveness check timed out")),
                    }
                }
            }
        }
    }

    /// One batch of commands: all (UN)LISTENs in one round trip, then the publishes.
    /// Returns true on Stop.
    async fn run_batch(
        &self,
        batch: Vec<Command>,
        wanted: &mut Wanted,
        node: &mut node::Node,
    ) -> Result<bool, String> {
        let mut sql = String::new();
        let mut listened = Vec::new();
        let mut publishes = Vec::new();
        let mut histories = Vec::new();
        let mut fresh = Vec::new();
        let mut stop = false;
        let mut replies = node::Replies::default();
        for c in batch {
            match c {
                Command::Listen(ch) => {
                    if node.listen(&ch, &mut wanted.channels, &mut replies) {
                        sql.push_str(&listen_sql("LISTEN", [&ch].into_iter()));
                    }
                    // a follower's are listened once its leader says so
                    if node.listens() {
                        fresh.push(ch.clone());
                        listened.push(ch);
                    }
                }
                Command::Acked(names) => {
                    fresh.extend(names.iter().cloned());
                    listened.extend(names);
                }
                Command::Unlisten(ch) => {
                    if node.unlisten(&ch, &mut wanted.channels, &mut replies) {
                        sql.push_str(&listen_sql("UNLISTEN", [&ch].into_iter()));
                    }
                }
                Command::Peer(w, msg) => {
                    let (mut listen, mut unlisten) = (Vec::new(), Vec::new());
                    let channels = &mut wanted.channels;
                    node.peer(w, msg, channels, &mut listen, &mut unlisten, &mut replies);
                    sql.push_str(&listen_sql("UNLISTEN", unlisten.iter()));
                    sql.push_str(&listen_sql("LISTEN", listen.iter()));
                }
                Command::Resync => node.resync(&wanted.channels, &mut replies),
                Command::Publish(p) => publishes.push(p),
                Command::History { id, channels } => histories.push((id, channels)),
                Command::Stop => stop = true,
            }
        }
        let listened_now = async {
            if !sql.is_empty() {
                if let Err(e) = self.client.batch_execute(&sql).await {
                    return Err(format!("LISTEN/UNLISTEN failed: {}", chain(&e)));
                }
            }
            if let (Some((_, stmts)), false) = (self.store, fresh.is_empty()) {
                // where the new channels stand once listened (a follower's: once its
                // leader has): every message notified from then on comes after it (one
                // committed in between is notified too, and seen as delivered), and after
                // a reconnect the worker catches up from there
                match stmts.positions(self.client, &fresh).await {
                    Ok(p) if !p.is_empty() => self.bridge.push(Event::Positions(p)),
                    Ok(_) => {}
                    Err(e) if e.is_closed() => return Err(chain(&e)),
                    Err(e) => self.bridge.log(
                        Level::Error,
                        format!("store: reading channel positions failed: {}", store_error(&e)),
                    ),
                }
            }
            Ok(())
        }
        .await;
        // answered even when the connection failed: LISTENed again on reconnect
        if !listened.is_empty() {
            self.bridge.push(Event::Listening(listened));
        }
        node.reply(replies);
        if let Err(why) = listened_now {
            publishes.into_iter().for_each(|p| wanted.hold(p));
            histories.into_iter().for_each(|h| wanted.hold_history(h));
            return Err(why);
        }
        self.finish(publishes, histories, wanted).await?;
        Ok(stop)
    }

    /// Publishes, then reads histories. What a lost connection did not send or read waits
    /// for the next one: nothing stays unanswered.
    async fn finish(
        &self,
        publishes: Vec<Publish>,
        histories: Vec<History>,
        wanted: &mut Wanted,
    ) -> Result<(), String> {
        if let Err(lost) = self.publish_batch(publishes).await {
            lost.unsent.into_iter().for_each(|p| wanted.hold(p));
            histories.into_iter().for_each(|h| wanted.hold_history(h));
            return Err(lost.why);
        }
        let mut histories = histories.into_iter();
        while let Some(h) = histories.next() {
            if let Err(why) = self.history(&h).await {
                wanted.hold_history(h);
                histories.for_each(|h| wanted.hold_history(h));
                return Err(why);
            }
        }
        Ok(())
    }

    /// A subscriber's history; only a lost connection is an error (the history is then
    /// not answered: the caller keeps it for the next connection).
    async fn history(&self, (id, channels): &History) -> Result<(), String> {
        let id = *id;
        let Some((cfg, stmts)) = self.store else {
            self.bridge.push(Event::History { id, result: Ok(Vec::new()) });
            return Ok(());
        };
        let mut lists = Vec::with_capacity(channels.len());
        for (channel, since) in channels {
            match stmts.history(self.client, cfg, channel, since).await {
                Ok(list) => lists.push(list),
                Err(e) if e.is_closed() => {
                    return Err(format!("reading history failed: {}", store_error(&e)));
                }
                Err(e) => {
                    let why = store_error(&e);
                    self.bridge.push(Event::History { id, result: Err(why) });
                    return Ok(());
                }
            }
        }
        self.bridge.push(Event::History { id, result: Ok(lists) });
        Ok(())
    }

    /// Sends publishes as few statements as possible; each statement is its own
    /// transaction. Stored ones go through the store's function, the others through
    /// `pg_notify`.
    ///
    /// PostgreSQL folds identical (channel, payload) pairs within one transaction into one
    /// notification, so a repeated pair starts a new statement (stored messages are unique
    /// already: each carries its row id). Errors of a statement are reported to its
    /// publishers; a lost connection is returned.
    async fn publish_batch(&self, mut publishes: Vec<Publish>) -> Result<(), Lost> {
        // an admin DELETE of a stored channel forgets its history first
        for k in 0..publishes.len() {
            let p = &mut publishes[k];
            if !p.stored || crate::protocol::payload::deleted_text(&p.payload).is_none() {
                continue;
            }
            if let Some((_, stmts)) = self.store {
                match stmts.reset(self.client, &p.channel).await {
                    Ok(()) => {}
                    // none was sent: all go again (a reset again too)
                    Err(e) if e.is_closed() => {
                        return Err(Lost { why: chain(&e), unsent: publishes });
                    }
                    Err(e) => self.bridge.log(
                        Level::Error,
                        format!("store: resetting \"{}\" failed: {}", p.channel, store_error(&e)),
                    ),
                }
            }
            p.channel = crate::protocol::channels::listen_name(&p.channel).into_owned();
            p.stored = false;
        }
        let (stored, plain): (Vec<Publish>, Vec<Publish>) =
            publishes.into_iter().partition(|p| p.stored && self.store.is_some());
        let mut groups = split_unique(plain).into_iter();
        while let Some(group) = groups.next() {
            let (ids, (channels, payloads)): (Vec<u64>, (Vec<String>, Vec<String>)) =
                group.into_iter().map(|p| (p.id, (p.channel, p.payload))).unzip();
            let outcome = self.client.execute(self.publish, &[&channels, &payloads]).await;
            if let Err(why) = self.published(ids, outcome.map(|_| Vec::new())) {
                let unsent = groups.flatten().chain(stored).collect();
                return Err(Lost { why, unsent });
            }
        }
        if let (Some((cfg, stmts)), false) = (self.store, stored.is_empty()) {
            let each: Vec<(&str, &str)> =
                stored.iter().map(|p| (p.channel.as_str(), p.payload.as_str())).collect();
            let outcome = stmts.publish(self.client, cfg, &each).await;
            let ids = stored.iter().map(|p| p.id).collect();
            self.published(ids, outcome).map_err(|why| Lost { why, unsent: Vec::new() })?;
        }
        Ok(())
    }

    fn published(
        &self,
        ids: Vec<u64>,
        outcome: Result<Vec<i64>, tokio_postgres::Error>,
    ) -> Result<(), String> {
        match outcome {
            Ok(stored) => self.bridge.push(Event::Published { ids, error: None, stored }),
            Err(e) if e.is_closed() || e.as_db_error().is_none() => {
                let why = chain(&e);
                self.bridge.push(Event::Published {
                    ids,
                    error: Some(why.clone()),
                    stored: Vec::new(),
                });
                return Err(format!("publish failed: {why}"));
            }
            Err(e) => self.bridge.push(Event::Published {
                ids,
                error: Some(store_error(&e)),
                stored: Vec::new(),
            }),
        }
        Ok(())
    }
}

/// An SQL error with its SQLSTATE, for the log and the publisher's explain.
fn store_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => chain(e),
    }
}

/// Splits publishes, in order, into groups without a repeated (channel, payload) pair.
pub fn split_unique(publishes: Vec<Publish>) -> Vec<Vec<Publish>> {
    let mut groups: Vec<Vec<Publish>> = Vec::new();
    let mut seen: std::collections::HashSet<(String, String)> = Default::default();
    for p in publishes {
        let key = (p.channel.clone(), p.payload.clone());
        if groups.is_empty() || seen.contains(&key) {
            groups.push(Vec::new());
            seen.clear();
        }
        seen.insert(key);
        groups.last_mut().expect("a group").push(p);
    }
    groups
}

/// `LISTEN "a";LISTEN "b";` for the given channels.
pub fn listen_sql<'a>(verb: &str, channels: impl Iterator<Item = &'a String>) -> String {
    let mut sql = String::new();
    for ch in channels {
        sql.push_str(verb);
        sql.push(' ');
        sql.push_str(&quote_ident(ch));
        sql.push(';');
    }
    sql
}

/// Waits out a backoff delay while keeping the wanted set current; true on Stop.
async fn sleep_or_stop(
    delay: Duration,
    rx: &mut mpsc::UnboundedReceiver<Command>,
    wanted: &mut Wanted,
    bridge: &Bridge,
    node: &mut node::Node,
) -> bool {
    let sleep = tokio::time::sleep(delay);
    tokio::pin!(sleep);
    loop {
        tokio::select! {
            _ = &mut sleep => return false,
            cmd = rx.recv() => if wanted.apply_while_down(cmd, false, bridge, node) { return true },
            _ = until(wanted.next_deadline()) => wanted.expire(bridge),
        }
    }
}

/// An error with its causes: tokio-postgres puts the server's message in the source.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let c_s = c.to_string();
        if !s.contains(&c_s) {
            s.push_str(": ");
            s.push_str(&c_s);
        }
        cur = c.source();
    }
    s
}

fn now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(Reconnect::new(ms(100), ms(1000)).unwrap(), 42);
        let d: Vec<Duration> = (0..8).map(|_| b.step()).collect();
        assert!(d[0] >= ms(50) && d[0] <= ms(100), "{d:?}");
        assert!(d[1] >= ms(100) && d[1] <= ms(200), "{d:?}");
        assert!(d[2] >= ms(200) && d[2] <= ms(400), "{d:?}");
        assert!(d.iter().all(|x| *x <= ms(1000)), "{d:?}");
        assert!(d[7] >= ms(500), "{d:?}");
        b.reset();
        assert!(b.step() <= ms(100));
    }

    #[test]
    fn listen_statements_are_quoted() {
        let chans = ["news".to_string(), "a\"b; DROP TABLE x".to_string()];
        assert_eq!(
            listen_sql("LISTEN", chans.iter()),
            "LISTEN \"news\";LISTEN \"a\"\"b; DROP TABLE x\";"
        );
        assert_eq!(listen_sql("UNLISTEN", [].iter()), "");
    }

    #[test]
    fn duplicate_publishes_go_to_separate_statements() {
        let p = |id: u64, c: &str, m: &str| Publish {
            id,
            channel: c.to_string(),
            payload: m.to_string(),
            stored: false,
        };
        let groups = split_unique(vec![
            p(1, "a", "x"),
            p(2, "b", "x"),
            p(3, "a", "y"),
            p(4, "a", "x"),
            p(5, "a", "x"),
            p(6, "b", "x"),
        ]);
        let ids: Vec<Vec<u64>> = groups.iter().map(|g| g.iter().map(|p| p.id).collect()).collect();
        assert_eq!(ids, vec![vec![1, 2, 3], vec![4], vec![5, 6]]);
        assert!(split_unique(Vec::new()).is_empty());
    }

    #[test]
    fn bridge_wakes_once_per_batch() {
        let b = Bridge::new().unwrap();
        b.push(Event::Disconnected);
        b.push(Event::Disconnected);
        assert_eq!(b.drain_wakeups(), 1);
        let mut out = Vec::new();
        assert!(!b.take(&mut out, 1));
        assert_eq!(out.len(), 1);
        assert!(b.take(&mut out, 10));
        assert_eq!(out.len(), 2);
        assert_eq!(b.drain_wakeups(), 0);
    }

    #[test]
    fn side_thread_wakes_when_it_parks_or_events_pile_up() {
        let b = Bridge::new().unwrap();
        let side = b.clone();
        std::thread::spawn(move || {
            Bridge::defer_on_this_thread(true);
            side.push(Event::Disconnected);
            side.push(Event::Disconnected);
            assert_eq!(side.drain_wakeups(), 0, "owed, not written");
            side.pay();
            assert_eq!(side.drain_wakeups(), 1, "paid once");
            side.pay();
            assert_eq!(side.drain_wakeups(), 0, "nothing more owed");
            let mut out = Vec::new();
            assert!(side.take(&mut out, 100), "nginx took them");
            for _ in 0..63 {
                side.push(Event::Disconnected);
            }
            assert_eq!(side.drain_wakeups(), 0, "63 still owed");
            side.push(Event::Disconnected);
            assert_eq!(side.drain_wakeups(), 1, "the 64th wakes at once");
            assert!(side.take(&mut out, 100));
            side.push(Event::Disconnected);
            std::thread::sleep(Duration::from_millis(2));
            side.push(Event::Disconnected);
            assert_eq!(side.drain_wakeups(), 1, "a wake owed for 1 ms is paid by the next push");
        })
        .join()
        .unwrap();
        // another thread (nginx's) still wakes at once when the queue was empty
        let mut out = Vec::new();
        assert!(b.take(&mut out, 100));
        b.push(Event::Disconnected);
        assert_eq!(b.drain_wakeups(), 1);
    }
}
