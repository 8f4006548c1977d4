//! A strict, fast JSON reader for review bodies: a serde `Deserializer`
//! that reads what serde_json reads, or gives up.
//!
//! serde_json spends most of its time on a review skipping what the webhook
//! does not read (a sidecar's args, env, probes, resources...): about
//! 77,000 of the 200,000 instructions the whole server spends per review
//! over HTTP/1.1 (callgrind, see BENCHMARKS.md). This reader skips a value
//! in one tight loop that validates as it goes, and reads strings in place.
//!
//! The contract, on which [`crate::admission::review`] relies: for any
//! input, [`from_slice`] either fails, with no detail, or returns the value
//! `serde_json::from_slice` would return (and `serde_json::from_str`, when
//! the input is UTF-8). It never accepts what serde_json refuses: it is
//! stricter in places (a string read as bytes, nesting deeper than 64 in a
//! skipped value, lone UTF-16 surrogates), and it reads only what the
//! review's types ask for (structs, maps, sequences, options, strings,
//! booleans, ignored values and serde_json's raw values); anything else,
//! such as `deserialize_any` or a number read as a number, fails. A failure
//! costs the partial read: the caller then reads the body with serde_json,
//! which gives the answer or the error it always gave. The visitors are
//! called as serde_json calls them (`visit_borrowed_str` for a string
//! without escapes, `visit_str` for one decoded, `visit_map` for an object
//! read as a struct...), so what a type makes of its input is the same.
//!
//! Like serde_json's slice reader, only strings the types read are checked
//! for UTF-8; skipped strings are checked for JSON escapes and control
//! characters only.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};

/// The reader did not take the input: read it with serde_json.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct GiveUp;

impl fmt::Display for GiveUp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("not read by the fast reader")
    }
}

impl std::error::Error for GiveUp {}

impl de::Error for GiveUp {
    fn custom<T: fmt::Display>(_msg: T) -> Self {
        GiveUp
    }
}

/// The name serde_json's `RawValue` asks a deserializer for; answered as
/// serde_json answers it (a map of this key to the value's JSON text).
const RAW_VALUE_TOKEN: &str = "$serde_json::private::RawValue";

/// Nesting a skipped value may have; deeper fails (serde_json has no limit
/// there, so its answer stands).
const MAX_SKIP_DEPTH: u32 = 64;

type Result<T> = std::result::Result<T, GiveUp>;

/// Reads a `T` from `input`, which must hold one JSON value and whitespace.
pub(crate) fn from_slice<'de, T: de::Deserialize<'de>>(input: &'de [u8]) -> Result<T> {
    read::<T, Native>(input)
}

/// [`from_slice`], scanning strings with `S`.
fn read<'de, T: de::Deserialize<'de>, S: Scan>(input: &'de [u8]) -> Result<T> {
    let mut reader = Reader::<S> {
        input,
        // One check of the whole input (every real review is UTF-8) costs
        // less than one per string read.
        text: std::str::from_utf8(input).ok(),
        pos: 0,
        scratch: String::new(),
        scan: PhantomData,
    };
    let value = T::deserialize(&mut reader)?;
    reader.skip_ws();
    if reader.pos != input.len() {
        return Err(GiveUp);
    }
    Ok(value)
}

/// The input and where reading is; strings are scanned with `S`.
struct Reader<'de, S> {
    input: &'de [u8],
    /// `input`, when it is UTF-8 as a whole.
    text: Option<&'de str>,
    pos: usize,
    /// Decoded strings that had escapes.
    scratch: String,
    scan: PhantomData<S>,
}

/// How the reader finds the end of the plain text in a string (the first
/// `"`, `\` or control character): [`find_special`].
trait Scan {
    /// Index of the first special byte at or after `i`, else `input.len()`.
    fn find_special(input: &[u8], i: usize) -> usize;
}

/// The build's own scan: SSE2 on x86_64, [`find_special_swar`] elsewhere.
struct Native;

impl Scan for Native {
    #[inline(always)]
    fn find_special(input: &[u8], i: usize) -> usize {
        find_special(input, i)
    }
}

/// The portable scan that non-x86_64 builds (aarch64) use, for tests to
/// read every input both ways on x86_64 too.
#[cfg(test)]
struct Portable;

#[cfg(test)]
impl Scan for Portable {
    #[inline(always)]
    fn find_special(input: &[u8], i: usize) -> usize {
        find_special_swar(input, i)
    }
}

