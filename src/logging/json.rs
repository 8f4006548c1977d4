//! The JSON log line, written straight into the line buffer.
//!
//! tracing-subscriber's JSON formatter sends every event through serde_json's
//! serializer, into an `io::Write` adaptor over the `fmt::Write` line buffer
//! that checks each piece for UTF-8 again: about 26,700 instructions for the
//! review line, 11% of the whole server's instructions per review over
//! HTTP/1.1 (callgrind, see BENCHMARKS.md). [`JsonLine`] writes the same line
//! directly: the same members in the same order (`timestamp`, `level`, the
//! event's fields, `target`), the same escaping and number formats, the same
//! timestamp. An event inside a span is handed to tracing-subscriber's own
//! formatter, which also writes the `span` and `spans` members (the review
//! line has no span).

use std::fmt::{self, Write as _};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{Format, Json, Writer};
use tracing_subscriber::fmt::time::FormatTime as _;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// The JSON event format of `--log-format json`: tracing-subscriber's
/// `json().flatten_event(true)` line, written without serde.
pub struct JsonLine {
    /// For events inside a span.
    in_span: Format<Json>,
}

impl JsonLine {
    /// The format, with tracing-subscriber's for events inside a span.
    pub fn new() -> Self {
        Self {
            in_span: tracing_subscriber::fmt::format().json().flatten_event(true),
        }
    }
}

impl<S, N> FormatEvent<S, N> for JsonLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'w> FormatFields<'w> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        // The span tracing-subscriber would print, looked up as it does.
        let span = event
            .parent()
            .and_then(|id| ctx.span(id))
            .or_else(|| ctx.lookup_current());
        if span.is_some() {
            return self.in_span.format_event(ctx, w, event);
        }
        let meta = event.metadata();
        let mut line = Line::new(&mut w);
        line.write_str("{\"timestamp\":\"")?;
        timestamp(&mut line, SystemTime::now())?;
        line.write_str("\",\"level\":\"")?;
        line.write_str(meta.level().as_str())?;
        line.write_str("\"")?;
        let mut fields = Fields {
            line: &mut line,
            result: Ok(()),
        };
        event.record(&mut fields);
        fields.result?;
        line.write_str(",\"target\":")?;
        string(&mut line, meta.target())?;
        line.write_str("}\n")?;
        line.flush()
    }
}

/// The line on its way into tracing-subscriber's buffer, gathered on the
/// stack first: one call through the `dyn fmt::Write` per line instead of
/// several per field.
struct Line<'a, 'w> {
    out: &'a mut Writer<'w>,
    buf: [u8; 1024],
    len: usize,
}

impl<'a, 'w> Line<'a, 'w> {
    fn new(out: &'a mut Writer<'w>) -> Self {
        Self {
            out,
            buf: [0; 1024],
            len: 0,
        }
    }

    fn flush(&mut self) -> fmt::Result {
        // Whole `str`s only were copied in, so this is UTF-8.
        let text = std::str::from_utf8(&self.buf[..self.len]).map_err(|_| fmt::Error)?;
        self.len = 0;
        self.out.write_str(text)
    }
}

impl fmt::Write for Line<'_, '_> {
    #[inline]
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if s.len() > self.buf.len() - self.len {
            self.flush()?;
            if s.len() > self.buf.len() {
                return self.out.write_str(s);
            }
        }
        self.buf[self.len..self.len + s.len()].copy_from_slice(s.as_bytes());
        self.len += s.len();
        Ok(())
    }
}

/// Writes each field as `,"name":value`, as tracing-serde's map visitor
/// serialises it: strings escaped, integers and booleans bare, floats as
/// serde_json writes them, anything else as its `Debug` text in a string.
struct Fields<'a, 'b, 'w> {
    line: &'a mut Line<'b, 'w>,
    result: fmt::Result,
}

impl Fields<'_, '_, '_> {
    fn entry(&mut self, field: &Field, value: impl FnOnce(&mut Line<'_, '_>) -> fmt::Result) {
        if self.result.is_ok() {
            self.result = (|| {
                self.line.write_str(",\"")?;
                escape(self.line, field.name())?;
                self.line.write_str("\":")?;
                value(self.line)
            })();
        }
    }
}

