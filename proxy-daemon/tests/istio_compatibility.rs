//! Keeps `docs/istio-compatibility.md` in step with the Istio models in
//! `src/config/istio.rs`: every field of a model struct and every name in
//! `KNOWN_UNSUPPORTED_FIELDS` must appear in the doc's tables; every field row carries one
//! of the doc's statuses; the totals table adds up; and every test the doc cites exists.
mod compat;

use std::{collections::BTreeSet, path::PathBuf};

use compat::{code_spans, doc, manifest_dir, model_fields, read};
use proxy_daemon::config::istio::KNOWN_UNSUPPORTED_FIELDS;

/// The statuses a field row may have, in the order of the totals table's columns.
const STATUSES: [&str; 4] = [
    "supported",
    "not supported (validate says so, with its line)",
    "meaningless on a node proxy (accepted, noted)",
    "accepted but ignored",
];

fn doc_path() -> PathBuf {
    manifest_dir().join("../docs/istio-compatibility.md")
}

#[test]
fn every_model_field_and_unsupported_name_is_in_the_doc() {
    let source = read(&manifest_dir().join("src/config/istio.rs"));
    let fields = model_fields(&source);
    // The parse itself: a few fields every version of the models has, renames included.
    for expected in ["hosts", "mirrorPercentage", "match", "consecutive5xxErrors"] {
        assert!(
            fields.contains(expected),
            "{expected} not found in {fields:?}"
        );
    }
    assert!(
        !fields.contains("request_headers_to_add") && !fields.contains("spec"),
        "Envoy value structs and IstioObject must be skipped: {fields:?}"
    );
    let doc = doc(&doc_path());
    // Path segments of the backticked paths in the tables' first column.
    let segments: BTreeSet<&str> = doc
        .first_cells
        .iter()
        .flat_map(|cell| code_spans(cell))
        .flat_map(|path| path.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')))
        .filter(|s| !s.is_empty())
        .collect();
    let missing: Vec<&str> = fields
        .iter()
        .map(String::as_str)
        .chain(KNOWN_UNSUPPORTED_FIELDS.iter().copied())
        .filter(|name| !segments.contains(name))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/istio-compatibility.md has no table row for: {}",
        missing.join(", ")
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
