//! Channel info and statistics bodies, in push-stream's four formats (json, plain, yaml,
//! xml), chosen by the `Accept` header as push-stream chooses.

use core::fmt::Write;

use crate::counters::{Info, WorkerSlot};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Json,
    Plain,
    Yaml,
    Xml,
}

/// A body format and the content type it is sent with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Format {
    pub kind: Kind,
    pub content_type: &'static str,
}

const JSON: Format = Format { kind: Kind::Json, content_type: "application/json" };

/// push-stream's rule: for each `/` in `Accept`, left to right, the subtype after it is
/// compared by prefix with plain, json, yaml, xml, x-json and x-yaml; the first match
/// wins, and json is the default.
pub fn select(accept: Option<&[u8]>) -> Format {
    const CHOICES: [(&[u8], Format); 6] = [
        (b"plain", Format { kind: Kind::Plain, content_type: "text/plain" }),
        (b"json", JSON),
        (b"yaml", Format { kind: Kind::Yaml, content_type: "application/yaml" }),
        (b"xml", Format { kind: Kind::Xml, content_type: "application/xml" }),
        (b"x-json", Format { kind: Kind::Json, content_type: "text/x-json" }),
        (b"x-yaml", Format { kind: Kind::Yaml, content_type: "text/x-yaml" }),
    ];
    let Some(accept) = accept else { return JSON };
    for (k, _) in accept.iter().enumerate().filter(|(_, &b)| b == b'/') {
        let rest = &accept[k + 1..];
        if let Some((_, f)) = CHOICES.iter().find(|(name, _)| rest.starts_with(name)) {
            return *f;
        }
    }
    JSON
}

fn id(info: &Info) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(&info.id)
}

fn channel_fields(out: &mut String, kind: Kind, info: &Info) {
    let (id, p, s, k) = (id(info), info.published, info.subscribers, info.stored);
    let _ = match kind {
        Kind::Json => write!(
            out,
            "{{\"channel\": \"{id}\", \"published_messages\": {p}, \"stored_messages\": {k}, \
             \"subscribers\": {s}}}"
        ),
        Kind::Plain => write!(
            out,
            "channel: {id}\r\npublished_messages: {p}\r\nstored_messages: {k}\r\n\
             active_subscribers: {s}"
        ),
        Kind::Yaml => write!(
            out,
            "  channel: {id}\r\n  published_messages: {p}\r\n  stored_messages: {k}\r\n  \
             subscribers: {s}"
        ),
        Kind::Xml => write!(
            out,
            "<channel>\r\n  <name>{id}</name>\r\n  <published_messages>{p}</published_messages>\r\n  \
             <stored_messages>{k}</stored_messages>\r\n  <subscribers>{s}</subscribers>\r\n\
             </channel>\r\n"
        ),
    };
}

const XML_HEAD: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\" ?>\r\n";

/// One channel's info (publisher answers, and a statistics query naming one channel).
pub fn single(kind: Kind, info: &Info) -> String {
    let mut out = String::with_capacity(128);
    if kind == Kind::Xml {
        out.push_str(XML_HEAD);
    }
    channel_fields(&mut out, kind, info);
    out.push_str("\r\n");
    out
}

/// The node-wide values heading a list of channels and the summary.
#[derive(Clone, Debug, Default)]
pub struct Head {
    pub hostname: String,
    /// `YYYY-MM-DDTHH:MM:SS`, UTC.
    pub time: String,
    pub channels: u64,
    pub wildcard_channels: u64,
    pub uptime: u64,
}

/// Several channels: `id=ALL`, a `prefix*`, or a path naming more than one.
pub fn group(kind: Kind, head: &Head, infos: &[Info]) -> String {
    let Head { hostname: h, time: t, channels: c, wildcard_channels: w, uptime: u } = head;
    let mut out = String::with_capacity(200 + infos.len() * 128);
    let _ = match kind {
        Kind::Json => write!(
            out,
            "{{\"hostname\": \"{h}\", \"time\": \"{t}\", \"channels\": {c}, \
             \"wildcard_channels\": {w}, \"uptime\": {u}, \"infos\": [\r\n"
        ),
        Kind::Plain => write!(
            out,
            "hostname: {h}, time: {t}, channels: {c}, wildcard_channels: {w}, uptime: {u}, \
             infos: \r\n"
        ),
        Kind::Yaml => write!(
            out,
            "hostname: {h}\r\ntime: {t}\r\nchannels: {c}\r\nwildcard_channels: {w}\r\n\
             uptime: {u}\r\ninfos: \r\n"
        ),
        Kind::Xml => write!(
            out,
            "{XML_HEAD}<root>\r\n  <hostname>{h}</hostname>\r\n  <time>{t}</time>\r\n  \
             <channels>{c}</channels>\r\n  <wildcard_channels>{w}</wildcard_channels>\r\n  \
             <uptime>{u}</uptime>\r\n  <infos>\r\n"
        ),
    };
    for (k, info) in infos.iter().enumerate() {
        let last = k + 1 == infos.len();
        if kind == Kind::Yaml {
            out.push_str(" -\r\n");
        }
        channel_fields(&mut out, kind, info);
        match kind {
            Kind::Json => out.push_str(if last { "\r\n" } else { ",\r\n" }),
            Kind::Plain if !last => out.push_str(",\r\n"),
            Kind::Yaml if !last => out.push_str("\r\n"),
            _ => {}
        }
    }
    out.push_str(match kind {
        Kind::Json => "]}\r\n",
        Kind::Plain | Kind::Yaml => "\r\n",
        Kind::Xml => "  </infos>\r\n</root>\r\n",
    });
    out
}

