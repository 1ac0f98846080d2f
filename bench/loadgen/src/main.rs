//! pgpush-loadgen: WebSocket subscribers and a publisher against a push server on this
//! machine (pgpush or nchan), reporting deliveries, latency and the server's memory and CPU.
//!
//! The phases: connect N subscribers over C channels (bounded concurrency), settle, sample
//! the nginx workers' memory, publish M messages at R msg/s (pg_notify or HTTP POST),
//! drain, sample CPU, report. Every phase is bounded by --deadline.

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
use tokio::sync::{mpsc, watch, Mutex, Semaphore};

use crate::procfs::{Group, Sample};
use crate::publish::{Plan, PubStats};
use crate::subscribe::{Outcome, Shared, Subscriber};
use crate::util::{channel_name, now_ns, parse_duration};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum PublishVia {
    /// SELECT pg_notify(...) over a PostgreSQL connection (--pg).
    Pg,
    /// HTTP POST with the message as the body (--pub-url).
    Http,
}

impl PublishVia {
    fn name(self) -> &'static str {
        match self {
            PublishVia::Pg => "pg",
            PublishVia::Http => "http",
        }
    }
}

/// Load generator for pgpush and nchan. Targets loopback addresses only.
#[derive(Debug, Parser)]
#[command(name = "pgpush-loadgen", version)]
struct Args {
    /// WebSocket URL; {channel} is replaced by the subscriber's channel name.
    #[arg(long, default_value = "ws://127.0.0.1:8080/ws?id={channel}")]
    url: String,
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
    /// Publisher URL for --publish http; {channel} is replaced by the channel name.
    #[arg(long, default_value = "http://127.0.0.1:8080/pub?id={channel}")]
    pub_url: String,
    /// Concurrent publisher connections (PostgreSQL or HTTP keep-alive), each with one
    /// statement or request in flight.
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
    if (args.subscribers as u64) + 64 > nofile {
        eprintln!(
            "pgpush-loadgen: warning: the open files limit ({nofile}) is below {} subscribers",
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
    util::parse_url(&args.url)?;
    if args.messages > 0 {
        match args.publish {
            PublishVia::Pg => {
                util::check_pg_local(args.pg.as_deref().ok_or("--publish pg needs --pg")?)?
            }
            PublishVia::Http => {
                util::parse_url(&args.pub_url)?;
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

    let mem_before = sample(nginx);

    // Connect.
    let shared = Arc::new(Shared::new(args.channels));
    let limit = Arc::new(Semaphore::new(args.connect_concurrency.max(1)));
    let (stop_tx, stop_rx) = watch::channel(false);
    let connect_start = Instant::now();
    let mut subs = Vec::with_capacity(args.subscribers);
    for i in 0..args.subscribers {
        let channel = i % args.channels;
        let sub = Subscriber {
            url: args.url.replace("{channel}", &channel_name(&args.channel_prefix, channel)),
            channel,
            limit: limit.clone(),
            connect_timeout: args.connect_timeout,
            shared: shared.clone(),
            stop: stop_rx.clone(),
            since_ns: run_start_ns,
        };
        subs.push(tokio::spawn(sub.run()));
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

    // Publish and drain.
    let stats = Arc::new(PubStats::default());
    let mut cpu_before = (Sample::default(), Sample::default(), 0u64);
    let mut cpu_after = cpu_before;
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
    }

    // Stop the subscribers and collect what they saw.
    let _ = stop_tx.send(true);
    let mut outcomes: Vec<Outcome> = Vec::with_capacity(subs.len());
    let collect_until = Instant::now() + Duration::from_secs(10);
    for h in subs {
        let left = collect_until.saturating_duration_since(Instant::now());
        let abort = h.abort_handle();
        match tokio::time::timeout(left, h).await {
            Ok(Ok(o)) => outcomes.push(o),
            _ => abort.abort(),
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
    /// (nginx workers, postgres, this process in µs) before and after publishing.
    cpu_before: (Sample, Sample, u64),
    cpu_after: (Sample, Sample, u64),
    timed_out: bool,
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
        let fields = vec![
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
            ("timed_out", u8::from(p.timed_out).to_string()),
        ];
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
        if args.messages > 0 {
            let _ = writeln!(
                t,
                "published     {} of {} messages via {} in {} s ({} msg/s, {} statements, \
                 {} errors)",
                g("sent"),
                g("messages"),
                g("publish"),
                g("publish_s"),
                g("publish_rate"),
                g("statements"),
                g("publish_errors")
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
}
