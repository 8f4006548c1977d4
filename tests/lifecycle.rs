//! The binary's life: start with no flags but a dev-cert dir, serve, and on
//! SIGTERM turn unready, finish the review in flight, stop accepting, exit 0.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use common::{Client, fixture, tls_connect};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BIN: &str = env!("CARGO_BIN_EXE_canary-injector");

struct Running {
    child: std::process::Child,
    https: SocketAddr,
    metrics: SocketAddr,
    ca_pem: String,
    /// Every stderr line after "serving", as the collector thread read it.
    logs: Arc<Mutex<Vec<String>>>,
    /// The collector thread; it ends when the child's stderr closes.
    collector: Option<std::thread::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Running {
    /// The JSON log lines collected so far whose `message` is `message`.
    fn logged(&self, message: &str) -> Vec<Value> {
        self.logs
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["message"] == message)
            .collect()
    }

    /// Waits for the process to exit; its exit code.
    async fn exit_code(&mut self) -> Option<i32> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Every line is collected once the collector saw EOF.
                if let Some(collector) = self.collector.take() {
                    tokio::task::spawn_blocking(move || collector.join())
                        .await
                        .unwrap()
                        .unwrap();
                }
                return status.code();
            }
            assert!(Instant::now() < deadline, "process did not exit");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_binary(extra: &[&str]) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("dev");
    let mut child = Command::new(BIN)
        .args([
            "--log-format",
            "json",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--dev-cert-dir",
            certs.to_str().unwrap(),
        ])
        .args(extra)
        .env_remove("POD_NAMESPACE")
        .env_remove("KUBECONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    // Owned by the guard from here on, so a failed start still reaps it.
    let mut running = Running {
        child,
        https: "0.0.0.0:0".parse().unwrap(),
        metrics: "0.0.0.0:0".parse().unwrap(),
        ca_pem: String::new(),
        logs: Arc::default(),
        collector: None,
        _dir: dir,
    };
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("server printed its addresses");
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        if v["message"] == "serving" {
            running.https = v["listen"].as_str().unwrap().parse().unwrap();
            running.metrics = v["metrics"].as_str().unwrap().parse().unwrap();
            running.ca_pem = std::fs::read_to_string(certs.join("ca.crt")).unwrap();
            // Keep draining stderr so the child never blocks on a full pipe.
            let logs = running.logs.clone();
            running.collector = Some(std::thread::spawn(move || {
                while let Ok(line) = rx.recv() {
                    logs.lock().unwrap().push(line);
                }
            }));
            return running;
        }
    }
}

async fn scrape(addr: SocketAddr) -> String {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    tcp.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test]
async fn serves_metrics_and_health_on_their_ports() {
    let server = start_binary(&[]);
    let metrics = scrape(server.metrics).await;
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    let expiry: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("canary_injector_certificate_expiry_timestamp_seconds "))
        .expect("certificate expiry gauge")
        .parse()
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(expiry > now + 300.0 * 86400.0, "dev cert valid ~1 year");
    assert!(metrics.contains("canary_injector_build_info{version="));
    let mut c = Client::connect(server.https, &server.ca_pem, false).await;
    assert_eq!(c.get("/healthz").await.status(), 200);
    assert_eq!(c.get("/readyz").await.status(), 200);
}

#[tokio::test]
async fn sigterm_finishes_in_flight_reviews_then_exits_zero() {
    let mut server = start_binary(&["--shutdown-delay-seconds", "2", "--drain-seconds", "10"]);
    let body = fixture("pod.review.json");
    let (first, rest) = body.as_bytes().split_at(body.len() / 2);

    // A review in flight: headers and half the body sent.
    let mut tls = tls_connect(server.https, &server.ca_pem, &[b"http/1.1"])
        .await
        .unwrap();
    let head = format!(
        "POST /mutate?timeout=30s HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    tls.write_all(first).await.unwrap();
    tls.flush().await.unwrap();

    let status = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());

    // Unready during the shutdown delay, while still accepting.
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut saw_unready = false;
    while Instant::now() < deadline {
        let mut c = Client::connect(server.https, &server.ca_pem, false).await;
        if c.get("/readyz").await.status() == 503 {
            saw_unready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(saw_unready, "readiness must turn false after SIGTERM");

    // Then the listener closes.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if tokio::net::TcpStream::connect(server.https).await.is_err() {
            break;
        }
        assert!(Instant::now() < deadline, "listener still accepting");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The review accepted before SIGTERM still gets its answer.
    tls.write_all(rest).await.unwrap();
    tls.flush().await.unwrap();
    let mut response = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), tls.read(&mut chunk))
            .await
            .expect("response before the drain deadline")
            .unwrap_or(0);
        if n == 0 {
            break;
        }
        response.extend_from_slice(&chunk[..n]);
        if response.ends_with(b"}") {
            break;
        }
    }
    let text = String::from_utf8_lossy(&response);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("\"patchType\":\"JSONPatch\""), "{text}");
    drop(tls);

    assert_eq!(server.exit_code().await, Some(0), "clean exit after drain");

    // Log lines are written in batches; none may be lost at exit: the
    // drained review's line and the last line of all.
    let reviews = server.logged("review");
    assert_eq!(reviews.len(), 1, "{:?}", server.logs.lock().unwrap());
    assert_eq!(reviews[0]["result"], "patched");
    assert_eq!(server.logged("stopped").len(), 1);
}

#[tokio::test]
async fn second_signal_exits_at_once_with_its_log_line() {
    let mut server = start_binary(&["--shutdown-delay-seconds", "30"]);
    for _ in 0..2 {
        let status = Command::new("kill")
            .args(["-TERM", &server.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        // Let the first signal be seen before the second.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(server.exit_code().await, Some(130));
    assert_eq!(server.logged("second signal; exiting").len(), 1);
}
