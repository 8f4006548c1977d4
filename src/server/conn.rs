//! Connection lifecycle shared by the HTTPS and the metrics listener: slots
//! (the connection cap and its reserve for probes), and closing connections
//! that carry no request (silent after the handshake, or idle).
//!
//! A connection's clock starts when it is ready for HTTP (after the TLS
//! handshake on the webhook port). Until its first request it may stay
//! [`Timeouts::first_request`]; after that, each time its last request
//! finishes it may stay [`Timeouts::idle`] before the next one starts. A
//! connection with a request in flight is never closed for idleness; an
//! HTTP/2 connection whose peer stops answering pings is closed by hyper
//! (`keep_alive_interval` / `keep_alive_timeout`). Closing is graceful: HTTP/2
//! gets a GOAWAY, HTTP/1.1 is closed between requests, and a connection still
//! sniffing for its protocol is dropped.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use hyper_util::server::graceful::GracefulConnection;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long a connection may go without a request.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timeouts {
    /// From ready-for-HTTP to the first request.
    pub(crate) first_request: Duration,
    /// From the end of the last request to the start of the next.
    pub(crate) idle: Duration,
}

/// A connection's claim on the cap; released on drop.
#[derive(Debug)]
pub(crate) struct Slot {
    /// From the reserve taken when the cap is reached (serves one probe),
    /// not one of `max_connections` (serves everything).
    reserve: bool,
    _permit: OwnedSemaphorePermit,
}

impl Slot {
    /// True for a slot from the reserve.
    pub(crate) fn is_reserve(&self) -> bool {
        self.reserve
    }
}

/// The connection cap and its reserve.
#[derive(Debug, Clone)]
pub(crate) struct Slots {
    regular: Arc<Semaphore>,
    reserve: Arc<Semaphore>,
    sizes: (u32, u32),
}

impl Slots {
    /// `regular` connections (at least one), plus `reserve` more once they
    /// are all taken.
    pub(crate) fn new(regular: usize, reserve: usize) -> Self {
        let regular = u32::try_from(regular.max(1)).unwrap_or(u32::MAX >> 4);
        let reserve = u32::try_from(reserve).unwrap_or(u32::MAX >> 4);
        Self {
            regular: Arc::new(Semaphore::new(regular as usize)),
            reserve: Arc::new(Semaphore::new(reserve as usize)),
            sizes: (regular, reserve),
        }
    }

    /// Waits for a free slot, regular first. Call before accepting, so that
    /// connections beyond cap and reserve wait in the listen backlog.
    pub(crate) async fn acquire(&self) -> Slot {
        let slot = |reserve, _permit| Slot { reserve, _permit };
        if let Ok(p) = self.regular.clone().try_acquire_owned() {
            return slot(false, p);
        }
        // Neither semaphore is ever closed, so `acquire_owned` cannot fail.
        tokio::select! {
            biased;
            Ok(p) = self.regular.clone().acquire_owned() => slot(false, p),
            Ok(p) = self.reserve.clone().acquire_owned() => slot(true, p),
        }
    }

    /// A reserve slot becomes a regular one if one freed up meanwhile
    /// (between waiting and the accept).
    pub(crate) fn upgrade(&self, slot: Slot) -> Slot {
        if !slot.reserve {
            return slot;
        }
        match self.regular.clone().try_acquire_owned() {
            Ok(_permit) => Slot {
                reserve: false,
                _permit,
            },
            Err(_) => slot,
        }
    }

    /// Waits until every slot is free again (every connection has closed),
    /// for at most `limit`; false when the time ran out.
    pub(crate) async fn drained(&self, limit: Duration) -> bool {
        let (regular, reserve) = self.sizes;
        let all = async {
            let _a = self.regular.acquire_many(regular).await;
            let _b = self.reserve.acquire_many(reserve).await;
        };
        tokio::time::timeout(limit, all).await.is_ok()
    }
}

/// What one connection is doing, for the idle check. Updated by every
/// request on it (two uncontended atomic operations and a clock read).
#[derive(Debug)]
pub(crate) struct Activity {
    ready_at: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds after `ready_at` when the last request finished, plus
    /// one; zero until a request has finished.
    idle_since: AtomicU64,
    /// Set for reserve connections: closed as soon as a request finished.
    one_shot: bool,
    finished: Notify,
}

impl Activity {
    /// A connection ready for HTTP now.
    pub(crate) fn new(one_shot: bool) -> Self {
        Self {
            ready_at: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            one_shot,
            finished: Notify::new(),
        }
    }

