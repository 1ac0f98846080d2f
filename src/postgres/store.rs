//! The message store (`push_stream_store_messages on`): the `pgpush` schema of
//! `sql/pgpush.sql`, publishing through it, reading a channel's history, and the cleaner.
//!
//! Everything runs on the worker's side connection. The schema's functions do the work;
//! this file only names them, with the schema the configuration chose.

use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use tokio_postgres::{Client, Statement};

use crate::protocol::channels::quote_ident;
use crate::protocol::payload::{self, Message};

/// The shipped schema, version 1.
pub const SCHEMA_SQL: &str = include_str!("../../sql/pgpush.sql");

/// How the store is used, from the configuration.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// The schema's name (`push_stream_postgres_schema`, `pgpush` by default).
    pub schema: String,
    /// Install (or upgrade) the schema on connect (`push_stream_postgres_schema_install`).
    pub install: bool,
    /// `push_stream_max_messages_stored_per_channel`, if any.
    pub max_stored: Option<i64>,
    /// `push_stream_message_ttl`.
    pub ttl: Duration,
    /// How often the cleaner runs.
    pub clean_every: Duration,
}

/// Where a subscriber resumes a channel from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Since {
    /// The last N kept messages (`.bN`).
    Backtrack(u32),
    /// Messages after this time and tag (`If-Modified-Since` / `If-None-Match`).
    Time { second: i64, tag: i64 },
    /// Messages after the newest one with this event id (`Last-Event-ID`).
    EventId(String),
    /// Messages after this offset of this epoch (a worker catching up on a channel); rows
    /// of another epoch come back too, so the reader can tell that the history was reset.
    After { epoch: i64, offset: i64 },
    /// A client's position (`Last-Event-ID: EPOCH:OFFSET`): the messages after it, led by
    /// [`gap`] when some are gone (deleted, expired, or the history was reset since).
    Position { epoch: i64, offset: i64 },
}

impl Since {
    /// A `Last-Event-ID` (or `push_stream_last_event_id`) value: `EPOCH:OFFSET` is a
    /// position in the store, anything else an event id.
    pub fn from_last_event_id(value: &[u8]) -> Self {
        let text = String::from_utf8_lossy(value);
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if let Some((e, o)) = text.split_once(':').filter(|(e, o)| digits(e) && digits(o)) {
            if let (Ok(epoch), Ok(offset)) = (e.parse(), o.parse()) {
                return Since::Position { epoch, offset };
            }
        }
        Since::EventId(text.into_owned())
    }
}

/// A stored message, as history gives it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stored {
    pub epoch: i64,
    pub offset: i64,
    pub second: i64,
    pub tag: i64,
    pub message: Message<'static>,
    pub event_id: Option<String>,
    pub event_type: Option<String>,
}

/// push-stream's special id of the message that tells a subscriber it missed messages.
pub const GAP_OFFSET: i64 = -4;

/// The gap message in a history: the messages before it are gone.
pub fn gap(epoch: i64) -> Stored {
    Stored {
        epoch,
        offset: GAP_OFFSET,
        second: 0,
        tag: 0,
        message: Message::Text(Vec::new().into()),
        event_id: None,
        event_type: Some("gap".into()),
    }
}

/// The store's prepared statements on one connection.
pub struct Statements {
    publish: Statement,
    history: Statement,
    clean: Statement,
    positions: Statement,
    reset: Statement,
    oldest: Statement,
    has_event: Statement,
}

/// The install script for `schema`: the shipped file with every `pgpush.` renamed.
pub fn install_sql(schema: &str) -> String {
    if schema == "pgpush" {
        return SCHEMA_SQL.to_string();
    }
    let q = quote_ident(schema);
    SCHEMA_SQL
        .replace("SCHEMA IF NOT EXISTS pgpush;", &format!("SCHEMA IF NOT EXISTS {q};"))
        .replace("pgpush.", &format!("{q}."))
}

