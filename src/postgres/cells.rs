//! The first column of an SQL hook's result rows, as the message sent back to the client.
//!
//! tokio-postgres receives results in binary form. A value goes back as PostgreSQL would
//! print it (`select now()` gives `2026-12-04 14:30:00.123456+00`), except `bytea`, which
//! goes back as its bytes in a binary frame. NULL is skipped. A type without a conversion
//! here (arrays, intervals, network types, ...) is reported so that the caller can log it:
//! cast it to `text` in the hook's SQL.

use std::error::Error;

use tokio_postgres::types::{FromSql, Kind, Type};

/// What one result cell becomes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    Text(String),
    Binary(Vec<u8>),
}

/// A cell read with [`FromSql`], whatever its type.
#[derive(Debug)]
pub struct Cell(pub Option<Reply>);

type BoxError = Box<dyn Error + Sync + Send>;

impl<'a> FromSql<'a> for Cell {
    fn from_sql(ty: &Type, raw: &'a [u8]) -> Result<Self, BoxError> {
        Ok(Cell(Some(convert(ty, raw)?)))
    }

    fn from_sql_null(_: &Type) -> Result<Self, BoxError> {
        Ok(Cell(None))
    }

    fn accepts(ty: &Type) -> bool {
        converts(ty)
    }
}

/// Whether values of this type can be sent back.
pub fn converts(ty: &Type) -> bool {
    if let Kind::Domain(inner) = ty.kind() {
        return converts(inner);
    }
    matches!(ty.kind(), Kind::Enum(_))
        || [
            Type::TEXT,
            Type::VARCHAR,
            Type::BPCHAR,
            Type::NAME,
            Type::UNKNOWN,
            Type::CHAR,
            Type::JSON,
            Type::JSONB,
            Type::XML,
            Type::BYTEA,
            Type::BOOL,
            Type::INT2,
            Type::INT4,
            Type::INT8,
            Type::OID,
            Type::FLOAT4,
            Type::FLOAT8,
            Type::NUMERIC,
            Type::TIMESTAMPTZ,
            Type::TIMESTAMP,
            Type::DATE,
            Type::UUID,
        ]
        .contains(ty)
}

fn convert(ty: &Type, raw: &[u8]) -> Result<Reply, BoxError> {
    if let Kind::Domain(inner) = ty.kind() {
        return convert(inner, raw);
    }
    if let Kind::Enum(_) = ty.kind() {
        return Ok(Reply::Text(String::from_utf8(raw.to_vec())?));
    }
    let text = match *ty {
        Type::BYTEA => return Ok(Reply::Binary(raw.to_vec())),
        Type::JSONB => {
            // version byte 1, then the JSON text
            match raw.split_first() {
                Some((1, json)) => String::from_utf8(json.to_vec())?,
                _ => return Err("unsupported jsonb version".into()),
            }
        }
        Type::CHAR => {
            // "char": one byte
            String::from_utf8(raw.to_vec())?
        }
        Type::BOOL => String::from(if bool::from_sql(ty, raw)? { "t" } else { "f" }),
        Type::INT2 => i16::from_sql(ty, raw)?.to_string(),
        Type::INT4 => i32::from_sql(ty, raw)?.to_string(),
        Type::INT8 => i64::from_sql(ty, raw)?.to_string(),
        Type::OID => u32::from_sql(ty, raw)?.to_string(),
        Type::FLOAT4 => float(f64::from(f32::from_sql(ty, raw)?)),
        Type::FLOAT8 => float(f64::from_sql(ty, raw)?),
        Type::NUMERIC => numeric(raw)?,
        Type::TIMESTAMPTZ => format!("{}+00", timestamp(i64::from_sql(ty, raw)?)),
        Type::TIMESTAMP => timestamp(i64::from_sql(ty, raw)?),
        Type::DATE => date(i64::from(i32::from_sql(ty, raw)?)),
        Type::UUID => uuid(raw)?,
        // text, varchar, bpchar, name, unknown, json, xml: the text itself
        _ => String::from_utf8(raw.to_vec())?,
    };
    Ok(Reply::Text(text))
}

/// A float as PostgreSQL 12+ prints it (shortest exact form).
fn float(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "Infinity" } else { "-Infinity" }.into()
    } else {
        let abs = v.abs();
        if abs != 0.0 && !(1e-4..1e15).contains(&abs) {
            // exponent form: 1e+100, 1.5e-07
            let s = format!("{v:e}");
            let (mantissa, exp) = s.split_once('e').unwrap_or((&s, "0"));
            let exp: i32 = exp.parse().unwrap_or(0);
            let sign = if exp < 0 { '-' } else { '+' };
            format!("{mantissa}e{sign}{:02}", exp.abs())
        } else {
            format!("{v}")
        }
    }
}