/// The statistics summary's own values.
#[derive(Clone, Debug, Default)]
pub struct Totals {
    pub published: u64,
    pub stored: u64,
    pub subscribers: u64,
    pub channels_in_delete: u64,
}

/// The statistics summary, with one entry per worker: (pid, subscribers, uptime).
pub fn summary(kind: Kind, head: &Head, totals: &Totals, workers: &[(i64, u64, u64)]) -> String {
    let Head { hostname: h, time: t, channels: c, wildcard_channels: w, uptime: u } = head;
    let Totals { published: p, stored: s, subscribers: n, channels_in_delete: d } = totals;
    let mut by_worker = String::new();
    for (k, (pid, subs, up)) in workers.iter().enumerate() {
        let last = k + 1 == workers.len();
        let _ = match kind {
            Kind::Json => write!(
                by_worker,
                "{{\"pid\": \"{pid}\", \"subscribers\": {subs}, \"uptime\": {up}}}{}",
                if last { "" } else { ",\r\n" }
            ),
            Kind::Plain => write!(
                by_worker,
                "  pid: {pid}\r\n  subscribers: {subs}\r\n  uptime: {up}{}",
                if last { "" } else { ",\r\n" }
            ),
            Kind::Yaml => write!(
                by_worker,
                "   -\r\n    pid: {pid}\r\n    subscribers: {subs}\r\n    uptime: {up}{}",
                if last { "" } else { "\r\n" }
            ),
            Kind::Xml => write!(
                by_worker,
                "<worker>\r\n  <pid>{pid}</pid>\r\n  <subscribers>{subs}</subscribers>\r\n  \
                 <uptime>{up}</uptime>\r\n</worker>\r\n"
            ),
        };
    }
    let b = by_worker;
    let mut out = String::with_capacity(512 + b.len());
    let _ = match kind {
        Kind::Json => write!(
            out,
            "{{\"hostname\": \"{h}\", \"time\": \"{t}\", \"channels\": {c}, \
             \"wildcard_channels\": {w}, \"published_messages\": {p}, \"stored_messages\": {s}, \
             \"messages_in_trash\": 0, \"channels_in_delete\": {d}, \"channels_in_trash\": 0, \
             \"subscribers\": {n}, \"uptime\": {u}, \"by_worker\": [\r\n{b}\r\n]}}\r\n"
        ),
        Kind::Plain => write!(
            out,
            "hostname: {h}\r\ntime: {t}\r\nchannels: {c}\r\nwildcard_channels: {w}\r\n\
             published_messages: {p}\r\nstored_messages: {s}\r\nmessages_in_trash: 0\r\n\
             channels_in_delete: {d}\r\nchannels_in_trash: 0\r\nsubscribers: {n}\r\n\
             uptime: {u}\r\nby_worker:\r\n{b}\r\n"
        ),
        Kind::Yaml => write!(
            out,
            "  hostname: {h}\r\n  time: {t}\r\n  channels: {c}\r\n  wildcard_channels: {w}\r\n  \
             published_messages: {p}\r\n  stored_messages: {s}\r\n  messages_in_trash: 0\r\n  \
             channels_in_delete: {d}\r\n  channels_in_trash: 0\r\n  subscribers: {n}\r\n  \
             uptime: {u}\r\n  by_worker:\r\n{b}\r\n"
        ),
        Kind::Xml => write!(
            out,
            "{XML_HEAD}<infos>\r\n  <hostname>{h}</hostname>\r\n  <time>{t}</time>\r\n  \
             <channels>{c}</channels>\r\n  <wildcard_channels>{w}</wildcard_channels>\r\n  \
             <published_messages>{p}</published_messages>\r\n  \
             <stored_messages>{s}</stored_messages>\r\n  \
             <messages_in_trash>0</messages_in_trash>\r\n  \
             <channels_in_delete>{d}</channels_in_delete>\r\n  \
             <channels_in_trash>0</channels_in_trash>\r\n  <subscribers>{n}</subscribers>\r\n  \
             <uptime>{u}</uptime>\r\n  <by_worker>{b}</by_worker>\r\n</infos>\r\n"
        ),
    };
    out
}

