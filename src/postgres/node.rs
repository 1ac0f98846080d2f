//! One listener per node (`push_stream_postgres_listen node`).
//!
//! Worker 0's side connection LISTENs for the whole node, on the union of every worker's
//! channels; the other workers' side connections never LISTEN, so a notifying commit
//! wakes one session per node instead of one per worker. The workers talk over unix
//! datagram socket pairs made by the master before the fork (one pair per worker), so a
//! worker that nginx respawns after a crash finds its pair again.
//!
//! A follower (every other worker) sends its LISTENs and UNLISTENs to the leader, which
//! acknowledges a LISTEN once it is done and routes each notification to the workers
//! whose channel it is. A follower still has its own connection for publishing, history
//! and the cleaner. When the leader's connection comes back it tells every follower,
//! which then catches up as after a reconnect of its own; a leader that restarts (a
//! crash) asks every follower for its whole set of channels.
//!
//! The datagrams are tiny tagged records: this module encodes and decodes them.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::mpsc;

use super::{Bridge, Command, Event, Level};

/// A follower to the leader.
#[derive(Debug, PartialEq, Eq)]
pub enum ToLeader {
    /// The follower's whole set of channels, replacing what the leader knew of it: sent
    /// when the follower starts and when a new leader asks, in parts of a bounded size
    /// (`last` on the final one). Each part is acknowledged; the last is answered with
    /// [`ToFollower::Relistened`] once every channel is LISTENed.
    Sync {
        nonce: u64,
        names: Vec<String>,
        last: bool,
    },
    /// LISTEN these too; answered with [`ToFollower::Ack`].
    Listen {
        nonce: u64,
        names: Vec<String>,
    },
    Unlisten {
        names: Vec<String>,
    },
}

/// The leader to a follower.
#[derive(Debug, PartialEq, Eq)]
pub enum ToFollower {
    /// A leader started: send your whole set ([`ToLeader::Sync`]).
    Hello,
    /// These channels of the follower's session `nonce` are LISTENed.
    Ack {
        nonce: u64,
        names: Vec<String>,
    },
    Notify {
        channel: String,
        payload: String,
    },
    /// The leader's connection is up again with every channel LISTENed: what was
    /// notified meanwhile is lost, catch up.
    Relistened,
    /// The leader's connection is down.
    Down,
}

fn put_names(names: &[String], out: &mut Vec<u8>) {
    for n in names {
        let len = u16::try_from(n.len()).unwrap_or(u16::MAX);
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&n.as_bytes()[..usize::from(len)]);
    }
}

fn get_names(mut b: &[u8]) -> Option<Vec<String>> {
    let mut names = Vec::new();
    while !b.is_empty() {
        let len = usize::from(u16::from_le_bytes(b.get(..2)?.try_into().ok()?));
        let name = b.get(2..2 + len)?;
        names.push(String::from_utf8(name.to_vec()).ok()?);
        b = &b[2 + len..];
    }
    Some(names)
}

fn get_nonce(b: &[u8]) -> Option<(u64, &[u8])> {
    let nonce = u64::from_le_bytes(b.get(..8)?.try_into().ok()?);
    Some((nonce, &b[8..]))
}

impl ToLeader {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            ToLeader::Sync { nonce, names, .. } | ToLeader::Listen { nonce, names } => {
                out.push(match self {
                    ToLeader::Sync { last: true, .. } => b'S',
                    ToLeader::Sync { .. } => b'P',
                    _ => b'L',
                });
                out.extend_from_slice(&nonce.to_le_bytes());
                put_names(names, &mut out);
            }
            ToLeader::Unlisten { names } => {
                out.push(b'U');
                put_names(names, &mut out);
            }
        }
        out
    }

    pub fn decode(b: &[u8]) -> Option<Self> {
        let (&tag, rest) = b.split_first()?;
        Some(match tag {
            b'S' | b'P' | b'L' => {
                let (nonce, rest) = get_nonce(rest)?;
                let names = get_names(rest)?;
                if tag == b'L' {
                    ToLeader::Listen { nonce, names }
                } else {
                    ToLeader::Sync { nonce, names, last: tag == b'S' }
                }
            }
            b'U' => ToLeader::Unlisten { names: get_names(rest)? },
            _ => return None,
        })
    }
}

