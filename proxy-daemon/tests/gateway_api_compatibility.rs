//! Keeps `docs/gateway-api-compatibility.md` in step with the Gateway API models in
//! `src/config/gateway.rs`: every field of a model struct appears in the doc's tables;
//! every field row carries one of the doc's statuses; the totals add up; every test the doc
//! cites exists; and every upstream mesh conformance manifest is replayed by the netns
//! suite.
mod compat;

use std::{collections::BTreeSet, path::PathBuf};

use compat::{code_spans, doc, manifest_dir, model_fields, read};

/// The statuses a field row may have, in the order of the totals table's columns.
const STATUSES: [&str; 4] = [
    "supported",
    "not supported (the route is not accepted; validate says so, with its line)",
    "ignored for the mesh (as the spec says)",
    "accepted but ignored",
];

fn doc_path() -> PathBuf {
    manifest_dir().join("../docs/gateway-api-compatibility.md")
}

#[test]
fn every_model_field_is_in_the_doc() {
    let fields = model_fields(&read(&manifest_dir().join("src/config/gateway.rs")));
    for expected in [
        "parentRefs",
        "sectionName",
        "replacePrefixMatch",
        "type",
        "backendRequest",
    ] {
        assert!(
            fields.contains(expected),
            "{expected} not found in {fields:?}"
        );
    }
    let doc = doc(&doc_path());
    let segments: BTreeSet<&str> = doc
        .first_cells
        .iter()
        .flat_map(|cell| code_spans(cell))
        .flat_map(|path| path.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')))
        .filter(|s| !s.is_empty())
        .collect();
    let missing: Vec<&String> = fields
        .iter()
        .filter(|f| !segments.contains(f.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/gateway-api-compatibility.md has no table row for: {missing:?}"
    );
}

#[test]
fn every_field_row_has_a_status_and_the_totals_add_up() {
    compat::check_statuses_and_totals(&doc(&doc_path()), &STATUSES);
}

#[test]
fn every_cited_test_exists() {
    compat::check_cited_tests(&doc(&doc_path()), &manifest_dir().join("../docs"));
}

/// Every manifest of the upstream corpus is applied by a test of `tests/tests/gamma.rs`.
#[test]
fn every_conformance_manifest_is_replayed() {
    let suite = read(&manifest_dir().join("../tests/tests/gamma.rs"));
    let dir = manifest_dir().join("../tests/fixtures/gateway-api-mesh/tests");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("corpus") {
        let name = entry
            .expect("entry")
            .file_name()
            .to_string_lossy()
            .into_owned();
        assert!(
            suite.contains(&format!("\"{name}\"")),
            "{name} is not replayed by gamma.rs"
        );
        seen += 1;
    }
    assert_eq!(seen, 21, "the corpus has 21 manifests");
}
