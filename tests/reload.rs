//! Certificate hot reload the way Kubernetes updates a Secret volume: the
//! files are symlinks through `..data`, which is swapped atomically. New
//! connections get the new pair within seconds; an open connection keeps
//! working; a broken pair is refused and the old one stays in service.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use canary_injector::server::tls::{self, CertPaths, Reload, Reloader, Resolver};
use common::{Certs, Client, fixture, provider, tls_connect};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// Writes a pair into `root/<version>/` and points `root/..data` at it
/// atomically (rename over the old link), like the kubelet does.
fn publish(root: &Path, version: &str, cert_pem: &str, key_pem: &str) {
    let dir = root.join(version);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("tls.crt"), cert_pem).unwrap();
    std::fs::write(dir.join("tls.key"), key_pem).unwrap();
    let tmp = root.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(version, &tmp).unwrap();
    std::fs::rename(&tmp, root.join("..data")).unwrap();
}

fn der(pem: &str) -> Vec<u8> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .unwrap()
        .unwrap()
        .to_vec()
}

async fn served_cert(addr: std::net::SocketAddr, ca: &str) -> Vec<u8> {
    let tls = tls_connect(addr, ca, &[b"http/1.1"]).await.unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

#[tokio::test]
async fn secret_symlink_swap_is_picked_up_and_broken_pairs_are_refused() {
    let certs = Certs::new();
    let root = certs.path("secret");
    std::fs::create_dir_all(&root).unwrap();
    let first = certs.issue("localhost");
    publish(&root, "..v1", &first.cert_pem, &first.key_pem);
    std::os::unix::fs::symlink("..data/tls.crt", root.join("tls.crt")).unwrap();
    std::os::unix::fs::symlink("..data/tls.key", root.join("tls.key")).unwrap();
    let paths = CertPaths {
        cert: root.join("tls.crt"),
        key: root.join("tls.key"),
    };

    let server = common::start_reloading(paths, Duration::from_millis(100)).await;
    let (addr, m) = (server.addr, server.metrics.clone());
    assert_eq!(served_cert(addr, &certs.ca_pem).await, der(&first.cert_pem));
    // A connection opened before the swap keeps working after it.
    let mut open = Client::connect(addr, &certs.ca_pem, true).await;

    let second = certs
        .ca
        .issue(&["localhost".into()], Duration::from_secs(7200))
        .unwrap();
    publish(&root, "..v2", &second.cert_pem, &second.key_pem);
    let deadline = Instant::now() + Duration::from_secs(5);
    while served_cert(addr, &certs.ca_pem).await != der(&second.cert_pem) {
        assert!(
            Instant::now() < deadline,
            "new certificate not served within 5 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        m.certificate_expiry.get(),
        tls::leaf_not_after(&der(&second.cert_pem)).unwrap()
    );
    assert_eq!(
        open.post_json("/mutate", fixture("pod.review.json"))
            .await
            .status(),
        200
    );

    // A broken pair: the key of another certificate. Refused; v2 stays.
    let other = certs
        .ca
        .issue(&["localhost".into()], Duration::from_secs(60))
        .unwrap();
    publish(&root, "..v3", &other.cert_pem, &second.key_pem);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        served_cert(addr, &certs.ca_pem).await,
        der(&second.cert_pem)
    );
    publish(&root, "..v4", "-----BEGIN CERTIFICATE-----\ngarbage\n", "");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        served_cert(addr, &certs.ca_pem).await,
        der(&second.cert_pem)
    );

    // Fixed again: picked up.
    publish(&root, "..v5", &other.cert_pem, &other.key_pem);
    let deadline = Instant::now() + Duration::from_secs(5);
    while served_cert(addr, &certs.ca_pem).await != der(&other.cert_pem) {
        assert!(Instant::now() < deadline, "fixed certificate not served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.shutdown.cancel();
}

#[test]
fn reload_reports_unchanged_swapped_and_refused() {
    let certs = Certs::new();
    let loaded = tls::load(&certs.paths, &provider()).unwrap();
    let resolver = Arc::new(Resolver::new(&loaded));
    let mut r = Reloader::new(certs.paths.clone(), provider(), resolver, &loaded);
    assert!(matches!(r.reload_if_changed(), Reload::Unchanged));
    certs.issue("localhost");
    assert!(matches!(r.reload_if_changed(), Reload::Swapped(Some(_))));
    assert!(matches!(r.reload_if_changed(), Reload::Unchanged));
    std::fs::write(&certs.paths.key, "not a key").unwrap();
    match r.reload_if_changed() {
        Reload::Refused(e) => assert!(e.to_string().contains("tls.key"), "{e}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    std::fs::remove_file(&certs.paths.cert).unwrap();
    assert!(matches!(r.reload_if_changed(), Reload::Refused(_)));
}
