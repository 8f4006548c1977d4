//! `canary-injector certs` as users run it: `--out DIR --print-ca-bundle`
//! writes a CA and a serving certificate that a real TLS client accepts for
//! the Service's DNS names, reuses the CA on the next run, and bad usage
//! exits 2.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;

use base64::Engine as _;
use canary_injector::server::tls::{self, CertPaths, Resolver};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const BIN: &str = env!("CARGO_BIN_EXE_canary-injector");
const SERVICE: [&str; 4] = [
    "--service",
    "canary-injector",
    "--namespace",
    "canary-injector",
];

fn certs(args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("certs")
        .args(args)
        // In-cluster mode must not find a real cluster from this machine.
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .env("HOME", "/nonexistent")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .output()
        .unwrap()
}

fn out_dir(dir: &Path) -> Output {
    let dir = dir.to_str().unwrap();
    certs(&[&SERVICE[..], &["--out", dir, "--print-ca-bundle"]].concat())
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).unwrap()
}

/// Serves one TLS handshake with the real server's TLS setup on the files
/// in `dir`, and connects a client that trusts only `dir/ca.crt` and asks
/// for `name`. Returns whether the client accepted the server.
async fn handshake(dir: &Path, name: &str) -> Result<(), std::io::Error> {
    let paths = CertPaths {
        cert: dir.join("tls.crt"),
        key: dir.join("tls.key"),
    };
    let loaded = tls::load(&paths, &common::provider()).expect("server accepts the pair");
    let resolver = Arc::new(Resolver::new(&loaded));
    let server_config = tls::server_config(common::provider(), resolver).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(server_config);
        if let Ok(mut tls) = acceptor.accept(tcp).await {
            let _ = tls.write_all(b"ok").await;
            let _ = tls.shutdown().await;
        }
    });
    let ca_pem = std::fs::read_to_string(dir.join("ca.crt")).unwrap();
    let connector = tokio_rustls::TlsConnector::from(common::client_config(&ca_pem, &[]));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let result = async {
        let mut tls = connector
            .connect(ServerName::try_from(name.to_owned()).unwrap(), tcp)
            .await?;
        let mut buf = Vec::new();
        tls.read_to_end(&mut buf).await?;
        assert_eq!(buf, b"ok");
        Ok(())
    }
    .await;
    let _ = server.await;
    result
}

#[tokio::test]
async fn out_dir_writes_a_ca_and_a_serving_certificate_the_apiserver_would_accept() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("prod");
    let out = out_dir(&dir);
    assert!(out.status.success(), "{}", text(&out.stderr));

    for name in ["ca.crt", "ca.key", "tls.crt", "tls.key"] {
        assert!(dir.join(name).is_file(), "{name} written");
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for name in ["ca.key", "tls.key"] {
            let mode = std::fs::metadata(dir.join(name))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{name}");
        }
    }

    // stdout is exactly base64(ca.crt): paste it into caBundle.
    let ca = std::fs::read(dir.join("ca.crt")).unwrap();
    let stdout = text(&out.stdout);
    assert_eq!(
        stdout.trim_end(),
        base64::engine::general_purpose::STANDARD.encode(&ca)
    );
    assert_eq!(stdout.lines().count(), 1);

    // The name the apiserver dials, and the other Service names.
    for name in [
        "canary-injector.canary-injector.svc",
        "canary-injector",
        "canary-injector.canary-injector",
        "canary-injector.canary-injector.svc.cluster.local",
    ] {
        handshake(&dir, name)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    let err = handshake(&dir, "other.canary-injector.svc")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("certificate"), "{err}");
}

#[tokio::test]
async fn a_second_run_keeps_the_ca_so_the_ca_bundle_stays_the_same() {
    let tmp = tempfile::tempdir().unwrap();
    let first = out_dir(tmp.path());
    assert!(first.status.success(), "{}", text(&first.stderr));
    let cert = std::fs::read(tmp.path().join("tls.crt")).unwrap();

    let second = out_dir(tmp.path());
    assert!(second.status.success(), "{}", text(&second.stderr));
    assert_eq!(second.stdout, first.stdout, "same caBundle");
    assert!(text(&second.stderr).contains("CA reused"));
    assert_ne!(std::fs::read(tmp.path().join("tls.crt")).unwrap(), cert);
    handshake(tmp.path(), "canary-injector.canary-injector.svc")
        .await
        .unwrap();
}

#[test]
fn without_print_ca_bundle_stdout_is_empty() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_str().unwrap();
    let out = certs(&[&SERVICE[..], &["--out", dir]].concat());
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(out.stdout.is_empty());
}

#[test]
fn usage_errors_exit_2() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&[], "--out <DIR>|--secret <NAME>"),
        (
            &[
                "--out",
                dir,
                "--secret",
                "s",
                "--webhook-configuration",
                "w",
            ],
            "cannot be used with",
        ),
        (&["--secret", "s"], "--webhook-configuration"),
        (&["--out", dir, "--webhook-configuration", "w"], "--secret"),
        (&["--out", dir, "--validity", "1y"], "unknown unit"),
        (&["--out", dir, "--renew-before", "30d"], "unknown unit"),
        (&["--out", dir, "--validity", "24h"], "--renew-before"),
        (
            &["--out", dir, "--ca-validity", "720h", "--validity", "8760h"],
            "--ca-validity",
        ),
    ];
    for (args, expected) in cases {
        let out = certs(&[&SERVICE[..], args].concat());
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
    for args in [
        &[
            "--service",
            "Canary_Injector",
            "--namespace",
            "ns",
            "--out",
            dir,
        ][..],
        &["--namespace", "ns", "--out", dir][..],
    ] {
        let out = certs(args);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
    assert!(
        std::fs::read_dir(tmp.path()).unwrap().next().is_none(),
        "nothing written on a usage error"
    );
}

#[test]
fn in_cluster_mode_without_a_cluster_exits_1() {
    let out = certs(
        &[
            &SERVICE[..],
            &[
                "--secret",
                "canary-injector-tls",
                "--webhook-configuration",
                "canary-injector",
            ],
        ]
        .concat(),
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot configure the Kubernetes client"),
        "{stderr}"
    );
}

#[test]
fn unreachable_apiserver_exits_1_and_names_the_call() {
    let tmp = tempfile::tempdir().unwrap();
    let kubeconfig = tmp.path().join("kubeconfig");
    // Port 1 on loopback: nothing listens, the connection is refused at once.
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\n\
         clusters: [{name: c, cluster: {server: 'https://127.0.0.1:1', insecure-skip-tls-verify: true}}]\n\
         users: [{name: u, user: {token: t}}]\n\
         contexts: [{name: x, context: {cluster: c, user: u}}]\n\
         current-context: x\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["certs"])
        .args(SERVICE)
        .args([
            "--secret",
            "canary-injector-tls",
            "--webhook-configuration",
            "canary-injector",
        ])
        .env("KUBECONFIG", &kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("error: cannot get Secret canary-injector/canary-injector-tls"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
}