impl ToFollower {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            ToFollower::Hello => out.push(b'H'),
            ToFollower::Ack { nonce, names } => {
                out.push(b'A');
                out.extend_from_slice(&nonce.to_le_bytes());
                put_names(names, &mut out);
            }
            ToFollower::Notify { channel, payload } => notify(channel, payload, &mut out),
            ToFollower::Relistened => out.push(b'R'),
            ToFollower::Down => out.push(b'D'),
        }
        out
    }

    pub fn decode(b: &[u8]) -> Option<Self> {
        let (&tag, rest) = b.split_first()?;
        Some(match tag {
            b'H' => ToFollower::Hello,
            b'A' => {
                let (nonce, rest) = get_nonce(rest)?;
                ToFollower::Ack { nonce, names: get_names(rest)? }
            }
            b'N' => {
                let len = usize::from(u16::from_le_bytes(rest.get(..2)?.try_into().ok()?));
                let channel = String::from_utf8(rest.get(2..2 + len)?.to_vec()).ok()?;
                let payload = String::from_utf8(rest[2 + len..].to_vec()).ok()?;
                ToFollower::Notify { channel, payload }
            }
            b'R' => ToFollower::Relistened,
            b'D' => ToFollower::Down,
            _ => return None,
        })
    }
}

/// A notification's datagram, written without building a [`ToFollower`].
pub fn notify(channel: &str, payload: &str, out: &mut Vec<u8>) {
    out.push(b'N');
    put_names(&[channel.to_string()], out);
    out.extend_from_slice(payload.as_bytes());
}

/// Which workers want which channel: bit `w` for worker `w` (at most 64 workers).
#[derive(Default, Debug)]
pub struct Routes {
    masks: HashMap<String, u64>,
    /// Followers resyncing: nothing is routed to them until they are told to catch up.
    muted: u64,
}

impl Routes {
    /// Worker `w` wants `channel`; true when the node did not listen to it yet.
    pub fn add(&mut self, channel: &str, w: usize) -> bool {
        match self.masks.get_mut(channel) {
            Some(m) => {
                *m |= 1 << w;
                false
            }
            None => {
                self.masks.insert(channel.to_string(), 1 << w);
                true
            }
        }
    }

    /// Worker `w` no longer wants `channel`; true when no worker does any more.
    pub fn remove(&mut self, channel: &str, w: usize) -> bool {
        let Some(m) = self.masks.get_mut(channel) else {
            return false;
        };
        *m &= !(1 << w);
        if *m == 0 {
            self.masks.remove(channel);
            return true;
        }
        false
    }

    /// Forgets every channel of worker `w`; gives those no worker wants any more.
    pub fn clear(&mut self, w: usize) -> Vec<String> {
        let mut gone = Vec::new();
        self.masks.retain(|ch, m| {
            *m &= !(1 << w);
            if *m == 0 {
                gone.push(ch.clone());
            }
            *m != 0
        });
        gone
    }

    pub fn mask(&self, channel: &str) -> u64 {
        self.masks.get(channel).copied().unwrap_or(0)
    }
}

/// The sockets a worker's side thread gets: made by the master before the fork.
pub enum Peers {
    /// One side connection per worker (the default, or a single worker).
    Alone,
    /// Worker `me` listens for the node; `followers[w]` reaches worker `w`.
    Leader {
        me: usize,
        followers: Vec<Option<UnixDatagram>>,
    },
    Follower {
        leader: UnixDatagram,
    },
}

/// Routes a notification: to the worker's own nginx thread when it wants the channel,
/// and to each follower that does.
#[derive(Clone)]
pub struct Router {
    me: u64,
    routes: Arc<Mutex<Routes>>,
    outbox: Arc<Vec<Option<Outbox>>>,
}

type Outbox = mpsc::UnboundedSender<Vec<u8>>;

impl Router {
    /// True when the worker's own subscribers want it.
    pub fn route(&self, channel: &str, payload: &str) -> bool {
        // queued under the lock, so that a follower's catch-up signal (queued under it
        // too) is never overtaken
        let routes = self.routes.lock();
        let mask = routes.mask(channel);
        let others = mask & !self.me & !routes.muted;
        if others != 0 {
            let mut d = Vec::with_capacity(channel.len() + payload.len() + 3);
            notify(channel, payload, &mut d);
            for (w, out) in self.outbox.iter().enumerate() {
                if let Some(out) = out.as_ref().filter(|_| others & (1 << w) != 0) {
                    let _ = out.send(d.clone());
                }
            }
        }
        mask & self.me != 0
    }
}

