//! pgpush-loadgen: WebSocket subscribers and a publisher against a push server on this
//! machine (pgpush or nchan), reporting deliveries, latency and the server's memory and CPU.
//!
//! The phases: connect N subscribers over C channels (bounded concurrency), settle, sample
//! the nginx workers' memory, publish M messages at R msg/s (pg_notify, HTTP POST or
//! WebSocket text frames), drain, sample CPU, report. With --churn instead of messages:
//! keep replacing subscribers (leave, then a new handshake) for a while, then sample
//! memory again. Every phase is bounded by --deadline.

mod churn;
mod eventsource;
mod longpoll;
mod procfs;
mod publish;
mod subscribe;
mod util;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot, watch, Mutex, Semaphore};

use crate::churn::{Churn, ChurnStats, Slot};
use crate::procfs::{Group, Sample};
use crate::publish::{Plan, PubStats, WsRoute};
use crate::subscribe::{LeaveMode, Outcome, Shared, Subscriber};
use crate::util::{channel_name, now_ns, parse_duration};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum PublishVia {
    /// SELECT pg_notify(...) over a PostgreSQL connection (--pg).
    Pg,
    /// HTTP POST with the message as the body (--pub-url).
    Http,
    /// WebSocket text frames to --pub-url (ws://); --publishers connections, connection j
    /// on channel j % channels, so at least one per channel. What the server sends them
    /// is read and dropped.
    Ws,
}

impl PublishVia {
    fn name(self) -> &'static str {
        match self {
            PublishVia::Pg => "pg",
            PublishVia::Http => "http",
            PublishVia::Ws => "ws",
        }
    }
}

/// Load generator for pgpush and nchan. Targets loopback addresses only.
#[derive(Debug, Parser)]
#[command(name = "pgpush-loadgen", version)]
struct Args {
    /// Subscriber URL: ws:// for WebSocket subscribers, http:// for EventSource ones (or
    /// long-polling ones with --long-poll); {channel} is replaced by the subscriber's
    /// channel name.
    #[arg(long, default_value = "ws://127.0.0.1:8080/ws?id={channel}")]
    url: String,
    /// http:// subscribers long-poll: one GET per answer, If-Modified-Since and
    /// If-None-Match from the previous answer.
    #[arg(long)]
    long_poll: bool,
    /// Number of WebSocket subscribers; subscriber i listens on channel i % channels.
    #[arg(long, short = 'n', default_value_t = 100)]
    subscribers: usize,
    /// Number of channels, named PREFIX0..PREFIX{C-1}.
    #[arg(long, short = 'c', default_value_t = 1)]
    channels: usize,
    /// Channel name prefix.
    #[arg(long, default_value = "bench")]
    channel_prefix: String,
    /// Messages to publish, round-robin over the channels (0: measure idle memory only).
    #[arg(long, short = 'm', default_value_t = 100)]
    messages: u64,
    /// Publishing rate in messages per second (0: as fast as possible).
    #[arg(long, short = 'r', default_value_t = 0.0)]
    rate: f64,
    /// Pad each payload to this many bytes (0: no padding, about 40 bytes).
    #[arg(long, default_value_t = 0)]
    size: usize,
    /// How to publish.
    #[arg(long, value_enum, default_value = "pg")]
    publish: PublishVia,
    /// libpq connection string for --publish pg.
    #[arg(long)]
    pg: Option<String>,
    /// Publisher URL for --publish http (http://) or ws (ws://); {channel} is replaced by
    /// the channel name.
    #[arg(long, default_value = "http://127.0.0.1:8080/pub?id={channel}")]
    pub_url: String,
    /// Concurrent publisher connections: PostgreSQL or HTTP keep-alive, each with one
    /// statement or request in flight; for ws, WebSocket connections that send without
    /// waiting for an answer (at least --channels of them).
    #[arg(long, default_value_t = 4)]
    publishers: usize,
    /// Most messages per pg_notify statement (one transaction) when they queue up.
    #[arg(long, default_value_t = 500)]
    batch: usize,
    /// WebSocket handshakes in flight at once.
    #[arg(long, default_value_t = 200)]
    connect_concurrency: usize,
    /// Timeout of one WebSocket connection attempt.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    connect_timeout: Duration,
    /// Pause after every subscriber is connected, before measuring and publishing.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    settle: Duration,
    /// After the last send, stop waiting for deliveries once none arrived for this long.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    drain: Duration,
    /// Hard limit for the whole run.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    deadline: Duration,
    /// Subscriber churn for this long once every subscriber is connected and settled
    /// (needs -m 0; 0: none): --churn-concurrency loops each make one subscriber leave,
    /// open a new one on its channel until the handshake completes, and start over.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    churn: Duration,
    /// Churn loops running at once.
    #[arg(long, default_value_t = 10)]
    churn_concurrency: usize,
    /// How a churned subscriber leaves.
    #[arg(long, value_enum, default_value = "close")]
    churn_leave: LeaveMode,
    /// PID of the nginx master: its children's (the workers') memory and CPU are reported.
    #[arg(long)]
    nginx_pid: Option<u32>,
    /// PID of the PostgreSQL postmaster: its and its backends' CPU is reported.
    #[arg(long)]
    pg_pid: Option<u32>,
    /// Tokio worker threads (one leaves the other cores to the server on a small machine).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Label for the RESULT line.
    #[arg(long, default_value = "run")]
    label: String,
    /// No progress lines on stderr.
    #[arg(long, short = 'q')]
    quiet: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = check(&args) {
        eprintln!("pgpush-loadgen: {e}");
        return ExitCode::from(2);
    }
    let nofile = procfs::raise_nofile_limit();
    let sockets = fds_needed(&args);
    if sockets > nofile {
        eprintln!(
            "pgpush-loadgen: warning: the open files limit ({nofile}) is below the {sockets} \
             this run needs ({} subscribers and the publishers)",
            args.subscribers
        );
    }
    // A backstop in case something hangs past every timeout below.
    let hard = args.deadline + Duration::from_secs(20);
    std::thread::spawn(move || {
        std::thread::sleep(hard);
        eprintln!("pgpush-loadgen: hard deadline passed, exiting");
        std::process::exit(3);
    });
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pgpush-loadgen: tokio runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let code = rt.block_on(run(args));
    rt.shutdown_timeout(Duration::from_secs(2));
    code
}

