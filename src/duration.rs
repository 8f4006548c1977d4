//! Go-style durations (`5s`, `1m30s`, `1.5h`, `500ms`, `720h0m0s`), parsed
//! with checked arithmetic: the apiserver's `?timeout=` query and the
//! `certs --validity` flag both use this format, and both may come from
//! someone who wants to crash us.
//!
//! The grammar is Go's `time.ParseDuration` without a sign: one or more
//! `<number><unit>` components, where the number is decimal with an optional
//! fraction (`1.5`, `.5`, `5.`) and the unit one of `ns`, `us` (`µs`, `μs`),
//! `ms`, `s`, `m`, `h`; a bare `0` is zero. The sum must fit a
//! [`Duration`]; a value too large for it is an error, never a wrap or a
//! panic. Fraction digits beyond the nineteenth are read and ignored.

use std::time::Duration;

/// Why a duration could not be read. `Copy` and allocation-free: the server
/// falls back to its default on error without building a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DurationError {
    /// The input was empty.
    Empty,
    /// A component did not start with a number (signs are not accepted).
    ExpectedNumber,
    /// A number had no unit after it.
    MissingUnit,
    /// A unit other than `ns`, `us`, `µs`, `ms`, `s`, `m` or `h`.
    UnknownUnit,
    /// The total does not fit a [`Duration`].
    TooLarge,
}

impl DurationError {
    /// What is wrong, in a few words (also the `Display` text).
    pub fn as_str(self) -> &'static str {
        match self {
            DurationError::Empty => "empty",
            DurationError::ExpectedNumber => "expected a number",
            DurationError::MissingUnit => "missing unit",
            DurationError::UnknownUnit => "unknown unit",
            DurationError::TooLarge => "too large",
        }
    }
}

impl std::fmt::Display for DurationError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::error::Error for DurationError {}

/// Parses a Go-style duration; see the [module docs](self) for the grammar.
pub fn parse(input: &str) -> Result<Duration, DurationError> {
    if input == "0" {
        return Ok(Duration::ZERO);
    }
    if input.is_empty() {
        return Err(DurationError::Empty);
    }
    let mut total: u128 = 0;
    let mut rest = input.as_bytes();
    while !rest.is_empty() {
        let (nanos, tail) = component(rest)?;
        total = total.checked_add(nanos).ok_or(DurationError::TooLarge)?;
        rest = tail;
    }
    let secs = u64::try_from(total / NANOS_PER_SEC).map_err(|_| DurationError::TooLarge)?;
    // The remainder is below 10^9, so it fits a u32.
    Ok(Duration::new(secs, (total % NANOS_PER_SEC) as u32))
}

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// Stop scaling the fraction here: 10^19 already resolves a nanosecond of an
/// hour (3.6 * 10^12 ns) and keeps `fraction * unit` well inside a u128.
const MAX_FRACTION_SCALE: u128 = 10_u128.pow(19);

/// One `<number><unit>`: its value in nanoseconds and what follows it.
fn component(input: &[u8]) -> Result<(u128, &[u8]), DurationError> {
    let (whole, whole_digits, rest) = digits(input)?;
    let (fraction, scale, fraction_digits, rest) = match rest.split_first() {
        Some((b'.', after)) => {
            let mut fraction: u128 = 0;
            let mut scale: u128 = 1;
            let count = after.iter().take_while(|b| b.is_ascii_digit()).count();
            for &b in &after[..count] {
                if scale < MAX_FRACTION_SCALE {
                    fraction = fraction * 10 + u128::from(b - b'0');
                    scale *= 10;
                }
            }
            (fraction, scale, count, &after[count..])
        }
        _ => (0, 1, 0, rest),
    };
    if whole_digits == 0 && fraction_digits == 0 {
        return Err(DurationError::ExpectedNumber);
    }
    let unit_len = rest
        .iter()
        .take_while(|b| !b.is_ascii_digit() && **b != b'.')
        .count();
    let (unit, rest) = rest.split_at(unit_len);
    let unit_nanos: u128 = match unit {
        b"" => return Err(DurationError::MissingUnit),
        b"ns" => 1,
        // "µs" (U+00B5 micro sign) and "μs" (U+03BC Greek mu), as Go.
        b"us" | b"\xc2\xb5s" | b"\xce\xbcs" => 1_000,
        b"ms" => 1_000_000,
        b"s" => NANOS_PER_SEC,
        b"m" => 60 * NANOS_PER_SEC,
        b"h" => 3_600 * NANOS_PER_SEC,
        _ => return Err(DurationError::UnknownUnit),
    };
    let nanos = whole
        .checked_mul(unit_nanos)
        .and_then(|n| n.checked_add(fraction * unit_nanos / scale))
        .ok_or(DurationError::TooLarge)?;
    Ok((nanos, rest))
}

