//! How one clause is read: which work type it is (the keyword that decides it) and how much of
//! the clause that reading explains, as a score in [0, 1] (see [`Catalog::decompose`] for the
//! rules this implements).

use super::{LowerClause, Word};
use crate::understanding::catalog::{Catalog, WorkTypeSpec};

/// Lost when the clause's head is a word the work type does not know ("Migrate the backups").
pub(super) const UNKNOWN_HEAD: f64 = 0.3;
/// Lost, times the share of the clause's words (other than function words) that nothing
/// explains, when the keyword is not the clause's head.
pub(super) const UNEXPLAINED: f64 = 0.3;
/// Lost when a keyword of another work type is in the clause and the work type's keyword is not
/// the clause's head ("check the backup dashboard").
pub(super) const RIVAL: f64 = 0.15;
/// Lost when a keyword of another work type is in the object of the clause's head keyword:
/// most often a modifier ("write a *backup* script"), sometimes the real work ("set up nightly
/// *backups*" read by "set up" alone).
pub(super) const RIVAL_IN_OBJECT: f64 = 0.1;
/// Lost when a preposition comes between the clause's head and the keyword: the keyword names a
/// circumstance, not the work ("Jellyfin won't start *after the upgrade*").
pub(super) const CIRCUMSTANCE: f64 = 0.2;
/// Lost when only a weak keyword decides, and the clause names no entity the catalog knows.
pub(super) const WEAK: f64 = 0.2;

/// The keyword that decided a clause's work type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Match {
    /// Index into the catalog.
    pub work_type: usize,
    /// Index of the keyword's first word in the clause.
    pub word: usize,
    /// Whether a weak keyword decided: no keyword of any work type is in the clause.
    pub weak: bool,
}

/// Words that open a phrase about a place, a time or a cause.
const PREPOSITIONS: &[&str] = &[
    "after", "since", "from", "for", "of", "with", "before", "during", "about", "in", "on", "at", "to", "by",
    "without", "because", "like", "than", "behind", "through",
];

/// Words that open a request without saying what it is about: politeness, the asker, wishes.
const LEAD_IN: &[&str] = &[
    "please", "pls", "kindly", "can", "could", "would", "will", "you", "i", "i'd", "i'm", "we", "we'd",
    "need", "needs", "want", "wanna", "like", "love", "to", "let's", "lets", "let", "us", "me", "help",
    "just", "go", "ahead", "hey", "hi", "so", "also", "now", "first", "finally", "next", "how", "do", "does",
    "is", "it", "possible", "there", "a", "way", "should", "must", "ok", "okay", "quickly",
];

/// Words that carry no work of their own: function words, generic verbs, times and schedules.
/// They are explained whatever the work type.
const FUNCTION_WORDS: &[&str] = &[
    // Determiners, pronouns, prepositions, auxiliaries.
    "a",
    "an",
    "the",
    "my",
    "our",
    "your",
    "their",
    "its",
    "his",
    "her",
    "this",
    "that",
    "these",
    "those",
    "it",
    "it's",
    "they",
    "them",
    "i",
    "me",
    "we",
    "us",
    "you",
    "he",
    "she",
    "what",
    "which",
    "who",
    "whose",
    "where",
    "when",
    "how",
    "is",
    "are",
    "was",
    "were",
    "be",
    "been",
    "am",
    "do",
    "does",
    "did",
    "has",
    "have",
    "had",
    "can",
    "could",
    "would",
    "will",
    "should",
    "shall",
    "may",
    "might",
    "must",
    "to",
    "of",
    "on",
    "in",
    "into",
    "onto",
    "at",
    "for",
    "from",
    "with",
    "without",
    "by",
    "over",
    "under",
    "so",
    "as",
    "if",
    "or",
    "nor",
    "but",
    "not",
    "no",
    "all",
    "every",
    "each",
    "some",
    "any",
    "more",
    "most",
    "less",
    "other",
    "another",
    "same",
    "new",
    "old",
    "there",
    "here",
    "up",
    "down",
    "out",
    "off",
    "about",
    "via",
    "through",
    "again",
    "too",
    "very",
    "also",
    "just",
    "only",
    "still",
    "please",
    "pls",
    "kindly",
    "thanks",
    "thank",
    "hey",
    "hi",
    "ok",
    "okay",
    "now",
    "then",
    "first",
    "next",
    "finally",
    "once",
    "right",
    "away",
    "i'd",
    "i'm",
    "we'd",
    "let's",
    "lets",
    "let",
    "need",
    "needs",
    "want",
    "wanna",
    "like",
    "love",
    "help",
    "go",
    "ahead",
    "way",
    "possible",
    "sure",
    "quickly",
    "properly",
    "correctly",
    "automatically",
    "whole",
    "entire",
    "both",
    "really",
    "super",
    "pretty",
    "extremely",
    "keeps",
    "kept",
    "keeping",
    "work",
    "works",
    "working",
    "remotely",
    "locally",
    "everything",
    // Generic verbs: they say that something is done, not what.
    "set",
    "add",
    "create",
    "make",
    "build",
    "configure",
    "enable",
    "disable",
    "get",
    "put",
    "change",
    "check",
    "fix",
    "open",
    "close",
    "allow",
    "point",
    "use",
    "start",
    "stop",
    "turn",
    "send",
    "show",
    "give",
    "keep",
    "take",
    "do",
    "run",
    "have",
    "schedule",
    "automate",
    "ensure",
    "sort",
    "handle",
    "look",
    "see",
    "tell",
    "find",
    "figure",
    "try",
    "move",
    "switch",
    "expose",
    // Things of any homelab: they say what the work is on, not which work it is.
    "server",
    "servers",
    "machine",
    "box",
    "node",
    "nodes",
    "container",
    "containers",
    "vm",
    "vms",
    "service",
    "services",
    "instance",
    "app",
    "apps",
    "data",
    "database",
    "db",
    "config",
    "configuration",
    "settings",
    "files",
    "folder",
    "directory",
    "volume",
    "volumes",
    "disk",
    "disks",
    "drive",
    "storage",
    "memory",
    "ram",
    "cpu",
    "usage",
    "logs",
    "network",
    "lan",
    "interface",
    "user",
    "users",
    "stack",
    "cluster",
    "site",
    "website",
    // Times and schedules.
    "nightly",
    "daily",
    "weekly",
    "monthly",
    "hourly",
    "yearly",
    "night",
    "day",
    "week",
    "month",
    "hour",
    "minute",
    "minutes",
    "hours",
    "days",
    "weeks",
    "morning",
    "evening",
    "today",
    "tonight",
    "tomorrow",
    "always",
    "sometimes",
    "lately",
    "recently",
    "since",
    "until",
    "before",
    "after",
    "while",
    "during",
    "regularly",
    "last",
    "yesterday",
    "whenever",
];