/// `YYYY-MM-DDTHH:MM:SS` (UTC) for a Unix time.
pub fn iso_time(secs: u64) -> String {
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Days since 1970-01-01 as (year, month, day), proleptic Gregorian (Howard Hinnant's
/// civil_from_days).
pub fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Unused slots are not shown; kept apart so the summary stays a pure function.
pub fn workers(slots: &[WorkerSlot], now: u64) -> Vec<(i64, u64, u64)> {
    slots.iter().map(|w| (w.pid, w.subscribers, now.saturating_sub(w.started))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: &str, p: u64, s: u64) -> Info {
        Info {
            id: id.as_bytes().to_vec(),
            published: p,
            stored: 0,
            subscribers: s,
            wildcard: false,
        }
    }

    #[test]
    fn accept_selects_like_push_stream() {
        assert_eq!(select(None).content_type, "application/json");
        assert_eq!(select(Some(b"text/html")).content_type, "application/json");
        assert_eq!(select(Some(b"text/plain")).kind, Kind::Plain);
        assert_eq!(select(Some(b"application/yaml")).content_type, "application/yaml");
        assert_eq!(select(Some(b"application/xml")).kind, Kind::Xml);
        assert_eq!(select(Some(b"text/x-json")).content_type, "text/x-json");
        assert_eq!(select(Some(b"text/x-yaml")).content_type, "text/x-yaml");
        // a browser's Accept picks xml, as push-stream does
        let browser = b"text/html,application/xhtml+xml,application/xml;q=0.9";
        assert_eq!(select(Some(browser)).kind, Kind::Xml);
    }

    #[test]
    fn single_channel_bodies() {
        let i = info("ch", 1, 2);
        assert_eq!(
            single(Kind::Json, &i),
            "{\"channel\": \"ch\", \"published_messages\": 1, \"stored_messages\": 0, \
             \"subscribers\": 2}\r\n"
        );
        assert_eq!(
            single(Kind::Plain, &i),
            "channel: ch\r\npublished_messages: 1\r\nstored_messages: 0\r\nactive_subscribers: 2\r\n"
        );
        assert!(single(Kind::Xml, &i).ends_with("</channel>\r\n\r\n"));
    }

    #[test]
    fn group_bodies() {
        let head = Head {
            hostname: "h".into(),
            time: "t".into(),
            channels: 3,
            wildcard_channels: 0,
            uptime: 9,
        };
        let body = group(Kind::Json, &head, &[info("a", 1, 0), info("b", 2, 1)]);
        assert_eq!(
            body,
            "{\"hostname\": \"h\", \"time\": \"t\", \"channels\": 3, \"wildcard_channels\": 0, \
             \"uptime\": 9, \"infos\": [\r\n{\"channel\": \"a\", \"published_messages\": 1, \
             \"stored_messages\": 0, \"subscribers\": 0},\r\n{\"channel\": \"b\", \
             \"published_messages\": 2, \"stored_messages\": 0, \"subscribers\": 1}\r\n]}\r\n"
        );
        assert!(group(Kind::Json, &head, &[]).ends_with("\"infos\": [\r\n]}\r\n"));
        let yaml = group(Kind::Yaml, &head, &[info("a", 1, 0)]);
        assert!(yaml.ends_with("infos: \r\n -\r\n  channel: a\r\n  published_messages: 1\r\n  stored_messages: 0\r\n  subscribers: 0\r\n"));
    }

    #[test]
    fn summary_json() {
        let head = Head {
            hostname: "h".into(),
            time: "t".into(),
            channels: 1,
            wildcard_channels: 0,
            uptime: 5,
        };
        let body = summary(
            Kind::Json,
            &head,
            &Totals { published: 2, subscribers: 3, ..Totals::default() },
            &[(10, 1, 4), (11, 2, 4)],
        );
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["by_worker"][1]["pid"], "11");
        assert_eq!(v["subscribers"], 3);
        assert_eq!(v["published_messages"], 2);
    }

    #[test]
    fn iso_times() {
        assert_eq!(iso_time(0), "1970-01-01T00:00:00");
        assert_eq!(iso_time(1_700_000_000), "2023-11-14T22:13:20");
        assert_eq!(iso_time(951_782_400), "2000-02-29T00:00:00");
    }
}
