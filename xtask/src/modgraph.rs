//! `cargo xtask modgraph`: the module dependency graph of a crate (proxy-daemon by
//! default), computed from its own source: `use` declarations and `crate::`, `super::`,
//! `self::` paths (and `<crate name>::` paths, which is how `main.rs` reaches the library).
//!
//! Not a Rust parser: comments and string/char literals are blanked out, the rest is split
//! into tokens, and paths are read off the tokens. Every path is resolved to the longest
//! module that exists as a file (`crate::proxy::http::Foo` → `proxy::http`, or `proxy` if
//! there is no such file). Inline modules (`mod tests { use super::*; }`) are followed for
//! resolving `self::`/`super::`, but their references count for the file they sit in.
//! Plain relative paths (`use config::Foo;` in `lib.rs`) are not followed: they look the
//! same as paths into external crates.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};

/// A module's path below the crate root (`[]` is the root itself).
type ModPath = Vec<String>;

/// One graph, nodes and their (sorted) dependencies; every node is a key.
type Graph<N> = BTreeMap<N, BTreeSet<N>>;

/// Name of the node for `main.rs` when the crate also has a `lib.rs`: the binary is its
/// own crate root, using the library by name.
const BIN_ROOT: &str = "main";

/// `cargo xtask modgraph [--root PATH] [--dot | --check-layers LAYERS]`.
pub fn run(root: &Path, dot: bool, check_layers: Option<&str>) -> Result<()> {
    if !root.is_dir() {
        bail!("{} is not a directory", root.display());
    }
    let crate_name = crate_name(root);
    let files = source_files(root)?;
    if files.is_empty() {
        bail!("no .rs files under {}", root.display());
    }
    let graph = module_graph(&files, crate_name.as_deref());
    let top = top_level(&graph);
    if dot {
        print!("{}", render_dot(&top));
        return Ok(());
    }
    if let Some(layers) = check_layers {
        let layers = parse_layers(layers)?;
        for name in &layers {
            if !top.contains_key(name) {
                eprintln!("modgraph: warning: layer {name:?} is not a top-level module");
            }
        }
        let upward = upward_edges(&graph, &layers);
        print!("{}", render_layer_report(&layers, &upward));
        if !upward.is_empty() {
            bail!(
                "{} top-level edge(s) go from a lower layer to a higher one",
                upward.len()
            );
        }
        return Ok(());
    }
    let mut out = String::from("edges:\n");
    for (module, deps) in &graph {
        let deps: Vec<String> = deps.iter().map(|d| display(d)).collect();
        let deps = if deps.is_empty() {
            "(none)".to_string()
        } else {
            deps.join(", ")
        };
        let _ = writeln!(out, "  {} -> {deps}", display(module));
    }
    out.push_str("\ntop-level graph:\n");
    for (module, deps) in &top {
        let deps: Vec<&str> = deps.iter().map(String::as_str).collect();
        let deps = if deps.is_empty() {
            "(none)".to_string()
        } else {
            deps.join(", ")
        };
        let _ = writeln!(out, "  {module} -> {deps}");
    }
    out.push_str("\ncycles:\n");
    let cycles = cycles(&top);
    for scc in &cycles {
        let _ = writeln!(out, "  {}", scc.join(" <-> "));
    }
    let plural = if cycles.len() == 1 { "" } else { "s" };
    let _ = writeln!(out, "{} cycle{plural}", cycles.len());
    print!("{out}");
    Ok(())
}

/// The crate's name as paths spell it (`proxy-daemon` → `proxy_daemon`), from the
/// `Cargo.toml` next to the source directory, if there is one.
fn crate_name(root: &Path) -> Option<String> {
    let manifest = std::fs::read_to_string(root.parent()?.join("Cargo.toml")).ok()?;
    let mut in_package = false;
    for line in manifest.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_package = line == "[package]";
        } else if in_package {
            if let Some(value) = line.strip_prefix("name").map(str::trim_start) {
                if let Some(value) = value.strip_prefix('=') {
                    let name = value.trim().trim_matches('"');
                    return Some(name.replace('-', "_"));
                }
            }
        }
    }
    None
}

