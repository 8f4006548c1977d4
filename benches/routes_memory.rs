//! Memory of the routes controller's caches with 10,000 pods, in a process
//! that also runs `serve` (the webhook, its listeners and tasks, no cluster):
//!
//! 1. `serve` started and answering;
//! 2. the routes index filled through the same conversions as the watch
//!    events: 1,000 Services, 1,000 EndpointSlices of 10 endpoints, 10,000
//!    canary pods' metadata, 1,000 DestinationRules and 1,000
//!    VirtualServices (objects generated one at a time: the input never
//!    sits in memory whole);
//! 3. for comparison, the same 10,000 pods' metadata in a kube-runtime
//!    reflector Store (what caching `PartialObjectMeta<Pod>` would hold).
//!
//! Prints, after each step, the heap bytes in use (a counting allocator)
//! and the process's resident memory (VmRSS, VmHWM from /proc/self/status).
//!
//! `cargo bench --bench routes_memory` (not a timed test: run it, read it)

#[path = "support/cluster.rs"]
mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use canary_injector::app::{App, ClusterAccess, ServeOptions, Shutdown};
use canary_injector::config::Config;
use canary_injector::routes::index::Index;
use canary_injector::server::Limits;
use canary_injector::server::tls::CertPaths;
use k8s_openapi::api::core::v1::Pod;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector;
use kube::runtime::watcher::Event;

/// Counts the bytes the heap holds.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded to `System` unchanged; only a counter is
// added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_add(new_size, Ordering::Relaxed);
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const MIB: f64 = 1024.0 * 1024.0;

fn status(field: &str) -> f64 {
    let text = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    text.lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .trim()
                .strip_suffix(" kB")?
                .trim()
                .parse::<f64>()
                .ok()
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Prints a line; returns the heap in use.
fn report(step: &str, heap_before: usize) -> usize {
    let heap = LIVE.load(Ordering::Relaxed);
    println!(
        "{step:<52} heap {:7.2} MiB (+{:6.2})  RSS {:7.2} MiB  peak RSS {:7.2} MiB",
        heap as f64 / MIB,
        heap.saturating_sub(heap_before) as f64 / MIB,
        status("VmRSS:"),
        status("VmHWM:"),
    );
    heap
}

fn main() {
    let start = report("start", 0);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let dev = canary_injector::certs::ensure_dev_cert(dir.path()).unwrap();
    let shutdown = Shutdown::new();
    let app = rt.block_on(async {
        App::bind(
            Config::default(),
            ServeOptions {
                listen: "127.0.0.1:0".parse().unwrap(),
                metrics_listen: "127.0.0.1:0".parse().unwrap(),
                tls: CertPaths {
                    cert: dev.cert.clone(),
                    key: dev.key.clone(),
                },
                cert_reload_interval: Duration::from_secs(5),
                shutdown_delay: Duration::ZERO,
                limits: Limits::default(),
                floor_response: None,
                cluster: ClusterAccess::Off,
            },
        )
        .await
        .unwrap()
    });
    let serving = rt.spawn(app.run(shutdown.clone()));
    rt.block_on(async { tokio::time::sleep(Duration::from_millis(300)).await });
    let served = report("serve running (no cluster)", start);

    let shape = support::Shape {
        services: 1_000,
        pods_per_service: 10,
    };
    let cfg = Config::default();
    let mut index = Index::new(cfg.labels.clone(), cfg.namespaces.clone());
    let mut last = served;
    support::fill_with(&mut index, shape, |kind| {
        last = report(&format!("  index: {kind}"), last);
    });
    assert_eq!(index.pod_count(), 10_000);
    assert_eq!(index.slice_count(), 1_000);
    let filled = report("+ routes index (1,000 Services, 10,000 pods)", served);

    let (store, mut writer) = reflector::store::<PartialObjectMeta<Pod>>();
    writer.apply_watcher_event(&Event::Init);
    for s in 0..shape.services {
        for p in 0..shape.pods_per_service {
            let pod = PartialObjectMeta::<Pod> {
                types: None,
                metadata: shape.pod(s, p),
                _phantom: Default::default(),
            };
            writer.apply_watcher_event(&Event::InitApply(pod));
        }
    }
    writer.apply_watcher_event(&Event::InitDone);
    assert_eq!(store.len(), 10_000);
    report("+ comparison: the 10,000 pods in a reflector Store", filled);

    drop((index, store, writer));
    shutdown.request();
    rt.block_on(serving).unwrap().unwrap();
}
