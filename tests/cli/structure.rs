//! The shape of `src/`: imports only point down (no circle among the modules of any level),
//! and no source file grows past the size one reads in a sitting.
//!
//! Reads the sources as text: every `crate::`, `super::` and `self::` path outside comments and
//! test modules is an edge from the module that names it to the deepest module the path names.
//! Modules are compared with their siblings (children grouped under their parent), at every
//! depth; a child naming its own parent or ancestor is not counted (Rust's `super::` to the
//! module that declares it).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The guideline is ~700 lines; this is where a file must be split.
const MAX_LINES: usize = 760;

/// Module path (`materialize::flush`) → source file, for every module of the library.
fn modules(root: &Path) -> BTreeMap<String, std::path::PathBuf> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            let name = path.file_name().unwrap().to_str().unwrap();
            if !name.ends_with(".rs") || name == "tests.rs" || name == "main.rs" {
                continue;
            }
            let rel = path.strip_prefix(root).unwrap().with_extension("");
            let mut parts: Vec<String> = rel.iter().map(|p| p.to_str().unwrap().to_string()).collect();
            if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
                parts.pop();
            }
            out.insert(parts.join("::"), path);
        }
    }
    out
}

/// The source without comments and without its inline test module.
fn code(src: &str) -> String {
    let mut end = src.len();
    let mut from = 0;
    while let Some(i) = src[from..].find("#[cfg(test)]") {
        let at = from + i;
        let rest = src[at + "#[cfg(test)]".len()..].trim_start();
        let line = rest.lines().next().unwrap_or("");
        if (line.starts_with("mod ") || line.starts_with("pub(crate) mod ")) && line.contains('{') {
            end = at;
            break;
        }
        from = at + 1;
    }
    src[..end]
        .lines()
        .map(|l| l.find("//").map_or(l, |i| &l[..i]))
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Every path that starts with `crate`, `super` or `self`, use groups (`a::{b, c::d}`) expanded.
fn paths(code: &str) -> Vec<Vec<String>> {
    let chars: Vec<char> = code.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let starts = ["crate::", "super::", "self::"]
            .iter()
            .find(|k| chars[i..].iter().take(k.len()).copied().eq(k.chars()));
        let boundary = i == 0 || !is_ident(chars[i - 1]);
        if let (Some(_), true) = (starts, boundary) {
            let mut prefix = Vec::new();
            i = tree(&chars, i, &mut prefix, &mut out);
        } else {
            i += 1;
        }
    }
    out
}

/// Parses a use tree at `i` below `prefix`; pushes each full path; returns the index after it.
fn tree(chars: &[char], mut i: usize, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) -> usize {
    let depth = prefix.len();
    loop {
        while i < chars.len() && chars[i].is_whitespace() {
            i += 1;
        }
        if i < chars.len() && chars[i] == '{' {
            i += 1;
            loop {
                i = tree(chars, i, prefix, out);
                while i < chars.len() && chars[i].is_whitespace() {
                    i += 1;
                }
                match chars.get(i) {
                    Some(',') => i += 1,
                    Some('}') => {
                        i += 1;
                        break;
                    }
                    _ => break,
                }
                while i < chars.len() && chars[i].is_whitespace() {
                    i += 1;
                }
                if chars.get(i) == Some(&'}') {
                    i += 1;
                    break;
                }
            }
            prefix.truncate(depth);
            return i;
        }
        let start = i;
        while i < chars.len() && is_ident(chars[i]) {
            i += 1;
        }
        if i == start {
            break;
        }
        prefix.push(chars[start..i].iter().collect());
        if chars[i..].starts_with(&[':', ':']) {
            i += 2;
        } else {
            break;
        }
    }
    if prefix.len() > depth || depth > 0 {
        out.push(prefix.clone());
    }
    prefix.truncate(depth);
    i
}

/// The module a path names, seen from module `from`.
fn resolve(from: &str, path: &[String], mods: &BTreeMap<String, std::path::PathBuf>) -> Option<String> {
    let mut base: Vec<String> = if from.is_empty() {
        vec![]
    } else {
        from.split("::").map(String::from).collect()
    };
    let mut segs = path;
    match segs.first().map(String::as_str) {
        Some("crate") => {
            base.clear();
            segs = &segs[1..];
        }
        Some("super") => {
            while segs.first().map(String::as_str) == Some("super") {
                base.pop();
                segs = &segs[1..];
            }
        }
        Some("self") => segs = &segs[1..],
        _ => return None,
    }
    let full: Vec<String> = base.into_iter().chain(segs.iter().cloned()).collect();
    (1..=full.len())
        .rev()
        .map(|n| full[..n].join("::"))
        .find(|m| mods.contains_key(m))
}

fn group(m: &str, depth: usize) -> String {
    m.split("::").take(depth).collect::<Vec<_>>().join("::")
}