/// Past JSON whitespace (the four bytes serde_json skips) from `i`.
#[inline(always)]
fn ws(input: &[u8], mut i: usize) -> usize {
    // Compact JSON has none: one comparison for the common case.
    while let Some(&c) = input.get(i)
        && c <= b' '
        && matches!(c, b' ' | b'\n' | b'\t' | b'\r')
    {
        i += 1;
    }
    i
}

/// Index of the first `"`, `\` or control character (below 0x20) at or
/// after `i`, else `input.len()`. Sixteen bytes at a time with SSE2, which
/// every x86_64 CPU has; the rest as [`find_special_swar`].
#[cfg(all(target_arch = "x86_64", target_feature = "sse2"))]
#[inline(always)]
fn find_special(input: &[u8], mut i: usize) -> usize {
    use std::arch::x86_64::{
        _mm_cmpeq_epi8, _mm_loadu_si128, _mm_min_epu8, _mm_movemask_epi8, _mm_or_si128,
        _mm_set1_epi8,
    };
    while let Some(chunk) = input.get(i..i + 16) {
        // SAFETY: the load reads the 16 bytes of `chunk` (`get` checked the
        // range) and has no alignment requirement; every intrinsic here
        // needs SSE2 (calling them is unsafe for that alone, the others
        // only compute on registers), which this build enables (the `cfg`
        // above: every x86_64 CPU has it).
        let mask = unsafe {
            let v = _mm_loadu_si128(chunk.as_ptr().cast());
            // Bytes equal to `"` or `\`, or no greater than 0x1f (unsigned).
            let found = _mm_or_si128(
                _mm_or_si128(
                    _mm_cmpeq_epi8(v, _mm_set1_epi8(b'"' as i8)),
                    _mm_cmpeq_epi8(v, _mm_set1_epi8(b'\\' as i8)),
                ),
                _mm_cmpeq_epi8(_mm_min_epu8(v, _mm_set1_epi8(0x1f)), v),
            );
            _mm_movemask_epi8(found) as u32
        };
        if mask != 0 {
            return i + mask.trailing_zeros() as usize;
        }
        i += 16;
    }
    find_special_swar(input, i)
}

/// [`find_special`] elsewhere.
#[cfg(not(all(target_arch = "x86_64", target_feature = "sse2")))]
#[inline]
fn find_special(input: &[u8], i: usize) -> usize {
    find_special_swar(input, i)
}

