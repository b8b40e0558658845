//! `schemas`: prints the JSON Schemas of the message types, writes them, or checks that the
//! checked-in ones are current.

use std::path::PathBuf;

use anyhow::Result;
use switchyard::model::wire;

use crate::Exit;

pub fn schemas(write: Option<PathBuf>, check: Option<PathBuf>) -> Result<Exit> {
    let schemas = wire::schemas();
    let render = |schema: &serde_json::Value| serde_json::to_string_pretty(schema).map(|s| s + "\n");
    if let Some(dir) = write {
        std::fs::create_dir_all(&dir)?;
        for (name, schema) in &schemas {
            std::fs::write(dir.join(name), render(schema)?)?;
        }
        println!("wrote {} schemas to {}", schemas.len(), dir.display());
    } else if let Some(dir) = check {
        let mut stale = Vec::new();
        for (name, schema) in &schemas {
            let current = std::fs::read_to_string(dir.join(name)).unwrap_or_default();
            if current != render(schema)? {
                stale.push(*name);
            }
        }
        if !stale.is_empty() {
            println!(
                "out of date: {} (run `switchyard schemas --write {}`)",
                stale.join(", "),
                dir.display()
            );
            return Ok(Exit::No);
        }
        println!("{} schemas are current", schemas.len());
    } else {
        let all: serde_json::Map<String, serde_json::Value> =
            schemas.into_iter().map(|(n, s)| (n.to_owned(), s)).collect();
        println!("{}", serde_json::to_string_pretty(&all)?);
    }
    Ok(Exit::Success)
}