/// The worker's part in the node: what its side connection does with LISTENs.
pub enum Node {
    Alone,
    Leader {
        me: usize,
        router: Router,
        nonces: Vec<u64>,
        /// Per follower in the middle of a Sync: its former channels not named yet.
        syncing: Vec<Option<HashSet<String>>>,
    },
    Follower {
        nonce: u64,
        outbox: Outbox,
    },
}

/// What a batch of commands asks of the node, once its statements have run.
#[derive(Default)]
pub struct Replies {
    acks: Vec<(usize, u64, Vec<String>)>,
    synced: Vec<usize>,
    to_leader: Vec<ToLeader>,
}

impl Node {
    /// Starts the socket tasks (inside the side thread's runtime). `commands` feeds a
    /// follower's requests (leader) or a leader's hello (follower) into the command loop.
    pub fn start(
        peers: Peers,
        commands: mpsc::WeakUnboundedSender<Command>,
        bridge: Arc<Bridge>,
    ) -> Node {
        match peers {
            Peers::Alone => Node::Alone,
            Peers::Leader { me, followers } => {
                let mut outbox = Vec::new();
                for (w, sock) in followers.into_iter().enumerate() {
                    let Some(sock) = sock.and_then(|s| tokio_socket(s, &bridge)) else {
                        outbox.push(None);
                        continue;
                    };
                    let sock = Arc::new(sock);
                    tokio::spawn(read_requests(w, sock.clone(), commands.clone(), bridge.clone()));
                    let (tx, rx) = mpsc::unbounded_channel();
                    // a follower that missed datagrams is made to resync
                    tokio::spawn(send_all(sock, rx, bridge.clone(), Some(ToFollower::Hello)));
                    // a leader that starts asks every follower for its channels
                    let _ = tx.send(ToFollower::Hello.encode());
                    outbox.push(Some(tx));
                }
                let nonces = vec![0; outbox.len()];
                let syncing = vec![None; outbox.len()];
                let router =
                    Router { me: 1 << me, routes: Arc::default(), outbox: Arc::new(outbox) };
                Node::Leader { me, router, nonces, syncing }
            }
            Peers::Follower { leader } => {
                let Some(sock) = tokio_socket(leader, &bridge) else {
                    return Node::Alone;
                };
                let sock = Arc::new(sock);
                let nonce = u64::from(std::process::id()) << 32 ^ super::now_nanos();
                tokio::spawn(read_leader(sock.clone(), nonce, commands, bridge.clone()));
                let (tx, rx) = mpsc::unbounded_channel();
                tokio::spawn(send_all(sock, rx, bridge, None));
                // a follower that starts has no channel yet: whatever a former process in
                // its place had is dropped
                let _ = tx.send(ToLeader::Sync { nonce, names: Vec::new(), last: true }.encode());
                Node::Follower { nonce, outbox: tx }
            }
        }
    }

    /// Whether this side connection LISTENs itself.
    pub fn listens(&self) -> bool {
        !matches!(self, Node::Follower { .. })
    }

    pub fn router(&self) -> Option<Router> {
        match self {
            Node::Leader { router, .. } => Some(router.clone()),
            _ => None,
        }
    }

    /// The worker LISTENs `ch`: true when the connection must LISTEN it now (false for
    /// a follower, whose leader does; `to_leader` then carries it).
    pub fn listen(
        &mut self,
        ch: &str,
        channels: &mut BTreeSet<String>,
        replies: &mut Replies,
    ) -> bool {
        match self {
            Node::Alone => channels.insert(ch.to_string()),
            Node::Leader { me, router, .. } => {
                let first = router.routes.lock().add(ch, *me);
                first && channels.insert(ch.to_string())
            }
            Node::Follower { nonce, .. } => {
                channels.insert(ch.to_string());
                push_names(&mut replies.to_leader, *nonce, ch, false);
                false
            }
        }
    }

    /// The worker UNLISTENs `ch`: true when the connection must UNLISTEN it now.
    pub fn unlisten(
        &mut self,
        ch: &str,
        channels: &mut BTreeSet<String>,
        replies: &mut Replies,
    ) -> bool {
        match self {
            Node::Alone => channels.remove(ch),
            Node::Leader { me, router, .. } => {
                let last = router.routes.lock().remove(ch, *me);
                last && channels.remove(ch)
            }
            Node::Follower { .. } => {
                channels.remove(ch);
                push_names(&mut replies.to_leader, 0, ch, true);
                false
            }
        }
    }

