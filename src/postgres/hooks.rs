//! The SQL hooks' connection: `push_stream_postgres_on_subscribe`, `_on_unsubscribe` and
//! `_on_publish` run here, on a second connection of the worker's tokio thread that never
//! LISTENs, so a slow hook never holds up notifications.
//!
//! Calls run one after the other in arrival order, which keeps one subscriber's hooks in
//! order: subscribe, then its publishes, then unsubscribe. Each statement is prepared once
//! per connection with every parameter typed `text` and run with bind parameters, never
//! spliced. An SQL error is logged with its SQLSTATE, the hook's name and the channel; a
//! statement that fails to prepare is logged once per connection. While the database is
//! unreachable, calls wait in a bounded queue and run after the reconnect, oldest first;
//! calls past the bound are dropped and counted in the log.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use futures_util::TryStreamExt;
use tokio::sync::mpsc;
use tokio_postgres::types::Type;
use tokio_postgres::{NoTls, Statement};

use super::cells::{converts, Cell, Reply};
use super::{chain, now_nanos, Backoff, Bridge, Event, Level};
use crate::config::conninfo;
use crate::config::values::Reconnect;

/// Calls kept while the database is unreachable.
pub const QUEUE_BOUND: usize = 10_000;

/// One hook to run.
#[derive(Debug)]
pub struct HookCall {
    pub id: u64,
    /// The directive, for the log.
    pub name: &'static str,
    pub sql: Arc<str>,
    /// `$1` (the channel id), `$2`, `$3`...: all `text`, `None` is NULL.
    pub params: Vec<Option<String>>,
    /// Send the first column of the result rows back ([`Event::HookRows`]).
    pub rows: bool,
}

enum Failure {
    /// The connection is gone: the call is run again after the reconnect.
    Lost(String),
    /// Logged; the call is over.
    Done,
}

/// Runs hooks until the worker drops its sender, then finishes what is queued.
pub async fn run(
    config: tokio_postgres::Config,
    reconnect: Reconnect,
    mut rx: mpsc::UnboundedReceiver<HookCall>,
    bridge: Arc<Bridge>,
) {
    let target = conninfo::describe(&config);
    let mut backoff = Backoff::new(reconnect, now_nanos() ^ 0x5eed);
    let mut queue: VecDeque<HookCall> = VecDeque::new();
    let mut dropped: u64 = 0;
    let mut open = true;
    let mut failures = 0u32;

    loop {
        // connecting: calls keep arriving into the bounded queue
        let connect = config.connect(NoTls);
        tokio::pin!(connect);
        let connected = loop {
            tokio::select! {
                r = &mut connect => break Some(r),
                call = rx.recv(), if open => match call {
                    Some(c) => hold(&mut queue, c, &mut dropped),
                    None => open = false,
                },
                else => break None,
            }
        };
        let client = match connected {
            Some(Ok((client, connection))) => {
                tokio::spawn(connection);
                client
            }
            Some(Err(e)) => {
                failures += 1;
                if failures == 1 {
                    bridge.log(
                        Level::Error,
                        format!("SQL hooks: connect() to postgres {target} failed: {}", chain(&e)),
                    );
                }
                if !open {
                    return give_up(&bridge, queue.len() as u64 + dropped);
                }
                let sleep = tokio::time::sleep(backoff.step());
                tokio::pin!(sleep);
                loop {
                    tokio::select! {
                        _ = &mut sleep => break,
                        call = rx.recv() => match call {
                            Some(c) => hold(&mut queue, c, &mut dropped),
                            None => return give_up(&bridge, queue.len() as u64 + dropped),
                        },
                    }
                }
                continue;
            }
            None => return,
        };
        if failures > 0 {
            bridge.log(Level::Notice, format!("SQL hooks: reconnected to postgres {target}"));
        }
        backoff.reset();
        if dropped > 0 {
            bridge.log(
                Level::Error,
                format!(
                    "SQL hooks: {dropped} hook call(s) dropped while postgres was unreachable \
                     (at most {QUEUE_BOUND} wait)"
                ),
            );
            dropped = 0;
        }

        let mut session = Session { client: &client, bridge: &bridge, statements: HashMap::new() };
        let lost = loop {
            let call = match queue.pop_front() {
                Some(c) => c,
                None if !open => return,
                None => match rx.recv().await {
                    Some(c) => c,
                    None => {
                        open = false;
                        continue;
                    }
                },
            };
            match session.call(&call).await {
                Ok(()) | Err(Failure::Done) => {}
                Err(Failure::Lost(why)) => {
                    queue.push_front(call);
                    break why;
                }
            }
        };
        bridge.log(
            Level::Error,
            format!("SQL hooks: connection to postgres {target} lost: {lost}; reconnecting"),
        );
        failures = 1;
        if !open {
            return give_up(&bridge, queue.len() as u64);
        }
    }
}

