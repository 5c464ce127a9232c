//! What the compatibility docs' tests share: reading a model source for its YAML field
//! names, and a doc's field tables (`| YAML path | status | notes | test |`) with their
//! Totals table.
#![allow(dead_code)]
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

/// The `proxy-daemon` crate's directory.
pub fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// serde's `rename_all = "camelCase"`: `mirror_percentage` → `mirrorPercentage`.
pub fn camel_case(snake: &str) -> String {
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
pub fn explicit_rename(attribute: &str) -> Option<String> {
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
pub fn model_fields(source: &str) -> BTreeSet<String> {
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
pub fn cells(line: &str) -> Option<Vec<String>> {
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
pub fn code_spans(cell: &str) -> impl Iterator<Item = &str> {
    cell.split('`').skip(1).step_by(2)
}

pub fn is_separator(row: &[String]) -> bool {
    row.iter()
        .all(|c| !c.is_empty() && c.chars().all(|ch| ch == '-' || ch == ':'))
}

/// One row of a field table (`| YAML path | status | notes | test |`), with the `## `
/// section it is in.
pub struct FieldRow {
    pub section: String,
    pub cells: Vec<String>,
}

/// The doc, read once: every table row's first cell, and the rows of its field tables.
pub struct Doc {
    pub first_cells: Vec<String>,
    pub field_rows: Vec<FieldRow>,
    /// The `## Totals` table: section → counts per status.
    pub totals: BTreeMap<String, Vec<usize>>,
}

pub fn doc(path: &Path) -> Doc {
    let text = read(path);
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

/// Every field row has 4 cells and one of `statuses`; the Totals table matches the rows.
pub fn check_statuses_and_totals(doc: &Doc, statuses: &[&str]) {
    let mut counted: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for row in &doc.field_rows {
        assert_eq!(
            row.cells.len(),
            4,
            "a field row has 4 cells: {:?}",
            row.cells
        );
        let status = &row.cells[1];
        let Some(i) = statuses.iter().position(|s| s == status) else {
            panic!("{}: unknown status {status:?}", row.cells[0]);
        };
        counted
            .entry(row.section.clone())
            .or_insert_with(|| vec![0; statuses.len()])[i] += 1;
    }
    assert!(!counted.is_empty(), "no field rows found");
    assert_eq!(
        doc.totals, counted,
        "the Totals table (left) does not match the rows (right)"
    );
}

/// Every test a row cites is defined in a file its row links (`docs_dir`: the doc's).
pub fn check_cited_tests(doc: &Doc, docs_dir: &Path) {
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