impl Visit for Fields<'_, '_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.entry(field, |w| string(w, value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.entry(field, |w| w.write_str(if value { "true" } else { "false" }));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.entry(field, |w| integer(w, false, value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.entry(field, |w| integer(w, value < 0, value.unsigned_abs()));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        // serde_json's float format (and `null` for NaN and infinities),
        // which `Display` does not match (`1.0`, `1e21`).
        self.entry(field, |w| {
            let text = serde_json::to_string(&value).map_err(|_| fmt::Error)?;
            w.write_str(&text)
        });
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.entry(field, |w| {
            w.write_str("\"")?;
            write!(Escaped(w), "{value:?}")?;
            w.write_str("\"")
        });
    }
}

/// An integer in decimal, as serde_json writes it.
fn integer(w: &mut impl fmt::Write, negative: bool, mut n: u64) -> fmt::Result {
    let mut digits = [0u8; 21];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    if negative {
        at -= 1;
        digits[at] = b'-';
    }
    w.write_str(std::str::from_utf8(&digits[at..]).map_err(|_| fmt::Error)?)
}

/// `s` as a JSON string.
fn string(w: &mut impl fmt::Write, s: &str) -> fmt::Result {
    w.write_str("\"")?;
    escape(w, s)?;
    w.write_str("\"")
}

/// Writes `s` escaped as serde_json escapes strings: `"` and `\`, the
/// control characters as `\b \t \n \f \r` or `\u00xx`; everything else
/// (DEL, non-ASCII) as is.
fn escape(w: &mut impl fmt::Write, s: &str) -> fmt::Result {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    if plain(s) {
        return w.write_str(s);
    }
    let mut start = 0;
    for (i, &b) in s.as_bytes().iter().enumerate() {
        let short = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            0x00..=0x1f => "",
            _ => continue,
        };
        // `b` is ASCII, so `i` and `i + 1` are character boundaries.
        w.write_str(&s[start..i])?;
        if short.is_empty() {
            let hex = [
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 0xf)],
            ];
            w.write_str(std::str::from_utf8(&hex).map_err(|_| fmt::Error)?)?;
        } else {
            w.write_str(short)?;
        }
        start = i + 1;
    }
    w.write_str(&s[start..])
}

/// True when `s` needs no escaping (most values): eight bytes at a time.
fn plain(s: &str) -> bool {
    const ONES: u64 = u64::from_ne_bytes([1; 8]);
    const HIGH: u64 = u64::from_ne_bytes([0x80; 8]);
    // Non-zero when some byte of `x` is below `n` (exact for n <= 128).
    let below = |x: u64, n: u8| x.wrapping_sub(ONES * u64::from(n)) & !x & HIGH;
    let mut chunks = s.as_bytes().chunks_exact(8);
    let mut found = 0;
    for chunk in &mut chunks {
        let mut word = [0; 8];
        word.copy_from_slice(chunk);
        let x = u64::from_ne_bytes(word);
        found |= below(x, 0x20) | below(x ^ (ONES * u64::from(b'"')), 1);
        found |= below(x ^ (ONES * u64::from(b'\\')), 1);
    }
    found == 0
        && chunks
            .remainder()
            .iter()
            .all(|&b| b >= 0x20 && b != b'"' && b != b'\\')
}

/// A `fmt::Write` that escapes what it is given (for `Debug` values).
struct Escaped<'a, W>(&'a mut W);

impl<W: fmt::Write> fmt::Write for Escaped<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        escape(self.0, s)
    }
}

/// `now` as tracing-subscriber's `SystemTime` timer writes it, e.g.
/// `2026-12-06T14:43:26.933701Z` (UTC, microseconds). Years outside
/// 1970-9999 are left to tracing-subscriber.
fn timestamp(w: &mut impl fmt::Write, now: SystemTime) -> fmt::Result {
    match civil(now) {
        Some(text) => w.write_str(std::str::from_utf8(&text).map_err(|_| fmt::Error)?),
        None => tracing_subscriber::fmt::time::SystemTime.format_time(&mut Writer::new(w)),
    }
}