/// One source file: the graph node it belongs to, the module `self::`/`super::` resolve
/// against (they differ only for a binary root next to a library), and its text.
struct SourceFile {
    node: ModPath,
    context: ModPath,
    text: String,
}

/// Every `.rs` file under `root`, in path order, with its module path. Files that vanish
/// while we read (someone is moving them) are skipped with a warning.
fn source_files(root: &Path) -> Result<Vec<SourceFile>> {
    let mut paths = Vec::new();
    walk(root, &mut paths).with_context(|| format!("reading {}", root.display()))?;
    paths.sort();
    let has_lib = paths.iter().any(|p| p == &root.join("lib.rs"));
    let mut files = Vec::new();
    for path in paths {
        let rel = path.strip_prefix(root).unwrap_or(&path);
        let Some(module) = module_path_of(rel) else {
            eprintln!(
                "modgraph: warning: skipping {} (no module path)",
                rel.display()
            );
            continue;
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                eprintln!(
                    "modgraph: warning: {} vanished while reading",
                    rel.display()
                );
                continue;
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let node = if has_lib && rel == Path::new("main.rs") {
            vec![BIN_ROOT.to_string()]
        } else {
            module.clone()
        };
        files.push(SourceFile {
            node,
            context: module,
            text,
        });
    }
    Ok(files)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        // A folder moved away under us: nothing to read in it.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let path = entry?.path();
        match std::fs::metadata(&path) {
            Ok(meta) if meta.is_dir() => walk(&path, out)?,
            Ok(meta) if meta.is_file() && path.extension().is_some_and(|x| x == "rs") => {
                out.push(path)
            }
            _ => {}
        }
    }
    Ok(())
}

/// `lib.rs`/`main.rs` → the root, `a/mod.rs` → `a`, `a/b.rs` → `a::b`.
fn module_path_of(rel: &Path) -> Option<ModPath> {
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_str().map(str::to_string))
        .collect::<Option<_>>()?;
    let file = parts.pop()?;
    let stem = file.strip_suffix(".rs")?;
    match (parts.is_empty(), stem) {
        (true, "lib" | "main") => Some(Vec::new()),
        (true, "mod") => None,
        (false, "mod") => Some(parts),
        _ => {
            parts.push(stem.to_string());
            Some(parts)
        }
    }
}

/// The module graph: each file's references resolved to existing modules, without
/// references to the module itself or to its own submodules.
fn module_graph(files: &[SourceFile], crate_name: Option<&str>) -> Graph<ModPath> {
    let mut modules: BTreeSet<ModPath> = files.iter().map(|f| f.context.clone()).collect();
    modules.insert(Vec::new());
    let mut graph: Graph<ModPath> = BTreeMap::new();
    for file in files {
        let deps = graph.entry(file.node.clone()).or_default();
        let bin_root = file.node != file.context;
        for (context, path) in references(&strip(&file.text), &file.context) {
            let Some(target) = absolute(&context, &path, crate_name) else {
                continue;
            };
            let target = longest_existing(&target, &modules);
            let own = if bin_root {
                target == file.node
            } else {
                target.starts_with(&file.node)
            };
            if !own {
                deps.insert(target);
            }
        }
    }
    graph
}

/// `crate` for the root, `a::b` otherwise.
fn display(module: &[String]) -> String {
    if module.is_empty() {
        "crate".to_string()
    } else {
        module.join("::")
    }
}

fn top_of(module: &[String]) -> String {
    module
        .first()
        .cloned()
        .unwrap_or_else(|| "crate".to_string())
}

/// The graph collapsed to top-level modules (first path segment), without self-loops.
fn top_level(graph: &Graph<ModPath>) -> Graph<String> {
    let mut top: Graph<String> = BTreeMap::new();
    for (module, deps) in graph {
        let from = top_of(module);
        let entry = top.entry(from.clone()).or_default();
        for dep in deps {
            let to = top_of(dep);
            if to != from {
                entry.insert(to);
            }
        }
    }
    for deps in top.clone().into_values() {
        for dep in deps {
            top.entry(dep).or_default();
        }
    }
    top
}

// ---- source text ---------------------------------------------------------------------

