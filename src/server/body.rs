//! Reading request bodies under two limits: one request's size
//! ([`Limits::max_body_bytes`](super::Limits::max_body_bytes)) and the bytes
//! held by all requests together ([`Limits::body_budget_bytes`](super::Limits::body_budget_bytes)).
//!
//! The budget is what keeps memory bounded when clients send part of a body
//! and stall: a request that would take it past the limit is refused at once
//! (the server answers 503 with `Retry-After`) instead of waiting for memory
//! that may never come back before its deadline. A declared `Content-Length`
//! is reserved before the first byte is read; a chunked body reserves as its
//! chunks arrive. The reservation is held until the answer is built, so the
//! bytes being parsed count too.

use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::Body;

/// Bytes of request bodies the server holds at most, across all requests.
#[derive(Debug)]
pub(crate) struct Budget {
    in_use: AtomicUsize,
    limit: usize,
}

impl Budget {
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            in_use: AtomicUsize::new(0),
            limit,
        }
    }

    /// Bytes reserved right now.
    pub(crate) fn in_use(&self) -> usize {
        self.in_use.load(Ordering::Relaxed)
    }

    /// Reserves `bytes`, or `None` when that would pass the limit.
    pub(crate) fn reserve(&self, bytes: usize) -> Option<Reservation<'_>> {
        let mut held = Reservation {
            budget: self,
            bytes: 0,
        };
        held.grow_to(bytes).then_some(held)
    }
}

/// Bytes of the budget held by one request; released on drop.
#[derive(Debug)]
pub(crate) struct Reservation<'a> {
    budget: &'a Budget,
    bytes: usize,
}

impl Reservation<'_> {
    /// Grows the reservation to at least `total` bytes; false (and unchanged)
    /// when the budget has no room for it.
    fn grow_to(&mut self, total: usize) -> bool {
        let extra = total.saturating_sub(self.bytes);
        if extra == 0 {
            return true;
        }
        let limit = self.budget.limit;
        let grown = self
            .budget
            .in_use
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |used| {
                used.checked_add(extra).filter(|&n| n <= limit)
            });
        if grown.is_ok() {
            self.bytes = total;
        }
        grown.is_ok()
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.budget.in_use.fetch_sub(self.bytes, Ordering::AcqRel);
        }
    }
}

/// Why a body was not read to the end.
#[derive(Debug)]
pub(crate) enum BodyError {
    /// More than the per-request limit.
    TooLarge,
    /// The global budget has no room for the rest of it.
    OverBudget,
    /// The connection failed while reading.
    Read(Box<dyn std::error::Error + Send + Sync>),
}

/// Reads `body` to the end into one buffer, reserving every byte from
/// `held` first (`declared`, the `Content-Length`, sizes the buffer).
///
/// A body that arrives whole in one chunk, as declared, is kept as it came
/// (no copy); otherwise the chunks are copied into one buffer of the
/// declared size as they arrive, so a stalled body never pins more of the
/// connection's read buffers than it reserved.
pub(crate) async fn collect<B>(
    body: B,
    declared: Option<usize>,
    limit: usize,
    held: &mut Reservation<'_>,
) -> Result<Bytes, BodyError>
where
    B: Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let mut body = pin!(body);
    let mut whole: Option<Bytes> = None;
    let mut buf = BytesMut::new();
    let mut len = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| BodyError::Read(Box::new(e)))?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers: nothing a review needs
        };
        if data.is_empty() {
            continue;
        }
        len = len
            .checked_add(data.len())
            .filter(|&n| n <= limit)
            .ok_or(BodyError::TooLarge)?;
        if !held.grow_to(len) {
            return Err(BodyError::OverBudget);
        }
        if len == data.len() && declared == Some(len) {
            // The first chunk is the whole declared body.
            whole = Some(data);
            continue;
        }
        if buf.capacity() == 0 {
            buf.reserve(declared.unwrap_or(len).max(len));
        }
        if let Some(first) = whole.take() {
            buf.extend_from_slice(&first);
        }
        buf.extend_from_slice(&data);
    }
    Ok(match whole {
        Some(data) => data,
        None => buf.freeze(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{Full, StreamBody};
    use hyper::body::Frame;

    type Chunks = StreamBody<futures::stream::Iter<std::vec::IntoIter<FrameResult>>>;
    type FrameResult = Result<Frame<Bytes>, std::io::Error>;

    fn chunks(parts: &[&'static [u8]]) -> Chunks {
        let frames: Vec<_> = parts
            .iter()
            .map(|p| Ok(Frame::data(Bytes::from_static(p))))
            .collect();
        StreamBody::new(futures::stream::iter(frames))
    }

    #[tokio::test]
    async fn one_chunk_is_kept_and_many_are_joined() {
        let budget = Budget::new(1024);
        let mut held = budget.reserve(5).unwrap();
        let body = Full::new(Bytes::from_static(b"hello"));
        let got = collect(body, Some(5), 100, &mut held).await.unwrap();
        assert_eq!(&got[..], b"hello");

        let mut held = budget.reserve(0).unwrap();
        let got = collect(chunks(&[b"ab", b"", b"cd", b"e"]), None, 100, &mut held)
            .await
            .unwrap();
        assert_eq!(&got[..], b"abcde");
        assert_eq!(budget.in_use(), 5 + 5, "both reservations still held");
        drop(held);
        assert_eq!(budget.in_use(), 5);
    }

    #[tokio::test]
    async fn per_request_limit_and_budget() {
        let budget = Budget::new(10);
        let mut held = budget.reserve(0).unwrap();
        let err = collect(chunks(&[b"123456", b"7890"]), None, 8, &mut held).await;
        assert!(matches!(err, Err(BodyError::TooLarge)));
        drop(held);

        let _other = budget.reserve(6).unwrap();
        assert!(budget.reserve(5).is_none(), "6 + 5 is past 10");
        let mut held = budget.reserve(0).unwrap();
        let err = collect(chunks(&[b"1234", b"5"]), None, 8, &mut held).await;
        assert!(matches!(err, Err(BodyError::OverBudget)));
        assert_eq!(held.bytes, 4, "what was read stays reserved until dropped");
        drop(held);
        assert_eq!(budget.in_use(), 6);
    }

    #[test]
    fn reservations_are_released_on_drop() {
        let budget = Budget::new(100);
        let a = budget.reserve(60).unwrap();
        assert!(budget.reserve(41).is_none());
        let b = budget.reserve(40).unwrap();
        assert_eq!(budget.in_use(), 100);
        drop(a);
        drop(b);
        assert_eq!(budget.in_use(), 0);
        assert!(budget.reserve(usize::MAX).is_none(), "no overflow");
        assert_eq!(budget.in_use(), 0);
    }
}