    /// A follower's request (leader only). Fills `listen`/`unlisten` with what the
    /// connection must (UN)LISTEN for the node.
    pub fn peer(
        &mut self,
        w: usize,
        msg: ToLeader,
        channels: &mut BTreeSet<String>,
        listen: &mut Vec<String>,
        unlisten: &mut Vec<String>,
        replies: &mut Replies,
    ) {
        let Node::Leader { router, nonces, syncing, .. } = self else { return };
        let (Some(known), Some(sync)) = (nonces.get_mut(w), syncing.get_mut(w)) else { return };
        let mut routes = router.routes.lock();
        let (nonce, names, last) = match msg {
            ToLeader::Sync { nonce, names, last } => (nonce, names, Some(last)),
            ToLeader::Listen { nonce, names } => (nonce, names, None),
            ToLeader::Unlisten { names } => {
                for n in names {
                    if routes.remove(&n, w) && channels.remove(&n) {
                        unlisten.push(n);
                    }
                }
                return;
            }
        };
        // a Sync, or a new process in the follower's place, starts from nothing: the
        // channels it had stay LISTENed until it is known that it no longer wants them
        if (last.is_some() && sync.is_none()) || *known != nonce {
            *sync = Some(routes.clear(w).into_iter().collect());
            if last.is_some() {
                routes.muted |= 1 << w;
            }
        }
        *known = nonce;
        for n in &names {
            let kept = sync.as_mut().is_some_and(|gone| gone.remove(n));
            if routes.add(n, w) && !kept && channels.insert(n.clone()) {
                listen.push(n.clone());
            }
        }
        if last != Some(false) {
            for n in sync.take().unwrap_or_default() {
                if routes.mask(&n) == 0 && channels.remove(&n) {
                    unlisten.push(n);
                }
            }
        }
        if !names.is_empty() {
            replies.acks.push((w, nonce, names));
        }
        if last == Some(true) {
            replies.synced.push(w);
        }
    }

    /// A new leader asked (follower only): the whole set goes to it.
    pub fn resync(&self, channels: &BTreeSet<String>, replies: &mut Replies) {
        if let Node::Follower { nonce, .. } = self {
            let mut parts = chunks(channels.iter().cloned());
            let last_part = parts.pop().unwrap_or_default();
            for names in parts {
                replies.to_leader.push(ToLeader::Sync { nonce: *nonce, names, last: false });
            }
            replies.to_leader.push(ToLeader::Sync { nonce: *nonce, names: last_part, last: true });
        }
    }

    /// Sends what a batch owes the other workers, once its statements have run.
    pub fn reply(&self, replies: Replies) {
        match self {
            Node::Alone => {}
            Node::Leader { router, .. } => {
                for (w, nonce, names) in replies.acks {
                    for names in chunks(names.into_iter()) {
                        router.send(w, &ToFollower::Ack { nonce, names });
                    }
                }
                for w in replies.synced {
                    let mut routes = router.routes.lock();
                    routes.muted &= !(1 << w);
                    router.send(w, &ToFollower::Relistened);
                }
            }
            Node::Follower { outbox, .. } => {
                for m in replies.to_leader {
                    let _ = outbox.send(m.encode());
                }
            }
        }
    }

    /// The leader's connection is up (every channel LISTENed: followers catch up), or
    /// down.
    pub fn tell_followers(&self, msg: &ToFollower) {
        if let Node::Leader { router, .. } = self {
            let mut routes = router.routes.lock();
            if *msg == ToFollower::Relistened {
                routes.muted = 0;
            }
            for w in 0..router.outbox.len() {
                router.send(w, msg);
            }
        }
    }

    /// While the leader's connection is down: acknowledgements go at once (LISTENed on
    /// reconnect), catch-up signals wait for the reconnect, which tells every follower.
    pub fn reply_while_down(&self, mut replies: Replies) {
        replies.synced.clear();
        self.reply(replies);
    }
}

impl Router {
    fn send(&self, w: usize, msg: &ToFollower) {
        if let Some(Some(out)) = self.outbox.get(w) {
            let _ = out.send(msg.encode());
        }
    }
}

/// The most bytes of names in one record, so that every record fits a datagram.
const PART: usize = 8 * 1024;