/// Leading ASCII digits as a number, how many there were, and the rest.
fn digits(input: &[u8]) -> Result<(u128, usize, &[u8]), DurationError> {
    let count = input.iter().take_while(|b| b.is_ascii_digit()).count();
    let mut value: u128 = 0;
    for &b in &input[..count] {
        value = value
            .checked_mul(10)
            .and_then(|v| v.checked_add(u128::from(b - b'0')))
            .ok_or(DurationError::TooLarge)?;
    }
    Ok((value, count, &input[count..]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn what_the_apiserver_and_go_print() {
        let cases = [
            ("0", Duration::ZERO),
            ("0s", Duration::ZERO),
            ("5s", ms(5_000)),
            ("10s", ms(10_000)),
            ("500ms", ms(500)),
            ("1m30s", ms(90_000)),
            ("1.5s", ms(1_500)),
            (".5s", ms(500)),
            ("5.s", ms(5_000)),
            ("1.5h", ms(5_400_000)),
            ("720h0m0s", Duration::from_secs(720 * 3600)),
            ("2h45m0.5s", ms((2 * 3600 + 45 * 60) * 1000 + 500)),
            ("1µs", Duration::from_micros(1)),
            ("1μs", Duration::from_micros(1)),
            ("1us", Duration::from_micros(1)),
            ("1ns", Duration::from_nanos(1)),
            ("1.0000000001s", Duration::from_secs(1)),
            ("0.000000001s", Duration::from_nanos(1)),
            // Fraction digits past the nineteenth are ignored, not overflowed.
            (
                "1.00000000000000000000000000000000000009s",
                Duration::from_secs(1),
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(parse(input), Ok(expected), "{input}");
        }
    }

    #[test]
    fn bad_input_is_an_error() {
        use DurationError::*;
        let cases = [
            ("", Empty),
            ("5", MissingUnit),
            ("1h5", MissingUnit),
            ("s", ExpectedNumber),
            (".s", ExpectedNumber),
            ("-5s", ExpectedNumber),
            ("+5s", ExpectedNumber),
            ("1h 30m", UnknownUnit),
            ("5x", UnknownUnit),
            ("1d", UnknownUnit),
            ("5S", UnknownUnit),
            ("5s\u{0}", UnknownUnit),
            ("1e9s", UnknownUnit),
            ("1..5s", MissingUnit),
            ("5s5", MissingUnit),
        ];
        for (input, expected) in cases {
            assert_eq!(parse(input), Err(expected), "{input}");
        }
    }

    #[test]
    fn values_past_the_largest_duration_are_too_large() {
        let max = u64::MAX.to_string();
        assert_eq!(parse(&format!("{max}s")), Ok(Duration::from_secs(u64::MAX)));
        assert_eq!(
            parse(&format!("{max}.999999999s")),
            Ok(Duration::new(u64::MAX, 999_999_999))
        );
        for input in [
            format!("{max}s1s"),
            format!("{max}.999999999s1ns"),
            // The crafted `?timeout=` from issue #12.
            "10000000000000000000s10000000000000000000s".to_string(),
            "99999999999999999999h".to_string(),
            "5124095576030432h".to_string(),
            format!("{}s", "9".repeat(60)),
        ] {
            assert_eq!(parse(&input), Err(DurationError::TooLarge), "{input}");
        }
        // Many components are summed one by one, not collected first.
        assert_eq!(
            parse(&"1h".repeat(100_000)),
            Ok(Duration::from_secs(360_000_000))
        );
    }

    /// Go's `Duration.String()` for whole nanoseconds below 2^63 (what the
    /// apiserver puts in `?timeout=`).
    fn go_string(nanos: u64) -> String {
        if nanos == 0 {
            return "0s".into();
        }
        if nanos < 1_000_000_000 {
            let (unit, scale) = match nanos {
                0..1_000 => ("ns", 1),
                1_000..1_000_000 => ("µs", 1_000),
                _ => ("ms", 1_000_000),
            };
            return format!("{}{unit}", decimal(nanos, scale));
        }
        let (h, rem) = (nanos / 3_600_000_000_000, nanos % 3_600_000_000_000);
        let (m, rem) = (rem / 60_000_000_000, rem % 60_000_000_000);
        let s = decimal(rem, 1_000_000_000);
        match (h, m) {
            (0, 0) => format!("{s}s"),
            (0, m) => format!("{m}m{s}s"),
            (h, m) => format!("{h}h{m}m{s}s"),
        }
    }

    fn decimal(value: u64, scale: u64) -> String {
        let (whole, frac) = (value / scale, value % scale);
        if frac == 0 {
            return whole.to_string();
        }
        let width = scale.ilog10() as usize;
        let frac = format!("{frac:0width$}");
        format!("{whole}.{}", frac.trim_end_matches('0'))
    }

    proptest! {
        #[test]
        fn any_string_is_parsed_or_refused(input in ".{0,40}") {
            let _ = parse(&input);
        }

        #[test]
        fn duration_shaped_strings_are_parsed_or_refused(
            input in "[0-9.]{0,25}(ns|us|µs|ms|s|m|h|x|)([0-9.]{0,25}(ns|ms|s|m|h)){0,4}"
        ) {
            let _ = parse(&input);
        }

        #[test]
        fn go_formatted_durations_round_trip(nanos in 0..=i64::MAX as u64) {
            let text = go_string(nanos);
            prop_assert_eq!(parse(&text), Ok(Duration::from_nanos(nanos)), "{}", text);
        }

        #[test]
        fn components_add_up_or_are_too_large(
            parts in prop::collection::vec((any::<u64>(), 0..4usize), 1..5)
        ) {
            const UNITS: [(&str, u128); 4] =
                [("ns", 1), ("s", NANOS_PER_SEC), ("m", 60 * NANOS_PER_SEC), ("h", 3600 * NANOS_PER_SEC)];
            let text: String = parts.iter().map(|&(n, u)| format!("{n}{}", UNITS[u].0)).collect();
            let expected: u128 = parts.iter().map(|&(n, u)| u128::from(n) * UNITS[u].1).sum();
            let fits = expected / NANOS_PER_SEC <= u128::from(u64::MAX);
            match parse(&text) {
                Ok(d) => prop_assert!(fits && d.as_nanos() == expected, "{}", text),
                Err(e) => prop_assert!(!fits && e == DurationError::TooLarge, "{}: {}", text, e),
            }
        }
    }
}
