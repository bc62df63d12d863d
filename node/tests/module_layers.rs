//! The node library's modules form layers: no module reaches (through
//! `crate::…` paths in code) a module that reaches it back. Checked on the
//! source, so that a cycle fails the build's tests instead of growing
//! unnoticed (the old `daemon` and `status` hubs imported everything and
//! were imported back).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Top-level module → the top-level modules its code refers to.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut g = BTreeMap::new();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        if name == "lib" {
            continue;
        }
        let mut files = Vec::new();
        collect(&path, &mut files);
        let mut uses = BTreeSet::new();
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap();
            for line in text.lines() {
                let code = line.trim_start();
                if code.starts_with("//") {
                    continue;
                }
                for part in code.split("crate::").skip(1) {
                    let m: String = part
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    if !m.is_empty() && m != name {
                        uses.insert(m);
                    }
                }
            }
        }
        g.insert(name, uses);
    }
    g
}

fn collect(path: &Path, out: &mut Vec<std::path::PathBuf>) {
    if path.is_dir() {
        for e in std::fs::read_dir(path).unwrap() {
            collect(&e.unwrap().path(), out);
        }
    } else if path.extension().is_some_and(|e| e == "rs") {
        out.push(path.to_path_buf());
    }
}

#[test]
fn no_module_cycle_in_the_node_library() {
    let g = graph();
    assert!(
        g.contains_key("endpoint") && g.contains_key("link"),
        "{g:?}"
    );
    // Depth-first search for a back edge.
    fn visit(
        m: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) {
        if done.contains(m) {
            return;
        }
        if let Some(i) = stack.iter().position(|s| s == m) {
            panic!("module cycle: {} -> {m}", stack[i..].join(" -> "));
        }
        stack.push(m.to_string());
        for n in g.get(m).into_iter().flatten() {
            if g.contains_key(n) {
                visit(n, g, stack, done);
            }
        }
        stack.pop();
        done.insert(m.to_string());
    }
    let mut done = BTreeSet::new();
    for m in g.keys() {
        visit(m, &g, &mut Vec::new(), &mut done);
    }
}

#[test]
fn the_lowest_layers_know_no_higher_one() {
    let g = graph();
    for (low, high) in [
        ("protocol", "link"),
        ("link", "mesh"),
        ("mesh", "endpoint"),
        ("swarm", "mesh"),
        ("endpoint", "router"),
        ("control", "endpoint"),
    ] {
        assert!(
            !g[low].contains(high),
            "{low} must not use {high}: {:?}",
            g[low]
        );
    }
}
