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
        (&["--out", dir, "--ca-secret", "c"], "--secret"),
        (
            &[
                "--secret",
                "s",
                "--ca-secret",
                "s",
                "--webhook-configuration",
                "w",
            ],
            "--ca-secret must differ from --secret",
        ),
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
        stderr.contains("error: the Kubernetes API did not answer GET /version"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
}

/// `--out` into a directory where someone planted symbolic links: at the
/// temporary name older versions used and at the file names. No link is
/// followed (the files they point to keep their content); links at names
/// that are only written are replaced by regular files, and a link at
/// `ca.crt`/`ca.key` (which would be read and reused as the CA) is refused.
#[cfg(unix)]
#[test]
fn out_dir_never_follows_planted_symlinks() {
    use std::os::unix::fs::symlink;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("out");
    std::fs::create_dir(&dir).unwrap();
    let victim = tmp.path().join("victim");
    std::fs::write(&victim, "precious").unwrap();
    let unchanged = || assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");

    // The old predictable temporary names and the two written-only names.
    for name in [
        ".ca.key.tmp",
        ".tls.key.tmp",
        ".ca.crt.tmp",
        "tls.key",
        "tls.crt",
    ] {
        symlink(&victim, dir.join(name)).unwrap();
    }
    let out = out_dir(&dir);
    assert!(out.status.success(), "{}", text(&out.stderr));
    unchanged();
    for name in ["tls.key", "tls.crt", "ca.key", "ca.crt"] {
        let meta = std::fs::symlink_metadata(dir.join(name)).unwrap();
        assert!(meta.file_type().is_file(), "{name} is a regular file now");
    }

    // A link at ca.key: the CA would be read from it; refused, exit 1.
    std::fs::remove_file(dir.join("ca.key")).unwrap();
    symlink(&victim, dir.join("ca.key")).unwrap();
    let before = std::fs::read(dir.join("tls.crt")).unwrap();
    let out = out_dir(&dir);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("ca.key: a symbolic link; refusing"),
        "{stderr}"
    );
    unchanged();
    assert_eq!(
        std::fs::read(dir.join("tls.crt")).unwrap(),
        before,
        "nothing written"
    );
    assert!(
        std::fs::symlink_metadata(dir.join("ca.key"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
}

/// The directory `--out` creates is private (0700), parents included; no
/// temporary file is left behind.
#[cfg(unix)]
#[test]
fn out_dir_is_created_private() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("certs/prod");
    let out = out_dir(&dir);
    assert!(out.status.success(), "{}", text(&out.stderr));
    for d in [tmp.path().join("certs"), dir.clone()] {
        let mode = std::fs::metadata(&d).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "{}", d.display());
    }
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["ca.crt", "ca.key", "tls.crt", "tls.key"]);
}

/// An existing directory that every user may write to is refused before
/// anything is written: another user could replace the key after it is
/// written.
#[test]
fn out_dir_writable_by_everyone_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("shared");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = out_dir(&dir);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains("directory writable by every user"), "{err}");
    assert!(err.contains(dir.to_str().unwrap()), "{err}");
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        0,
        "nothing written"
    );
    // Made private, the same directory is used.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let out = out_dir(&dir);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// The shell commands of certs/README.md section 1b, run as written (with
/// this build of the binary first on PATH) in a fresh directory: they must
/// work when followed literally.
#[test]
fn certs_readme_1b_works_as_written() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/certs/README.md")).unwrap();
    let section = readme
        .split("### 1b.")
        .nth(1)
        .expect("section 1b")
        .split("\n## ")
        .next()
        .unwrap();
    // The first ```sh block: the commands that make the files.
    let block = section
        .split("```sh\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("a sh block in 1b");
    assert!(block.contains("--out certs/prod"), "{block}");
    let tmp = tempfile::tempdir().unwrap();
    let bin_dir = Path::new(BIN).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("sh")
        .args(["-eu", "-c", block])
        .current_dir(tmp.path())
        .env("PATH", path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{block}\n{}", text(&out.stderr));
    let prod = tmp.path().join("certs/prod");
    for name in ["ca.crt", "ca.key", "tls.crt", "tls.key"] {
        assert!(prod.join(name).is_file(), "{name}");
    }
    let bundle = std::fs::read_to_string(prod.join("ca-bundle.b64")).unwrap();
    let ca = std::fs::read(prod.join("ca.crt")).unwrap();
    assert_eq!(
        bundle.trim_end(),
        base64::engine::general_purpose::STANDARD.encode(ca)
    );
}

/// `certs --out certs/prod` puts a CA key there: git must ignore it (and
/// certs/dev), but still track certs/README.md.
#[test]
fn generated_keys_under_certs_are_git_ignored() {
    let check = |path: &str| {
        Command::new("git")
            .args(["check-ignore", "--quiet", "--no-index", path])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("git is needed to check .gitignore")
            .code()
    };
    for key in [
        "certs/prod/ca.key",
        "certs/prod/tls.key",
        "certs/dev/ca.key",
        "certs/staging/ca.key",
    ] {
        assert_eq!(check(key), Some(0), "{key} must be ignored");
    }
    assert_eq!(
        check("certs/README.md"),
        Some(1),
        "certs/README.md must stay tracked"
    );
}