/// PostgreSQL's binary numeric: ndigits, weight, sign, dscale, then base-10000 digits.
fn numeric(raw: &[u8]) -> Result<String, BoxError> {
    let word = |i: usize| -> Result<i16, BoxError> {
        raw.get(i * 2..i * 2 + 2)
            .map(|b| i16::from_be_bytes([b[0], b[1]]))
            .ok_or_else(|| "short numeric".into())
    };
    let ndigits = word(0)? as usize;
    let weight = i32::from(word(1)?);
    let sign = word(2)? as u16;
    let dscale = word(3)? as usize;
    match sign {
        0xC000 => return Ok("NaN".into()),
        0xD000 => return Ok("Infinity".into()),
        0xF000 => return Ok("-Infinity".into()),
        _ => {}
    }
    let digits: Vec<i16> = (0..ndigits).map(|i| word(4 + i)).collect::<Result<_, _>>()?;
    let digit = |pos: i32| -> i16 {
        // the base-10000 digit whose weight is `pos`
        let idx = weight - pos;
        if idx >= 0 && (idx as usize) < digits.len() {
            digits[idx as usize]
        } else {
            0
        }
    };
    let mut s = String::new();
    if sign == 0x4000 {
        s.push('-');
    }
    if weight < 0 {
        s.push('0');
    } else {
        for pos in (0..=weight).rev() {
            let d = digit(pos);
            if pos == weight {
                s.push_str(&d.to_string());
            } else {
                s.push_str(&format!("{d:04}"));
            }
        }
    }
    if dscale > 0 {
        s.push('.');
        let mut frac = String::new();
        let mut pos = -1;
        while frac.len() < dscale {
            frac.push_str(&format!("{:04}", digit(pos)));
            pos -= 1;
        }
        frac.truncate(dscale);
        s.push_str(&frac);
    }
    Ok(s)
}

/// Microseconds since 2000-01-01 00:00:00, as `YYYY-MM-DD HH:MM:SS[.ffffff]`.
fn timestamp(us: i64) -> String {
    match us {
        i64::MAX => return "infinity".into(),
        i64::MIN => return "-infinity".into(),
        _ => {}
    }
    let secs = us.div_euclid(1_000_000);
    let frac = us.rem_euclid(1_000_000);
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    let mut s = format!("{} {:02}:{:02}:{:02}", date(days), tod / 3600, tod / 60 % 60, tod % 60);
    if frac != 0 {
        let f = format!(".{frac:06}");
        s.push_str(f.trim_end_matches('0'));
    }
    s
}

/// Days since 2000-01-01, as `YYYY-MM-DD` (proleptic Gregorian; BC years as PostgreSQL
/// prints them are not handled).
fn date(days: i64) -> String {
    match days {
        d if d == i64::from(i32::MAX) => return "infinity".into(),
        d if d == i64::from(i32::MIN) => return "-infinity".into(),
        _ => {}
    }
    let (y, m, d) = crate::protocol::info::civil_from_days(days + 10_957);
    format!("{y:04}-{m:02}-{d:02}")
}

fn uuid(raw: &[u8]) -> Result<String, BoxError> {
    if raw.len() != 16 {
        return Err("bad uuid".into());
    }
    let h: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(ty: Type, raw: &[u8]) -> String {
        match convert(&ty, raw).unwrap() {
            Reply::Text(t) => t,
            Reply::Binary(b) => panic!("binary {b:?}"),
        }
    }

    #[test]
    fn timestamps_print_as_postgresql_does() {
        assert_eq!(timestamp(0), "2000-01-01 00:00:00");
        // 2026-12-04 14:30:00.1234 UTC
        let us = (9834 * 86_400 + 14 * 3600 + 30 * 60) * 1_000_000 + 123_400;
        assert_eq!(timestamp(us), "2026-12-04 14:30:00.1234");
        assert_eq!(text(Type::TIMESTAMPTZ, &us.to_be_bytes()), "2026-12-04 14:30:00.1234+00");
        assert_eq!(timestamp(-1), "1999-12-31 23:59:59.999999");
        assert_eq!(date(59), "2000-02-29");
        assert_eq!(date(-10_957), "1970-01-01");
    }

    #[test]
    fn numbers_and_booleans() {
        assert_eq!(text(Type::INT4, &42i32.to_be_bytes()), "42");
        assert_eq!(text(Type::INT8, &(-7i64).to_be_bytes()), "-7");
        assert_eq!(text(Type::BOOL, &[1]), "t");
        assert_eq!(text(Type::FLOAT8, &1.5f64.to_be_bytes()), "1.5");
        assert_eq!(text(Type::FLOAT8, &1e100f64.to_be_bytes()), "1e+100");
        assert_eq!(float(f64::NAN), "NaN");
    }

    #[test]
    fn numerics() {
        let n = |ws: &[i16]| -> Vec<u8> { ws.iter().flat_map(|w| w.to_be_bytes()).collect() };
        // 12345.678: digits 1, 2345, 6780; weight 1; scale 3
        assert_eq!(numeric(&n(&[3, 1, 0, 3, 1, 2345, 6780])).unwrap(), "12345.678");
        // -0.05: digit 500 at weight -1, scale 2
        assert_eq!(numeric(&n(&[1, -1, 0x4000, 2, 500])).unwrap(), "-0.05");
        // 0
        assert_eq!(numeric(&n(&[0, 0, 0, 0])).unwrap(), "0");
        // 10000 = digit 1 at weight 1, no trailing digit stored
        assert_eq!(numeric(&n(&[1, 1, 0, 0, 1])).unwrap(), "10000");
    }

    #[test]
    fn bytea_is_binary_and_text_is_itself() {
        assert_eq!(convert(&Type::BYTEA, b"\0\xff").unwrap(), Reply::Binary(vec![0, 255]));
        assert_eq!(text(Type::TEXT, "héllo".as_bytes()), "héllo");
        assert_eq!(text(Type::JSONB, b"\x01{\"a\": 1}"), "{\"a\": 1}");
        assert!(!converts(&Type::INTERVAL));
        assert!(converts(&Type::VARCHAR));
    }
}