    /// Marks a request in flight until the guard drops.
    pub(crate) fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    /// When the connection may be closed if nothing happens meanwhile, or
    /// `None` while a request is in flight.
    fn close_at(&self, t: Timeouts) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        match self.idle_since.load(Ordering::Acquire) {
            0 => Some(self.ready_at + t.first_request),
            _ if self.one_shot => Some(self.ready_at),
            since => Some(self.ready_at + Duration::from_millis(since - 1) + t.idle),
        }
    }
}

/// A request in flight on a connection.
#[derive(Debug)]
pub(crate) struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.0;
        if a.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            let since = a.ready_at.elapsed().as_millis() as u64 + 1;
            a.idle_since.store(since, Ordering::Release);
            if a.one_shot {
                a.finished.notify_one();
            }
        }
    }
}

/// Why [`drive`] began a graceful close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Closed {
    /// The peer closed it, or the protocol ended it (an error, a refused
    /// keep-alive, an unanswered HTTP/2 ping).
    ByPeer,
    /// No request in time, or idle too long.
    Idle,
    /// The server is shutting down.
    Shutdown,
}

/// Runs `conn` to the end, closing it gracefully when it goes without a
/// request for too long (see the module docs) or `shutdown` is cancelled.
pub(crate) async fn drive<C>(
    conn: C,
    activity: &Activity,
    timeouts: Timeouts,
    shutdown: &CancellationToken,
) -> (Closed, Result<(), C::Error>)
where
    C: GracefulConnection,
{
    let mut conn = std::pin::pin!(conn);
    let why = loop {
        // Requests do not wake this loop (that would cost every request a
        // task wake-up); instead it looks at least once per idle period, so
        // a close time that moved earlier (first request done, idle shorter
        // than the first-request timeout) is still met exactly: a request
        // that ended after one look has its close time after the next look.
        let next_look = Instant::now() + timeouts.idle;
        let check_at = activity
            .close_at(timeouts)
            .map_or(next_look, |at| at.min(next_look));
        tokio::select! {
            result = conn.as_mut() => return (Closed::ByPeer, result),
            _ = shutdown.cancelled() => break Closed::Shutdown,
            _ = tokio::time::sleep_until(check_at) => {
                if activity.close_at(timeouts).is_some_and(|at| at <= Instant::now()) {
                    break Closed::Idle;
                }
            }
            _ = activity.finished.notified(), if activity.one_shot => {}
        }
    };
    conn.as_mut().graceful_shutdown();
    (why, conn.await)
}

/// Accepts with `accept` whenever a slot is free and spawns `serve` for each
/// connection with its slot, until `shutdown` is cancelled.
pub(crate) async fn accept_loop<A, AFut, T, F, Fut>(
    slots: &Slots,
    shutdown: &CancellationToken,
    mut accept: A,
    mut serve: F,
) where
    A: FnMut() -> AFut,
    AFut: Future<Output = T>,
    F: FnMut(T, Slot) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        let slot = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            slot = slots.acquire() => slot,
        };
        let accepted = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            accepted = accept() => accepted,
        };
        tokio::spawn(serve(accepted, slots.upgrade(slot)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reserve_is_used_only_when_the_cap_is_reached() {
        let slots = Slots::new(2, 1);
        let a = slots.acquire().await;
        let b = slots.acquire().await;
        assert!(!a.is_reserve() && !b.is_reserve());
        let c = slots.acquire().await;
        assert!(c.is_reserve());
        let waiting = tokio::time::timeout(Duration::from_millis(50), slots.acquire()).await;
        assert!(waiting.is_err(), "cap and reserve taken: wait");
        drop(a);
        let c = slots.upgrade(c);
        assert!(
            !c.is_reserve(),
            "a freed regular slot replaces the reserve one"
        );
        let d = slots.acquire().await;
        assert!(d.is_reserve());
        drop((b, c, d));
        assert!(slots.drained(Duration::from_secs(1)).await);
    }

    #[tokio::test(start_paused = true)]
    async fn close_time_follows_requests() {
        let t = Timeouts {
            first_request: Duration::from_secs(10),
            idle: Duration::from_secs(90),
        };
        let a = Arc::new(Activity::new(false));
        let start = a.ready_at;
        assert_eq!(a.close_at(t), Some(start + t.first_request));
        let req = a.begin();
        assert_eq!(a.close_at(t), None, "busy");
        tokio::time::advance(Duration::from_secs(100)).await;
        drop(req);
        let at = a.close_at(t).unwrap();
        assert!(at >= start + Duration::from_secs(100) + t.idle);

        let one_shot = Arc::new(Activity::new(true));
        drop(one_shot.begin());
        assert_eq!(one_shot.close_at(t), Some(one_shot.ready_at), "at once");
    }
}