fn is_ident_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// The source with comments (doc comments too) removed, string literals (plain, byte, C,
/// raw) replaced by `""` and char literals by `' '`. Lifetimes stay. Newlines inside
/// removed text are kept, so line numbers do not move.
fn strip(src: &str) -> String {
    let c: Vec<char> = src.chars().collect();
    let at = |i: usize| c.get(i).copied().unwrap_or('\0');
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    while i < c.len() {
        let ch = c[i];
        let prev_ident = i > 0 && is_ident_char(c[i - 1]);
        if ch == '/' && at(i + 1) == '/' {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if ch == '/' && at(i + 1) == '*' {
            // Block comments nest.
            let mut depth = 0usize;
            while i < c.len() {
                if c[i] == '/' && at(i + 1) == '*' {
                    depth += 1;
                    i += 2;
                } else if c[i] == '*' && at(i + 1) == '/' {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    if c[i] == '\n' {
                        out.push('\n');
                    }
                    i += 1;
                }
            }
            out.push(' ');
        } else if let Some((hashes, open)) = (!prev_ident).then(|| raw_string_at(&c, i)).flatten() {
            // r"…", r#"…"#, br"…", cr"…": no escapes, ends at `"` and as many `#`s.
            i = open + 1;
            while i < c.len() && !(c[i] == '"' && (1..=hashes).all(|k| at(i + k) == '#')) {
                if c[i] == '\n' {
                    out.push('\n');
                }
                i += 1;
            }
            i += 1 + hashes;
            out.push_str("\"\"");
        } else if ch == '"' || (!prev_ident && matches!(ch, 'b' | 'c') && at(i + 1) == '"') {
            i += if ch == '"' { 1 } else { 2 };
            while i < c.len() && c[i] != '"' {
                if c[i] == '\\' {
                    i += 1;
                }
                if at(i) == '\n' {
                    out.push('\n');
                }
                i += 1;
            }
            i += 1;
            out.push_str("\"\"");
        } else if ch == '\'' || (!prev_ident && ch == 'b' && at(i + 1) == '\'') {
            let q = if ch == '\'' { i } else { i + 1 };
            if at(q + 1) == '\\' {
                // '\n', '\'', '\u{1F600}'.
                let mut j = q + 3;
                while j < c.len() && c[j] != '\'' && c[j] != '\n' {
                    j += 1;
                }
                i = j + 1;
                out.push_str("' '");
            } else if at(q + 2) == '\'' && at(q + 1) != '\'' {
                i = q + 3;
                out.push_str("' '");
            } else {
                // A lifetime or label ('a, 'static), or the `b` of an identifier.
                out.push(ch);
                i += 1;
            }
        } else {
            out.push(ch);
            i += 1;
        }
    }
    out
}

/// At `i`, the start of a raw string literal (`r`, `br` or `cr`, then `#`s, then `"`)?
/// Returns the number of `#`s and the index of the opening quote.
fn raw_string_at(c: &[char], i: usize) -> Option<(usize, usize)> {
    let mut j = i;
    if matches!(c.get(j), Some('b' | 'c')) {
        j += 1;
    }
    if c.get(j) != Some(&'r') {
        return None;
    }
    j += 1;
    let hashes = c[j..].iter().take_while(|&&ch| ch == '#').count();
    j += hashes;
    (c.get(j) == Some(&'"')).then_some((hashes, j))
}

/// Identifiers (`$crate` is one), `::`, and every other non-space character on its own.
fn tokenize(s: &str) -> Vec<&str> {
    let mut tokens = Vec::new();
    let mut chars = s.char_indices().peekable();
    while let Some((start, ch)) = chars.next() {
        if ch.is_whitespace() {
            continue;
        }
        let ident_start = is_ident_char(ch)
            || (ch == '$' && chars.peek().is_some_and(|&(_, n)| is_ident_char(n)));
        if ident_start {
            let mut end = start + ch.len_utf8();
            while let Some(&(i, n)) = chars.peek() {
                if !is_ident_char(n) {
                    break;
                }
                end = i + n.len_utf8();
                chars.next();
            }
            tokens.push(&s[start..end]);
        } else if ch == ':' && chars.peek().is_some_and(|&(_, n)| n == ':') {
            chars.next();
            tokens.push(&s[start..start + 2]);
        } else {
            tokens.push(&s[start..start + ch.len_utf8()]);
        }
    }
    tokens
}

fn is_ident(token: &str) -> bool {
    token
        .chars()
        .next()
        .is_some_and(|c| is_ident_char(c) || c == '$')
}

/// The paths a (stripped) source file uses, each with the module it is written in: the
/// file's `context` plus any inline `mod name { … }` around it. From `use` declarations
/// (grouped imports expanded) and from paths starting `crate::`, `$crate::`, `super::`,
/// `self::` or `<crate name>::` anywhere else. Paths are returned as written; which of them
/// are crate-internal is for [`absolute`] to say.
fn references(stripped: &str, context: &[String]) -> Vec<(ModPath, Vec<String>)> {
    let tokens = tokenize(stripped);
    let tok = |i: usize| tokens.get(i).copied().unwrap_or("");
    let mut out = Vec::new();
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0usize;
    let here = |inline: &[(String, usize)]| -> ModPath {
        let mut m = context.to_vec();
        m.extend(inline.iter().map(|(name, _)| name.clone()));
        m
    };
    let mut i = 0;
    while i < tokens.len() {
        match tok(i) {
            "{" => depth += 1,
            "}" => {
                if inline.last().is_some_and(|(_, d)| *d == depth) {
                    inline.pop();
                }
                depth = depth.saturating_sub(1);
            }
            "mod" if is_ident(tok(i + 1)) && tok(i + 2) == "{" => {
                depth += 1;
                inline.push((tok(i + 1).to_string(), depth));
                i += 3;
                continue;
            }
            "use" => {
                // To the `;` that ends the declaration (braces inside are the use tree's).
                let mut j = i + 1;
                let mut braces = 0usize;
                while j < tokens.len() {
                    match tokens[j] {
                        "{" => braces += 1,
                        "}" if braces == 0 => break,
                        "}" => braces -= 1,
                        ";" if braces == 0 => break,
                        _ => {}
                    }
                    j += 1;
                }
                let m = here(&inline);
                out.extend(
                    expand_use(&tokens[i + 1..j])
                        .into_iter()
                        .map(|p| (m.clone(), p)),
                );
                i = j;
                continue;
            }
            t if is_ident(t) && tok(i + 1) == "::" && (i == 0 || tok(i - 1) != "::") => {
                let mut path = vec![t.to_string()];
                let mut j = i + 1;
                while tok(j) == "::" && is_ident(tok(j + 1)) {
                    path.push(tok(j + 1).to_string());
                    j += 2;
                }
                out.push((here(&inline), path));
                i = j;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    out
}

/// A use tree (the tokens between `use` and `;`) as the full paths it imports:
/// `crate::{a::{b, c}, d}` → `crate::a::b`, `crate::a::c`, `crate::d`. `self` in a group
/// names the group's prefix; `*` and `as` imports give their path.
fn expand_use(tokens: &[&str]) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut i = 0;
    use_tree(tokens, &mut i, &mut Vec::new(), &mut out);
    out
}

fn use_tree(tokens: &[&str], i: &mut usize, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    let tok = |i: usize| tokens.get(i).copied().unwrap_or("");
    let len = prefix.len();
    if tok(*i) == "::" {
        *i += 1; // `use ::std::…`, `use ::{…}`.
    }
    loop {
        match tok(*i) {
            "{" => {
                *i += 1;
                loop {
                    match tok(*i) {
                        "}" => {
                            *i += 1;
                            break;
                        }
                        "," => *i += 1,
                        "" => break,
                        _ => {
                            let before = *i;
                            use_tree(tokens, i, prefix, out);
                            if *i == before {
                                *i += 1; // Not a use tree: do not loop on it.
                            }
                        }
                    }
                }
                break;
            }
            "*" => {
                *i += 1;
                out.push(prefix.clone());
                break;
            }
            t if is_ident(t) => {
                // `self` in a group is the group's prefix, not one more segment.
                if t != "self" || prefix.is_empty() {
                    prefix.push(t.to_string());
                }
                *i += 1;
                if tok(*i) == "::" {
                    *i += 1;
                    continue;
                }
                if tok(*i) == "as" {
                    *i += 2;
                }
                out.push(prefix.clone());
                break;
            }
            _ => break,
        }
    }
    prefix.truncate(len);
}

/// A path written in module `context` as a path from the crate root, if it is
/// crate-internal: `crate::`, `$crate::` and `<crate name>::` paths start at the root,
/// `self::` at `context`, each leading `super::` one module up. `None` for other paths
/// (external crates, items, locals) and for `super::` above the root.
fn absolute(context: &[String], path: &[String], crate_name: Option<&str>) -> Option<ModPath> {
    let (first, rest) = path.split_first()?;
    let mut base = match first.as_str() {
        "crate" | "$crate" => Vec::new(),
        name if Some(name) == crate_name => Vec::new(),
        "self" | "super" => context.to_vec(),
        _ => return None,
    };
    let mut rest = rest;
    if first == "super" {
        base.pop()?;
    }
    if first == "super" || first == "self" {
        // `super::super::…`, `self::super::…`.
        while rest.first().is_some_and(|s| s == "super") {
            base.pop()?;
            rest = &rest[1..];
        }
    }
    for segment in rest {
        match segment.as_str() {
            "self" => {}
            "super" | "crate" => return None,
            _ => base.push(segment.clone()),
        }
    }
    Some(base)
}

/// The longest prefix of `path` that is a module (the root, `[]`, if none is).
fn longest_existing(path: &[String], modules: &BTreeSet<ModPath>) -> ModPath {
    (0..=path.len())
        .rev()
        .map(|k| path[..k].to_vec())
        .find(|m| modules.contains(m))
        .unwrap_or_default()
}

// ---- cycles, dot, layers -------------------------------------------------------------

/// Strongly connected components with more than one node (Tarjan's algorithm), each
/// sorted, in sorted order.
fn cycles(graph: &Graph<String>) -> Vec<Vec<String>> {
    struct Tarjan<'g> {
        graph: &'g Graph<String>,
        index: BTreeMap<&'g str, usize>,
        low: BTreeMap<&'g str, usize>,
        stack: Vec<&'g str>,
        on_stack: BTreeSet<&'g str>,
        sccs: Vec<Vec<String>>,
    }
    impl<'g> Tarjan<'g> {
        fn visit(&mut self, v: &'g str) {
            let n = self.index.len();
            self.index.insert(v, n);
            self.low.insert(v, n);
            self.stack.push(v);
            self.on_stack.insert(v);
            let graph = self.graph;
            for w in graph.get(v).into_iter().flatten() {
                let w = w.as_str();
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let low = self.low[v].min(self.low[w]);
                    self.low.insert(v, low);
                } else if self.on_stack.contains(w) {
                    let low = self.low[v].min(self.index[w]);
                    self.low.insert(v, low);
                }
            }
            if self.low[v] == self.index[v] {
                let mut scc = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on_stack.remove(w);
                    scc.push(w.to_string());
                    if w == v {
                        break;
                    }
                }
                self.sccs.push(scc);
            }
        }
    }
    let mut t = Tarjan {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        sccs: Vec::new(),
    };
    let mut nodes: BTreeSet<&str> = graph.keys().map(String::as_str).collect();
    nodes.extend(graph.values().flatten().map(String::as_str));
    for v in nodes {
        if !t.index.contains_key(v) {
            t.visit(v);
        }
    }
    let mut sccs: Vec<Vec<String>> = t.sccs.into_iter().filter(|s| s.len() > 1).collect();
    for scc in &mut sccs {
        scc.sort();
    }
    sccs.sort();
    sccs
}