/// [`find_special`] eight bytes at a time (as serde_json's own string
/// scan): the lowest flagged byte is always a true match.
#[inline(never)]
fn find_special_swar(input: &[u8], mut i: usize) -> usize {
    const ONES: u64 = u64::MAX / 255;
    const HIGH: u64 = ONES << 7;
    while let Some(chunk) = input.get(i..i + 8) {
        let v = u64::from_le_bytes(chunk.try_into().unwrap_or_default());
        let ctrl = v.wrapping_sub(ONES * 0x20) & !v;
        let q = v ^ (ONES * u64::from(b'"'));
        let quote = q.wrapping_sub(ONES) & !q;
        let b = v ^ (ONES * u64::from(b'\\'));
        let backslash = b.wrapping_sub(ONES) & !b;
        let found = (ctrl | quote | backslash) & HIGH;
        if found != 0 {
            return i + (found.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while let Some(&c) = input.get(i) {
        if c == b'"' || c == b'\\' || c < 0x20 {
            return i;
        }
        i += 1;
    }
    i
}

/// Four hex digits at `i`, as serde_json decodes them.
#[inline]
fn hex4(input: &[u8], i: usize) -> Result<u32> {
    let digits = input.get(i..i + 4).ok_or(GiveUp)?;
    let mut n = 0;
    for &d in digits {
        let v = match d {
            b'0'..=b'9' => d - b'0',
            b'a'..=b'f' => d - b'a' + 10,
            b'A'..=b'F' => d - b'A' + 10,
            _ => return Err(GiveUp),
        };
        n = n << 4 | u32::from(v);
    }
    Ok(n)
}

/// Past the string whose content starts at `i` (after its `"`): past its
/// closing `"`. Checks escapes and control characters as serde_json does
/// for a string it skips.
#[inline(always)]
fn skip_str<S: Scan>(input: &[u8], i: usize) -> Result<usize> {
    let end = S::find_special(input, i);
    if input.get(end) == Some(&b'"') {
        return Ok(end + 1);
    }
    skip_str_escaped::<S>(input, end)
}

/// [`skip_str`] from the first byte that is not plain text, at `i`.
#[inline(never)]
fn skip_str_escaped<S: Scan>(input: &[u8], mut i: usize) -> Result<usize> {
    loop {
        match input.get(i) {
            Some(b'"') => return Ok(i + 1),
            Some(b'\\') => {
                i = match input.get(i + 1) {
                    Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => i + 2,
                    Some(b'u') => {
                        hex4(input, i + 2)?;
                        i + 6
                    }
                    _ => return Err(GiveUp),
                }
            }
            _ => return Err(GiveUp),
        }
        i = S::find_special(input, i);
    }
}

/// Past the number starting at `i` (JSON's grammar, as serde_json checks a
/// number it skips; a leading zero followed by a digit leaves the digit,
/// which then fails where it stands).
#[inline]
fn skip_number(input: &[u8], mut i: usize) -> Result<usize> {
    let digits = |mut i: usize| {
        while let Some(b'0'..=b'9') = input.get(i) {
            i += 1;
        }
        i
    };
    if input.get(i) == Some(&b'-') {
        i += 1;
    }
    match input.get(i) {
        Some(b'0') => i += 1,
        Some(b'1'..=b'9') => i = digits(i + 1),
        _ => return Err(GiveUp),
    }
    if input.get(i) == Some(&b'.') {
        let start = i + 1;
        i = digits(start);
        if i == start {
            return Err(GiveUp);
        }
    }
    if let Some(b'e' | b'E') = input.get(i) {
        i += 1;
        if let Some(b'+' | b'-') = input.get(i) {
            i += 1;
        }
        let start = i;
        i = digits(start);
        if i == start {
            return Err(GiveUp);
        }
    }
    Ok(i)
}

/// Past `word` (`true`, `false`, `null`) at `i`.
#[inline]
fn literal(input: &[u8], i: usize, word: &[u8]) -> Result<usize> {
    if input.get(i..i + word.len()) == Some(word) {
        Ok(i + word.len())
    } else {
        Err(GiveUp)
    }
}

/// Past an object member's key and its `:`, the key's `"` at `i`.
#[inline(always)]
fn skip_key<S: Scan>(input: &[u8], i: usize) -> Result<usize> {
    if input.get(i) != Some(&b'"') {
        return Err(GiveUp);
    }
    let i = ws(input, skip_str::<S>(input, i + 1)?);
    if input.get(i) != Some(&b':') {
        return Err(GiveUp);
    }
    Ok(i + 1)
}

impl<'de, S: Scan> Reader<'de, S> {
    #[inline]
    fn skip_ws(&mut self) {
        self.pos = ws(self.input, self.pos);
    }

    /// The next byte after whitespace, not consumed.
    #[inline]
    fn peek(&mut self) -> Option<u8> {
        self.skip_ws();
        self.input.get(self.pos).copied()
    }

    /// Consumes `word` after whitespace.
    #[inline]
    fn eat_literal(&mut self, word: &[u8]) -> Result<()> {
        self.skip_ws();
        self.pos = literal(self.input, self.pos, word)?;
        Ok(())
    }

    /// Skips one value, validated, without recursion: containers open are
    /// kept as bits (1 = object), innermost lowest.
    fn skip_value(&mut self) -> Result<()> {
        let input = self.input;
        let mut i = self.pos;
        let mut open: u64 = 0;
        let mut depth = 0;
        loop {
            // A value starts at `i`, after whitespace.
            match input.get(i) {
                Some(b'"') => i = skip_str::<S>(input, i + 1)?,
                Some(&c @ (b'{' | b'[')) => {
                    if depth == MAX_SKIP_DEPTH {
                        return Err(GiveUp);
                    }
                    let object = c == b'{';
                    i = ws(input, i + 1);
                    match input.get(i) {
                        Some(b'}') if object => i += 1,
                        Some(b']') if !object => i += 1,
                        _ => {
                            open = open << 1 | u64::from(object);
                            depth += 1;
                            if object {
                                i = skip_key::<S>(input, i)?;
                            }
                            continue;
                        }
                    }
                }
                Some(b' ' | b'\n' | b'\t' | b'\r') => {
                    i += 1;
                    continue;
                }
                Some(b't') => i = literal(input, i, b"true")?,
                Some(b'f') => i = literal(input, i, b"false")?,
                Some(b'n') => i = literal(input, i, b"null")?,
                Some(b'-' | b'0'..=b'9') => i = skip_number(input, i)?,
                _ => return Err(GiveUp),
            }
            // A value ended at `i`: close what ends here, up to the next
            // value of an open container.
            loop {
                if depth == 0 {
                    self.pos = i;
                    return Ok(());
                }
                let object = open & 1 == 1;
                match input.get(i) {
                    Some(b',') => {
                        i = ws(input, i + 1);
                        if object {
                            i = skip_key::<S>(input, i)?;
                        }
                        break;
                    }
                    Some(b'}') if object => {}
                    Some(b']') if !object => {}
                    Some(b' ' | b'\n' | b'\t' | b'\r') => {
                        i += 1;
                        continue;
                    }
                    _ => return Err(GiveUp),
                }
                i += 1;
                open >>= 1;
                depth -= 1;
            }
        }
    }

    /// `input[start..end]`, which lies between two ASCII bytes, as `str`.
    #[inline]
    fn slice_str(&self, start: usize, end: usize) -> Result<&'de str> {
        match self.text {
            Some(text) => text.get(start..end).ok_or(GiveUp),
            None => std::str::from_utf8(&self.input[start..end]).map_err(|_| GiveUp),
        }
    }

    /// Reads the string whose `"` is next (after whitespace) and hands it
    /// to `visitor`: in place when it has no escapes, else decoded.
    fn read_str<V: Visitor<'de>>(&mut self, visitor: V) -> Result<V::Value> {
        if self.peek() != Some(b'"') {
            return Err(GiveUp);
        }
        let input = self.input;
        let start = self.pos + 1;
        let end = S::find_special(input, start);
        match input.get(end) {
            Some(b'"') => {
                let s = self.slice_str(start, end)?;
                self.pos = end + 1;
                visitor.visit_borrowed_str(s)
            }
            Some(b'\\') => {
                self.decode_escaped(start, end)?;
                visitor.visit_str(&self.scratch)
            }
            _ => Err(GiveUp),
        }
    }

    /// Decodes the string starting at `start` whose first escape is at
    /// `special` into `scratch`, and moves past it. Fails on anything
    /// serde_json would refuse in a string it reads, and on lone surrogates.
    #[cold]
    fn decode_escaped(&mut self, start: usize, mut special: usize) -> Result<()> {
        let input = self.input;
        self.scratch.clear();
        let mut i = start;
        loop {
            let plain = self.slice_str(i, special)?;
            self.scratch.push_str(plain);
            match input.get(special) {
                Some(b'"') => {
                    self.pos = special + 1;
                    return Ok(());
                }
                Some(b'\\') => {}
                _ => return Err(GiveUp),
            }
            let (c, len) = match input.get(special + 1) {
                Some(b'"') => ('"', 2),
                Some(b'\\') => ('\\', 2),
                Some(b'/') => ('/', 2),
                Some(b'b') => ('\x08', 2),
                Some(b'f') => ('\x0c', 2),
                Some(b'n') => ('\n', 2),
                Some(b'r') => ('\r', 2),
                Some(b't') => ('\t', 2),
                Some(b'u') => match hex4(input, special + 2)? {
                    high @ 0xD800..=0xDBFF => {
                        if input.get(special + 6..special + 8) != Some(b"\\u") {
                            return Err(GiveUp);
                        }
                        let low = hex4(input, special + 8)?;
                        if !(0xDC00..=0xDFFF).contains(&low) {
                            return Err(GiveUp);
                        }
                        let n = 0x1_0000 + ((high - 0xD800) << 10) + (low - 0xDC00);
                        (char::from_u32(n).ok_or(GiveUp)?, 12)
                    }
                    n => (char::from_u32(n).ok_or(GiveUp)?, 6),
                },
                _ => return Err(GiveUp),
            };
            self.scratch.push(c);
            i = special + len;
            special = S::find_special(input, i);
        }
    }

    /// Consumes `close` after whitespace: the end of a container a visitor
    /// read to its end (anything else, such as a trailing comma, fails).
    #[inline]
    fn end(&mut self, close: u8) -> Result<()> {
        if self.peek() != Some(close) {
            return Err(GiveUp);
        }
        self.pos += 1;
        Ok(())
    }

    /// Reads an array through `visitor`'s sequence access.
    fn read_array<V: Visitor<'de>>(&mut self, visitor: V) -> Result<V::Value> {
        if self.peek() != Some(b'[') {
            return Err(GiveUp);
        }
        self.pos += 1;
        let value = visitor.visit_seq(Elements {
            reader: self,
            first: true,
        })?;
        self.end(b']')?;
        Ok(value)
    }

    /// Reads an object through `visitor`'s map access.
    fn read_object<V: Visitor<'de>>(&mut self, visitor: V) -> Result<V::Value> {
        if self.peek() != Some(b'{') {
            return Err(GiveUp);
        }
        self.pos += 1;
        let value = visitor.visit_map(Members {
            reader: self,
            first: true,
        })?;
        self.end(b'}')?;
        Ok(value)
    }
}

