//! The layering ARCHITECTURE.md promises, checked on the source: only `broker` speaks AMQP
//! (lapin), only `store` speaks to PostgreSQL, only `llm` and `telemetry` speak HTTP (reqwest,
//! axum), only `telemetry` knows how metrics are kept (prometheus-client) and names
//! OpenTelemetry. A file that reaches past its edge fails here, naming the file and the crate.
//!
//! Each file is read as Rust tokens, so a crate named in a comment or a string (a log filter,
//! say) does not count, and one named inside a macro does.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use proc_macro2::{TokenStream, TokenTree};

/// Each edge crate, and the only places under `src/` that may name it.
const EDGES: &[(&str, &[&str])] = &[
    ("lapin", &["broker.rs", "broker/"]),
    ("tokio_postgres", &["store/"]),
    ("deadpool_postgres", &["store/"]),
    ("postgres_types", &["store/"]),
    ("refinery", &["store/"]),
    ("reqwest", &["llm.rs", "telemetry/"]),
    ("axum", &["telemetry/"]),
    ("prometheus_client", &["telemetry/"]),
    ("opentelemetry", &["telemetry/"]),
    ("opentelemetry_sdk", &["telemetry/"]),
    ("opentelemetry_otlp", &["telemetry/"]),
    ("opentelemetry_http", &["telemetry/"]),
    ("tracing_opentelemetry", &["telemetry/"]),
];

#[test]
fn each_edge_crate_is_named_only_in_its_own_module() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut breaches = Vec::new();
    let files = rust_files(&src);
    assert!(files.len() > 20, "read only {} files under {}", files.len(), src.display());
    for file in files {
        let relative = file.strip_prefix(&src).unwrap().to_string_lossy().replace('\\', "/");
        let text = std::fs::read_to_string(&file).unwrap();
        let tokens = TokenStream::from_str(&text).unwrap_or_else(|e| panic!("{relative}: {e}"));
        let mut named = Vec::new();
        idents(tokens, &mut named);
        for (krate, allowed) in EDGES {
            if named.iter().any(|i| i == krate) && !allowed.iter().any(|a| relative.starts_with(a)) {
                breaches
                    .push(format!("src/{relative} uses {krate}, which belongs to {}", allowed.join(", ")));
            }
        }
    }
    assert!(breaches.is_empty(), "{}", breaches.join("\n"));
}

#[test]
fn the_check_sees_a_crate_in_code_and_in_macros_but_not_in_strings_or_comments() {
    let named = |text: &str| {
        let mut named = Vec::new();
        idents(TokenStream::from_str(text).unwrap(), &mut named);
        named.iter().any(|i| i == "lapin")
    };
    assert!(named("use lapin::Channel;"));
    assert!(named("fn f() { let _ = format!(\"{}\", lapin::VERSION); }"));
    assert!(!named("// lapin::Channel\nconst FILTER: &str = \"lapin::returned_messages=error\";"));
    assert!(!named("/// Talks to lapin.\nfn f() {}"));
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files
}

fn idents(tokens: TokenStream, out: &mut Vec<String>) {
    for token in tokens {
        match token {
            TokenTree::Ident(ident) => out.push(ident.to_string()),
            TokenTree::Group(group) => idents(group.stream(), out),
            TokenTree::Punct(_) | TokenTree::Literal(_) => {}
        }
    }
}
