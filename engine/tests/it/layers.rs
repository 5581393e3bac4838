//! The engine's folders are layers, in the order data flows, and a lower layer never
//! imports a higher one (see the README's Layout): this test reads every source file
//! and checks each `crate::…` path it names outside its `#[cfg(test)]` module.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Layers from the bottom: a file may name its own layer and the ones before it.
const LAYERS: [&[&str]; 9] = [
    &["error", "histogram", "expr"],
    &["spec"],
    &["ingest"],
    &["checkpoint"],
    &["online"],
    &["offline"],
    &["sources"],
    &["sinks"],
    &["serve"],
];

fn layer(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level modules a file names as `crate::m`, `crate::{m, …}` and `use crate::m`,
/// in code (not comments) before its unit tests.
fn crate_modules(text: &str) -> BTreeSet<String> {
    let before_tests = text.split("#[cfg(test)]").next().unwrap_or("");
    let code: String = before_tests
        .lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    let mut found = BTreeSet::new();
    for (i, _) in code.match_indices("crate::") {
        if code[..i].ends_with('$') {
            continue; // `$crate::` in a macro
        }
        let rest = &code[i + "crate::".len()..];
        let names: Vec<&str> = match rest.strip_prefix('{') {
            Some(group) => group
                .split('}')
                .next()
                .unwrap_or("")
                .split(',')
                .map(|s| s.trim().split("::").next().unwrap_or("").trim())
                .collect(),
            None => vec![
                rest.split(|c: char| !c.is_alphanumeric() && c != '_')
                    .next()
                    .unwrap_or(""),
            ],
        };
        found.extend(
            names
                .into_iter()
                .filter(|n| !n.is_empty())
                .map(String::from),
        );
    }
    found
}

#[test]
fn lower_layers_never_import_higher_ones() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut checked = 0;
    let mut violations = Vec::new();
    for path in &files {
        let rel = path.strip_prefix(&src).unwrap();
        let top = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_str()
            .unwrap();
        let top = top.strip_suffix(".rs").unwrap_or(top);
        // The crate root and the binary wire the layers together; the fuzz entry
        // points reach into every layer.
        if top == "lib" || top == "main" || top == "fuzz" {
            continue;
        }
        let own = layer(top).unwrap_or_else(|| {
            panic!("{}: folder {top:?} is in no layer of LAYERS", rel.display())
        });
        checked += 1;
        let text = std::fs::read_to_string(path).unwrap();
        for module in crate_modules(&text) {
            // Crate-root re-exports (`crate::Engine`) belong to the layer they come from:
            // name the module path instead, so that this test can see it.
            let Some(theirs) = layer(&module) else {
                if module.chars().next().is_some_and(char::is_uppercase) {
                    violations.push(format!(
                        "{} names crate::{module}: use the module path",
                        rel.display()
                    ));
                }
                continue;
            };
            if theirs > own {
                violations.push(format!(
                    "{} (layer {top}) imports crate::{module}, a higher layer",
                    rel.display()
                ));
            }
        }
    }
    assert!(
        checked > 20,
        "only {checked} files found under {}",
        src.display()
    );
    assert!(violations.is_empty(), "{}", violations.join("\n"));
}

#[test]
fn the_checker_sees_each_form_of_import() {
    let text = "use crate::serve::x;\nuse crate::{online::Engine, spec};\n/// [`x`](crate::ingest::x)\nfn f() { crate::sources::open(); $crate::error::E; }\n#[cfg(test)]\nuse crate::offline;";
    let found: Vec<String> = crate_modules(text).into_iter().collect();
    assert_eq!(found, ["online", "serve", "sources", "spec"]);
}