/// The version the shipped script records (`INSERT INTO pgpush.schema_version VALUES (N)`).
pub fn schema_version() -> i32 {
    const MARK: &str = "INSERT INTO pgpush.schema_version VALUES (";
    SCHEMA_SQL
        .split_once(MARK)
        .and_then(|(_, rest)| rest.split_once(')'))
        .and_then(|(n, _)| n.parse().ok())
        .unwrap_or(0)
}

/// Installs or upgrades the schema, unless it is current: the script's DDL takes strong
/// locks on the tables, so running it on every connect of every worker would collide with
/// other sessions' publishes (even deadlock). Under the script's own advisory lock, so
/// that one session installs while the others wait and then find it current.
async fn install(client: &Client, schema: &str) -> Result<(), tokio_postgres::Error> {
    client.batch_execute("BEGIN; SELECT pg_advisory_xact_lock(7310151040527013617)").await?;
    let done = async {
        let table = format!("{}.schema_version", quote_ident(schema));
        let exists: bool =
            client.query_one("SELECT to_regclass($1) IS NOT NULL", &[&table]).await?.get(0);
        let current: i32 = if exists {
            client
                .query_one(&format!("SELECT coalesce(max(version), 0) FROM {table}"), &[])
                .await?
                .get(0)
        } else {
            0
        };
        if current < schema_version() {
            client.batch_execute(&install_sql(schema)).await?;
        }
        client.batch_execute("COMMIT").await
    }
    .await;
    if done.is_err() {
        let _ = client.batch_execute("ROLLBACK").await;
    }
    done
}

impl Statements {
    /// Installs the schema if asked, then prepares the statements.
    pub async fn prepare(
        client: &Client,
        cfg: &StoreConfig,
    ) -> Result<Self, tokio_postgres::Error> {
        if cfg.install {
            install(client, &cfg.schema).await?;
        }
        let s = quote_ident(&cfg.schema);
        let publish = client
            .prepare(&format!(
                "SELECT {s}.publish_batch($1::text[], $2::text[], $3::text[], $4::text[], \
                 $5::text[], $6::bigint, make_interval(secs => $7::float8))"
            ))
            .await?;
        let history = client
            .prepare(&format!(
                "SELECT \"offset\", second, tag::bigint, payload, payload_bin, event_id, event_type, epoch \
                 FROM {s}.kept($1::text, $2::bigint, make_interval(secs => $3::float8)) k \
                 WHERE ($4::bigint IS NULL OR k.\"offset\" > (SELECT max(x.\"offset\") \
                        FROM {s}.kept($1::text, $2::bigint, make_interval(secs => $3::float8)) x \
                        WHERE x.event_id = $5::text)) \
                   AND ($6::bigint IS NULL OR k.second > $6::bigint \
                        OR (k.second = $6::bigint AND k.tag > $7::bigint)) \
                   AND ($8::bigint IS NULL OR k.\"offset\" > (SELECT coalesce(max(y.\"offset\"), 0) \
                        FROM {s}.kept($1::text, $2::bigint, make_interval(secs => $3::float8)) y) - $8::bigint) \
                   AND ($9::bigint IS NULL OR k.\"offset\" > $9::bigint OR k.epoch <> $10::bigint) \
                 ORDER BY \"offset\""
            ))
            .await?;
        let clean = client
            .prepare(&format!("SELECT {s}.clean($1::bigint, make_interval(secs => $2::float8))"))
            .await?;
        let positions = client
            .prepare(&format!(
                "SELECT channel, epoch, last_offset FROM {s}.channels WHERE channel = ANY($1::text[])"
            ))
            .await?;
        let reset = client.prepare(&format!("SELECT {s}.reset($1::text)")).await?;
        let oldest = client
            .prepare(&format!(
                "SELECT greatest(first_offset, last_offset - coalesce($2::bigint, last_offset) + 1), \
                        epoch, last_offset \
                 FROM {s}.channels WHERE channel = $1::text"
            ))
            .await?;
        let has_event = client
            .prepare(&format!(
                "SELECT EXISTS (SELECT 1 FROM {s}.kept($1::text, $2::bigint, \
                 make_interval(secs => $3::float8)) k WHERE k.event_id = $4::text)"
            ))
            .await?;
        Ok(Self { publish, history, clean, positions, reset, oldest, has_event })
    }