/// How long the WebSocket publishers keep reading after the drain, for the frames the
/// server still owes them.
const WS_REPLY_GRACE: Duration = Duration::from_secs(2);

fn check(args: &Args) -> Result<(), String> {
    if args.publishers == 0 {
        return Err("--publishers must be at least 1".into());
    }
    if args.channels == 0 {
        return Err("--channels must be at least 1".into());
    }
    if args.subscribers == 0 {
        return Err("--subscribers must be at least 1".into());
    }
    if !(args.rate >= 0.0 && args.rate.is_finite()) {
        return Err("--rate must be 0 or a positive number".into());
    }
    if !args.churn.is_zero() {
        if args.messages > 0 {
            return Err("--churn runs instead of publishing: use it with -m 0".into());
        }
        if args.churn_concurrency == 0 {
            return Err("--churn-concurrency must be at least 1".into());
        }
        if args.url.starts_with("http://") {
            return Err("--churn needs WebSocket subscribers (a ws:// --url)".into());
        }
    }
    util::parse_url(&args.url)?;
    if args.messages > 0 {
        match args.publish {
            PublishVia::Pg => {
                util::check_pg_local(args.pg.as_deref().ok_or("--publish pg needs --pg")?)?
            }
            PublishVia::Http => {
                util::parse_url(&args.pub_url)?;
            }
            PublishVia::Ws => {
                if !args.pub_url.starts_with("ws://") {
                    return Err(format!(
                        "--publish ws needs a ws:// --pub-url, not {}",
                        args.pub_url
                    ));
                }
                util::parse_url(&args.pub_url)?;
                WsRoute::new(args.publishers, args.channels)?;
            }
        }
    }
    for pid in [args.nginx_pid, args.pg_pid].into_iter().flatten() {
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            return Err(format!("no process {pid}"));
        }
    }
    Ok(())
}

/// File descriptors the run holds at most: subscribers, publisher connections, the churn
/// loops' extra connection each, and some to spare.
fn fds_needed(args: &Args) -> u64 {
    let publishers = if args.messages > 0 { args.publishers } else { 0 };
    let churn = if args.churn.is_zero() { 0 } else { args.churn_concurrency };
    (args.subscribers + publishers + churn) as u64 + 64
}

fn progress(args: &Args, msg: &str) {
    if !args.quiet {
        eprintln!("loadgen: {msg}");
    }
}

/// Expected deliveries when the first `sent` messages went round-robin over the channels.
fn expected_deliveries(shared: &Shared, sent: u64) -> u64 {
    let c = shared.per_channel.len() as u64;
    shared
        .per_channel
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let msgs = sent / c + u64::from((i as u64) < sent % c);
            msgs * u64::from(n.load(Ordering::Relaxed))
        })
        .sum()
}