impl<'de, S: Scan> de::Deserializer<'de> for &mut Reader<'de, S> {
    type Error = GiveUp;

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value> {
        Err(GiveUp)
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        match self.peek() {
            Some(b't') => {
                self.eat_literal(b"true")?;
                visitor.visit_bool(true)
            }
            Some(b'f') => {
                self.eat_literal(b"false")?;
                visitor.visit_bool(false)
            }
            _ => Err(GiveUp),
        }
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        self.read_str(visitor)
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        self.read_str(visitor)
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        self.read_str(visitor)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        match self.peek() {
            Some(b'n') => {
                self.eat_literal(b"null")?;
                visitor.visit_none()
            }
            Some(_) => visitor.visit_some(self),
            None => Err(GiveUp),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value> {
        if name == RAW_VALUE_TOKEN {
            self.skip_ws();
            let start = self.pos;
            self.skip_value()?;
            let raw = self.slice_str(start, self.pos)?;
            return visitor.visit_map(RawValueMap { raw: Some(raw) });
        }
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        self.read_array(visitor)
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        self.read_object(visitor)
    }

    /// An object, or an array (its fields in order), as serde_json reads a
    /// struct.
    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value> {
        if self.peek() == Some(b'[') {
            self.read_array(visitor)
        } else {
            self.read_object(visitor)
        }
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        self.skip_value()?;
        visitor.visit_unit()
    }

    serde::forward_to_deserialize_any! {
        i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char bytes byte_buf
        unit unit_struct tuple tuple_struct enum
    }
}

/// An object's members, for a visitor.
struct Members<'a, 'de, S> {
    reader: &'a mut Reader<'de, S>,
    first: bool,
}

impl<'de, S: Scan> MapAccess<'de> for Members<'_, 'de, S> {
    type Error = GiveUp;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>> {
        match self.reader.peek() {
            Some(b'}') => return Ok(None),
            Some(b'"') if self.first => self.first = false,
            Some(b',') if !self.first => {
                self.reader.pos += 1;
                if self.reader.peek() != Some(b'"') {
                    return Err(GiveUp);
                }
            }
            _ => return Err(GiveUp),
        }
        seed.deserialize(Key(&mut *self.reader)).map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value> {
        if self.reader.peek() != Some(b':') {
            return Err(GiveUp);
        }
        self.reader.pos += 1;
        seed.deserialize(&mut *self.reader)
    }
}

/// An array's elements, for a visitor.
struct Elements<'a, 'de, S> {
    reader: &'a mut Reader<'de, S>,
    first: bool,
}

impl<'de, S: Scan> SeqAccess<'de> for Elements<'_, 'de, S> {
    type Error = GiveUp;

    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>> {
        match self.reader.peek() {
            Some(b']') => return Ok(None),
            Some(_) if self.first => self.first = false,
            Some(b',') => {
                self.reader.pos += 1;
                if matches!(self.reader.peek(), Some(b']') | None) {
                    return Err(GiveUp);
                }
            }
            _ => return Err(GiveUp),
        }
        seed.deserialize(&mut *self.reader).map(Some)
    }
}

/// `Deserializer` methods that fail.
macro_rules! give_up {
    ($($method:ident)*) => {
        $(
            fn $method<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value> {
                Err(GiveUp)
            }
        )*
    };
}

/// An object key (the reader is at its `"`): a string, whatever the key
/// type asks for, as serde_json reads keys; keys read as numbers or
/// booleans fail.
struct Key<'a, 'de, S>(&'a mut Reader<'de, S>);

impl<'de, S: Scan> de::Deserializer<'de> for Key<'_, 'de, S> {
    type Error = GiveUp;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        self.0.read_str(visitor)
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        self.0.read_str(visitor)
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        self.0.read_str(visitor)
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        self.0.read_str(visitor)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        self.0.read_str(visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _visitor: V,
    ) -> Result<V::Value> {
        Err(GiveUp)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value> {
        Err(GiveUp)
    }

    // serde_json reads these from inside the key's quotes; not needed here.
    give_up! {
        deserialize_bool deserialize_option deserialize_bytes deserialize_byte_buf
        deserialize_i8 deserialize_i16 deserialize_i32 deserialize_i64 deserialize_i128
        deserialize_u8 deserialize_u16 deserialize_u32 deserialize_u64 deserialize_u128
        deserialize_f32 deserialize_f64
    }

    serde::forward_to_deserialize_any! {
        char unit unit_struct seq tuple tuple_struct map struct
    }
}

/// serde_json's answer to `RawValue`: one member, the token, whose value is
/// the JSON text.
struct RawValueMap<'de> {
    raw: Option<&'de str>,
}

impl<'de> MapAccess<'de> for RawValueMap<'de> {
    type Error = GiveUp;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>> {
        if self.raw.is_none() {
            return Ok(None);
        }
        seed.deserialize(de::value::BorrowedStrDeserializer::new(RAW_VALUE_TOKEN))
            .map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value> {
        let raw = self.raw.take().ok_or(GiveUp)?;
        seed.deserialize(de::value::BorrowedStrDeserializer::new(raw))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::{Value, json};

    use super::*;
    use crate::admission::ReviewIn;
    use crate::mutate::ObjectView;

    type Review<'a> = ReviewIn<ObjectView<'a>>;

    /// What serde_json makes of `input` (as the server reads a body).
    fn serde(input: &[u8]) -> Option<String> {
        crate::admission::read_review(input)
            .ok()
            .map(|r| format!("{r:?}"))
    }

    /// What the fast reader makes of `input`, read with the build's scan
    /// and with the portable one (aarch64's), which must agree.
    fn fast(input: &[u8]) -> Option<String> {
        let native = from_slice::<Review>(input).ok().map(|r| format!("{r:?}"));
        let portable = read::<Review, Portable>(input)
            .ok()
            .map(|r| format!("{r:?}"));
        assert_eq!(
            native,
            portable,
            "the two scans read differently: {}",
            String::from_utf8_lossy(input)
        );
        native
    }

    /// The contract: the fast reader gives up, or agrees with serde_json.
    fn agrees(input: &[u8]) -> std::result::Result<bool, String> {
        match fast(input) {
            None => Ok(false),
            Some(value) => match serde(input) {
                Some(expected) if expected == value => Ok(true),
                Some(expected) => Err(format!(
                    "{}\nfast:  {value}\nserde: {expected}",
                    String::from_utf8_lossy(input)
                )),
                None => Err(format!(
                    "accepted what serde_json refuses: {}",
                    String::from_utf8_lossy(input)
                )),
            },
        }
    }

    fn reviews() -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        let mut dirs = vec![std::path::PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures"
        ))];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                let name = path.display().to_string();
                if path.is_dir() {
                    dirs.push(path);
                } else if name.ends_with(".review.json") {
                    out.push((name, std::fs::read(&path).unwrap()));
                }
            }
        }
        out.sort();
        assert!(out.len() >= 20, "fixtures found: {}", out.len());
        out
    }

    #[test]
    fn every_fixture_is_read_as_serde_json_reads_it() {
        for (name, body) in reviews() {
            let value: Value = serde_json::from_slice(&body).unwrap();
            let compact = serde_json::to_vec(&value).unwrap();
            for input in [&body, &compact] {
                assert_eq!(agrees(input), Ok(true), "{name}");
            }
        }
    }

    /// A small review around `object`, as text.
    fn review_with(object: &str) -> String {
        format!(
            r#"{{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{{"uid":"u","kind":{{"group":"","version":"v1","kind":"Pod"}},"operation":"CREATE","object":{object}}}}}"#
        )
    }

    #[test]
    fn what_it_takes_and_what_it_leaves_to_serde_json() {
        let taken = [
            // Escapes in strings read, and in strings skipped.
            r#"{"metadata":{"name":"caf\u00e9 \ud83d\ude00 \"q\" \\ \/ \b\f\n\r\t","x":"\u00E9\n"}}"#,
            // The same key twice in a map: the last wins, as in serde_json.
            r#"{"metadata":{"labels":{"a":"1","a":"2"}}}"#,
            // Nulls where options are read.
            r#"{"kind":null,"metadata":{"labels":null,"annotations":null,"name":null},"spec":null}"#,
            // Numbers and literals skipped.
            r#"{"x":[0,-0,1.5,-2e10,3E+2,4e-3,1e400,123456789012345678901234567890,true,false,null]}"#,
            // Whitespace everywhere JSON allows it.
            " \t\r\n{ \"metadata\" : { \"labels\" : { \"a\" : \"b\" } , \"x\" : [ 1 , { } , [ ] ] } } \n",
            // Raw `env` kept as written.
            r#"{"spec":{"containers":[{"name":"c","env":[ {"name":"A","value":"1"} ],"image":"i:1"}]}}"#,
            r#"{"spec":{"containers":[{"name":"c","env":null}]}}"#,
            r#"{"metadata":{"ownerReferences":[{"apiVersion":"v1","kind":"K","name":"n","uid":"u","controller":true}]}}"#,
            // Empty containers.
            r#"{"metadata":{},"spec":{"containers":[],"volumes":[{}]}}"#,
            // A struct written as an array of its fields, in order.
            r#"{"metadata":["a",null,{"k":"v"}],"spec":[]}"#,
        ];
        for object in taken {
            let input = review_with(object);
            assert_eq!(agrees(input.as_bytes()), Ok(true), "{input}");
        }
        let left = [
            // serde_json refuses these.
            r#"{"metadata":{"name":"a","name":"b"}}"#,
            r#"{"metadata":{"name":"\ud800"}}"#,
            r#"{"metadata":{"name":"\udc00\ud800"}}"#,
            "{\"metadata\":{\"name\":\"a\u{1}\"}}",
            "{\"x\":\"a\u{1}b\"}",
            r#"{"x":"\x"}"#,
            r#"{"x":"\u12"}"#,
            r#"{"x":01}"#,
            r#"{"x":1.}"#,
            r#"{"x":-}"#,
            r#"{"x":.5}"#,
            r#"{"x":1e}"#,
            r#"{"x":[1,]}"#,
            r#"{"x":{"a":1,}}"#,
            r#"{"x":{"a" 1}}"#,
            r#"{"x":{1:1}}"#,
            r#"{"x":tru}"#,
            r#"{"x":nul}"#,
            r#"{"x":[1 2]}"#,
            r#"{"metadata":{"labels":{"a":1}}}"#,
            r#"{"metadata":{"labels":{"a":"b",}}}"#,
            r#"{"spec":{"hostNetwork":"true"}}"#,
            r#"{"spec":{"containers":{}}}"#,
            // serde_json takes this; the fast reader leaves it to serde_json.
            r#"{"x":[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}"#,
        ];
        for object in left {
            let input = review_with(object);
            assert_eq!(agrees(input.as_bytes()), Ok(false), "{input}");
        }
        // Around the review.
        let good = review_with("{}");
        for input in [
            format!("{good} x"),
            format!("{good},"),
            good[..good.len() - 1].to_string(),
            format!("[{good}]"),
            good.replace(r#""uid":"u","#, ""),
            good.replace(r#""uid":"u","#, r#""uid":"u","uid":"v","#),
            String::new(),
            " ".into(),
        ] {
            assert_eq!(agrees(input.as_bytes()), Ok(false), "{input}");
        }
    }

    #[test]
    fn bytes_that_are_not_utf8_are_read_as_serde_json_reads_a_slice() {
        // In a string skipped: serde_json's slice reader does not check it.
        let mut skipped = review_with(r#"{"x":"a?b","metadata":{"name":"n"}}"#).into_bytes();
        let at = skipped.iter().position(|&b| b == b'?').unwrap();
        skipped[at] = 0xff;
        assert_eq!(agrees(&skipped), Ok(true));
        // In a string read: refused by both.
        let mut read = review_with(r#"{"metadata":{"name":"a?b"}}"#).into_bytes();
        let at = read.iter().position(|&b| b == b'?').unwrap();
        read[at] = 0xff;
        assert_eq!(agrees(&read), Ok(false));
        assert_eq!(serde(&read), None);
    }

    /// Any JSON value, shaped by the names the review's types read.
    fn value() -> impl Strategy<Value = Value> {
        let key = prop::sample::select(vec![
            "apiVersion",
            "kind",
            "request",
            "uid",
            "object",
            "metadata",
            "labels",
            "annotations",
            "spec",
            "containers",
            "initContainers",
            "name",
            "env",
            "image",
            "restartPolicy",
            "volumeMounts",
            "mountPath",
            "volumes",
            "template",
            "jobTemplate",
            "hostNetwork",
            "ownerReferences",
            "controller",
            "deletionTimestamp",
            "generateName",
            "dryRun",
            "operation",
            "namespace",
            "subResource",
            "group",
            "version",
            "x",
            "é\"\\",
        ]);
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_map(|f| json!(f)),
            ".{0,12}".prop_map(Value::from),
            prop::sample::select(vec!["", "a", "CREATE", "v1", "Pod", "admission.k8s.io/v1"])
                .prop_map(Value::from),
        ];
        leaf.prop_recursive(5, 48, 6, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
                prop::collection::vec((key.clone(), inner), 0..6).prop_map(|members| {
                    Value::Object(
                        members
                            .into_iter()
                            .map(|(k, v)| (k.to_string(), v))
                            .collect(),
                    )
                }),
            ]
        })
    }

    /// Replaces the value at a path chosen by `steps` (each picks a member
    /// or element at that level) with `with`.
    fn graft(doc: &mut Value, steps: &[usize], with: Value) {
        if let Some((&step, rest)) = steps.split_first() {
            match doc {
                Value::Object(map) if !map.is_empty() => {
                    let i = step % map.len();
                    return graft(map.values_mut().nth(i).unwrap(), rest, with);
                }
                Value::Array(items) if !items.is_empty() => {
                    let i = step % items.len();
                    return graft(&mut items[i], rest, with);
                }
                _ => {}
            }
        }
        *doc = with;
    }

    proptest! {
        /// The vector and word-at-a-time scans find what a byte loop finds,
        /// at any offset and length (so through every tail).
        #[test]
        fn the_string_scan_finds_the_first_special_byte(
            bytes in prop::collection::vec(
                prop::sample::select(b"ab\"\\\x00\x1f\x20\x7f\x80\xff".to_vec()), 0..80),
            plain in prop::collection::vec(b'a'..=b'z', 0..40),
            start in any::<prop::sample::Index>(),
        ) {
            let mut input = plain;
            input.extend(bytes);
            let i = start.index(input.len() + 1);
            let naive = input[i..]
                .iter()
                .position(|&c| c == b'"' || c == b'\\' || c < 0x20)
                .map_or(input.len(), |p| i + p);
            prop_assert_eq!(find_special(&input, i), naive);
            prop_assert_eq!(find_special_swar(&input, i), naive);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

        /// Fixtures with a part replaced by any value: wherever a type
        /// meets something else, both readers decide alike.
        #[test]
        fn grafted_reviews_read_alike(
            pick in any::<prop::sample::Index>(),
            steps in prop::collection::vec(any::<usize>(), 0..8),
            with in value(),
            pretty in any::<bool>(),
        ) {
            let fixtures = reviews();
            let (_, body) = &fixtures[pick.index(fixtures.len())];
            let mut doc: Value = serde_json::from_slice(body).unwrap();
            graft(&mut doc, &steps, with);
            let input = if pretty {
                serde_json::to_vec_pretty(&doc).unwrap()
            } else {
                serde_json::to_vec(&doc).unwrap()
            };
            let taken = agrees(&input).map_err(TestCaseError::fail)?;
            // Valid JSON with unique keys and shallow nesting: the fast
            // reader takes everything serde_json takes.
            prop_assert_eq!(taken, serde(&input).is_some());
        }

        /// Fixtures with bytes inserted, removed or replaced: mostly not
        /// JSON any more, which the fast reader must never take.
        #[test]
        fn damaged_reviews_are_never_read_differently(
            pick in any::<prop::sample::Index>(),
            edits in prop::collection::vec(
                (any::<prop::sample::Index>(), 0..3_u8, prop::sample::select(
                    b"{}[]:,\"\\ \t\n0123456789-+.eEtrufalsn\x01\x1f\xff\xc3u".to_vec())),
                1..4),
            compact in any::<bool>(),
        ) {
            let fixtures = reviews();
            let (_, body) = &fixtures[pick.index(fixtures.len())];
            let mut input = if compact {
                serde_json::to_vec(&serde_json::from_slice::<Value>(body).unwrap()).unwrap()
            } else {
                body.clone()
            };
            for (at, op, byte) in edits {
                let i = at.index(input.len() + 1);
                match op {
                    0 => input.insert(i, byte),
                    1 if i < input.len() => { input.remove(i); }
                    _ if i < input.len() => input[i] = byte,
                    _ => input.push(byte),
                }
            }
            agrees(&input).map_err(TestCaseError::fail)?;
        }
    }
}