    /// Publishes through the store, in order; the number of messages each channel keeps
    /// after its message.
    pub async fn publish(
        &self,
        client: &Client,
        cfg: &StoreConfig,
        publishes: &[(&str, &str)],
    ) -> Result<Vec<i64>, tokio_postgres::Error> {
        let n = publishes.len();
        let (mut c, mut t, mut b, mut i, mut y) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for (channel, notified) in publishes {
            let (message, meta) = payload::unwrap_with_meta(notified);
            c.push(channel.to_string());
            match message {
                Message::Binary(bytes) => {
                    t.push(None);
                    b.push(Some(STANDARD.encode(bytes)));
                }
                Message::Text(text) => {
                    t.push(Some(String::from_utf8_lossy(&text).into_owned()));
                    b.push(None);
                }
            }
            i.push(meta.event_id);
            y.push(meta.event_type);
        }
        let ttl = cfg.ttl.as_secs_f64();
        let rows =
            client.query(&self.publish, &[&c, &t, &b, &i, &y, &cfg.max_stored, &ttl]).await?;
        Ok(rows.iter().map(|r| r.get::<_, Option<i64>>(0).unwrap_or(0)).collect())
    }

    /// A channel's kept messages after `since`, oldest first. When a time and tag are
    /// older than every kept message and older ones were deleted, the list starts with
    /// [`gap`]: the client missed messages that are gone.
    pub async fn history(
        &self,
        client: &Client,
        cfg: &StoreConfig,
        channel: &str,
        since: &Since,
    ) -> Result<Vec<Stored>, tokio_postgres::Error> {
        let ttl = cfg.ttl.as_secs_f64();
        let (mut by_event, mut event, mut second, mut tag, mut back, mut after) =
            (None::<i64>, None::<String>, None::<i64>, 0i64, None::<i64>, None::<i64>);
        let mut epoch = 0i64;
        match since {
            Since::Backtrack(n) => back = Some(i64::from(*n)),
            Since::Time { second: s, tag: t } => {
                second = Some(*s);
                tag = *t;
            }
            Since::EventId(e) => {
                by_event = Some(1);
                event = Some(e.clone());
            }
            Since::After { epoch: e, offset } | Since::Position { epoch: e, offset } => {
                after = Some(*offset);
                epoch = *e;
            }
        }
        let rows = client
            .query(
                &self.history,
                &[
                    &channel,
                    &cfg.max_stored,
                    &ttl,
                    &by_event,
                    &event,
                    &second,
                    &tag,
                    &back,
                    &after,
                    &epoch,
                ],
            )
            .await?;
        let mut list: Vec<Stored> = rows
            .iter()
            .map(|r| {
                let message = match r.get::<_, Option<Vec<u8>>>(4) {
                    Some(bytes) => Message::Binary(bytes),
                    None => Message::Text(
                        r.get::<_, Option<String>>(3).unwrap_or_default().into_bytes().into(),
                    ),
                };
                Stored {
                    epoch: r.get(7),
                    offset: r.get(0),
                    second: r.get(1),
                    tag: r.get(2),
                    message,
                    event_id: r.get(5),
                    event_type: r.get(6),
                }
            })
            .collect();
        let missed = match (since, list.first()) {
            (Since::Time { .. }, Some(first)) => {
                let (oldest, _) = self.extent(client, cfg, channel).await?;
                first.offset > 1 && oldest == Some(first.offset)
            }
            // a position tells exactly what follows it: anything else is a gap
            (Since::Position { epoch, offset }, Some(first)) => {
                first.epoch != *epoch || first.offset > offset + 1
            }
            (Since::Position { epoch, offset }, None) => {
                match self.extent(client, cfg, channel).await? {
                    (_, Some((e, last))) => e != *epoch || last > *offset,
                    // a channel the store does not know: its history is gone if it had any
                    (_, None) => *offset > 0,
                }
            }
            // an event id that is not kept, on a channel that lost messages: it may have
            // been one of them (push-stream gives nothing old)
            (Since::EventId(_), None) => {
                let (oldest, _) = self.extent(client, cfg, channel).await?;
                oldest.is_some_and(|o| o > 1)
                    && !self.has_event(client, cfg, channel, since).await?
            }
            _ => false,
        };
        if missed {
            let epoch = match list.first() {
                Some(m) => m.epoch,
                None => self.extent(client, cfg, channel).await?.1.map_or(0, |(e, _)| e),
            };
            list.insert(0, gap(epoch));
        }
        Ok(list)
    }