fn size(names: &[String]) -> usize {
    names.iter().map(|n| n.len() + 2).sum()
}

/// Names in parts of at most [`PART`] bytes (at least one part, maybe empty).
fn chunks(names: impl Iterator<Item = String>) -> Vec<Vec<String>> {
    let mut parts = vec![Vec::new()];
    for n in names {
        match parts.last_mut().filter(|p| size(p) < PART) {
            Some(p) => p.push(n),
            None => parts.push(vec![n]),
        }
    }
    parts
}

/// Appends `ch` to the last message if it is a LISTEN (or UNLISTEN) too.
fn push_names(out: &mut Vec<ToLeader>, nonce: u64, ch: &str, unlisten: bool) {
    match (out.last_mut(), unlisten) {
        (Some(ToLeader::Listen { names, .. }), false)
        | (Some(ToLeader::Unlisten { names }), true)
            if size(names) < PART =>
        {
            names.push(ch.to_string());
        }
        (_, false) => out.push(ToLeader::Listen { nonce, names: vec![ch.to_string()] }),
        (_, true) => out.push(ToLeader::Unlisten { names: vec![ch.to_string()] }),
    }
}

fn tokio_socket(s: UnixDatagram, bridge: &Bridge) -> Option<tokio::net::UnixDatagram> {
    let s = s.set_nonblocking(true).and_then(|()| tokio::net::UnixDatagram::from_std(s));
    match s {
        Ok(s) => Some(s),
        Err(e) => {
            bridge.log(Level::Alert, format!("node listener: cannot use its socket: {e}"));
            None
        }
    }
}

/// What a read takes: a datagram as long is cut short (and said so). A record is at
/// most a notification (8000 bytes and its channel) or [`PART`] bytes of names.
const DATAGRAM: usize = 64 * 1024;
/// The longest batch sent.
const BATCH_MAX: usize = 60 * 1024;
/// How long a send may wait for a worker that does not read; past it, it is stalled.
const STALL: Duration = Duration::from_secs(2);

/// Sends datagrams in order. A peer that reads nothing for [`STALL`] (a crashed worker
/// not yet replaced) is stalled: what is sent to it meanwhile is dropped without waiting,
/// and `resume` (a follower's catch-up signal) goes first once it reads again: it is
/// offered with the next datagram, and every second meanwhile.
async fn send_all(
    sock: Arc<tokio::net::UnixDatagram>,
    mut rx: mpsc::UnboundedReceiver<Vec<u8>>,
    bridge: Arc<Bridge>,
    resume: Option<ToFollower>,
) {
    let resume = resume.map(|m| m.encode());
    let mut stalled = false;
    // a stalled peer reads again once it takes the catch-up signal
    let back = |stalled: &mut bool| {
        if resume.as_ref().map_or(Ok(0), |r| sock.try_send(r)).is_ok() {
            *stalled = false;
            bridge.log(Level::Notice, "node listener: a worker reads its socket again".into());
        }
    };
    let mut carry: Option<Vec<u8>> = None;
    loop {
        let first = match carry.take() {
            Some(d) => d,
            // the signal is offered every second, even when nothing more is sent
            None if stalled => match tokio::time::timeout(STALL / 2, rx.recv()).await {
                Ok(Some(d)) => d,
                Ok(None) => return,
                Err(_) => {
                    back(&mut stalled);
                    continue;
                }
            },
            None => match rx.recv().await {
                Some(d) => d,
                None => return,
            },
        };
        // what queued up meanwhile leaves in the same datagram, up to its limit
        let d = match rx.try_recv() {
            Err(_) => first,
            Ok(second) if 1 + 8 + first.len() + second.len() > BATCH_MAX => {
                carry = Some(second);
                first
            }
            Ok(second) => {
                let mut batch = vec![BATCH];
                for r in [first, second] {
                    put_record(&r, &mut batch);
                }
                while let Ok(r) = rx.try_recv() {
                    if batch.len() + 4 + r.len() > BATCH_MAX {
                        carry = Some(r);
                        break;
                    }
                    put_record(&r, &mut batch);
                }
                batch
            }
        };
        if stalled {
            back(&mut stalled);
            if stalled {
                continue;
            }
        }
        match tokio::time::timeout(STALL, sock.send(&d)).await {
            Ok(Ok(_)) => {}
            // nobody holds the other end any more: its configuration's workers are gone
            // (a reload, a shutdown) and so is anything to send them
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                bridge.log(Level::Info, "node listener: the other end has gone away".into());
                return;
            }
            Ok(Err(e)) => {
                bridge.log(Level::Error, format!("node listener: send() failed: {e}"));
            }
            Err(_) => {
                stalled = true;
                bridge.log(
                    Level::Error,
                    "node listener: a worker has not read its socket for 2s; dropping what is \
                     sent to it until it reads again (it then catches up)"
                        .into(),
                );
            }
        }
    }
}