fn related(a: &str, b: &str) -> bool {
    a == b || a.starts_with(&format!("{b}::")) || b.starts_with(&format!("{a}::"))
}

/// Strongly connected components of more than one node.
fn circles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct Tarjan<'a> {
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<String, usize>,
        low: BTreeMap<String, usize>,
        stack: Vec<String>,
        on: BTreeSet<String>,
        out: Vec<Vec<String>>,
    }
    impl Tarjan<'_> {
        fn visit(&mut self, v: &str) {
            let n = self.index.len();
            self.index.insert(v.to_string(), n);
            self.low.insert(v.to_string(), n);
            self.stack.push(v.to_string());
            self.on.insert(v.to_string());
            for w in self.graph.get(v).into_iter().flatten() {
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let l = self.low[v].min(self.low[w]);
                    self.low.insert(v.to_string(), l);
                } else if self.on.contains(w) {
                    let l = self.low[v].min(self.index[w]);
                    self.low.insert(v.to_string(), l);
                }
            }
            if self.low[v] == self.index[v] {
                let mut comp = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on.remove(&w);
                    let done = w == v;
                    comp.push(w);
                    if done {
                        break;
                    }
                }
                if comp.len() > 1 {
                    comp.sort();
                    self.out.push(comp);
                }
            }
        }
    }
    let mut t = Tarjan {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: vec![],
        on: BTreeSet::new(),
        out: vec![],
    };
    for v in graph.keys() {
        if !t.index.contains_key(v) {
            t.visit(v);
        }
    }
    t.out
}

fn src_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// (from, to, the path that made the edge) for every import between two modules.
fn edges() -> Vec<(String, String, String)> {
    let mods = modules(&src_dir());
    let mut out = Vec::new();
    for (m, file) in &mods {
        let text = std::fs::read_to_string(file).unwrap();
        for p in paths(&code(&text)) {
            if let Some(to) = resolve(m, &p, &mods) {
                if to != *m && !m.starts_with(&format!("{to}::")) {
                    out.push((m.clone(), to, p.join("::")));
                }
            }
        }
    }
    out
}

#[test]
fn no_import_circle_at_any_depth() {
    let edges = edges();
    assert!(
        edges.len() > 300,
        "the scan found only {} imports: is it reading src/?",
        edges.len()
    );
    let mut found = Vec::new();
    for depth in 1..=5 {
        let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (a, b, _) in &edges {
            let (ga, gb) = (group(a, depth), group(b, depth));
            if !related(&ga, &gb) {
                graph.entry(ga).or_default().insert(gb);
            }
        }
        for c in circles(&graph) {
            let inside: Vec<String> = edges
                .iter()
                .filter(|(a, b, _)| {
                    let (ga, gb) = (group(a, depth), group(b, depth));
                    !related(&ga, &gb) && c.contains(&ga) && c.contains(&gb)
                })
                .map(|(a, b, p)| format!("  {a} -> {b} ({p})"))
                .collect();
            found.push(format!("depth {depth}: {c:?}\n{}", inside.join("\n")));
        }
    }
    assert!(found.is_empty(), "import circles in src/:\n{}", found.join("\n"));
}

#[test]
fn the_scan_sees_a_circle_when_there_is_one() {
    // The checker itself: a two-module circle and a grouped import.
    let mods: BTreeMap<String, std::path::PathBuf> = ["a", "a::x", "a::y", "b"]
        .iter()
        .map(|m| (m.to_string(), std::path::PathBuf::new()))
        .collect();
    let from_x = paths(&code(
        "use super::{y::Thing, z};\n// use crate::b;\nfn f() { crate::b::g() }",
    ));
    let to: Vec<_> = from_x.iter().filter_map(|p| resolve("a::x", p, &mods)).collect();
    assert_eq!(to, vec!["a::y".to_string(), "a".to_string(), "b".to_string()]);
    let tail = code("fn f() {}\n#[cfg(test)]\nmod tests {\n    use crate::b;\n}\n");
    assert!(paths(&tail).is_empty(), "test modules are skipped: {tail}");
    let graph: BTreeMap<String, BTreeSet<String>> = [("a", "b"), ("b", "a")]
        .iter()
        .map(|(x, y)| (x.to_string(), BTreeSet::from([y.to_string()])))
        .collect();
    assert_eq!(circles(&graph), vec![vec!["a".to_string(), "b".to_string()]]);
}

#[test]
fn no_source_file_past_the_split_size() {
    let mut long: Vec<String> = modules(&src_dir())
        .values()
        .filter_map(|f| {
            let n = std::fs::read_to_string(f).unwrap().lines().count();
            (n > MAX_LINES).then(|| format!("{} ({n} lines)", f.display()))
        })
        .collect();
    long.sort();
    assert!(
        long.is_empty(),
        "split these files (one concern each, ~700 lines at most): {long:?}"
    );
}
