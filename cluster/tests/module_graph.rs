//! The top-level modules of each crate of the workspace (`node/src`, `operator/src`,
//! `cluster/src`) depend on each other without cycles: the graph of `crate::<module>` paths
//! (in `use` lines and inline, outside comments and test-only code) read from the sources is
//! acyclic. One check for every crate, kept with what the crates share.
//!
//! node, bottom up: store, record, cluster, protocol, ... engine, peer, node, server, proxy,
//! admin. operator: crd, build, observe, probe, status, scale, roll, reconcile. `main.rs`
//! and `bin/` are binaries and may use anything.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir`.
fn sources(dir: &Path, into: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, into);
        } else if path.extension().is_some_and(|e| e == "rs") {
            into.push(path);
        }
    }
}

/// The top-level module a source file belongs to (`peer/link.rs` -> `peer`).
fn module_of(src: &Path, file: &Path) -> String {
    let relative = file.strip_prefix(src).unwrap();
    let first = relative.components().next().unwrap();
    let name = first.as_os_str().to_string_lossy();
    name.trim_end_matches(".rs").to_string()
}

/// `source` without its test-only part: what follows the first `#[cfg(test)]` that opens
/// an inline module (test modules close their files).
fn non_test(source: &str) -> &str {
    let inline_tests =
        regex::Regex::new(r"#\[cfg\(test\)\]\s*(pub(\(crate\))?\s+)?mod\s+\w+\s*\{").unwrap();
    inline_tests
        .find(source)
        .map_or(source, |m| &source[..m.start()])
}

/// Files that `#[cfg(test)] mod name;` declarations make test-only (`name.rs` or
/// `name/mod.rs` in the declaring module's folder).
fn test_only_files(files: &[PathBuf]) -> BTreeSet<PathBuf> {
    let declared =
        regex::Regex::new(r"#\[cfg\(test\)\]\s*(pub(\(crate\))?\s+)?mod\s+(\w+)\s*;").unwrap();
    let mut out = BTreeSet::new();
    for file in files {
        let text = std::fs::read_to_string(file).unwrap();
        let stem = file.file_stem().unwrap().to_string_lossy();
        let parent = file.parent().unwrap();
        // `a.rs` declares its children in `a/`; `lib.rs`, `main.rs` and `mod.rs` in their
        // own folder.
        let dir = if matches!(stem.as_ref(), "lib" | "main" | "mod") {
            parent.to_path_buf()
        } else {
            parent.join(stem.as_ref())
        };
        for capture in declared.captures_iter(&text) {
            let name = &capture[3];
            out.insert(dir.join(format!("{name}.rs")));
            out.insert(dir.join(name).join("mod.rs"));
        }
    }
    out
}

/// Whether `b` can start an identifier.
fn ident_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// The top-level modules `source` names in code (not comments): `crate::m`, and
/// `crate::{a, b::c}` groups.
fn referenced(source: &str) -> BTreeSet<String> {
    let code: Vec<&str> = source
        .lines()
        .map(|line| line.split_once("//").map_or(line, |(code, _)| code))
        .collect();
    let text = code.join("\n");
    let text = text.as_str();
    let mut found = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut at = 0;
    while let Some(i) = text[at..].find("crate::") {
        let start = at + i;
        at = start + "crate::".len();
        // `kache_crate::` or `$crate::` are other paths.
        if start > 0 && (ident_byte(bytes[start - 1]) || bytes[start - 1] == b'$') {
            continue;
        }
        if bytes.get(at) == Some(&b'{') {
            // Top-level names in the group: those at brace depth 1, after `{` or `,`.
            let mut depth = 0;
            let mut expecting = true;
            let mut j = at;
            while j < bytes.len() {
                match bytes[j] {
                    b'{' => {
                        depth += 1;
                        expecting = depth == 1;
                    }
                    b'}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    b',' if depth == 1 => expecting = true,
                    b if expecting && ident_byte(b) => {
                        let end = (j..bytes.len())
                            .find(|&k| !ident_byte(bytes[k]))
                            .unwrap_or(bytes.len());
                        found.insert(text[j..end].to_string());
                        expecting = false;
                        j = end;
                        continue;
                    }
                    _ => {}
                }
                j += 1;
            }
        } else {
            let end = (at..bytes.len())
                .find(|&k| !ident_byte(bytes[k]))
                .unwrap_or(bytes.len());
            found.insert(text[at..end].to_string());
        }
    }
    found
}

/// Module -> the other top-level modules it refers to, for the crate whose sources are in
/// `src` (a folder of the workspace).
fn graph(src: &str) -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(src);
    let mut files = Vec::new();
    sources(&src, &mut files);
    let test_only = test_only_files(&files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let module = module_of(&src, file);
        if matches!(module.as_str(), "main" | "lib" | "bin") || test_only.contains(file) {
            continue;
        }
        let text = std::fs::read_to_string(file).unwrap();
        let uses = referenced(non_test(&text))
            .into_iter()
            .filter(|m| *m != module && m != "self")
            .collect::<BTreeSet<_>>();
        graph.entry(module).or_default().extend(uses);
    }
    graph
}

/// A cycle through the graph, if there is one (depth-first search).
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|start| visit(start, graph, &mut Vec::new(), &mut done))
}

#[test]
fn the_parser_sees_single_paths_and_groups() {
    let text = "use crate::engine::Engine;\nuse crate::{peer::{link, wire}, store};\n\
                let x = crate::record::apply(s); // crate::commented\n\
                /// `crate::documented`\n$crate::ignored; kache_crate::ignored";
    let found: Vec<String> = referenced(text).into_iter().collect();
    assert_eq!(found, ["engine", "peer", "record", "store"]);
}

#[test]
fn the_cycle_finder_finds_a_cycle() {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    graph.entry("a".into()).or_default().insert("b".into());
    graph.entry("b".into()).or_default().insert("c".into());
    assert_eq!(find_cycle(&graph), None);
    graph.entry("c".into()).or_default().insert("a".into());
    assert_eq!(find_cycle(&graph).map(|c| c.len()), Some(4));
}

#[test]
fn test_only_code_is_left_out() {
    let text = "use crate::a::X;\n#[cfg(test)]\nmod tests {\n    use crate::b::Y;\n}\n";
    let found: Vec<String> = referenced(non_test(text)).into_iter().collect();
    assert_eq!(found, ["a"]);
}

fn assert_acyclic(src: &str, graph: &BTreeMap<String, BTreeSet<String>>) {
    if let Some(cycle) = find_cycle(graph) {
        panic!("module cycle in {src}: {}\n{graph:#?}", cycle.join(" -> "));
    }
}

#[test]
fn the_nodes_modules_form_no_cycle() {
    let graph = graph("node/src");
    // The graph is really read: the engine uses the store, the peer layer the records.
    assert!(graph["engine"].contains("store"), "{graph:?}");
    assert!(graph["peer"].contains("record"), "{graph:?}");
    assert_acyclic("node/src", &graph);
}

#[test]
fn the_operators_modules_form_no_cycle() {
    let graph = graph("operator/src");
    assert!(graph["status"].contains("crd"), "{graph:?}");
    // Test fixtures are no module of the library's graph.
    assert!(!graph.contains_key("fixtures"), "{graph:?}");
    assert_acyclic("operator/src", &graph);
}

#[test]
fn the_shared_crates_modules_form_no_cycle() {
    let graph = graph("cluster/src");
    assert!(graph.len() > 2, "{graph:?}");
    assert_acyclic("cluster/src", &graph);
}