    /// A channel's oldest kept offset, and its (epoch, last offset), if the store has it.
    async fn extent(
        &self,
        client: &Client,
        cfg: &StoreConfig,
        channel: &str,
    ) -> Result<(Option<i64>, Option<(i64, i64)>), tokio_postgres::Error> {
        let row = client.query_opt(&self.oldest, &[&channel, &cfg.max_stored]).await?;
        Ok(row.map_or((None, None), |r| (r.get(0), Some((r.get(1), r.get(2))))))
    }

    /// Whether a kept message of the channel has the event id `since` names.
    async fn has_event(
        &self,
        client: &Client,
        cfg: &StoreConfig,
        channel: &str,
        since: &Since,
    ) -> Result<bool, tokio_postgres::Error> {
        let Since::EventId(id) = since else { return Ok(false) };
        let ttl = cfg.ttl.as_secs_f64();
        let row = client.query_one(&self.has_event, &[&channel, &cfg.max_stored, &ttl, id]).await?;
        Ok(row.get(0))
    }

    /// Where these channels stand now: (channel, epoch, last offset), for those the store
    /// has.
    pub async fn positions(
        &self,
        client: &Client,
        channels: &[String],
    ) -> Result<Vec<(String, i64, i64)>, tokio_postgres::Error> {
        let rows = client.query(&self.positions, &[&channels]).await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect())
    }

    /// Forgets a channel's history (an admin `DELETE`): a new epoch, offsets from 1.
    pub async fn reset(&self, client: &Client, channel: &str) -> Result<(), tokio_postgres::Error> {
        client.execute(&self.reset, &[&channel]).await.map(drop)
    }

    /// One cleaning pass; `None` when another nginx was cleaning.
    pub async fn clean(
        &self,
        client: &Client,
        cfg: &StoreConfig,
    ) -> Result<Option<i64>, tokio_postgres::Error> {
        let ttl = cfg.ttl.as_secs_f64();
        let row = client.query_one(&self.clean, &[&cfg.max_stored, &ttl]).await?;
        Ok(row.get(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_renamed_schema_keeps_derived_listen_names() {
        let sql = install_sql("my \"store\"");
        assert!(sql.contains("CREATE SCHEMA IF NOT EXISTS \"my \"\"store\"\"\";"));
        assert!(sql.contains("\"my \"\"store\"\"\".publish_message"));
        assert!(!sql.contains(" pgpush."));
        assert!(sql.contains("'pgpush_' || md5(channel)"));
        assert_eq!(install_sql("pgpush"), SCHEMA_SQL);
    }

    /// nginx skips an install whose version is current: a change to the script must come
    /// with a new version, or running installs would never get it.
    #[test]
    fn a_changed_script_has_a_new_version() {
        use md5::{Digest, Md5};
        let hash: String = Md5::digest(SCHEMA_SQL).iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            (schema_version(), hash.as_str()),
            (2, "a502e1063c22efd40d3dda8b1350a0d5"),
            "sql/pgpush.sql changed: raise the version it records, then update this test"
        );
    }
}
