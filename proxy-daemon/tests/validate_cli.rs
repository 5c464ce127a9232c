//! `proxy-daemon validate` on one file per kind of mistake: the output must match
//! tests/fixtures/mistakes/expected.txt line by line (exit code included).
use std::{path::Path, process::Command};

#[test]
fn validate_reports_each_mistake_at_its_line() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
    let mut files: Vec<String> = std::fs::read_dir(fixtures.join("mistakes"))
        .expect("mistakes dir")
        .flatten()
        .map(|e| format!("mistakes/{}", e.file_name().to_string_lossy()))
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 10, "at least ten kinds of mistake");
    let mut actual = String::new();
    for f in &files {
        // One file at a time: a directory is one configuration, where names would collide.
        let out = Command::new(env!("CARGO_BIN_EXE_proxy-daemon"))
            .args(["validate", f])
            .current_dir(&fixtures)
            .output()
            .expect("run validate");
        actual.push_str(&String::from_utf8_lossy(&out.stdout));
        actual.push_str(&format!("exit {}\n", out.status.code().unwrap_or(-1)));
    }
    let expected =
        std::fs::read_to_string(fixtures.join("mistakes/expected.txt")).expect("expected.txt");
    for (i, (a, e)) in actual.lines().zip(expected.lines()).enumerate() {
        assert_eq!(a, e, "line {} differs", i + 1);
    }
    assert_eq!(
        actual.lines().count(),
        expected.lines().count(),
        "output:\n{actual}"
    );
}

#[test]
fn validate_passes_good_files_and_fails_on_a_directory_with_a_bad_one() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/seed-examples");
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_proxy-daemon"))
            .arg("validate")
            .args(args)
            .current_dir(&fixtures)
            .output()
            .expect("run validate")
    };
    let ok = run(&["subsets-weights.yaml", "serviceentry-tls-origination.yaml"]);
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stdout)
    );
    assert!(ok.stdout.is_empty());
    // One line on standard error says what was checked, unless -q.
    assert_eq!(
        String::from_utf8_lossy(&ok.stderr).trim(),
        "validate: 5 objects in 2 paths: valid (0 errors, 0 warnings, 0 notes)"
    );
    let quiet = run(&["-q", "subsets-weights.yaml"]);
    assert_eq!(quiet.status.code(), Some(0));
    assert!(quiet.stderr.is_empty() && quiet.stdout.is_empty());
    let bad = run(&["."]);
    assert_eq!(bad.status.code(), Some(1));
    let text = String::from_utf8_lossy(&bad.stdout);
    assert!(
        text.contains("./route-by-source.broken.yaml:32: "),
        "{text}"
    );
}

#[test]
fn files_given_together_are_validated_as_one_configuration() {
    let dir = std::env::temp_dir().join(format!("pd-validate-set-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("a.yaml"),
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  http:
  - route: [{destination: {host: reviews, subset: v2}}]
",
    )
    .unwrap();
    std::fs::write(
        dir.join("b.yaml"),
        "apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop}
spec:
  ports: [{name: http, port: 9080}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
  subsets: [{name: v2, labels: {version: v2}}]
",
    )
    .unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_proxy-daemon"))
            .arg("validate")
            .args(args)
            .current_dir(&dir)
            .output()
            .expect("run validate");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    // Together, as `kubectl apply -f a.yaml -f b.yaml` takes them: nothing to say.
    assert_eq!(run(&["a.yaml", "b.yaml"]), (Some(0), String::new()));
    // Alone, the subset's DestinationRule is elsewhere: a warning, not a failure.
    let (code, text) = run(&["a.yaml"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("a.yaml:7: VirtualService/shop/reviews: warning: subset \"v2\""),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Istio's fault-injection task applies `fault-injection-details-v1.yaml` after
/// `destination-rule-all.yaml`, redefining the `details` DestinationRule: accepted as
/// `kubectl apply` takes it (the later definition), with a warning naming both places.
#[test]
fn istios_fault_injection_sample_is_accepted_after_the_file_it_redefines() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/istio-samples");
    let out = Command::new(env!("CARGO_BIN_EXE_proxy-daemon"))
        .args([
            "validate",
            "destination-rule-all.yaml",
            "fault-injection-details-v1.yaml",
        ])
        .current_dir(&fixtures)
        .output()
        .expect("run validate");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.lines().any(|l| l.starts_with("fault-injection-details-v1.yaml:23: DestinationRule/default/details: warning: replaces the definition at destination-rule-all.yaml:")),
        "{text}"
    );
}