/// `YYYY-MM-DDTHH:MM:SS.uuuuuuZ` for `t`, or `None` outside 1970-9999.
fn civil(t: SystemTime) -> Option<[u8; 27]> {
    let since = t.duration_since(UNIX_EPOCH).ok()?;
    let secs = since.as_secs();
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Days to a proleptic Gregorian date (Howard Hinnant's `civil_from_days`,
    // for days on or after the epoch).
    let z = days + 719_468;
    let (era, doe) = (z / 146_097, z % 146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    if year > 9999 {
        return None;
    }
    let mut out = *b"0000-00-00T00:00:00.000000Z";
    let mut put = |at: usize, width: usize, mut n: u64| {
        for i in (at..at + width).rev() {
            out[i] = b'0' + (n % 10) as u8;
            n /= 10;
        }
    };
    put(0, 4, year);
    put(5, 2, month);
    put(8, 2, day);
    put(11, 2, rest / 3_600);
    put(14, 2, rest % 3_600 / 60);
    put(17, 2, rest % 60);
    put(20, 6, u64::from(since.subsec_micros()));
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;
    use tracing::{debug, error, info, info_span, warn};
    use tracing_subscriber::fmt::MakeWriter;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl MakeWriter<'_> for Captured {
        type Writer = Self;
        fn make_writer(&self) -> Self {
            self.clone()
        }
    }

    /// Every kind of field and value the webhook logs, and the odd ones.
    fn events() {
        #[derive(Debug)]
        #[allow(dead_code)]
        struct Peer {
            addr: &'static str,
            port: u16,
        }
        let io = std::io::Error::other("broken \"pipe\"\n");
        info!(
            uid = "c0ffee00-1234",
            kind = "Pod",
            name = "web-*",
            dry_run = false,
            patch_ops = 1_u64,
            latency_us = 103_u64,
            "review"
        );
        warn!(
            text = "quote \" backslash \\ newline \n tab \t cr \r bs \u{8} ff \u{c} nul \0 us \u{1f} del \u{7f} é 日本 🦀",
            "escaping"
        );
        error!(error = %io, debug = ?io, "error values");
        error!(
            error = &io as &(dyn std::error::Error + 'static),
            "an error field"
        );
        info!(
            negative = -42_i64,
            big = u64::MAX,
            small = i64::MIN,
            wide = 170_141_183_460_469_231_731_687_303_715_884_105_727_i128,
            unsigned_wide = u128::MAX,
            "integers"
        );
        info!(
            one = 1.0_f64,
            tenth = 0.1_f64,
            huge = 1e300_f64,
            tiny = 1.5e-7_f64,
            nan = f64::NAN,
            inf = f64::INFINITY,
            "floats"
        );
        info!(peer = ?Peer { addr: "10.0.0.1", port: 8443 }, pretty = true, "debug values");
        info!(a.dotted.name = "x", r#type = "raw identifier");
        info!("message {} with {:?} arguments", 2, "formatted");
        debug!(target: "custom::target", value = 1_u64, "a target");
        info!(message = "an explicit message field", other = 2_u64);
        info!(empty = "", "");
        // Longer than the line's stack buffer, in one value and in total.
        let long = format!("{}\"{}", "a".repeat(700), "é".repeat(400));
        info!(long = long.as_str(), again = long.as_str(), "long values");
        // Inside a span: handed to tracing-subscriber's formatter.
        let span = info_span!("pods", namespace = "shop", count = 3_u64);
        span.in_scope(|| info!(inside = true, "in a span"));
        let child = info_span!(parent: &span, "child", quoted = "a \"b\"");
        info!(parent: &child, "explicit parent");
    }

    fn run(ours: bool) -> String {
        let out = Captured::default();
        let builder = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(out.clone())
            .json()
            .flatten_event(true);
        if ours {
            tracing::subscriber::with_default(
                builder.event_format(JsonLine::new()).finish(),
                events,
            );
        } else {
            tracing::subscriber::with_default(builder.finish(), events);
        }
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        // Timestamps differ between runs: compared by `civil_matches_the_calendar`.
        text.lines()
            .map(|line| {
                let at = line.find("\"timestamp\":\"").unwrap() + 13;
                format!("{}<time>{}\n", &line[..at], &line[at + 27..])
            })
            .collect()
    }

    #[test]
    fn lines_are_those_of_tracing_subscriber() {
        let (ours, theirs) = (run(true), run(false));
        assert_eq!(ours.lines().count(), 15, "{ours}");
        for (a, b) in ours.lines().zip(theirs.lines()) {
            assert_eq!(a, b);
        }
        assert_eq!(ours, theirs);
        assert!(
            ours.contains(r#""span":{"count":3,"namespace":"shop","name":"pods"}"#),
            "{ours}"
        );
    }

    #[test]
    fn plain_finds_what_needs_escaping_at_every_position() {
        let chars = (0..0x80_u8)
            .map(char::from)
            .chain(['é', '日', '🦀', '\u{7f}']);
        for c in chars {
            let needs = c < ' ' || c == '"' || c == '\\';
            for len in 1..20 {
                for at in 0..len {
                    let s: String = (0..len).map(|i| if i == at { c } else { 'a' }).collect();
                    assert_eq!(plain(&s), !needs, "{c:?} at {at} of {len}");
                }
            }
        }
        assert!(plain(""));
    }

    #[test]
    fn civil_matches_the_calendar() {
        let text = |t: SystemTime| String::from_utf8(civil(t).unwrap().to_vec()).unwrap();
        assert_eq!(text(UNIX_EPOCH), "1970-01-01T00:00:00.000000Z");
        let at =
            |secs: u64, micros: u64| UNIX_EPOCH + Duration::from_micros(secs * 1_000_000 + micros);
        assert_eq!(text(at(951_782_400, 1)), "2000-02-29T00:00:00.000001Z");
        assert_eq!(
            text(at(4_107_542_399, 999_999)),
            "2100-02-28T23:59:59.999999Z"
        );
        assert_eq!(text(at(4_107_542_400, 0)), "2100-03-01T00:00:00.000000Z");
        assert_eq!(text(at(253_402_300_799, 0)), "9999-12-31T23:59:59.000000Z");
        assert!(civil(at(253_402_300_800, 0)).is_none(), "year 10000");
        assert!(civil(UNIX_EPOCH - Duration::from_secs(1)).is_none());
        // Every day from 1970 to 2400, at a time of day that moves, against
        // the `time` crate's calendar.
        let mut secs = 0_u64;
        while secs < 13_574_563_200 {
            let dt = time::OffsetDateTime::from_unix_timestamp(secs as i64).unwrap();
            let want = format!(
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.000042Z",
                dt.year(),
                u8::from(dt.month()),
                dt.day(),
                dt.hour(),
                dt.minute(),
                dt.second()
            );
            assert_eq!(text(at(secs, 42)), want);
            secs += 86_400 + 3_607;
        }
    }
}