fn hold(queue: &mut VecDeque<HookCall>, call: HookCall, dropped: &mut u64) {
    if queue.len() < QUEUE_BOUND {
        queue.push_back(call);
    } else {
        *dropped += 1;
    }
}

fn give_up(bridge: &Bridge, n: u64) {
    if n > 0 {
        bridge.log(
            Level::Error,
            format!("SQL hooks: {n} hook call(s) not run: the worker is stopping and postgres is unreachable"),
        );
    }
}

struct Session<'a> {
    client: &'a tokio_postgres::Client,
    bridge: &'a Bridge,
    /// Prepared statements of this connection; `None` failed to prepare (logged once).
    statements: HashMap<(Arc<str>, usize), Option<Statement>>,
}

impl Session<'_> {
    async fn call(&mut self, call: &HookCall) -> Result<(), Failure> {
        let channel = call.params.first().cloned().flatten().unwrap_or_default();
        let stmt = self.statement(call).await?;
        let Some(stmt) = stmt else {
            self.answer(call, Vec::new());
            return Err(Failure::Done);
        };
        let result = async {
            let rows = self.client.query_raw(&stmt, call.params.iter()).await?;
            let mut replies = Vec::new();
            let first_ok = stmt.columns().first().map(|c| converts(c.type_()));
            tokio::pin!(rows);
            while let Some(row) = rows.try_next().await? {
                if call.rows && first_ok == Some(true) {
                    if let Some(reply) = row.try_get::<_, Cell>(0)?.0 {
                        replies.push(reply);
                    }
                }
            }
            Ok::<_, tokio_postgres::Error>(replies)
        };
        match result.await {
            Ok(replies) => {
                self.answer(call, replies);
                Ok(())
            }
            Err(e) if lost(&e) => Err(Failure::Lost(chain(&e))),
            Err(e) => {
                self.bridge.log(Level::Error, failed(call.name, &channel, &e));
                self.answer(call, Vec::new());
                Err(Failure::Done)
            }
        }
    }

    /// The call's statement, prepared on first use.
    async fn statement(&mut self, call: &HookCall) -> Result<Option<Statement>, Failure> {
        let key = (call.sql.clone(), call.params.len());
        if let Some(s) = self.statements.get(&key) {
            return Ok(s.clone());
        }
        let types = vec![Type::TEXT; call.params.len()];
        match self.client.prepare_typed(&call.sql, &types).await {
            Ok(stmt) => {
                if call.rows {
                    if let Some(col) = stmt.columns().first() {
                        if !converts(col.type_()) {
                            self.bridge.log(
                                Level::Warn,
                                format!(
                                    "{}: the first result column \"{}\" is of type {}, which is \
                                     not sent back: cast it to text",
                                    call.name,
                                    col.name(),
                                    col.type_()
                                ),
                            );
                        }
                    }
                }
                self.statements.insert(key, Some(stmt.clone()));
                Ok(Some(stmt))
            }
            Err(e) if !lost(&e) => {
                let channel = call.params.first().cloned().flatten().unwrap_or_default();
                self.bridge
                    .log(Level::Error, format!("{} (prepare)", failed(call.name, &channel, &e)));
                self.statements.insert(key, None);
                Ok(None)
            }
            Err(e) => Err(Failure::Lost(chain(&e))),
        }
    }

    fn answer(&self, call: &HookCall, rows: Vec<Reply>) {
        if call.rows {
            self.bridge.push(Event::HookRows { id: call.id, rows });
            self.bridge.pay();
        }
    }
}

/// Whether an error means the connection is gone (rather than this statement failing).
fn lost(e: &tokio_postgres::Error) -> bool {
    use std::error::Error;
    e.is_closed() || e.source().is_some_and(|s| s.is::<std::io::Error>())
}

/// `push_stream_postgres_on_publish failed for channel "x": SQLSTATE 42P01: ...`
fn failed(name: &str, channel: &str, e: &tokio_postgres::Error) -> String {
    let code = e.code().map_or("", |c| c.code());
    let msg = e.as_db_error().map_or_else(|| chain(e), |d| d.message().to_string());
    format!(
        "{name} failed for channel {}: SQLSTATE {code}: {msg}",
        serde_json::Value::from(channel)
    )
}
