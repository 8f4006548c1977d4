//! The binary as users run it: `mutate -f` offline, and start-up errors of
//! `serve`, with their exit codes (0 ok, 1 refused document, 2 bad input).

use std::io::Write;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_canary-injector");

fn fixture_path(name: &str) -> String {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn run(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .env_remove("POD_NAMESPACE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(s) = stdin {
        input.write_all(s.as_bytes()).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8(o.stderr.clone()).unwrap()
}

fn docs(yaml: &str) -> Vec<Value> {
    serde_saphyr::from_multiple(yaml).unwrap()
}

#[test]
fn mutate_labels_manifests_like_kube_inject() {
    let out = run(
        &["mutate", "-f", &fixture_path("manifests/workloads.yaml")],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let docs = docs(&stdout(&out));
    assert_eq!(docs.len(), 4);

    let deployment = &docs[0];
    assert_eq!(
        deployment["spec"]["template"]["metadata"]["labels"]["stage"],
        "normal"
    );
    // Strings that look like other YAML types stay strings.
    assert_eq!(
        deployment["spec"]["template"]["metadata"]["labels"]["canary-injector.io/inject"],
        "true"
    );
    assert_eq!(
        deployment["spec"]["template"]["spec"]["containers"][0]["args"][2],
        "--verbose=false"
    );
    assert_eq!(
        deployment["spec"]["selector"]["matchLabels"]["version"],
        "stable"
    );
    assert!(deployment["metadata"]["labels"].get("stage").is_none());

    let service = &docs[1];
    let original =
        &self::docs(&std::fs::read_to_string(fixture_path("manifests/workloads.yaml")).unwrap())[1];
    assert_eq!(service, original, "other kinds pass through unchanged");

    let rs = &docs[2];
    for labels in [
        &rs["metadata"]["labels"],
        &rs["spec"]["template"]["metadata"]["labels"],
    ] {
        assert_eq!(labels["canarytag"], "feature-login");
        assert_eq!(labels["stage"], "gray");
    }
    assert!(stderr(&out).contains("\"feature/login\" is not a valid label value"));

    let cron = &docs[3];
    assert_eq!(
        cron["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]["canarytag"],
        "nightly"
    );

    // Idempotent: mutating the output changes nothing.
    let again = run(&["mutate", "-f", "-", "--patch"], Some(&stdout(&out)));
    assert!(again.status.success());
    assert_eq!(stdout(&again), "[]\n[]\n[]\n[]\n");
}

#[test]
fn mutate_reads_json_from_stdin_and_prints_patches() {
    let review: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture_path("istio-pod.review.json")).unwrap(),
    )
    .unwrap();
    let pod = review["request"]["object"].to_string();
    let out = run(&["mutate", "-f", "-", "--patch"], Some(&pod));
    assert!(out.status.success(), "{}", stderr(&out));
    let patch: Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    // An `istioctl kube-inject`ed 1.5 pod: the label, plus the bootstrap
    // template volume and its mount on istio-proxy (containers[1]).
    let paths: Vec<&str> = patch
        .as_array()
        .unwrap()
        .iter()
        .map(|op| op["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        paths,
        [
            "/metadata/labels/stage",
            "/spec/volumes/-",
            "/spec/containers/1/volumeMounts/-"
        ]
    );
    assert_eq!(
        patch[2]["value"]["mountPath"],
        "/var/lib/istio/envoy/envoy_bootstrap_tmpl.json"
    );
}

#[test]
fn mutate_handles_lists() {
    let list = r#"{"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "a"}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "b"}}]}"#;
    let out = run(&["mutate", "-f", "-", "--patch"], Some(list));
    assert!(out.status.success(), "{}", stderr(&out));
    let patch: Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(patch[0]["path"], "/items/0/metadata/labels");
}

#[test]
fn missing_file_is_exit_2() {
    let out = run(&["mutate", "-f", "/nonexistent/manifest.yaml"], None);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("cannot read /nonexistent/manifest.yaml"),
        "{}",
        stderr(&out)
    );
    assert!(stdout(&out).is_empty());
}

#[test]
fn invalid_yaml_is_exit_2() {
    for input in ["kind: Pod\nmetadata: [unclosed\n", "- just\n- a list\n"] {
        let out = run(&["mutate", "-f", "-"], Some(input));
        assert_eq!(out.status.code(), Some(2), "{input}");
        assert!(stderr(&out).starts_with("error: "), "{}", stderr(&out));
        assert!(stdout(&out).is_empty());
    }
}

#[test]
fn unusable_tag_is_exit_1_naming_the_document() {
    let input = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n  annotations:\n    canary-injector.io/tag: '///'\n";
    let out = run(&["mutate", "-f", "-"], Some(input));
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("document 1 (Pod web)"), "{err}");
    assert!(err.contains("canary-injector.io/tag"), "{err}");
}

#[test]
fn config_file_changes_the_labels_and_bad_config_is_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.yaml");
    std::fs::write(
        &good,
        "labels: {stage: example.com/stage, normalStage: stable}\n",
    )
    .unwrap();
    let out = run(
        &[
            "mutate",
            "-f",
            "-",
            "--patch",
            "--config",
            good.to_str().unwrap(),
        ],
        Some("kind: Pod\nmetadata: {name: a, labels: {app: a}}\n"),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out).trim(),
        r#"[{"op":"add","path":"/metadata/labels/example.com~1stage","value":"stable"}]"#
    );

    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "stageLabels: x\n").unwrap();
    for cmd in ["mutate", "serve"] {
        let mut args = vec![cmd, "--config", bad.to_str().unwrap()];
        if cmd == "mutate" {
            args.extend(["-f", "-"]);
        }
        let out = run(&args, Some(""));
        assert_eq!(out.status.code(), Some(2), "{cmd}");
        assert!(
            stderr(&out).contains("stageLabels"),
            "{cmd}: {}",
            stderr(&out)
        );
    }
}

