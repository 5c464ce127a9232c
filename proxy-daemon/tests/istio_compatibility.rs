//! Keeps `docs/istio-compatibility.md` in step with the Istio models in
//! `src/config/istio.rs`: every field of a model struct and every name in
//! `KNOWN_UNSUPPORTED_FIELDS` must appear in the doc's tables; every field row carries one
//! of the doc's statuses; the totals table adds up; and every test the doc cites exists.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use proxy_daemon::config::istio::KNOWN_UNSUPPORTED_FIELDS;

/// The statuses a field row may have, in the order of the totals table's columns.
const STATUSES: [&str; 4] = [
    "supported",
    "not supported (validate says so, with its line)",
    "meaningless on a node proxy (accepted, noted)",
    "accepted but ignored",
];

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn doc_path() -> PathBuf {
    manifest_dir().join("../docs/istio-compatibility.md")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// serde's `rename_all = "camelCase"`: `mirror_percentage` → `mirrorPercentage`.
fn camel_case(snake: &str) -> String {
    let mut out = String::new();
    for (i, word) in snake.split('_').enumerate() {
        let mut chars = word.chars();
        match chars.next() {
            Some(first) if i > 0 => {
                out.extend(first.to_uppercase());
                out.push_str(chars.as_str());
            }
            _ => out.push_str(word),
        }
    }
    out
}

/// The value of `rename = "..."` in a serde attribute line, if it has one.
fn explicit_rename(attribute: &str) -> Option<String> {
    let rest = attribute.split_once("rename = \"")?.1;
    Some(rest.split_once('"')?.0.to_string())
}

/// The YAML names of the fields of the Istio model structs, read from `istio.rs`: the
/// `pub <name>:` lines of each `pub struct ... {` block, in camelCase unless a
/// `#[serde(rename = "...")]` above the field says otherwise.
///
/// Which structs count: those whose `#[serde(...)]` says `rename_all = "camelCase"`, Istio's
/// JSON naming. The EnvoyFilter `value` structs (`EnvoyRoute`, `HttpRouteMerge`, ...) have
/// no `rename_all`: their fields are Envoy's own snake_case names, documented in the doc's
/// Envoy section but not Istio API, so they are skipped. So is `IstioObject`, the
/// Kubernetes wrapper whose `metadata` and `spec` are plumbing, not fields of a spec.
fn model_fields(source: &str) -> BTreeSet<String> {
    let mut fields = BTreeSet::new();
    let mut struct_attribute = String::new();
    let mut in_istio_struct = None::<bool>;
    let mut field_rename = None;
    for line in source.lines().map(str::trim) {
        match in_istio_struct {
            None => {
                if line.starts_with("#[serde(") {
                    struct_attribute = line.to_string();
                } else if let Some(name) = line.strip_prefix("pub struct ") {
                    let istio = struct_attribute.contains("rename_all = \"camelCase\"")
                        && !name.starts_with("IstioObject");
                    in_istio_struct = Some(istio);
                    struct_attribute.clear();
                } else if line.starts_with("pub enum ") {
                    struct_attribute.clear();
                }
            }
            Some(istio) => {
                if line == "}" {
                    in_istio_struct = None;
                } else if line.starts_with("#[serde(") {
                    field_rename = explicit_rename(line);
                } else if let Some((name, _)) = line
                    .strip_prefix("pub ")
                    .and_then(|rest| rest.split_once(':'))
                {
                    let rename = field_rename.take();
                    if istio {
                        fields.insert(rename.unwrap_or_else(|| camel_case(name)));
                    }
                }
            }
        }
    }
    fields
}

/// The cells of a Markdown table row, trimmed (`\|` is a pipe inside a cell); None for
/// a line that is not a table row.
fn cells(line: &str) -> Option<Vec<String>> {
    let inner = line.trim().strip_prefix('|')?.strip_suffix('|')?;
    let mut out = vec![String::new()];
    let mut chars = inner.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'|') => {
                out.last_mut().unwrap().push('|');
                chars.next();
            }
            '|' => out.push(String::new()),
            c => out.last_mut().unwrap().push(c),
        }
    }
    Some(out.into_iter().map(|c| c.trim().to_string()).collect())
}