/// Reads datagrams and hands `on_record` each record, until it returns false or the
/// socket fails.
async fn read_records(
    sock: Arc<tokio::net::UnixDatagram>,
    bridge: &Bridge,
    mut on_record: impl FnMut(&[u8]) -> bool,
) {
    let mut buf = vec![0u8; DATAGRAM + 1];
    loop {
        let n = match sock.recv(&mut buf).await {
            Ok(n) if n > DATAGRAM => {
                bridge.log(Level::Error, "node listener: a datagram too long, dropped".into());
                continue;
            }
            Ok(n) => n,
            Err(e) => {
                bridge.log(Level::Error, format!("node listener: recv() failed: {e}"));
                return;
            }
        };
        if !records(&buf[..n]).into_iter().all(&mut on_record) {
            return;
        }
    }
}

/// The leader reads a follower's requests into its command loop.
async fn read_requests(
    w: usize,
    sock: Arc<tokio::net::UnixDatagram>,
    commands: mpsc::WeakUnboundedSender<Command>,
    bridge: Arc<Bridge>,
) {
    read_records(sock, &bridge, |record| {
        let Some(msg) = ToLeader::decode(record) else {
            bridge.log(Level::Error, "node listener: a request that does not parse".into());
            return true;
        };
        commands.upgrade().is_some_and(|tx| tx.send(Command::Peer(w, msg)).is_ok())
    })
    .await;
}

/// A follower reads what its leader sends.
async fn read_leader(
    sock: Arc<tokio::net::UnixDatagram>,
    nonce: u64,
    commands: mpsc::WeakUnboundedSender<Command>,
    bridge: Arc<Bridge>,
) {
    read_records(sock, &bridge, |record| follow(record, nonce, &commands, &bridge)).await;
}

/// Acts on one record from the leader; false when the worker is stopping.
fn follow(
    record: &[u8],
    nonce: u64,
    commands: &mpsc::WeakUnboundedSender<Command>,
    bridge: &Bridge,
) -> bool {
    {
        match ToFollower::decode(record) {
            Some(ToFollower::Notify { channel, payload }) => {
                bridge.push(Event::Notification { channel, payload })
            }
            // acknowledgements for a former process in this worker's place are not ours
            // through the command loop, which reads where the channels stand first
            Some(ToFollower::Ack { nonce: n, names }) if n == nonce => {
                let Some(tx) = commands.upgrade() else { return false };
                let _ = tx.send(Command::Acked(names));
            }
            Some(ToFollower::Ack { .. }) => {}
            Some(ToFollower::Relistened) => bridge.push(Event::Connected { relistened: true }),
            Some(ToFollower::Down) => bridge.push(Event::Disconnected),
            Some(ToFollower::Hello) => {
                let Some(tx) = commands.upgrade() else { return false };
                let _ = tx.send(Command::Resync);
            }
            None => {
                bridge.log(Level::Error, "node listener: a datagram that does not parse".into())
            }
        }
    }
    true
}

/// The tag of a datagram that carries several records, each after its u32 length.
const BATCH: u8 = b'M';

fn put_record(r: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(r.len() as u32).to_le_bytes());
    out.extend_from_slice(r);
}