impl Catalog {
    /// The work type of a clause: the earliest keyword of any work type ("Set up nightly
    /// backups": backup); failing that, the earliest weak keyword ("Set up Gitea": deployment).
    /// Ties go to catalog order.
    pub(super) fn classify(&self, clause: &LowerClause) -> Option<Match> {
        let earliest = |weak: bool| {
            self.work_types()
                .iter()
                .enumerate()
                .filter_map(|(i, spec)| {
                    let keywords = if weak { &spec.weak_keywords } else { &spec.keywords };
                    keywords.iter().filter_map(|k| clause.find(k)).min().map(|pos| (pos, i))
                })
                .min()
                .map(|(pos, work_type)| Match { work_type, word: clause.word_at(pos), weak })
        };
        earliest(false).or_else(|| earliest(true))
    }

    /// How much of a clause the reading `m` explains, in [0, 1]: 1, less the deductions of the
    /// rules in [`Catalog::decompose`].
    pub(super) fn clause_score(
        &self,
        clause: &LowerClause,
        words: &[Word],
        named: &[String],
        m: Match,
    ) -> f64 {
        let spec = &self.work_types()[m.work_type];
        let n = words.len();
        let mut own = vec![false; n];
        for keyword in spec.keywords.iter().chain(&spec.weak_keywords) {
            mark_all(clause, keyword, false, &mut own);
        }
        let mut known = vec![false; n];
        for entity in self.work_types().iter().flat_map(|s| &s.known_entities) {
            mark_all(clause, &entity.to_lowercase(), true, &mut known);
        }
        let mut generic = vec![false; n];
        for weak in self.work_types().iter().flat_map(|s| &s.weak_keywords) {
            mark_all(clause, weak, false, &mut generic);
        }
        let named: Vec<&str> = named.iter().flat_map(|e| e.split(' ')).collect();
        let explained = |i: usize| {
            let w = &words[i];
            own[i]
                || known[i]
                || generic[i]
                || FUNCTION_WORDS.contains(&w.lower.as_str())
                // A sentence's first word is capitalised whatever it is: a name only if known.
                || (i > 0 && named.contains(&w.text))
                || w.text.chars().any(|c| c.is_ascii_digit())
                || w.text.trim_end_matches('.').contains(['.', ':', '/'])
        };
        let head = words.iter().position(|w| !LEAD_IN.contains(&w.lower.as_str())).unwrap_or(0);
        let head = (head..n).find(|&i| !FUNCTION_WORDS.contains(&words[i].lower.as_str())).unwrap_or(head);
        let mut score: f64 = 1.0;
        // A keyword among the lead-in words ("let me know") is the head.
        if m.word > head {
            if !explained(head) {
                score -= UNKNOWN_HEAD;
            }
            let content = (0..n).filter(|&i| !FUNCTION_WORDS.contains(&words[i].lower.as_str()));
            let (content, unexplained) =
                content.fold((0usize, 0usize), |(c, u), i| (c + 1, u + usize::from(!explained(i))));
            score -= UNEXPLAINED * unexplained as f64 / content.max(1) as f64;
            if self.rival_keyword(clause, spec, &own) {
                score -= RIVAL;
            }
            if words[head + 1..m.word].iter().any(|w| PREPOSITIONS.contains(&w.lower.as_str())) {
                score -= CIRCUMSTANCE;
            }
        } else if self.rival_keyword(clause, spec, &own) {
            score -= RIVAL_IN_OBJECT;
        }
        if m.weak && !known.contains(&true) {
            score -= WEAK;
        }
        score.clamp(0.0, 1.0)
    }

    /// Whether a keyword of another work type is in the clause, outside the words of `spec`'s.
    fn rival_keyword(&self, clause: &LowerClause, spec: &WorkTypeSpec, own: &[bool]) -> bool {
        self.work_types().iter().filter(|s| !std::ptr::eq(*s, spec)).flat_map(|s| &s.keywords).any(|k| {
            let mut theirs = vec![false; own.len()];
            mark_all(clause, k, false, &mut theirs);
            theirs.iter().zip(own).any(|(&t, &o)| t && !o)
        })
    }
}

/// Marks the words of every match of `phrase` in the clause (see [`LowerClause::matches`]).
fn mark_all(clause: &LowerClause, phrase: &str, whole: bool, marks: &mut [bool]) {
    for (first, last) in clause.matches(phrase, whole) {
        let last = last.min(marks.len() - 1);
        for mark in &mut marks[first..=last] {
            *mark = true;
        }
    }
}
