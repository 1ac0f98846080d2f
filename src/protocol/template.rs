//! push-stream message templates: `~text~ ~channel~ ~id~ ~time~ ~tag~ ~size~ ~event-id~
//! ~event-type~`, and pgpush's `~epoch~` (a stored message's channel epoch), parsed once at
//! configuration time and rendered per message.

/// A placeholder of a template.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    Text,
    Channel,
    Id,
    Time,
    Tag,
    Size,
    EventId,
    EventType,
    Epoch,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Literal(Vec<u8>),
    Field(Field),
}

/// A parsed template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

/// What a message provides to a template.
#[derive(Clone, Copy, Debug, Default)]
pub struct Values<'a> {
    pub text: &'a [u8],
    /// A binary message: `text` holds its bytes, which no text template applies to.
    pub binary: bool,
    pub channel: &'a str,
    pub id: i64,
    pub time: &'a str,
    pub tag: u64,
    pub event_id: &'a str,
    pub event_type: &'a str,
    /// The channel's epoch, for a stored message; 0 otherwise.
    pub epoch: i64,
}

impl Template {
    pub fn parse(t: &[u8]) -> Self {
        const FIELDS: &[(&[u8], Field)] = &[
            (b"~text~", Field::Text),
            (b"~channel~", Field::Channel),
            (b"~id~", Field::Id),
            (b"~time~", Field::Time),
            (b"~tag~", Field::Tag),
            (b"~size~", Field::Size),
            (b"~event-id~", Field::EventId),
            (b"~event-type~", Field::EventType),
            (b"~epoch~", Field::Epoch),
        ];
        let mut parts = Vec::new();
        let mut lit = Vec::new();
        let mut i = 0;
        'outer: while i < t.len() {
            if t[i] == b'~' {
                for (name, field) in FIELDS {
                    if t[i..].starts_with(name) {
                        if !lit.is_empty() {
                            parts.push(Part::Literal(std::mem::take(&mut lit)));
                        }
                        parts.push(Part::Field(*field));
                        i += name.len();
                        continue 'outer;
                    }
                }
            }
            lit.push(t[i]);
            i += 1;
        }
        if !lit.is_empty() {
            parts.push(Part::Literal(lit));
        }
        Self { parts }
    }

    /// `~text~` alone: the payload goes out untouched, with no copy.
    pub fn is_identity(&self) -> bool {
        matches!(self.parts.as_slice(), [Part::Field(Field::Text)])
    }

    pub fn uses(&self, f: Field) -> bool {
        self.parts.contains(&Part::Field(f))
    }

    pub fn render(&self, v: &Values<'_>, out: &mut Vec<u8>) {
        for p in &self.parts {
            match p {
                Part::Literal(l) => out.extend_from_slice(l),
                Part::Field(Field::Text) => out.extend_from_slice(v.text),
                Part::Field(Field::Channel) => out.extend_from_slice(v.channel.as_bytes()),
                Part::Field(Field::Id) => out.extend_from_slice(v.id.to_string().as_bytes()),
                Part::Field(Field::Time) => out.extend_from_slice(v.time.as_bytes()),
                Part::Field(Field::Tag) => out.extend_from_slice(v.tag.to_string().as_bytes()),
                Part::Field(Field::Epoch) => out.extend_from_slice(v.epoch.to_string().as_bytes()),
                Part::Field(Field::Size) => {
                    out.extend_from_slice(v.text.len().to_string().as_bytes())
                }
                Part::Field(Field::EventId) => out.extend_from_slice(v.event_id.as_bytes()),
                Part::Field(Field::EventType) => out.extend_from_slice(v.event_type.as_bytes()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(t: &str, v: &Values<'_>) -> String {
        let mut out = Vec::new();
        Template::parse(t.as_bytes()).render(v, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn renders() {
        let v = Values {
            text: b"hello",
            binary: false,
            channel: "news",
            id: 7,
            time: "2026-01-01T00:00:00",
            tag: 2,
            event_id: "e1",
            event_type: "greeting",
            epoch: 1764000000000,
        };
        assert_eq!(render("~text~", &v), "hello");
        assert_eq!(render("~epoch~:~id~", &v), "1764000000000:7");
        assert_eq!(
            render("{\"id\":~id~,\"channel\":\"~channel~\",\"text\":\"~text~\"}", &v),
            "{\"id\":7,\"channel\":\"news\",\"text\":\"hello\"}"
        );
        assert_eq!(render("~size~|~tag~|~time~", &v), "5|2|2026-01-01T00:00:00");
        assert_eq!(render("~event-id~/~event-type~", &v), "e1/greeting");
        assert_eq!(render("~~text~~ ~unknown~ ~", &v), "~hello~ ~unknown~ ~");
        assert!(Template::parse(b"~text~").is_identity());
        assert!(!Template::parse(b"<p>~text~</p>").is_identity());
        assert!(Template::parse(b"~id~").uses(Field::Id));
    }
}