#[test]
fn serve_refuses_bad_limits_and_an_unwritable_dev_cert_dir() {
    for flag in ["--max-connections", "--cert-reload-seconds"] {
        let out = run(&["serve", flag, "0"], None);
        assert_eq!(out.status.code(), Some(2), "{flag} 0");
        assert!(stderr(&out).contains(flag), "{flag}: {}", stderr(&out));
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, "x").unwrap();
    let out = run(
        &[
            "serve",
            "--dev-cert-dir",
            file.join("dev").to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out)
            .contains("cannot create the development certificate; pass --tls-cert and --tls-key"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn serve_refuses_bad_tls_flags() {
    let out = run(&["serve", "--tls-cert", "/tmp/x.crt"], None);
    assert_eq!(
        out.status.code(),
        Some(2),
        "cert without key is a usage error"
    );

    let out = run(
        &[
            "serve",
            "--tls-cert",
            "/nonexistent/tls.crt",
            "--tls-key",
            "/nonexistent/tls.key",
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("/nonexistent/tls.crt"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn bootstrap_template_patches_and_refuses_with_exit_2() {
    let out = run(
        &[
            "bootstrap-template",
            "-f",
            &fixture_path("bootstrap/istio-1.5.tmpl.json"),
        ],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let expected =
        std::fs::read_to_string(fixture_path("bootstrap/istio-1.5.expected.json")).unwrap();
    assert_eq!(stdout(&out), expected);

    // Idempotent through the binary too.
    let again = run(&["bootstrap-template", "-f", "-"], Some(&expected));
    assert!(again.status.success());
    assert_eq!(stdout(&again), expected);
    assert!(stderr(&again).contains("unchanged"));

    for (fixture, message) in [
        ("bootstrap/istio-1.12.tmpl.json", "Istio >= 1.8"),
        ("bootstrap/two-xds.tmpl.json", "found 2 clusters"),
        (
            "bootstrap/not-a-template.json",
            "not an envoy bootstrap template",
        ),
        ("bootstrap/missing.json", "cannot read"),
    ] {
        let out = run(&["bootstrap-template", "-f", &fixture_path(fixture)], None);
        assert_eq!(out.status.code(), Some(2), "{fixture}");
        assert!(
            stderr(&out).contains(message),
            "{fixture}: {}",
            stderr(&out)
        );
        assert!(stdout(&out).is_empty(), "{fixture}");
    }
}

#[test]
fn bootstrap_template_custom_values_and_configmap_manifest() {
    let out = run(
        &[
            "bootstrap-template",
            "-f",
            &fixture_path("bootstrap/istio-1.7.tmpl.json"),
            "--keepalive-time",
            "20",
            "--keepalive-probes",
            "4",
            "--keepalive-interval",
            "6",
            "--configmap",
            "canary-injector-bootstrap",
            "--namespace",
            "mesh-tools",
        ],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let cm: Value = serde_saphyr::from_str(&stdout(&out)).unwrap();
    assert_eq!(cm["kind"], "ConfigMap");
    assert_eq!(cm["metadata"]["name"], "canary-injector-bootstrap");
    assert_eq!(cm["metadata"]["namespace"], "mesh-tools");
    let template = cm["data"]["envoy_bootstrap_tmpl.json"].as_str().unwrap();
    // The YAML block holds the template byte for byte.
    let direct = run(
        &[
            "bootstrap-template",
            "-f",
            &fixture_path("bootstrap/istio-1.7.tmpl.json"),
            "--keepalive-time=20",
            "--keepalive-probes=4",
            "--keepalive-interval=6",
        ],
        None,
    );
    assert_eq!(template, stdout(&direct));
    assert!(template.contains("\"keepalive_time\": 20"));
    assert!(template.contains("\"keepalive_probes\": 4"));
    assert!(template.contains("\"keepalive_interval\": 6"));

    let zero = run(
        &[
            "bootstrap-template",
            "-f",
            &fixture_path("bootstrap/istio-1.7.tmpl.json"),
            "--keepalive-time",
            "0",
        ],
        None,
    );
    assert_eq!(zero.status.code(), Some(2));
}

#[test]
fn mutate_mounts_the_bootstrap_template_unless_told_not_to() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.yaml");
    std::fs::write(&cfg, "istio:\n  proxyVersion: '1.5'\n").unwrap();
    let manifests = fixture_path("manifests/workloads.yaml");
    let out = run(
        &[
            "mutate",
            "-f",
            &manifests,
            "--config",
            cfg.to_str().unwrap(),
        ],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let with = docs(&stdout(&out));
    let annotations = &with[0]["spec"]["template"]["metadata"]["annotations"];
    assert!(
        annotations["sidecar.istio.io/userVolumeMount"]
            .as_str()
            .unwrap()
            .contains("/var/lib/istio/envoy/envoy_bootstrap_tmpl.json")
    );

    let out = run(
        &[
            "mutate",
            "-f",
            &manifests,
            "--config",
            cfg.to_str().unwrap(),
            "--no-bootstrap",
        ],
        None,
    );
    let docs = docs(&stdout(&out));
    assert!(
        docs[0]["spec"]["template"]["metadata"]
            .get("annotations")
            .is_none()
    );
}

/// `check` without a reachable cluster: exit 2 and a reason, not a report.
#[test]
fn check_without_a_cluster_is_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    // A kubeconfig whose API server refuses connections.
    let kubeconfig = dir.path().join("config");
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\ncurrent-context: dead\n\
         clusters: [{name: dead, cluster: {server: 'https://127.0.0.1:1'}}]\n\
         contexts: [{name: dead, context: {cluster: dead, user: u}}]\n\
         users: [{name: u, user: {token: t}}]\n",
    )
    .unwrap();
    for (config, reason) in [
        (
            dir.path().join("missing").display().to_string(),
            "cannot configure the Kubernetes client",
        ),
        (kubeconfig.display().to_string(), "cannot read"),
    ] {
        let out = Command::new(BIN)
            .args(["check", "-o", "json"])
            .env("KUBECONFIG", &config)
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env("HOME", dir.path())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        assert!(stderr(&out).contains(reason), "{}", stderr(&out));
        assert!(stdout(&out).is_empty(), "no report without a cluster");
    }
    let out = run(&["check", "-o", "yaml"], None);
    assert_eq!(out.status.code(), Some(2), "bad usage");
}
