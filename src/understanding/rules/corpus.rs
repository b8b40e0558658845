//! Everyday requests read by the rules of the default catalog: how many are understood, and
//! whether the ones misread say so by a low confidence.

use super::DecomposeError;
use crate::understanding::catalog::Catalog;

/// Phrasings with the work types a reader expects of them (see the file's header).
const CORPUS: &str = include_str!("corpus.txt");

/// The least share of the corpus the rules must read as expected (an unread phrasing counts as
/// misread: it goes to a model decomposer, when one is configured).
const UNDERSTOOD_FLOOR: f64 = 0.94;
/// A misread must have a confidence below this.
const MISREAD_BELOW: f64 = 0.8;

fn corpus() -> Vec<(Vec<&'static str>, &'static str)> {
    CORPUS
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|line| {
            let (types, text) = line.split_once('|').unwrap_or_else(|| panic!("no '|' in {line:?}"));
            (types.split(',').map(str::trim).collect(), text.trim())
        })
        .collect()
}

#[test]
fn everyday_requests_are_understood_and_misreads_are_not_confident() {
    let catalog = Catalog::default();
    let corpus = corpus();
    assert!(corpus.len() >= 60, "{} phrasings", corpus.len());
    let mut misread = Vec::new();
    for (expected, text) in &corpus {
        for work_type in expected {
            assert!(catalog.work_types().iter().any(|s| s.name.as_str() == *work_type), "{work_type}?");
        }
        match catalog.decompose(text) {
            Ok(d) => {
                let read: Vec<&str> = d.intents.iter().map(|i| i.work_type.as_str()).collect();
                if &read != expected {
                    misread.push(format!("{text:?}: read as {read:?}, confidence {}", d.confidence));
                    assert!(
                        d.confidence < MISREAD_BELOW,
                        "{text:?} is misread as {read:?} with confidence {}",
                        d.confidence
                    );
                }
            }
            Err(DecomposeError::NoMatch { .. }) => misread.push(format!("{text:?}: no keyword matches")),
            Err(e) => panic!("{text:?}: {e}"),
        }
    }
    let share = 1.0 - misread.len() as f64 / corpus.len() as f64;
    println!("understood {} of {} phrasings: {share:.3}", corpus.len() - misread.len(), corpus.len());
    for m in &misread {
        println!("misread: {m}");
    }
    assert!(share >= UNDERSTOOD_FLOOR, "only {share:.3} of the corpus understood");
}