/// Graphviz dot of the top-level graph; edges inside a cycle in red.
fn render_dot(top: &Graph<String>) -> String {
    let mut scc_of: BTreeMap<String, usize> = BTreeMap::new();
    for (k, scc) in cycles(top).into_iter().enumerate() {
        scc_of.extend(scc.into_iter().map(|m| (m, k)));
    }
    let mut out = String::from("digraph modgraph {\n  rankdir=LR;\n  node [shape=box];\n");
    for module in top.keys() {
        let _ = writeln!(out, "  \"{module}\";");
    }
    for (from, deps) in top {
        for to in deps {
            let in_cycle = scc_of.get(from).is_some_and(|k| scc_of.get(to) == Some(k));
            let attr = if in_cycle { " [color=red]" } else { "" };
            let _ = writeln!(out, "  \"{from}\" -> \"{to}\"{attr};");
        }
    }
    out.push_str("}\n");
    out
}

/// `config,state,capture` → the layers, lowest first.
fn parse_layers(spec: &str) -> Result<Vec<String>> {
    let layers: Vec<String> = spec
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    if layers.is_empty() {
        bail!("--check-layers needs a comma-separated list of top-level modules");
    }
    let mut seen = BTreeSet::new();
    for layer in &layers {
        if !seen.insert(layer) {
            bail!("layer {layer:?} is listed twice");
        }
    }
    Ok(layers)
}