fn percentile(sorted: &[u32], q: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

async fn run(args: Args) -> ExitCode {
    let start = Instant::now();
    let run_start_ns = now_ns();
    let deadline = start + args.deadline;
    let mut timed_out = false;
    let nginx = args.nginx_pid.map(|parent| Group { parent, include_parent: false });
    let postgres = args.pg_pid.map(|parent| Group { parent, include_parent: true });
    let sample = |g: Option<Group>| g.map(|g| g.sample()).unwrap_or_default();

    // Publishers connect first: a wrong address fails before 10,000 connections are open.
    let plan = Arc::new(Plan {
        channels: args.channels,
        prefix: args.channel_prefix.clone(),
        size: args.size,
    });
    let mut pg_clients = Vec::new();
    if args.messages > 0 && args.publish == PublishVia::Pg {
        let conninfo = args.pg.clone().unwrap_or_default();
        for _ in 0..args.publishers.max(1) {
            match publish::pg_connect(&conninfo).await {
                Ok(c) => pg_clients.push(c),
                Err(e) => {
                    eprintln!("pgpush-loadgen: {e}");
                    return ExitCode::from(2);
                }
            }
        }
    }

    let mut ws_pubs = Vec::new();
    if args.messages > 0 && args.publish == PublishVia::Ws {
        for j in 0..args.publishers {
            let channel = WsRoute::channel_of_connection(j, args.channels);
            let url =
                args.pub_url.replace("{channel}", &channel_name(&args.channel_prefix, channel));
            match subscribe::connect(&url, args.connect_timeout).await {
                Ok(ws) => ws_pubs.push(ws),
                Err(e) => {
                    eprintln!("pgpush-loadgen: WebSocket publisher {url}: {e}");
                    return ExitCode::from(2);
                }
            }
        }
    }

    let mem_before = sample(nginx);

    // Connect.
    let shared = Arc::new(Shared::new(args.channels));
    let limit = Arc::new(Semaphore::new(args.connect_concurrency.max(1)));
    let (stop_tx, stop_rx) = watch::channel(false);
    let churning = !args.churn.is_zero();
    let connect_start = Instant::now();
    let mut subs: Vec<Slot> = Vec::with_capacity(args.subscribers);
    for i in 0..args.subscribers {
        let channel = i % args.channels;
        let url = args.url.replace("{channel}", &channel_name(&args.channel_prefix, channel));
        let (leave_tx, leave_rx) = if churning {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let sub = Subscriber {
            url: url.clone(),
            channel,
            limit: limit.clone(),
            connect_timeout: args.connect_timeout,
            shared: shared.clone(),
            stop: stop_rx.clone(),
            since_ns: run_start_ns,
            leave: leave_rx,
            leave_mode: args.churn_leave,
            long_poll: args.long_poll,
        };
        let handle = Some(tokio::spawn(sub.run()));
        subs.push(Slot { channel, url, handle, leave: leave_tx });
    }
    let n = args.subscribers as u64;
    let mut last_note = Instant::now();
    loop {
        let (ok, failed) =
            (shared.connected.load(Ordering::Relaxed), shared.failed.load(Ordering::Relaxed));
        if ok + failed >= n {
            break;
        }
        if Instant::now() >= deadline {
            timed_out = true;
            break;
        }
        if last_note.elapsed() >= Duration::from_secs(2) {
            progress(&args, &format!("{ok} of {n} subscribers connected, {failed} failed"));
            last_note = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let connect_secs = connect_start.elapsed().as_secs_f64();
    let connected = shared.connected.load(Ordering::Relaxed);
    let failed = shared.failed.load(Ordering::Relaxed);
    progress(
        &args,
        &format!(
            "{connected} of {n} subscribers connected in {connect_secs:.2} s, {failed} failed"
        ),
    );
    if !timed_out {
        let left = deadline.saturating_duration_since(Instant::now());
        tokio::time::sleep(args.settle.min(left)).await;
    }
    let mem_idle = sample(nginx);

    // Churn.
    let mut cpu_before = (Sample::default(), Sample::default(), 0u64);
    let mut cpu_after = cpu_before;
    let mut churned = None;
    let mut churn_outcomes = Vec::new();
    if churning && connected > 0 && !timed_out {
        cpu_before = (sample(nginx), sample(postgres), procfs::self_cpu_us());
        let k = args.churn_concurrency.clamp(1, subs.len().max(1));
        progress(
            &args,
            &format!(
                "churning for {:?}: {k} loops, each a leave ({}) and a new subscriber",
                args.churn,
                args.churn_leave.name()
            ),
        );
        let ctx = Arc::new(Churn {
            leave_mode: args.churn_leave,
            connect_timeout: args.connect_timeout,
            shared: shared.clone(),
            stop: stop_rx.clone(),
            since_ns: run_start_ns,
            limit: limit.clone(),
        });
        let churn_start = Instant::now();
        let end = (churn_start + args.churn).min(deadline);
        let loops: Vec<_> = churn::deal(std::mem::take(&mut subs), k)
            .into_iter()
            .map(|hand| tokio::spawn(ctx.clone().run_loop(hand, end)))
            .collect();
        let mut stats = ChurnStats::default();
        for l in loops {
            if let Ok((slots, s)) = l.await {
                subs.extend(slots);
                stats.merge(s);
            }
        }
        let secs = churn_start.elapsed().as_secs_f64();
        cpu_after = (sample(nginx), sample(postgres), procfs::self_cpu_us());
        churn_outcomes = std::mem::take(&mut stats.outcomes);
        progress(
            &args,
            &format!(
                "{} subscribers replaced in {secs:.2} s ({} connects and {} leaves failed)",
                stats.connects, stats.connect_failed, stats.leave_failed
            ),
        );
        if Instant::now() >= deadline {
            timed_out = true;
        } else {
            let left = deadline.saturating_duration_since(Instant::now());
            tokio::time::sleep(args.settle.min(left)).await;
        }
        churned = Some(Churned { stats, secs, mem_after: sample(nginx) });
    }

    // Publish and drain.
    let stats = Arc::new(PubStats::default());
    let mut pub_readers = Vec::new();
    let mut publish_secs = 0.0;
    if args.messages > 0 && connected > 0 && !timed_out {
        cpu_before = (sample(nginx), sample(postgres), procfs::self_cpu_us());
        progress(
            &args,
            &format!(
                "publishing {} messages via {} at {}",
                args.messages,
                args.publish.name(),
                if args.rate > 0.0 { format!("{} msg/s", args.rate) } else { "full speed".into() }
            ),
        );
        let (tx, rx) = mpsc::channel(args.batch.max(1) * 2 + 64);
        let queue = Arc::new(Mutex::new(rx));
        let pub_start = Instant::now();
        let mut tasks = vec![tokio::spawn(publish::pace(tx, args.messages, args.rate))];
        match args.publish {
            PublishVia::Pg => {
                for client in pg_clients.drain(..) {
                    tasks.push(tokio::spawn(publish::pg_publisher(
                        client,
                        queue.clone(),
                        plan.clone(),
                        args.batch,
                        stats.clone(),
                    )));
                }
            }
            PublishVia::Http => {
                let endpoint = util::parse_url(&args.pub_url).expect("checked in check()");
                for _ in 0..args.publishers.max(1) {
                    tasks.push(tokio::spawn(publish::http_publisher(
                        endpoint.clone(),
                        endpoint.path.clone(),
                        queue.clone(),
                        plan.clone(),
                        stats.clone(),
                    )));
                }
            }
            PublishVia::Ws => {
                let route = WsRoute::new(ws_pubs.len(), args.channels).expect("checked in check()");
                let mut senders = Vec::with_capacity(ws_pubs.len());
                for ws in ws_pubs.drain(..) {
                    let (sink, stream) = ws.split();
                    let (tx, rx) = mpsc::channel(256);
                    senders.push(tx);
                    tasks.push(tokio::spawn(publish::ws_writer(
                        sink,
                        rx,
                        plan.clone(),
                        stats.clone(),
                    )));
                    pub_readers.push(tokio::spawn(publish::ws_reader(
                        stream,
                        stop_rx.clone(),
                        stats.clone(),
                    )));
                }
                tasks.push(tokio::spawn(publish::ws_router(
                    queue.clone(),
                    route,
                    plan.clone(),
                    senders,
                    stats.clone(),
                )));
            }
        }
        if !publish::join_all(tasks, deadline).await {
            timed_out = true;
        }
        publish_secs = pub_start.elapsed().as_secs_f64();
        let sent = stats.sent.load(Ordering::Relaxed);
        progress(&args, &format!("{sent} messages sent in {publish_secs:.2} s; draining"));
        let expected = expected_deliveries(&shared, sent);
        loop {
            if shared.received.load(Ordering::Relaxed) >= expected {
                break;
            }
            let last = shared
                .last_recv_ns
                .load(Ordering::Relaxed)
                .max(stats.last_send_ns.load(Ordering::Relaxed));
            if now_ns().saturating_sub(last) >= args.drain.as_nanos() as u64 {
                break;
            }
            if Instant::now() >= deadline {
                timed_out = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        cpu_after = (sample(nginx), sample(postgres), procfs::self_cpu_us());
        if args.publish == PublishVia::Ws {
            // What the server sends the WebSocket publishers (one frame per message, from
            // either server) may trail the last delivery: wait a little for it, so that
            // the count is whole, outside the CPU window.
            let until = (Instant::now() + WS_REPLY_GRACE).min(deadline);
            while stats.replies.load(Ordering::Relaxed) < sent && Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }

    // Stop the subscribers and collect what they saw.
    let _ = stop_tx.send(true);
    let mut outcomes: Vec<Outcome> = Vec::with_capacity(subs.len() + churn_outcomes.len());
    outcomes.append(&mut churn_outcomes);
    let collect_until = Instant::now() + Duration::from_secs(10);
    for h in subs.into_iter().filter_map(|s| s.handle) {
        let left = collect_until.saturating_duration_since(Instant::now());
        let abort = h.abort_handle();
        match tokio::time::timeout(left, h).await {
            Ok(Ok(o)) => outcomes.push(o),
            _ => abort.abort(),
        }
    }
    for h in pub_readers {
        let left = collect_until.saturating_duration_since(Instant::now());
        let abort = h.abort_handle();
        match tokio::time::timeout(left, h).await {
            Ok(Ok(Some(e))) => outcomes.push(Outcome { error: Some(e), ..Outcome::default() }),
            Ok(_) => {}
            Err(_) => abort.abort(),
        }
    }

    let report = Report::build(
        &args,
        &shared,
        &stats,
        outcomes,
        Phases {
            connect_secs,
            publish_secs,
            mem_before,
            mem_idle,
            cpu_before,
            cpu_after,
            churned,
            timed_out,
        },
    );
    report.print(&args);
    if timed_out || connected == 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

struct Phases {
    connect_secs: f64,
    publish_secs: f64,
    mem_before: Sample,
    mem_idle: Sample,
    /// (nginx workers, postgres, this process in µs) before and after publishing or
    /// churning.
    cpu_before: (Sample, Sample, u64),
    cpu_after: (Sample, Sample, u64),
    churned: Option<Churned>,
    timed_out: bool,
}

/// What the churn phase did.
struct Churned {
    stats: ChurnStats,
    secs: f64,
    /// The nginx workers after the churn and --settle.
    mem_after: Sample,
}

/// `after - before` in KiB, negative when memory went down.
fn growth_kb(before: u64, after: u64) -> i64 {
    after as i64 - before as i64
}

/// The figures, in the order they are printed on the RESULT line.
struct Report {
    fields: Vec<(&'static str, String)>,
    errors: BTreeMap<String, u64>,
}

impl Report {
    fn build(
        args: &Args,
        shared: &Shared,
        stats: &PubStats,
        outcomes: Vec<Outcome>,
        p: Phases,
    ) -> Report {
        let connected = shared.connected.load(Ordering::Relaxed);
        let sent = stats.sent.load(Ordering::Relaxed);
        let expected = expected_deliveries(shared, sent);
        let mut received = 0u64;
        let mut unparsed = 0u64;
        let mut stale = 0u64;
        let mut binary = 0u64;
        let mut errors = BTreeMap::new();
        let mut lat: Vec<u32> = Vec::with_capacity(expected.min(50_000_000) as usize);
        for o in outcomes {
            received += o.received;
            unparsed += o.unparsed;
            stale += o.stale;
            binary += o.binary;
            lat.extend_from_slice(&o.latencies);
            if let Some(e) = o.error {
                // Group by the message's first words, not per connection.
                let key: String = e.chars().take(80).collect();
                *errors.entry(key).or_insert(0) += 1;
            }
        }
        lat.sort_unstable();
        let first_send = stats.first_send_ns.load(Ordering::Relaxed);
        let last_recv = shared.last_recv_ns.load(Ordering::Relaxed);
        let window = if first_send > 0 && last_recv > first_send {
            (last_recv - first_send) as f64 / 1e9
        } else {
            0.0
        };
        let rate = |n: u64, secs: f64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
        let per_sub = |before: u64, after: u64| {
            if connected > 0 {
                (after.saturating_sub(before) * 1024) as f64 / connected as f64
            } else {
                0.0
            }
        };
        let nginx_cpu_us = p.cpu_after.0.cpu_us().saturating_sub(p.cpu_before.0.cpu_us());
        let pg_cpu_us = p.cpu_after.1.cpu_us().saturating_sub(p.cpu_before.1.cpu_us());
        let self_cpu_us = p.cpu_after.2.saturating_sub(p.cpu_before.2);
        let per_delivery = |us: u64| if received > 0 { us as f64 / received as f64 } else { 0.0 };

        let f0 = |v: f64| format!("{v:.0}");
        let f2 = |v: f64| format!("{v:.2}");
        let f3 = |v: f64| format!("{v:.3}");
        let mut fields = vec![
            ("label", args.label.clone()),
            ("subscribers", args.subscribers.to_string()),
            ("channels", args.channels.to_string()),
            ("messages", args.messages.to_string()),
            ("rate", args.rate.to_string()),
            ("size", args.size.to_string()),
            ("publish", args.publish.name().to_string()),
            ("connected", connected.to_string()),
            ("connect_failed", shared.failed.load(Ordering::Relaxed).to_string()),
            ("dropped", shared.dropped.load(Ordering::Relaxed).to_string()),
            ("connect_s", f2(p.connect_secs)),
            ("workers", p.mem_idle.processes.to_string()),
            ("rss_before_kb", p.mem_before.rss_kb.to_string()),
            ("rss_idle_kb", p.mem_idle.rss_kb.to_string()),
            ("pss_before_kb", p.mem_before.pss_kb.to_string()),
            ("pss_idle_kb", p.mem_idle.pss_kb.to_string()),
            ("rss_per_sub_b", f0(per_sub(p.mem_before.rss_kb, p.mem_idle.rss_kb))),
            ("pss_per_sub_b", f0(per_sub(p.mem_before.pss_kb, p.mem_idle.pss_kb))),
            ("sent", sent.to_string()),
            ("publish_errors", stats.errors.load(Ordering::Relaxed).to_string()),
            ("statements", stats.statements.load(Ordering::Relaxed).to_string()),
            ("publish_s", f2(p.publish_secs)),
            ("publish_rate", f0(rate(sent, p.publish_secs))),
            ("expected", expected.to_string()),
            ("received", received.to_string()),
            ("lost", expected.saturating_sub(received).to_string()),
            ("extra", received.saturating_sub(expected).to_string()),
            ("unparsed", unparsed.to_string()),
            ("stale", stale.to_string()),
            ("binary_frames", binary.to_string()),
            ("window_s", f3(window)),
            ("deliveries_per_s", f0(rate(received, window))),
            ("p50_us", percentile(&lat, 0.50).to_string()),
            ("p90_us", percentile(&lat, 0.90).to_string()),
            ("p99_us", percentile(&lat, 0.99).to_string()),
            ("max_us", lat.last().copied().unwrap_or(0).to_string()),
            ("nginx_cpu_ms", f0(nginx_cpu_us as f64 / 1000.0)),
            ("nginx_cpu_us_per_delivery", f3(per_delivery(nginx_cpu_us))),
            ("pg_cpu_ms", f0(pg_cpu_us as f64 / 1000.0)),
            ("pg_cpu_us_per_delivery", f3(per_delivery(pg_cpu_us))),
            ("loadgen_cpu_ms", f0(self_cpu_us as f64 / 1000.0)),
            ("pub_replies", stats.replies.load(Ordering::Relaxed).to_string()),
            ("timed_out", u8::from(p.timed_out).to_string()),
        ];
        if let Some(c) = &p.churned {
            let s = &c.stats;
            let mut hs = s.handshake_us.clone();
            hs.sort_unstable();
            let mut leave = s.leave_us.clone();
            leave.sort_unstable();
            let per_cycle =
                |us: u64| if s.connects > 0 { us as f64 / s.connects as f64 } else { 0.0 };
            fields.extend([
                ("churn_s", f2(c.secs)),
                ("churn_concurrency", args.churn_concurrency.to_string()),
                ("churn_leave", args.churn_leave.name().to_string()),
                ("churn_connects", s.connects.to_string()),
                ("churn_leaves", s.leaves.to_string()),
                ("churn_connect_failed", s.connect_failed.to_string()),
                ("churn_leave_failed", s.leave_failed.to_string()),
                ("churn_gone", s.gone.to_string()),
                ("churn_connects_per_s", f0(rate(s.connects, c.secs))),
                ("churn_leaves_per_s", f0(rate(s.leaves, c.secs))),
                ("churn_hs_p50_us", percentile(&hs, 0.50).to_string()),
                ("churn_hs_p99_us", percentile(&hs, 0.99).to_string()),
                ("churn_hs_max_us", hs.last().copied().unwrap_or(0).to_string()),
                ("churn_leave_p50_us", percentile(&leave, 0.50).to_string()),
                ("churn_leave_p99_us", percentile(&leave, 0.99).to_string()),
                ("nginx_cpu_us_per_cycle", f3(per_cycle(nginx_cpu_us))),
                ("pg_cpu_us_per_cycle", f3(per_cycle(pg_cpu_us))),
                ("rss_after_churn_kb", c.mem_after.rss_kb.to_string()),
                ("pss_after_churn_kb", c.mem_after.pss_kb.to_string()),
                (
                    "churn_rss_growth_kb",
                    growth_kb(p.mem_idle.rss_kb, c.mem_after.rss_kb).to_string(),
                ),
                (
                    "churn_pss_growth_kb",
                    growth_kb(p.mem_idle.pss_kb, c.mem_after.pss_kb).to_string(),
                ),
            ]);
        }
        Report { fields, errors }
    }

    fn get(&self, key: &str) -> &str {
        self.fields.iter().find(|(k, _)| *k == key).map(|(_, v)| v.as_str()).unwrap_or("")
    }

    fn print(&self, args: &Args) {
        let g = |k| self.get(k);
        let ms = |k| format!("{:.2} ms", g(k).parse::<f64>().unwrap_or(0.0) / 1000.0);
        let kb = |k| format!("{:.1} MiB", g(k).parse::<f64>().unwrap_or(0.0) / 1024.0);
        let mut t = String::new();
        let _ = writeln!(t, "== pgpush-loadgen: {} ==", args.label);
        let _ = writeln!(
            t,
            "subscribers   {} of {} connected over {} channels in {} s ({} failed, {} dropped)",
            g("connected"),
            g("subscribers"),
            g("channels"),
            g("connect_s"),
            g("connect_failed"),
            g("dropped")
        );
        if args.nginx_pid.is_some() {
            let _ = writeln!(
                t,
                "nginx memory  {} workers: RSS {} -> {} idle ({} B/subscriber), \
                 PSS {} -> {} ({} B/subscriber)",
                g("workers"),
                kb("rss_before_kb"),
                kb("rss_idle_kb"),
                g("rss_per_sub_b"),
                kb("pss_before_kb"),
                kb("pss_idle_kb"),
                g("pss_per_sub_b")
            );
        }
        if !args.churn.is_zero() && !g("churn_s").is_empty() {
            let _ = writeln!(
                t,
                "churn         {} replacements in {} s by {} loops, leaving by {}: {} connects/s, \
                 {} leaves/s ({} connects and {} leaves failed, {} already gone)",
                g("churn_connects"),
                g("churn_s"),
                g("churn_concurrency"),
                g("churn_leave"),
                g("churn_connects_per_s"),
                g("churn_leaves_per_s"),
                g("churn_connect_failed"),
                g("churn_leave_failed"),
                g("churn_gone")
            );
            let _ = writeln!(
                t,
                "handshake     p50 {}  p99 {}  max {}; leave p50 {}  p99 {}",
                ms("churn_hs_p50_us"),
                ms("churn_hs_p99_us"),
                ms("churn_hs_max_us"),
                ms("churn_leave_p50_us"),
                ms("churn_leave_p99_us")
            );
            if args.nginx_pid.is_some() {
                let _ = writeln!(
                    t,
                    "nginx CPU     {} ms = {} us per replacement; PSS {} after the churn \
                     ({} KiB from idle)",
                    g("nginx_cpu_ms"),
                    g("nginx_cpu_us_per_cycle"),
                    kb("pss_after_churn_kb"),
                    g("churn_pss_growth_kb")
                );
            }
            if args.pg_pid.is_some() {
                let _ = writeln!(
                    t,
                    "postgres CPU  {} ms = {} us per replacement",
                    g("pg_cpu_ms"),
                    g("pg_cpu_us_per_cycle")
                );
            }
        }
        if args.messages > 0 {
            let _ = writeln!(
                t,
                "published     {} of {} messages via {} in {} s ({} msg/s, {} statements, \
                 {} errors, {} replies)",
                g("sent"),
                g("messages"),
                g("publish"),
                g("publish_s"),
                g("publish_rate"),
                g("statements"),
                g("publish_errors"),
                g("pub_replies")
            );
            let _ = writeln!(
                t,
                "deliveries    {} of {} expected ({} lost, {} extra, {} unparsed, {} stale, \
                 {} binary) in {} s = {}/s",
                g("received"),
                g("expected"),
                g("lost"),
                g("extra"),
                g("unparsed"),
                g("stale"),
                g("binary_frames"),
                g("window_s"),
                g("deliveries_per_s")
            );
            let _ = writeln!(
                t,
                "latency       p50 {}  p90 {}  p99 {}  max {}",
                ms("p50_us"),
                ms("p90_us"),
                ms("p99_us"),
                ms("max_us")
            );
            if args.nginx_pid.is_some() {
                let _ = writeln!(
                    t,
                    "nginx CPU     {} ms = {} us per delivery",
                    g("nginx_cpu_ms"),
                    g("nginx_cpu_us_per_delivery")
                );
            }
            if args.pg_pid.is_some() {
                let _ = writeln!(
                    t,
                    "postgres CPU  {} ms = {} us per delivery",
                    g("pg_cpu_ms"),
                    g("pg_cpu_us_per_delivery")
                );
            }
            let _ = writeln!(t, "loadgen CPU   {} ms", g("loadgen_cpu_ms"));
        }
        for (e, count) in &self.errors {
            let _ = writeln!(t, "subscriber error x{count}: {e}");
        }
        if g("timed_out") == "1" {
            let _ = writeln!(t, "the run hit --deadline ({:?})", args.deadline);
        }
        print!("{t}");
        let line: Vec<String> = self
            .fields
            .iter()
            .map(|(k, v)| format!("{k}={}", v.replace(char::is_whitespace, "_")))
            .collect();
        println!("RESULT {}", line.join(" "));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.5), 50);
        assert_eq!(percentile(&v, 0.99), 99);
        assert_eq!(percentile(&v, 1.0), 100);
        assert_eq!(percentile(&[], 0.5), 0);
        assert_eq!(percentile(&[7], 0.01), 7);
    }

    #[test]
    fn expected_counts_round_robin() {
        let shared = Shared::new(3);
        shared.per_channel[0].store(2, Ordering::Relaxed);
        shared.per_channel[1].store(1, Ordering::Relaxed);
        shared.per_channel[2].store(1, Ordering::Relaxed);
        // 5 messages: channels 0,1,2,0,1 -> 2*2 + 2*1 + 1*1.
        assert_eq!(expected_deliveries(&shared, 5), 7);
    }

    #[test]
    fn args_parse() {
        let a = Args::try_parse_from([
            "pgpush-loadgen",
            "--subscribers",
            "10",
            "--channels",
            "2",
            "--publish",
            "http",
            "--settle",
            "500ms",
        ])
        .unwrap();
        assert_eq!(a.settle, Duration::from_millis(500));
        assert_eq!(a.publish, PublishVia::Http);
        assert_eq!(a.publishers, 4);
        assert!(check(&a).is_ok());
        let a = Args::try_parse_from(["pgpush-loadgen", "--publish", "pg"]).unwrap();
        assert!(check(&a).is_err(), "--pg is required");
    }

    fn parse(extra: &[&str]) -> Args {
        let mut argv = vec!["pgpush-loadgen"];
        argv.extend_from_slice(extra);
        Args::try_parse_from(argv).unwrap()
    }

    #[test]
    fn args_ws_publish() {
        let ws = ["--publish", "ws", "--pub-url", "ws://127.0.0.1:9/wspub?id={channel}"];
        let a = parse(&[&ws[..], &["-c", "4", "--publishers", "4"]].concat());
        assert_eq!(a.publish, PublishVia::Ws);
        assert!(check(&a).is_ok());
        // Fewer connections than channels: some channel would have no publisher.
        let a = parse(&[&ws[..], &["-c", "5", "--publishers", "4"]].concat());
        assert!(check(&a).is_err());
        // An http:// URL is not a WebSocket publisher.
        let a = parse(&["--publish", "ws", "-c", "1"]);
        assert!(check(&a).is_err());
        let a = parse(&["--publish", "ws", "--pub-url", "ws://10.1.2.3/x", "-c", "1"]);
        assert!(check(&a).is_err(), "loopback only");
        // Not publishing: the publisher URL does not matter.
        let a = parse(&["--publish", "ws", "-m", "0", "-c", "9"]);
        assert!(check(&a).is_ok());
    }

    #[test]
    fn args_churn() {
        let a = parse(&["-n", "100", "-m", "0", "--churn", "3s", "--churn-concurrency", "4"]);
        assert_eq!(a.churn, Duration::from_secs(3));
        assert_eq!(a.churn_leave, LeaveMode::Close);
        assert!(check(&a).is_ok());
        assert_eq!(fds_needed(&a), 100 + 4 + 64);
        let a = parse(&["-m", "0", "--churn", "1s", "--churn-leave", "drop"]);
        assert_eq!(a.churn_leave, LeaveMode::Drop);
        assert!(check(&parse(&["--churn", "1s", "--publish", "http"])).is_err(), "needs -m 0");
        assert!(check(&parse(&["-m", "0", "--churn", "1s", "--churn-concurrency", "0"])).is_err());
        assert!(parse(&[]).churn.is_zero());
    }

    #[test]
    fn memory_growth_is_signed() {
        assert_eq!(growth_kb(100, 150), 50);
        assert_eq!(growth_kb(150, 100), -50);
    }
}
