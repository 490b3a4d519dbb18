//! The house rules of `docs/architecture.md`, checked: every module of `src/` sits in a layer
//! and may import (`crate::…`) only modules of lower layers, so there is no import cycle and
//! no room reaches back up the event's journey (a source never imports the dispatcher, the
//! store never imports a handler). Modules of one layer do not import each other.

use std::collections::BTreeMap;
use std::path::Path;

/// Lowest first. Keep in step with the table in docs/architecture.md.
const LAYERS: &[(&str, &[&str])] = &[
    ("secrets", &["secret"]),
    ("how settings are written", &["setting"]),
    (
        "foundations",
        &["time", "crypto", "event", "template", "batch", "forwarded"],
    ),
    (
        "the inbox and the client",
        &["store", "dingtalk", "telemetry"],
    ),
    ("observability and HTTP", &["metrics", "http"]),
    (
        "the extension API, the routes and the actions",
        &["handler", "routes", "actions"],
    ),
    (
        "the rooms",
        &[
            "sources",
            "dispatch",
            "builtin",
            "ops",
            "server",
            "api",
            "retention",
        ],
    ),
    ("composition", &["config"]),
    ("wiring", &["app"]),
    ("the command line", &["cli"]),
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS
        .iter()
        .position(|(_, modules)| modules.contains(&module))
}

/// `src/builtin/todo.rs` → `builtin`; `src/lib.rs` and `src/main.rs` → `None`.
fn top_module(src: &Path, file: &Path) -> Option<String> {
    let relative = file.strip_prefix(src).ok()?;
    let first = relative.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (name != "lib" && name != "main").then(|| name.to_owned())
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level modules `text` names as `crate::name`, outside comments.
fn imports(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            if rest.starts_with('{') {
                panic!("grouped `crate::{{…}}` imports hide what a module uses: {line}");
            }
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() && name.chars().next().is_some_and(|c| c.is_ascii_lowercase()) {
                found.push(name);
            }
        }
    }
    found
}

#[test]
fn every_module_imports_only_from_lower_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut broken: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut seen = 0;
    for file in &files {
        let Some(module) = top_module(&src, file) else {
            continue;
        };
        let Some(own) = layer_of(&module) else {
            panic!("src module {module} is in no layer: add it to LAYERS and docs/architecture.md");
        };
        let text = std::fs::read_to_string(file).expect("read");
        for imported in imports(&text) {
            seen += 1;
            if imported == module {
                continue;
            }
            let Some(theirs) = layer_of(&imported) else {
                panic!(
                    "{} imports crate::{imported}, which is in no layer",
                    file.display()
                );
            };
            if theirs >= own {
                broken
                    .entry(format!("{} ({})", file.display(), LAYERS[own].0))
                    .or_default()
                    .push(format!("{imported} ({})", LAYERS[theirs].0));
            }
        }
    }
    assert!(seen > 50, "found only {seen} imports: is the scan broken?");
    assert!(
        broken.is_empty(),
        "imports of a module's own or a higher layer:\n{broken:#?}"
    );
}

#[test]
fn the_scan_sees_what_it_must() {
    assert_eq!(
        imports("use crate::store::Store; // crate::dispatch\nlet x = crate::time::now_millis();"),
        ["store", "time"]
    );
    assert!(layer_of("dispatch") > layer_of("store"));
    assert_eq!(layer_of("sources"), layer_of("dispatch"));
}