/// The `code spans` of a cell.
fn code_spans(cell: &str) -> impl Iterator<Item = &str> {
    cell.split('`').skip(1).step_by(2)
}

fn is_separator(row: &[String]) -> bool {
    row.iter()
        .all(|c| !c.is_empty() && c.chars().all(|ch| ch == '-' || ch == ':'))
}

/// One row of a field table (`| YAML path | status | notes | test |`), with the `## `
/// section it is in.
struct FieldRow {
    section: String,
    cells: Vec<String>,
}

/// The doc, read once: every table row's first cell, and the rows of its field tables.
struct Doc {
    first_cells: Vec<String>,
    field_rows: Vec<FieldRow>,
    /// The `## Totals` table: section → counts per status.
    totals: BTreeMap<String, Vec<usize>>,
}

fn doc() -> Doc {
    let text = read(&doc_path());
    let mut doc = Doc {
        first_cells: Vec::new(),
        field_rows: Vec::new(),
        totals: BTreeMap::new(),
    };
    let mut section = String::new();
    let mut in_field_table = false;
    for line in text.lines() {
        let Some(row) = cells(line) else {
            if let Some(heading) = line.strip_prefix("## ") {
                section = heading.trim().to_string();
            }
            in_field_table = false;
            continue;
        };
        if is_separator(&row) {
            continue;
        }
        doc.first_cells.push(row[0].clone());
        if row.len() >= 2 && row[0] == "YAML path" && row[1] == "status" {
            in_field_table = true;
        } else if in_field_table {
            doc.field_rows.push(FieldRow {
                section: section.clone(),
                cells: row,
            });
        } else if section == "Totals" && row[0] != "kind" {
            let counts = row[1..]
                .iter()
                .map(|n| n.parse().unwrap_or_else(|_| panic!("totals: {line}")))
                .collect();
            doc.totals.insert(row[0].clone(), counts);
        }
    }
    doc
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
    let doc = doc();
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
    let doc = doc();
    let mut counted: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for row in &doc.field_rows {
        assert_eq!(
            row.cells.len(),
            4,
            "a field row has 4 cells: {:?}",
            row.cells
        );
        let status = &row.cells[1];
        let Some(i) = STATUSES.iter().position(|s| s == status) else {
            panic!("{}: unknown status {status:?}", row.cells[0]);
        };
        counted
            .entry(row.section.clone())
            .or_insert_with(|| vec![0; STATUSES.len()])[i] += 1;
    }
    assert!(!counted.is_empty(), "no field rows found");
    assert_eq!(
        doc.totals, counted,
        "the Totals table (left) does not match the rows (right)"
    );
}

#[test]
fn every_cited_test_exists() {
    let doc = doc();
    let docs_dir = doc_path().parent().unwrap().to_path_buf();
    for row in &doc.field_rows {
        let cell = row.cells.last().unwrap();
        let path = &row.cells[0];
        if cell == "no test yet" {
            continue;
        }
        // Link targets: `[text](target)`.
        let linked: Vec<PathBuf> = cell
            .split("](")
            .skip(1)
            .filter_map(|rest| rest.split_once(')'))
            .map(|(target, _)| docs_dir.join(target))
            .collect();
        let sources: Vec<String> = linked
            .iter()
            .inspect(|p| assert!(p.exists(), "{path}: {} does not exist", p.display()))
            .filter(|p| p.extension().is_some_and(|e| e == "rs"))
            .map(|p| read(p))
            .collect();
        let names: Vec<&str> = code_spans(cell).collect();
        assert!(!names.is_empty(), "{path}: no test named in {cell:?}");
        for name in names {
            let definition = format!("fn {name}(");
            assert!(
                sources.iter().any(|s| s.contains(&definition)),
                "{path}: test {name} is in none of the files linked in its row"
            );
        }
    }
}