/// The records of a datagram: itself, or those of a batch (a truncated one ends early).
pub fn records(mut d: &[u8]) -> Vec<&[u8]> {
    if d.first() != Some(&BATCH) {
        return vec![d];
    }
    d = &d[1..];
    let mut out = Vec::new();
    while let Some(len) = d.get(..4).and_then(|b| b.try_into().ok()).map(u32::from_le_bytes) {
        let Some(r) = d.get(4..4 + len as usize) else { break };
        out.push(r);
        d = &d[4 + len as usize..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        let names = vec!["news".to_string(), String::new(), "é\n".to_string()];
        for m in [
            ToLeader::Sync { nonce: 7, names: names.clone(), last: true },
            ToLeader::Sync { nonce: 7, names: vec![], last: false },
            ToLeader::Listen { nonce: u64::MAX, names: vec![] },
            ToLeader::Unlisten { names: names.clone() },
        ] {
            assert_eq!(ToLeader::decode(&m.encode()), Some(m));
        }
        for m in [
            ToFollower::Hello,
            ToFollower::Ack { nonce: 3, names },
            ToFollower::Notify { channel: "a".into(), payload: "\u{1b}m{\"t\":1}".into() },
            ToFollower::Notify { channel: String::new(), payload: String::new() },
            ToFollower::Relistened,
            ToFollower::Down,
        ] {
            assert_eq!(ToFollower::decode(&m.encode()), Some(m));
        }
    }

    #[test]
    fn truncated_or_unknown_datagrams_are_refused() {
        assert_eq!(ToLeader::decode(b""), None);
        assert_eq!(ToLeader::decode(b"S\x01\x02"), None);
        assert_eq!(ToLeader::decode(b"U\x05\x00ab"), None);
        assert_eq!(ToFollower::decode(b"N\x09\x00ab"), None);
        assert_eq!(ToFollower::decode(b"Z"), None);
    }

    #[test]
    fn batches_carry_records_in_order() {
        let a = ToFollower::Notify { channel: "a".into(), payload: "1".into() }.encode();
        let b = ToFollower::Relistened.encode();
        let mut batch = vec![BATCH];
        put_record(&a, &mut batch);
        put_record(&b, &mut batch);
        assert_eq!(records(&batch), [&a[..], &b[..]]);
        assert_eq!(records(&a), [&a[..]]);
        assert_eq!(records(&batch[..batch.len() - 1]), [&a[..]]);
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_follower_sync_replaces_its_channels() {
        let router = Router { me: 1, routes: Arc::default(), outbox: Arc::new(vec![None, None]) };
        let mut node = Node::Leader {
            me: 0,
            router: router.clone(),
            nonces: vec![0; 2],
            syncing: vec![None; 2],
        };
        let mut ch = BTreeSet::new();
        let mut step = |msg| {
            let (mut l, mut u, mut r) = (Vec::new(), Vec::new(), Replies::default());
            node.peer(1, msg, &mut ch, &mut l, &mut u, &mut r);
            u.sort();
            (l, u, r.acks.len(), r.synced)
        };
        let listen = |nonce, v: &[&str]| ToLeader::Listen { nonce, names: names(v) };
        let sync = |v: &[&str], last| ToLeader::Sync { nonce: 5, names: names(v), last };
        assert_eq!(step(listen(5, &["a", "b"])), (names(&["a", "b"]), vec![], 1, vec![]));
        // a Sync in two parts keeps b, adds c and drops a, then tells the follower
        assert_eq!(step(sync(&["b"], false)), (vec![], vec![], 1, vec![]));
        assert_eq!(router.routes.lock().muted, 0b10);
        assert_eq!(step(sync(&["c"], true)), (names(&["c"]), names(&["a"]), 1, vec![1]));
        // a new process in the follower's place starts from nothing
        assert_eq!(step(listen(6, &["d"])), (names(&["d"]), names(&["b", "c"]), 1, vec![]));
        assert_eq!(ch.into_iter().collect::<Vec<_>>(), names(&["d"]));
    }

    #[test]
    fn names_go_in_bounded_parts() {
        let many: Vec<String> = (0..2000).map(|i| format!("channel-{i:05}")).collect();
        let parts = chunks(many.clone().into_iter());
        assert!(parts.len() > 1);
        assert!(parts.iter().all(|p| size(p) <= PART + 16));
        assert_eq!(parts.concat(), many);
        assert_eq!(chunks(std::iter::empty()), vec![Vec::<String>::new()]);
    }

    #[test]
    fn routes_count_workers_per_channel() {
        let mut r = Routes::default();
        assert!(r.add("a", 0));
        assert!(!r.add("a", 3));
        assert!(r.add("b", 3));
        assert_eq!(r.mask("a"), 0b1001);
        assert!(!r.remove("a", 0));
        assert!(!r.remove("x", 0));
        let mut gone = r.clear(3);
        gone.sort();
        assert_eq!(gone, ["a", "b"]);
        assert_eq!(r.mask("a"), 0);
    }
}