/// Top-level edges from a lower layer to a higher one, each with the module edges that
/// make it. Modules not in `layers` are ignored.
type Upward = BTreeMap<(String, String), Vec<(ModPath, ModPath)>>;

fn upward_edges(graph: &Graph<ModPath>, layers: &[String]) -> Upward {
    let rank = |m: &str| layers.iter().position(|l| l == m);
    let mut upward: Upward = BTreeMap::new();
    for (module, deps) in graph {
        let from = top_of(module);
        for dep in deps {
            let to = top_of(dep);
            if let (Some(a), Some(b)) = (rank(&from), rank(&to)) {
                if a < b {
                    upward
                        .entry((from.clone(), to))
                        .or_default()
                        .push((module.clone(), dep.clone()));
                }
            }
        }
    }
    upward
}

fn render_layer_report(layers: &[String], upward: &Upward) -> String {
    let rank = |m: &str| layers.iter().position(|l| l == m).unwrap_or(0);
    let mut out = format!("layers (lowest first): {}\n", layers.join(" < "));
    if upward.is_empty() {
        out.push_str("no edge goes from a lower layer to a higher one\n");
        return out;
    }
    out.push_str("upward edges (a lower layer importing a higher one):\n");
    for ((from, to), via) in upward {
        let _ = writeln!(
            out,
            "  {from} -> {to}  (layer {} imports layer {})",
            rank(from),
            rank(to)
        );
        for (a, b) in via {
            let _ = writeln!(out, "    via {} -> {}", display(a), display(b));
        }
    }
    let plural = if upward.len() == 1 { "" } else { "s" };
    let _ = writeln!(out, "{} upward edge{plural}", upward.len());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Vec<String> {
        if s.is_empty() {
            Vec::new()
        } else {
            s.split("::").map(str::to_string).collect()
        }
    }

    fn modules(list: &[&str]) -> BTreeSet<ModPath> {
        list.iter().map(|m| p(m)).collect()
    }

    /// The modules a file at `context` references, resolved against `mods`.
    fn resolved(src: &str, context: &str, mods: &[&str]) -> BTreeSet<String> {
        let mods = modules(mods);
        references(&strip(src), &p(context))
            .into_iter()
            .filter_map(|(ctx, path)| absolute(&ctx, &path, Some("my_crate")))
            .map(|t| display(&longest_existing(&t, &mods)))
            .collect()
    }

    #[test]
    fn strips_comments() {
        let src = "a // crate::x\n/// crate::doc\n//! inner\nb /* c /* nested */ crate::y */ d\n/** e\n */f";
        assert_eq!(strip(src), "a \n\n\nb   d\n\n f");
    }

    #[test]
    fn strips_strings_and_chars_but_not_lifetimes() {
        let src = r###"let s = "crate::a \" // not a comment"; x"###;
        assert_eq!(strip(src), r#"let s = ""; x"#);
        let src = r####"r#"crate::a "quoted" "# + br##"x"#"## + b"y\"" + c"z""####;
        assert_eq!(strip(src), r#""" + "" + "" + """#);
        let src = r#"f::<'a>('"', '\'', b'"', '\u{1F600}', 'static) /* */"#;
        assert_eq!(strip(src), "f::<'a>(' ', ' ', ' ', ' ', 'static)  ");
        // Newlines inside strings and comments are kept.
        assert_eq!(strip("\"a\nb\"\n/*\n*/x").lines().count(), 4);
        // An identifier ending in r/b is not a string prefix.
        assert_eq!(strip(r#"for"x" sub"y""#), r#"for"" sub"""#);
    }

    #[test]
    fn strings_and_comments_give_no_references() {
        let src = "// use crate::a;\nlet s = \"crate::b::X\";\n/* crate::c */ crate::d::f();";
        assert_eq!(
            resolved(src, "x", &["", "a", "b", "c", "d", "x"]),
            BTreeSet::from(["d".to_string()])
        );
    }

    #[test]
    fn grouped_use() {
        let paths = |s: &str| -> Vec<String> {
            let stripped = strip(s);
            let tokens = tokenize(&stripped);
            expand_use(&tokens[1..tokens.len() - 1])
                .iter()
                .map(|v| v.join("::"))
                .collect()
        };
        assert_eq!(
            paths("use crate::{a::{b, c}, d};"),
            ["crate::a::b", "crate::a::c", "crate::d"]
        );
        assert_eq!(
            paths("use crate::a::{self, b::{self as bb, *}, c as cc,};"),
            ["crate::a", "crate::a::b", "crate::a::b", "crate::a::c"]
        );
        assert_eq!(
            paths("use ::std::{io, fmt::Write as _};"),
            ["std::io", "std::fmt::Write"]
        );
        assert_eq!(paths("use {crate::a, super::b};"), ["crate::a", "super::b"]);
        // Resolved to modules: nested groups resolve against their prefix.
        let mods = ["", "a", "a::b", "a::c", "d", "x"];
        assert_eq!(
            resolved("use crate::{a::{b, c}, d};", "x", &mods),
            BTreeSet::from(["a::b", "a::c", "d"].map(String::from))
        );
        // `a::Item` is not a module: it resolves to `a`.
        assert_eq!(
            resolved("pub(crate) use crate::{a::Item, d::{self}};", "x", &mods),
            BTreeSet::from(["a", "d"].map(String::from))
        );
    }

    #[test]
    fn super_and_self_resolution() {
        let ctx = p("proxy::http");
        assert_eq!(
            absolute(&ctx, &p("super::route::X"), None),
            Some(p("proxy::route::X"))
        );
        assert_eq!(
            absolute(&ctx, &p("super::super::config"), None),
            Some(p("config"))
        );
        assert_eq!(absolute(&ctx, &p("super::super::super::x"), None), None);
        assert_eq!(
            absolute(&ctx, &p("self::inner::Y"), None),
            Some(p("proxy::http::inner::Y"))
        );
        assert_eq!(
            absolute(&ctx, &p("self::super::Z"), None),
            Some(p("proxy::Z"))
        );
        assert_eq!(absolute(&ctx, &p("crate::a::b"), None), Some(p("a::b")));
        assert_eq!(
            absolute(&ctx, &p("my_crate::a"), Some("my_crate")),
            Some(p("a"))
        );
        assert_eq!(absolute(&ctx, &p("std::io"), Some("my_crate")), None);
        assert_eq!(absolute(&p(""), &p("super::x"), None), None);

        let mods = ["", "proxy", "proxy::http", "proxy::route", "config"];
        let src = "use super::{route::pick, Shared};\nfn f() { super::super::config::load(); }";
        assert_eq!(
            resolved(src, "proxy::http", &mods),
            BTreeSet::from(["proxy", "proxy::route", "config"].map(String::from))
        );
        // Inside an inline module `super` is the file's own module.
        let src = "fn f() {}\n#[cfg(test)]\nmod tests {\n    use super::*;\n    use super::super::route;\n}\nuse super::Shared;";
        assert_eq!(
            resolved(src, "proxy::http", &mods),
            BTreeSet::from(["proxy::http", "proxy::route", "proxy"].map(String::from))
        );
    }

    #[test]
    fn code_paths_stop_before_generics_and_items() {
        let mods = ["", "a", "a::b", "x"];
        let src =
            "fn f() -> crate::a::b::Foo<u8> { crate::a::Bar::<u8>::new(); $crate::a::b::m!() }";
        assert_eq!(
            resolved(src, "x", &mods),
            BTreeSet::from(["a", "a::b"].map(String::from))
        );
        // `x::crate` and `pub(crate)` are not paths from the root.
        assert!(resolved("pub(crate) fn f() { y::self_::g() }", "x", &mods).is_empty());
    }

    #[test]
    fn module_paths() {
        assert_eq!(module_path_of(Path::new("lib.rs")), Some(p("")));
        assert_eq!(module_path_of(Path::new("main.rs")), Some(p("")));
        assert_eq!(module_path_of(Path::new("a/mod.rs")), Some(p("a")));
        assert_eq!(module_path_of(Path::new("a/b.rs")), Some(p("a::b")));
        assert_eq!(module_path_of(Path::new("a/main.rs")), Some(p("a::main")));
        assert_eq!(module_path_of(Path::new("a/b/c.rs")), Some(p("a::b::c")));
    }

    fn graph(edges: &[(&str, &str)]) -> Graph<String> {
        let mut g: Graph<String> = BTreeMap::new();
        for (a, b) in edges {
            g.entry(a.to_string()).or_default().insert(b.to_string());
            g.entry(b.to_string()).or_default();
        }
        g
    }

    #[test]
    fn tarjan_finds_a_three_cycle() {
        let g = graph(&[("a", "b"), ("b", "c"), ("c", "a"), ("d", "a"), ("c", "e")]);
        assert_eq!(cycles(&g), vec![vec!["a", "b", "c"]]);
        let g = graph(&[("a", "b"), ("b", "c"), ("d", "e"), ("e", "d"), ("x", "y")]);
        assert_eq!(cycles(&g), vec![vec!["d", "e"]]);
        assert!(cycles(&graph(&[("a", "b"), ("b", "c"), ("a", "c")])).is_empty());
    }

    #[test]
    fn whole_crate() {
        let dir = std::env::temp_dir().join(format!("xtask-modgraph-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let src = dir.join("src");
        std::fs::create_dir_all(src.join("proxy")).unwrap();
        std::fs::create_dir_all(src.join("state")).unwrap();
        let files = [
            ("../Cargo.toml", "[package]\nname = \"my-crate\"\n"),
            (
                "lib.rs",
                "pub mod config;\npub mod proxy;\npub mod state;\n",
            ),
            ("main.rs", "fn main() { my_crate::proxy::run(); }"),
            (
                "config.rs",
                "use crate::state::Snapshot; // config -> state (upward)\n",
            ),
            (
                "state/mod.rs",
                "pub mod compile;\nuse crate::config::Config;\n",
            ),
            (
                "state/compile.rs",
                "use super::Snapshot;\nuse crate::proxy::Inputs;\n",
            ),
            (
                "proxy/mod.rs",
                "mod http;\nuse crate::{config, state::compile::{self}};\n",
            ),
            (
                "proxy/http.rs",
                "use super::Inputs; use self::inner::X;\nmod tests { use super::*; }",
            ),
        ];
        for (name, text) in files {
            std::fs::write(src.join(name), text).unwrap();
        }
        let files = source_files(&src).unwrap();
        let g = module_graph(&files, crate_name(&src).as_deref());
        let show = |g: &Graph<ModPath>| -> Vec<String> {
            g.iter()
                .map(|(m, d)| {
                    let d: Vec<String> = d.iter().map(|d| display(d)).collect();
                    format!("{} -> {}", display(m), d.join(", "))
                })
                .collect()
        };
        assert_eq!(
            show(&g),
            [
                "crate -> ",
                "config -> state",
                "main -> proxy",
                "proxy -> config, state::compile",
                "proxy::http -> proxy",
                "state -> config",
                "state::compile -> proxy, state",
            ]
        );
        let top = top_level(&g);
        assert_eq!(cycles(&top), vec![vec!["config", "proxy", "state"]]);
        let layers = parse_layers("config, state,proxy").unwrap();
        let upward = upward_edges(&g, &layers);
        let keys: Vec<_> = upward.keys().map(|(a, b)| format!("{a}->{b}")).collect();
        assert_eq!(keys, ["config->state", "state->proxy"]);
        assert!(render_dot(&top).contains("\"config\" -> \"state\" [color=red];"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
