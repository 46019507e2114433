//! The layering of `agent/src`, read from the code's own paths: no top-level module (a
//! file or a folder directly under `agent/src`) may import, through any chain, a module
//! that imports it back. ARCHITECTURE.md shows the layers this keeps.
//!
//! An edge `a -> b` is any `crate::b` path (in a `use`, a `use crate::{..}` group or an
//! inline path) in a file of `a`, outside comments. The test fails with every cycle and
//! the lines that make it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Graph = BTreeMap<String, BTreeMap<String, Vec<String>>>;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The code of a file with `//` comments (doc comments included) blanked out, and
/// string literals left alone (they never hold `crate::` in this crate's sources).
fn code_lines(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) if !l[..i].contains('"') => l[..i].to_string(),
            _ => l.to_string(),
        })
        .collect()
}

/// The names that follow `crate::` in `code`, including those inside `crate::{..}` groups
/// (nested groups are flattened; only the first segment of each path counts).
fn crate_paths(code: &str) -> Vec<String> {
    crate_paths_at(code).into_iter().map(|(n, _)| n).collect()
}

/// [`crate_paths`] with the byte offset of each `crate::`.
fn crate_paths_at(code: &str) -> Vec<(String, usize)> {
    let mut out = Vec::new();
    let mut rest = code;
    let mut base = 0;
    while let Some(i) = rest.find("crate::") {
        let at = base + i;
        let after = &rest[i + "crate::".len()..];
        let before = rest[..i].chars().last();
        base = at + "crate::".len();
        rest = after;
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue; // e.g. `my_crate::`
        }
        if let Some(group) = after.strip_prefix('{') {
            // Top-level names of the group: depth-0 segments before `::`, `,` or `}`.
            let mut depth = 0;
            let mut name = String::new();
            let mut at_start = true;
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        at_start = true;
                        continue;
                    }
                    _ => {}
                }
                if depth == 0 && at_start {
                    if c.is_alphanumeric() || c == '_' {
                        name.push(c);
                    } else if !name.is_empty() {
                        out.push((std::mem::take(&mut name), at));
                        at_start = false;
                    }
                }
            }
            if !name.is_empty() {
                out.push((name, at));
            }
        } else {
            let name: String = after
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                out.push((name, at));
            }
        }
    }
    out
}

fn graph(src: &Path) -> (BTreeSet<String>, Graph) {
    let mut tops = BTreeSet::new();
    for e in std::fs::read_dir(src).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_stem().unwrap().to_string_lossy().to_string();
        if p.is_dir()
            || (p.extension().is_some_and(|x| x == "rs") && name != "lib" && name != "main")
        {
            tops.insert(name);
        }
    }
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut g: Graph = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(src).unwrap();
        let top = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        if !tops.contains(&top) {
            continue;
        }
        // Join the code so `use crate::{\n a,\n b}` groups are read whole.
        let text = std::fs::read_to_string(&f).unwrap();
        let lines = code_lines(&text);
        let joined = lines.join("\n");
        for (name, at) in crate_paths_at(&joined) {
            if name == top || !tops.contains(&name) {
                continue;
            }
            let line = joined[..at].matches('\n').count() + 1;
            g.entry(top.clone())
                .or_default()
                .entry(name)
                .or_default()
                .push(format!("agent/src/{}:{line}", rel.display()));
        }
    }
    (tops, g)
}

/// Strongly connected components with more than one member (Tarjan).
fn cycles(tops: &BTreeSet<String>, g: &Graph) -> Vec<Vec<String>> {
    struct T<'a> {
        g: &'a Graph,
        index: BTreeMap<String, usize>,
        low: BTreeMap<String, usize>,
        stack: Vec<String>,
        on: BTreeSet<String>,
        next: usize,
        out: Vec<Vec<String>>,
    }
    fn visit(t: &mut T<'_>, v: &str) {
        t.index.insert(v.into(), t.next);
        t.low.insert(v.into(), t.next);
        t.next += 1;
        t.stack.push(v.into());
        t.on.insert(v.into());
        let succ: Vec<String> =
            t.g.get(v)
                .map(|m| m.keys().cloned().collect())
                .unwrap_or_default();
        for w in succ {
            if !t.index.contains_key(&w) {
                visit(t, &w);
                let l = t.low[v].min(t.low[&w]);
                t.low.insert(v.into(), l);
            } else if t.on.contains(&w) {
                let l = t.low[v].min(t.index[&w]);
                t.low.insert(v.into(), l);
            }
        }
        if t.low[v] == t.index[v] {
            let mut comp = Vec::new();
            loop {
                let w = t.stack.pop().unwrap();
                t.on.remove(&w);
                let done = w == v;
                comp.push(w);
                if done {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                t.out.push(comp);
            }
        }
    }
    let mut t = T {
        g,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in tops {
        if !t.index.contains_key(v) {
            visit(&mut t, v);
        }
    }
    t.out
}

#[test]
fn no_top_level_module_imports_itself_back() {
    // `LAYERS_SRC` points the check at another tree (to see it fail on an old one).
    let src = std::env::var_os("LAYERS_SRC")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    let (tops, g) = graph(&src);
    assert!(
        tops.len() > 10,
        "read {} modules from {}",
        tops.len(),
        src.display()
    );
    let found = cycles(&tops, &g);
    if !found.is_empty() {
        let mut msg = String::from("import cycles among the top-level modules of agent/src:\n");
        for comp in &found {
            msg.push_str(&format!("\n  cycle: {}\n", comp.join(", ")));
            for a in comp {
                for (b, at) in g.get(a).into_iter().flatten() {
                    if comp.contains(b) {
                        msg.push_str(&format!("    {a} -> {b}  ({})\n", at.join(", ")));
                    }
                }
            }
        }
        panic!("{msg}");
    }
}

#[test]
fn the_checker_sees_groups_inline_paths_and_cycles() {
    let code = "use crate::{a::X, b::{c, d}, e};\nfn f() { crate::g::h(); my_crate::z(); }";
    assert_eq!(crate_paths(code), ["a", "b", "e", "g"]);
    assert_eq!(crate_paths("// crate::x is a comment").len(), 1); // raw text...
    assert!(code_lines("x(); // crate::y")[0].trim() == "x();"); // ...but comments are cut
    let mut g: Graph = BTreeMap::new();
    let edge = |g: &mut Graph, a: &str, b: &str| {
        g.entry(a.into()).or_default().insert(b.into(), vec![]);
    };
    edge(&mut g, "a", "b");
    edge(&mut g, "b", "c");
    edge(&mut g, "c", "a");
    edge(&mut g, "c", "d");
    let tops: BTreeSet<String> = ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect();
    assert_eq!(cycles(&tops, &g), vec![vec!["a", "b", "c"]]);
    g.get_mut("c").unwrap().remove("a");
    assert!(cycles(&tops, &g).is_empty());
}
